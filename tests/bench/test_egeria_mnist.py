"""Real task (issue: Egeria): ResNet-20 from scratch on MNIST-10k (fixed 8k/2k split),
egeria against the unfrozen baseline with the same seed, data order and epochs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("egeria_mnist", ROOT / "benchmarks" / "egeria_mnist.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["egeria_mnist"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_egeria_on_mnist_freezes_a_growing_prefix_at_equal_accuracy(shared_data, tmp_path):
    mod = _script()
    assert mod.main(["--data", str(shared_data / "mnist10k"), "--out", str(tmp_path), "--epochs", "8"]) == 0
    rec = json.loads((tmp_path / "results.json").read_text())
    base, eg = rec["baseline"], rec["egeria"]
    ks = [k for _, k in eg["frozen"]]
    assert len(ks) >= 2 and ks == sorted(ks) and ks[-1] >= 2, eg["frozen"]  # a growing prefix
    assert abs(eg["final_accuracy"] - base["final_accuracy"]) <= 0.5, (eg["final_accuracy"], base["final_accuracy"])
    assert base["final_accuracy"] > 97.0  # the baseline itself learned the task
    assert eg["wall_seconds"] < base["wall_seconds"], (eg["wall_seconds"], base["wall_seconds"])
    assert all("Egeria" in e["reason"] for e in eg["events"] if e["action"] == "freeze")
    assert any(r.get("plasticity") for r in eg["timeline"])  # the timeline is written out
