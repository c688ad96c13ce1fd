"""Real task: ResNet-20 from scratch on MNIST-10k (fixed 8k/2k split); the default policy
(egeria) and smartfrz each against the unfrozen baseline with the same seed, data order,
schedule and epochs (one run of ``benchmarks/egeria_mnist.py``, 3 epochs (186 steps) to keep
the suite short; the 8-epoch figures are in ``docs/benchmarks.md``). No timing is asserted:
speed is measured by ``fxfreeze bench`` and recorded in ``docs/benchmarks.md`` (AutoFreeze's
real-task figures are there too; its rule is tested in ``tests/runtime/test_autofreeze.py``)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ("egeria", "smartfrz")
pytestmark = pytest.mark.xdist_group("egeria-mnist")  # one worker runs the shared 3-epoch run
REASON = {"egeria": "Egeria", "autofreeze": "AutoFreeze", "smartfrz": "SmartFRZ"}


def _script():
    spec = importlib.util.spec_from_file_location("egeria_mnist", ROOT / "benchmarks" / "egeria_mnist.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["egeria_mnist"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    path = (ROOT / ".." / "shared" / "data" / "mnist10k").resolve()
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} is absent")
    out = tmp_path_factory.mktemp("mnist-real-task")
    assert _script().main(["--data", str(path), "--out", str(out), "--epochs", "3", "--policies", ",".join(POLICIES)]) == 0
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("policy", POLICIES)
def test_policy_freezes_a_growing_prefix_within_half_a_point(record, policy):
    base, run = record["baseline"], record[policy]
    assert base["final_accuracy"] > 97.0  # the baseline itself learned the task
    ks = [k for _, k in run["frozen"]]
    assert ks and ks == sorted(ks) and ks[-1] >= 2, run["frozen"]  # a prefix that only grows, 2+ blocks
    if policy == "egeria":
        assert len(ks) >= 2  # one block per evaluation: it grows in steps
    assert abs(run["final_accuracy"] - base["final_accuracy"]) <= 0.5, (run["final_accuracy"], base["final_accuracy"])
    assert all(REASON[policy] in e["reason"] for e in run["events"] if e["action"] == "freeze")
    assert run["timeline"]  # the policy's own record is written out
    if policy == "egeria":
        assert any(r.get("plasticity") for r in run["timeline"])
