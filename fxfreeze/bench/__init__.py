"""Measuring training runs: the loop shared by ``fxfreeze bench``, the benchmarks and the
real-task tests (plain PyTorch and compiled runs go through the same code)."""

from .runner import RunResult, train_run

__all__ = ["RunResult", "train_run"]
