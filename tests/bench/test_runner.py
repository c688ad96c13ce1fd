"""``train_run`` on a tiny synthetic task: the record a comparison is built from, without
needing the shared data."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fxfreeze.bench.runner import train_run


def _task():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] > 0).long()

    def batches(epoch: int):
        order = torch.randperm(256, generator=torch.Generator().manual_seed(epoch))
        for i in range(0, 256, 32):
            idx = order[i : i + 32]
            yield x[idx], y[idx], idx

    def model() -> nn.Module:
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))

    return model, batches, (lambda: iter([(x, y)]))


def test_evaluations_inside_epochs_are_off_the_clock_and_resolve_tta():
    model, batches, test = _task()
    r = train_run("plain", model, batches, test, epochs=2, steps_per_epoch=8, evals_per_epoch=4,
                  make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    assert [e["epoch"] for e in r.epochs] == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]
    assert [e["step"] for e in r.epochs] == [2, 4, 6, 8, 10, 12, 14, 16]
    walls = [e["wall"] for e in r.epochs]
    assert walls == sorted(walls) and walls[-1] == pytest.approx(r.wall_seconds)
    assert r.final_accuracy == r.epochs[-1]["accuracy"]
    first = next(e for e in r.epochs if e["accuracy"] >= r.final_accuracy)
    assert r.time_to_accuracy(r.final_accuracy) == first["wall"]
    assert r.step_to_accuracy(r.final_accuracy) == first["step"]
    assert r.time_to_accuracy(101.0) is None and r.step_to_accuracy(101.0) is None
    with pytest.raises(ValueError, match="steps_per_epoch"):
        train_run("x", model, batches, test, epochs=1, evals_per_epoch=2,
                  make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.1))


def test_same_seed_same_run_and_a_policy_run_records_freezes():
    model, batches, test = _task()
    kw = dict(epochs=2, steps_per_epoch=8, make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    a = train_run("a", model, batches, test, **kw)
    b = train_run("b", model, batches, test, **kw)
    assert a.losses == b.losses and a.final_accuracy == b.final_accuracy
    m = train_run("manual", model, batches, test, policy="manual", config={"manual": {"schedule": {4: 1}}},
                  example_inputs=(torch.randn(2, 8),), **kw)
    assert m.frozen == [(4, 1)] and m.num_blocks >= 1 and 0 < m.backward_flops_skipped < 1


def test_summary_compares_every_run_with_the_control_of_its_seed():
    """The captured graph's own speed is not the freezing's: each run's time to accuracy and
    total time are also given over the compiled control of the same seed."""
    from fxfreeze.bench.runner import RunResult
    from fxfreeze.bench.suite import _summarise, markdown
    from fxfreeze.bench.workloads import Workload

    def run(name, seed, curve, wall):
        r = RunResult(name=name, policy=None if name == "baseline" else name)
        r.epochs = [{"epoch": i + 1.0, "wall": w, "accuracy": a, "step": 10 * (i + 1), "num_frozen": 0}
                    for i, (a, w) in enumerate(curve)]
        r.final_accuracy, r.wall_seconds, r.extra["seed"] = curve[-1][0], wall, seed
        return r

    runs = {
        "baseline": run("baseline", 0, [(80.0, 10.0), (90.0, 20.0), (90.0, 30.0)], 30.0),
        "compiled": run("compiled", 0, [(80.0, 8.0), (90.0, 16.0), (90.0, 24.0)], 24.0),
        "egeria": run("egeria", 0, [(89.8, 6.0), (90.0, 12.0), (90.0, 12.0)], 12.0),
        "baseline (seed 1)": run("baseline", 1, [(90.0, 10.0), (90.0, 20.0)], 20.0),
        "egeria (seed 1)": run("egeria", 1, [(90.0, 5.0), (90.0, 10.0)], 10.0),
    }
    w = Workload("w", lambda: None, lambda e: iter(()), lambda: iter(()), None, lambda m: None, 1, description="d")
    rows = _summarise(w, runs)["runs"]
    assert rows["egeria"]["tta_speedup"] == pytest.approx(20.0 / 6.0)  # 89.8 >= 90 - 0.3 at 6 s
    assert rows["egeria"]["tta_vs_control"] == pytest.approx(16.0 / 6.0)
    assert rows["egeria"]["total_vs_control"] == pytest.approx(2.0)
    assert rows["compiled"]["tta_vs_control"] == pytest.approx(1.0)
    assert rows["egeria (seed 1)"]["tta_vs_control"] is None  # no control ran with seed 1
    md = markdown({"machine": {"processor": "x", "threads": 2, "torch": "t"}, "epochs": 3, "seed": 0, "quick": False,
                   "workloads": {"w": {"description": "d", "target_accuracy": 89.7, "runs": rows}}})
    # egeria reached the target at its first measurement (step 10), the baseline at its second
    assert rows["egeria"]["tta_step"] == 10 and rows["baseline"]["tta_step"] == 20
    assert "over the control: TTA, total" in md and "| egeria | 90.00% | +0.00 | 6.0 | 10 | 3.33x | 2.67x, 2.00x |" in md


def test_a_run_on_a_device_moves_batches_there_and_reads_the_losses_once():
    """``train_run(device=...)``: the model and every batch go to the device (tensors, tuples
    and dicts), the clock waits for the device, and the recorded losses (kept on the device
    while training) equal a run that read each at once. On the CPU here; on CUDA in the GPU
    pass (benchmarks/gpu_checks.sh)."""
    from fxfreeze.bench.runner import to_device

    t = torch.ones(2)
    moved = to_device({"a": (t, [t]), "b": 3}, torch.device("cpu"))
    assert moved["a"][0] is t and moved["a"][1][0] is t and moved["b"] == 3  # already there: no copy
    assert isinstance(moved["a"], tuple) and isinstance(moved["a"][1], list)
    model, batches, test = _task()
    kw = dict(epochs=2, steps_per_epoch=8, make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.1), loss_every=3)
    a = train_run("cpu", model, batches, test, device="cpu", **kw)
    b = train_run("default", model, batches, test, **kw)
    assert [s for s, _ in a.losses] == [3, 6, 9, 12, 15] and all(isinstance(v, float) for _, v in a.losses)
    assert a.losses == b.losses and a.final_accuracy == b.final_accuracy
    with pytest.raises(RuntimeError):
        train_run("bad", model, batches, test, device="gpu7", **kw)


def test_bench_refuses_a_device_it_cannot_use(tmp_path, capsys):
    from fxfreeze.cli import main

    assert main(["bench", "--mnist", str(tmp_path), "--device", "gpu7", "-o", str(tmp_path / "o")]) == 2
    assert "not a device torch knows" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "--mnist", str(tmp_path), "--device", "cuda", "-o", str(tmp_path / "o")]) == 2
        assert "no CUDA device is visible" in capsys.readouterr().err


def _dropout_task():
    model, batches, test = _task()

    def with_dropout() -> nn.Module:
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))

    return with_dropout, batches, test


def test_runs_in_turns_equal_the_same_runs_one_after_another():
    """``run_interleaved``: each run pauses every ``switch_every`` steps with its clock
    stopped, and keeps its own random stream (dropout here) while the others train: the
    records are those of the runs trained alone."""
    from fxfreeze.bench.runner import run_interleaved, train_steps

    model, batches, test = _dropout_task()
    kw = dict(epochs=2, steps_per_epoch=8, evals_per_epoch=2,
              make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    alone = {s: train_run(f"s{s}", model, batches, test, seed=s, **kw) for s in (0, 1)}
    gens = {f"s{s}": train_steps(f"s{s}", model, batches, test, seed=s, switch_every=3, **kw) for s in (1, 0)}
    pauses = {label: [] for label in gens}
    order = []

    def paused(label, step):
        pauses[label].append(step)
        order.append(label)

    together = run_interleaved(gens, on_pause=paused)
    assert list(together) == ["s1", "s0"]  # in the order given
    for s in (0, 1):
        a, b = alone[s], together[f"s{s}"]
        assert a.losses == b.losses and a.final_accuracy == b.final_accuracy
        assert [e["accuracy"] for e in a.epochs] == [e["accuracy"] for e in b.epochs]
        assert [e["step"] for e in a.epochs] == [e["step"] for e in b.epochs]
        assert b.wall_seconds > 0
    assert pauses["s0"] == [3, 6, 9, 12, 15] and pauses["s1"] == [3, 6, 9, 12, 15]
    assert order[:4] == ["s1", "s0", "s1", "s0"]  # in turns


def test_a_run_pauses_only_when_its_reference_worker_is_idle(monkeypatch):
    """Egeria's reference jobs run beside training; a run in turns pauses only once its
    worker has nothing queued, so that the worker never takes the cores while another run
    is on the clock."""
    import fxfreeze
    from fxfreeze import zoo
    from fxfreeze.bench.runner import train_steps

    made = []
    real = fxfreeze.compile
    monkeypatch.setattr(fxfreeze, "compile", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 1, 16, 16, generator=g), torch.randint(0, 10, (128,), generator=g)

    def batches(epoch):
        for i in range(0, 128, 32):
            yield x[i : i + 32], y[i : i + 32]

    gen = train_steps("egeria", lambda: zoo.resnet_cifar(depth=8, width=8, in_channels=1), batches,
                      lambda: iter([(x[:32], y[:32])]), epochs=20, steps_per_epoch=4, policy="egeria",
                      config={"egeria": {"eval_interval": 2, "asynchronous": True, "overhead_budget": 0,
                                         "probe_size": 16, "freeze": False}},
                      example_inputs=(x[:2],), switch_every=1,
                      make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.05))
    pauses = []
    while True:
        try:
            pauses.append(next(gen))
        except StopIteration as stop:
            res = stop.value
            break
        worker = made[0].freezer.policy.worker
        assert worker is not None and worker.pending == 0, f"paused at step {pauses[-1]} with a reference job queued"
    assert res.steps == 80 and res.extra["worker_seconds"] > 0  # the worker did run its jobs meanwhile
    assert 0 < res.extra["worker_cpu_seconds"] <= res.extra["worker_seconds"] + 0.01  # its core time, within its wall time
    assert pauses and pauses == sorted(set(pauses))
