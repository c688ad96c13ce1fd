"""`fxfreeze bench --quick`: the smoke run finishes and writes a complete, sane report
(speed is not asserted). It runs the baseline, the cached default and a schedule; egeria
and smartfrz train on the real task in ``test_egeria_mnist.py``, and every run (the
compiled control included) is in the recorded benchmarks."""

from __future__ import annotations

import json
import math

import pytest

from fxfreeze.cli import main

RUNS = ["baseline", "egeria+cache", "manual", "cache-every2"]


@pytest.mark.slow
def test_bench_quick_writes_a_complete_report(shared_data, tmp_path, capsys):
    rc = main(["bench", "--quick", "--mnist", str(shared_data / "mnist10k"), "--evals-per-epoch", "2",
               "--policies", ",".join(RUNS[1:-1]), "--set", "egeria.eval_interval=4",
               "--variant", "cache-every2=egeria+cache egeria.eval_interval=2", "--default-seeds", "2",
               "-o", str(tmp_path)])
    assert rc == 0
    rep = json.loads((tmp_path / "results.json").read_text())
    assert rep["quick"] is True and rep["machine"]["threads"] >= 1 and rep["warmup"] is True
    assert rep["interleave"] == 25  # the runs trained in turns (the default)
    (wl,) = rep["workloads"].values()
    # a second seed for the baseline and the variant (the default, egeria, is not among the runs)
    assert list(wl["runs"]) == RUNS + ["baseline (seed 1)", "cache-every2 (seed 1)"]
    assert wl["runs"]["cache-every2 (seed 1)"]["seed"] == 1
    for name, r in wl["runs"].items():
        assert 10.0 < r["final_accuracy"] <= 100.0, name
        assert r["wall_seconds"] > 0 and math.isfinite(r["wall_seconds"])
        assert 0.0 <= r["backward_flops_skipped"] <= 1.0
        assert [e["epoch"] for e in r["epochs"]] == [0.5, 1.0, 1.5, 2.0] and r["losses"]  # 2 epochs, 2 evaluations each
        walls = [e["wall"] for e in r["epochs"]]
        assert walls == sorted(walls) and walls[-1] == pytest.approx(r["wall_seconds"])
        assert r["tta_seconds"] is None or r["tta_seconds"] <= r["wall_seconds"] + 1e-9
        # the step of the measurement that reached the target, with its time
        assert (r["tta_step"] is None) == (r["tta_seconds"] is None)
        assert r["tta_step"] is None or {"step": r["tta_step"], "wall": r["tta_seconds"]}.items() <= next(
            e for e in r["epochs"] if e["step"] == r["tta_step"]).items()
        assert 0 < r["wall_after_first_epoch"] < r["wall_seconds"]  # the time without the first epoch
    assert wl["runs"]["baseline"]["backward_flops_skipped"] == 0.0
    assert wl["runs"]["baseline"]["tta_speedup"] == pytest.approx(1.0)
    assert wl["runs"]["manual"]["final_num_frozen"] > 0  # its schedule freezes half at mid-run
    # the override reached the egeria run (its short-run settings evaluate every 10 steps)
    assert rep["overrides"] == {"egeria": {"eval_interval": 4}}
    assert [e["step"] for e in wl["runs"]["egeria+cache"]["timeline"][:2]] == [4, 8]
    # its policy cost: the training thread's seconds and the worker's CPU seconds, not its busy wall time
    eg = wl["runs"]["egeria+cache"]
    assert 0 < eg["worker_cpu_seconds"] <= eg["worker_busy_seconds"] + 0.01
    assert eg["controller_seconds"] == pytest.approx(eg["policy_main_seconds"] + eg["worker_cpu_seconds"])
    # the variant ran after the policies with its own key over the override, and the cache on
    assert rep["variants"] == {"cache-every2": {"policy": "egeria+cache", "overrides": {"egeria": {"eval_interval": 2}}}}
    assert [e["step"] for e in wl["runs"]["cache-every2"]["timeline"][:2]] == [2, 4]
    assert "variant cache-every2: egeria+cache with" in (tmp_path / "results.md").read_text()
    md = (tmp_path / "results.md").read_text()
    assert all(f"| {name} |" in md for name in RUNS) and "without 1st epoch" in md and "warmed up" in md
    assert "| TTA step |" in md
    assert "not the defaults" in md and "in turns of 25 steps" in md
    assert "results.json" in capsys.readouterr().out


def test_bench_rejects_bad_arguments(tmp_path, capsys):
    assert main(["bench", "-o", str(tmp_path / "o")]) == 2  # no default data path: the user's data
    assert "needs data" in capsys.readouterr().err
    assert main(["bench", "--mnist", str(tmp_path / "missing"), "-o", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["bench", "--policies", "egeria,warp", "--mnist", str(tmp_path), "-o", str(tmp_path / "o")]) == 2
    assert "unknown policy 'warp'" in capsys.readouterr().err
    assert main(["bench", "--evals-per-epoch", "0", "--mnist", str(tmp_path), "-o", str(tmp_path / "o")]) == 2
    assert "--evals-per-epoch must be positive" in capsys.readouterr().err
    assert main(["bench", "--interleave", "-1", "--mnist", str(tmp_path), "-o", str(tmp_path / "o")]) == 2
    assert "--interleave must be 0" in capsys.readouterr().err
    for bad, says in (("x", "expected 'NAME=POLICY"), ("=egeria", "expected 'NAME=POLICY"), ("v=egeria 'a", "quotation"),
                      ("v=egeria egeria", "expected KEY=VALUE"), ("v=warp", "'warp' is not a bench policy"),
                      ("v=baseline", "'baseline' is not a bench policy"), ("egeria=egeria", "a name of its own"),
                      ("v=egeria egeria.thresold=1", "variant 'v': unknown key 'thresold'"),
                      ("v=manual manual.schedule={90: 1}", "must be quoted inside the variant"),
                      ("v=manual 'manual.schedule={90: 1}'", None), ("v=egeria egeria.threshold=2", None)):
        rc = main(["bench", "--variant", bad, "--mnist", str(tmp_path / "missing"), "-o", str(tmp_path / "o")])
        assert rc == 2
        err = capsys.readouterr().err
        assert (says or "does not exist") in err, (bad, err)  # a good --variant gets as far as the data path
    rc = main(["bench", "--variant", "v=egeria", "--variant", "v=smartfrz", "--mnist", str(tmp_path), "-o", str(tmp_path / "o")])
    assert rc == 2 and "was given before" in capsys.readouterr().err
    for bad, says in (("egeria.thresold=1", "thresold"), ("egeria", "expected KEY=VALUE"), ("egeria=1", "egeria"),
                      ("egeria.threshold=[1", "not valid YAML"), ("total_steps=1", None)):
        rc = main(["bench", "--set", bad, "--mnist", str(tmp_path / "missing"), "-o", str(tmp_path / "o")])
        assert rc == 2
        err = capsys.readouterr().err
        assert (says or "does not exist") in err, (bad, err)  # a good --set gets as far as the data path


def test_a_variant_of_the_manual_run_has_its_own_schedule_and_the_plan():
    """A variant's ``manual.schedule`` replaces the base run's (mid-run half) instead of
    adding to it, and a manual variant gets the plan's ``max_frozen`` even without the
    ``manual`` run: before, ``--variant "early=manual 'manual.schedule={90: 1}'"`` also
    unfroze everything at mid-run ({448: 0})."""
    from fxfreeze.bench.suite import POLICIES, _needs_plan, merge_config

    base = POLICIES["manual"].config(None, 897, 6)
    assert base == {"manual": {"schedule": {448: 3}}}
    assert merge_config(base, {"manual": {"schedule": {90: 1, 180: 3}}}) == {"manual": {"schedule": {90: 1, 180: 3}}}
    assert merge_config({"egeria": {"window": 5}, "total_steps": 9}, {"egeria": {"patience": 3}}) == {
        "egeria": {"window": 5, "patience": 3}, "total_steps": 9}
    assert _needs_plan(["egeria"], {"early": ("manual", {})}) and not _needs_plan(["egeria"], {"v": ("egeria", {})})
