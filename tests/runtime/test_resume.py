"""Checkpoint and resume in a fresh process reproduces an uninterrupted run bitwise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("_resume_worker.py")


def _run(mode: str, folder: Path) -> None:
    subprocess.run([sys.executable, str(WORKER), mode, str(folder)], check=True, timeout=600)


def test_resume_is_bitwise_identical(tmp_path):
    _run("full", tmp_path)
    _run("first", tmp_path)
    _run("second", tmp_path)
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert full["num_frozen"] == resumed["num_frozen"] == 6
    assert [e["num_frozen"] for e in resumed["history"] if e["action"] == "freeze"] == [3, 6]
    for k, v in full["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
