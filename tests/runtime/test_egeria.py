"""Egeria: SP loss, the decision rule on synthetic plasticity, the worker's failure
handling, NaN safety, checkpointing, and the policy end to end on a small model."""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import threading
import time

import pytest
import torch
from torch import nn

import fxfreeze
from fxfreeze import zoo
from fxfreeze.config import FreezeConfig
from fxfreeze.runtime.egeria.plasticity import PlasticityTracker, flat_trend, sp_loss
from fxfreeze.runtime.policies.rules import egeria_rule, lr_step_rule
from fxfreeze.runtime.egeria.worker import ReferenceWorker


# -- SP loss ------------------------------------------------------------------------------------
def test_sp_loss_zero_for_identical_and_scale_invariant():
    a = torch.randn(8, 3, 4, 4)
    assert sp_loss(a, a) == 0.0
    b = torch.randn(8, 3, 4, 4)
    base = sp_loss(a, b)
    assert base > 0
    assert math.isclose(sp_loss(3.7 * a, b), base, rel_tol=1e-6)  # fp32 rounding of the scaled input
    assert math.isclose(sp_loss(a, 0.01 * b), base, rel_tol=1e-6)  # fp32 rounding of the scaled input
    with pytest.raises(ValueError, match="same number of samples"):
        sp_loss(a, b[:4])


def test_sp_loss_hand_computed():
    # A = [[1, 0], [0, 1]]: G = I, rows already unit. B = [[1, 0], [1, 0]]: G = [[1, 1], [1, 1]],
    # rows normalised to 1/sqrt(2). Difference: diagonal 1 - 1/sqrt(2), off-diagonal -1/sqrt(2).
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    r = 1 / math.sqrt(2)
    expected = (2 * (1 - r) ** 2 + 2 * r**2) / 4
    assert math.isclose(sp_loss(a, b), expected, rel_tol=1e-6)  # float32 Gram matrices


# -- the trend statistic ---------------------------------------------------------------------------
def test_sp_loss_of_one_sequence_compares_its_positions_at_most_256_of_them():
    torch.manual_seed(0)
    a, b = torch.randn(40, 8), torch.randn(40, 8)
    assert sp_loss(a[None], b[None]) == pytest.approx(sp_loss(a, b), rel=1e-6)  # a packed probe: rows are positions
    long_a, long_b = torch.randn(1, 1000, 8), torch.randn(1, 1000, 8)
    rows = torch.linspace(0, 999, 256).round().long()
    assert sp_loss(long_a, long_b) == pytest.approx(sp_loss(long_a[0, rows], long_b[0, rows]), rel=1e-6)
    assert sp_loss(torch.randn(1, 8), torch.randn(1, 8)) == 0.0  # one sample without positions: nothing to compare


def test_flat_trend_on_synthetic_series():
    steps = [100, 110, 120, 130, 140]
    ok, t = flat_trend([5.0, 5.05, 4.98, 5.02, 5.0], 0.5, steps, origin=0)
    assert ok and abs(t.elasticity) < 0.05
    # distance growing linearly since the anchor: elasticity 1, however old the anchor
    for origin in (0, -1000):
        ok, t = flat_trend([0.1 * (x - origin) for x in steps], 0.5, steps, origin=origin)
        assert not ok and t.elasticity == pytest.approx(1.0)
    # growing like sqrt(age): elasticity 0.5, not under 0.5
    ok, t = flat_trend([math.sqrt(x) for x in steps], 0.5, steps, origin=0)
    assert not ok and t.elasticity == pytest.approx(0.5, abs=0.01)
    # a drift (distance linear in age: SP loss, quadratic in it, grows like age^2): elasticity 2
    ok, t = flat_trend([(0.1 * x) ** 2 for x in steps], 0.5, steps, origin=0)
    assert not ok and t.elasticity == pytest.approx(2.0, abs=0.05)
    # one-sided: a distance that shrinks back towards the anchor is a converged block
    # fluctuating around it, not learning (the test asks "still moving away?")
    ok, t = flat_trend([5.0, 4.0, 3.2, 2.5, 2.0], 0.5, steps, origin=0)
    assert ok and t.elasticity < -1.0  # two-sided, |elasticity| < 0.5 would not pass
    ok, t = flat_trend([1.0, 3.0, 0.5, 2.8, 0.6], 0.5, steps, origin=0)  # too noisy to tell
    assert not ok and t.noise > 1.0
    assert flat_trend([1.0, float("nan"), 1.0, 1.0, 1.0], 0.5)[0] is False
    assert flat_trend([0.0, 0.0, 0.0], 0.5)[0] is False


def test_flat_trend_judges_the_excess_over_the_anchors_floor():
    """A large quantization floor flattens a block's motion out of the raw series; the
    excess over the floor (the value measured at the anchor itself) shows it."""
    steps, origin = [100, 110, 120, 130, 140], 60
    moving = [100.0 + 0.01 * (x - origin) for x in steps]  # floor 100, motion 0.4 .. 0.8
    ok, t = flat_trend(moving, 0.5, steps, origin=origin)
    assert ok and abs(t.elasticity) < 0.05  # the raw series looks flat
    ok, t = flat_trend(moving, 0.5, steps, origin=origin, floor=100.0)
    assert not ok and t.resolved and t.elasticity == pytest.approx(1.0)
    # motion that has levelled off above the floor: settled, and resolved
    ok, t = flat_trend([100.5, 100.51, 100.49, 100.5, 100.505], 0.5, steps, origin=origin, floor=100.0)
    assert ok and t.resolved and abs(t.elasticity) < 0.1
    # no motion the reference resolves: the excess is within the noise of zero
    ok, t = flat_trend([100.02, 99.97, 100.01, 99.98, 100.015], 0.5, steps, origin=origin, floor=100.0)
    assert ok and not t.resolved
    # below the floor and falling is not motion either; growing out of the noise is
    assert flat_trend([99.9, 99.8, 99.85, 99.7, 99.75], 0.5, steps, origin=origin, floor=100.0)[0]
    ok, t = flat_trend([99.98, 100.0, 100.03, 100.06, 100.08], 0.5, steps, origin=origin, floor=100.0)
    assert not ok and t.resolved
    # rising out of the floor's noise from below it is moving away too, not settled
    assert not flat_trend([99.90, 99.95, 100.0, 100.02, 100.03], 0.5, steps, origin=origin, floor=100.0)[0]


def test_tracker_takes_the_floor_from_the_anchors_own_evaluation():
    tr = PlasticityTracker(window=3, threshold=0.5)
    tr.add(0, 5.0, step=10, origin=10)  # measured at the anchor: the floor
    assert tr.floor[0] == 5.0 and not tr.series.get(0) and tr.normalized(0) is None
    for step, v in ((20, 5.1), (30, 5.2), (40, 5.3)):
        tr.add(0, v, step=step, origin=10)
    t = tr.last_trend[0]
    assert t.resolved and t.elasticity == pytest.approx(1.0, abs=0.05)  # 0.1, 0.2, 0.3 above the floor
    assert tr.flat_count[0] == 0
    tr2 = PlasticityTracker(window=3, threshold=0.5)
    tr2.load_state_dict(tr.state_dict())
    assert tr2.floor == {0: 5.0}
    tr.add(0, 7.0, step=50, origin=50)  # a new anchor: new floor, evidence restarts
    assert tr.floor[0] == 7.0 and not tr.series.get(0)


def test_a_block_that_moved_less_than_the_references_error_is_settled_when_a_floor_ratio_is_set():
    """Measured on MiniLM's embeddings in fine-tuning (docs/egeria.md): their distance from
    the anchor still grows with the learning rate (elasticity about 2) while it stays within
    a small multiple of the int8 reference's own error. With ``floor_ratio`` that counts as
    settled; without it, or once the excess passes the ratio anywhere in the window, not."""
    floor, xs = 2.26e-9, [85, 99, 113, 127, 141]
    vals = [3.15e-9, 3.45e-9, 4.48e-9, 5.32e-9, 5.22e-9]  # excess 0.89 .. 3.06e-9: at most 1.35x the floor
    ok, t = flat_trend(vals, 0.5, xs, origin=15, floor=floor)
    assert not ok and t.elasticity > 1.5 and not t.small
    ok, t = flat_trend(vals, 0.5, xs, origin=15, floor=floor, floor_ratio=1.5)
    assert ok and t.small and t.elasticity > 1.5
    assert not flat_trend(vals, 0.5, xs, origin=15, floor=floor, floor_ratio=1.0)[0]  # 1.35x > 1.0x
    # without a floor (no anchor evaluation seen) the ratio has nothing to judge against
    assert not flat_trend(vals, 0.5, xs, origin=15, floor_ratio=1.5)[0]
    # in the tracker: per block, described in words, kept through a resume
    tr = PlasticityTracker(window=5, threshold=0.5, floor_ratios={0: 1.5})
    for j in (0, 1):
        tr.add(j, floor, step=15, origin=15)
        for x, v in zip(xs, vals):
            tr.add(j, v, step=x, origin=15)
    assert tr.flat_count == {0: 1, 1: 0}
    assert "less than 1.5x the reference's own error" in tr.describe(0)
    tr2 = PlasticityTracker(window=5, threshold=0.5)
    tr2.load_state_dict(tr.state_dict())
    assert tr2.last_trend[0].small and not tr2.last_trend[1].small


def test_the_floor_ratio_applies_to_pretrained_blocks_only_and_is_validated():
    from fxfreeze.runtime.egeria.regime import Regimes

    r = Regimes(3, 1.5, 0.5, pretrained_floor_ratio=1.5)
    r.pretrained = [True, False, True]
    assert r.floor_ratios() == {0: 1.5, 2: 1.5}
    assert Regimes(3, 1.5, 0.5).floor_ratios() == {}
    with pytest.raises(fxfreeze.ConfigError, match="pretrained_floor_ratio"):
        FreezeConfig.from_dict({"egeria": {"pretrained_floor_ratio": -1}})


def test_tracker_counts_consecutive_flat_evaluations_and_resets_on_nan():
    tr = PlasticityTracker(window=5, threshold=0.5)
    for i, v in enumerate([1, 2, 3, 4, 5, 5.1, 5.0, 5.05, 4.95, 5.0]):
        tr.add(0, float(v), step=10 * (i + 1), origin=0)
    assert tr.flat_count[0] >= 2
    t = tr.last_trend[0]
    assert tr.describe(0) == f"elasticity {t.elasticity:+.3f} < 0.5, noise {t.noise:.3f}"  # a decision's reason
    tr.add(0, float("nan"), step=100)
    assert tr.flat_count.get(0, 0) == 0 and 0 not in tr.series
    state = tr.state_dict()
    tr2 = PlasticityTracker(window=5, threshold=0.5)
    tr2.load_state_dict(state)
    assert tr2.series == tr.series


def _drive(series, steps=400, lr_at=None, unfreeze="all", threshold=None, run=1):
    """Egeria's real tracker and decision rules (the functions EgeriaPolicy calls) on
    synthetic plasticity series: ``series[j](e)`` is block j's plasticity at the e-th
    evaluation since its anchor, one evaluation every ``eval_interval`` steps."""
    extra = {} if threshold is None else {"threshold": threshold}
    cfg = FreezeConfig(egeria={"eval_interval": 5, "unfreeze_on_lr_change": unfreeze, **extra}).egeria
    hi = len(series)
    tracker = PlasticityTracker(window=cfg.window, threshold=float(cfg.threshold), noise_limit=float(cfg.noise_limit))
    k, trace, origin, evaluations = 0, [], 0, 0
    for step in range(1, steps + 1):
        if step == lr_at:
            tracker.reset()
            origin, evaluations = step, 0  # fresh anchors: the series restart
            new = lr_step_rule(cfg.unfreeze_on_lr_change, k)
            if new is not None:
                k = new
                trace.append((step, k))
            continue
        if step % cfg.eval_interval or k >= hi:
            continue
        evaluations += 1
        for j in range(k, hi):
            tracker.add(j, series[j](evaluations), step, origin=origin)
        new = egeria_rule(tracker.flat_count, k, hi, int(cfg.patience), run)
        if new is not None:
            k = new
            trace.append((step, k))
    return trace


def _converging(rate):
    return lambda e: 10.0 * (1 - math.exp(-e / rate)) + 0.01


def test_decision_rule_freezes_converging_blocks_in_order():
    trace = _drive({0: _converging(2), 1: _converging(5), 2: _converging(10)})
    ks = [k for _, k in trace]
    assert ks == [1, 2, 3]
    steps = [s for s, _ in trace]
    assert steps == sorted(steps) and len(set(steps)) == 3  # one block per evaluation, in order


def test_blocks_that_settled_behind_the_front_one_freeze_with_it():
    # blocks 1 and 2 level off long before block 0: one at a time, each waits for a window
    # after the one before it; as a run, they freeze with block 0, in one decision
    slow, fast = _converging(6), _converging(1)
    one = _drive({0: slow, 1: fast, 2: fast, 3: lambda e: 0.5 * e * e})
    run = _drive({0: slow, 1: fast, 2: fast, 3: lambda e: 0.5 * e * e}, run=3)
    assert [k for _, k in one] == [1, 2, 3] and len({s for s, _ in one}) == 3
    assert run == [(one[0][0], 3)]  # the same first decision, three blocks at once; block 3 still drifts
    # never further than the run allows, and never over a block that has not settled
    assert _drive({0: slow, 1: fast, 2: fast}, run=2)[0] == (one[0][0], 2)
    assert _drive({0: slow, 1: lambda e: 0.5 * e * e, 2: fast}, run=3)[0] == (one[0][0], 1)


def test_decision_rule_leaves_drifting_and_noisy_blocks_alone():
    rng = random.Random(0)
    # still learning: a steady drift away from the anchor, and the SP loss is quadratic in
    # the distance (elasticity 2)
    drifting = lambda e: 0.5 * e * e  # noqa: E731
    noisy = lambda e: max(0.01, 5.0 + rng.gauss(0, 3.0))  # noqa: E731
    assert _drive({0: drifting, 1: _converging(2)}) == []  # block 1 converges but is behind block 0
    assert _drive({0: noisy, 1: _converging(2)}) == []


def test_diffusion_is_settled_from_scratch_but_not_for_a_pretrained_block():
    """A distance growing like the anchor's age (a random walk under SGD noise: elasticity
    1) passes the from-scratch threshold (1.5) and fails the pretrained one (0.5)."""
    cfg = FreezeConfig().egeria
    diffusing = lambda e: 0.5 * e  # noqa: E731
    assert [k for _, k in _drive({0: diffusing, 1: _converging(2)}, threshold=cfg.threshold)] == [1, 2]
    assert _drive({0: diffusing, 1: _converging(2)}, threshold=cfg.pretrained_threshold) == []


def test_decision_rule_unfreezes_on_a_learning_rate_step():
    series = {0: _converging(2), 1: _converging(3), 2: lambda e: 1.0 + e * e}  # block 2 still drifts
    trace = _drive(series, steps=300, lr_at=200, unfreeze="all")
    assert (200, 0) in trace
    before = [k for s, k in trace if s < 200]
    after = [k for s, k in trace if s > 200]
    assert max(before) == 2 and after and max(after) >= 1  # tracking restarts and refreezes
    trace = _drive(series, steps=300, lr_at=200, unfreeze="last")
    assert (200, 1) in trace


@pytest.mark.parametrize("mode, kept", [(None, 2), ("none", 2), ("last", 1), ("all", 0)])
def test_a_learning_rate_step_keeps_the_frozen_prefix_by_default(mode, kept):
    """The default keeps the prefix through a drop (docs/egeria.md, "Learning-rate steps keep
    the prefix"); the other modes unfreeze the last block or all of them. The whole path:
    the controller detects the step from the optimizer and applies the policy's decision."""
    extra = {"freeze": False} if mode is None else {"freeze": False, "unfreeze_on_lr_change": mode}
    fm, opt, x, y = _setup(extra)
    fm.freeze_prefix(2)
    _train(fm, opt, x, y, 3)
    assert fm.freezer.num_frozen == 2
    for g in opt.param_groups:
        g["lr"] *= 0.1
    _train(fm, opt, x, y, 2)
    assert [e["action"] for e in fm.freezer.history].count("lr_change") == 1
    assert fm.freezer.num_frozen == kept
    fm.freezer.detach()


# -- the worker -----------------------------------------------------------------------------------
def test_worker_runs_jobs_in_order_and_reports_errors():
    w = ReferenceWorker(num_threads=1)
    ids = [w.submit(lambda i=i: i * i, tag=i) for i in range(5)]
    w.submit(lambda: 1 / 0, tag="bad")
    assert w.wait(10)
    res = w.poll()
    assert [r.value for r in res[:5]] == [0, 1, 4, 9, 16] and [r.job_id for r in res[:5]] == ids
    assert res[5].error.startswith("ZeroDivisionError")
    w.close()
    assert w.submit(lambda: 1) is None


def test_worker_counts_the_cpu_its_jobs_use_apart_from_their_wall_time():
    """``cpu_seconds`` is the core time a job took (what it can take from training), apart
    from its wall time, which includes waiting: a sleeping job uses almost no CPU, a job that
    computes uses about its wall time."""
    w = ReferenceWorker(num_threads=1)

    def spin() -> int:
        t, n = time.thread_time(), 0
        while time.thread_time() - t < 0.1:
            n += 1
        return n

    w.submit(lambda: time.sleep(0.2), tag="sleep")
    w.submit(spin, tag="spin")
    assert w.wait(10)
    sleep, busy = w.poll()
    assert sleep.seconds >= 0.2 and sleep.cpu_seconds < 0.05
    assert 0.1 <= busy.cpu_seconds <= busy.seconds + 0.01
    assert w.cpu_seconds == pytest.approx(sleep.cpu_seconds + busy.cpu_seconds)
    assert w.busy_seconds == pytest.approx(sleep.seconds + busy.seconds)
    w.close()


def test_worker_thread_count_is_its_own_and_threads_started_later_keep_the_default():
    """The worker runs its jobs on ``num_threads`` threads; the training thread, and a thread
    that first uses PyTorch after the worker started (a DataLoader's pin-memory thread, say),
    keep the process's count. Before the fix such a thread started with the worker's 1."""
    before = torch.get_num_threads()
    if before < 2:
        torch.set_num_threads(2)  # so that the worker's 1 is distinguishable
    default = torch.get_num_threads()
    try:
        w = ReferenceWorker(num_threads=1)
        w.submit(torch.get_num_threads, tag="threads")
        assert w.wait(10)
        assert w.poll()[0].value == 1
        later: list[int] = []
        t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert later == [default] and torch.get_num_threads() == default
        w.close()
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are a Linux feature")
def test_worker_runs_at_a_lower_priority_than_training():
    here = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    w = ReferenceWorker(num_threads=1, nice=5)
    w.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), tag="nice")
    assert w.wait(10)
    assert w.poll()[0].value == min(19, here + 5)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == here  # training's own is unchanged
    w.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the deliberate kills
def test_worker_that_dies_is_restarted_then_disabled(caplog):
    w = ReferenceWorker(num_threads=1, max_restarts=2)

    def die():
        raise SystemExit  # escapes `except Exception`: the thread ends

    with caplog.at_level(logging.WARNING, logger="fxfreeze"):
        w.submit(die, tag="x")
        time.sleep(0.2)
        assert w.submit(lambda: "alive", tag="y") is not None  # restart 1
        assert w.wait(10)
        res = w.poll()
        assert any(r.error and "died" in r.error for r in res) and any(r.value == "alive" for r in res)
        assert w.restarts == 1
        for _ in range(2):
            w.submit(die)
            time.sleep(0.2)
            w.check()
        assert w.disabled and w.submit(lambda: 1) is None
    assert "restarting" in caplog.text and "giving up" in caplog.text


# -- the policy on a real model ----------------------------------------------------------------------
def _setup(cfg_extra=None, model=None):
    torch.manual_seed(0)
    model = model or zoo.resnet_cifar(depth=8, width=8, in_channels=1)
    x = torch.randn(64, 1, 16, 16)
    y = torch.randint(0, 10, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    cfg = {"egeria": {"eval_interval": 2, "overhead_budget": 0, "asynchronous": False, "probe_size": 16, **(cfg_extra or {})}}
    fm = fxfreeze.compile(model, x[:2], optimizer=opt, config=cfg)
    return fm, opt, x, y


def _train(fm, opt, x, y, steps, poison=None):
    for i in range(steps):
        out = fm(x)
        loss = nn.functional.cross_entropy(out, y)
        if poison is not None and i >= poison:
            loss = loss * float("nan")
        fm.freezer.observe_loss(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_policy_measures_plasticity_and_freezes_a_prefix():
    fm, opt, x, y = _setup({"threshold": 5.0, "patience": 1, "window": 3})  # a loose rule: freezes early
    _train(fm, opt, x, y, 40)
    pol = fm.freezer.policy
    recs = [r for r in pol.timeline if r.get("plasticity")]
    assert recs and all(math.isfinite(v) and v >= 0 for r in recs for v in r["plasticity"].values())
    assert set(pol.backends.values()) == {"int8_static"}
    events = [e for e in fm.freezer.history if e["action"] == "freeze"]
    assert events and [e["num_frozen"] for e in events] == sorted(e["num_frozen"] for e in events)
    assert all("Egeria" in e["reason"] for e in events)
    fm.freezer.detach()


def test_policy_freezes_a_settled_run_in_one_decision_when_asked():
    firsts = {}
    for run in (False, True):
        fm, opt, x, y = _setup({"threshold": 5.0, "patience": 1, "window": 3, "freeze_run": run})
        _train(fm, opt, x, y, 40)
        events = [e for e in fm.freezer.history if e["action"] == "freeze"]
        sizes = [e["num_frozen"] - len(e["blocks"]) for e in events]  # the prefix before each decision
        assert events and sizes == sorted(sizes)
        assert all(len(e["blocks"]) <= (1 + 2 if run else 1) for e in events)  # the front block and its lookahead 2
        firsts[run] = events[0]
        fm.freezer.detach()
    # synchronous and seeded: the same evidence up to the first decision, which the run extends
    assert firsts[True]["step"] == firsts[False]["step"]
    assert len(firsts[True]["blocks"]) > 1 and firsts[True]["reason"].startswith("Egeria: blocks 0-")


def test_observe_only_never_freezes():
    fm, opt, x, y = _setup({"threshold": 5.0, "patience": 1, "window": 3, "freeze": False})
    _train(fm, opt, x, y, 30)
    assert fm.num_frozen == 0 and any(r.get("plasticity") for r in fm.freezer.policy.timeline)
    fm.freezer.detach()


def test_nan_loss_never_freezes_and_never_crashes():
    fm, opt, x, y = _setup({"threshold": 5.0, "patience": 1, "window": 3})
    _train(fm, opt, x, y, 30, poison=0)
    assert fm.num_frozen == 0
    assert any(r.get("skipped") for r in fm.freezer.policy.timeline)
    fm.freezer.detach()


def test_the_probe_is_read_on_the_worker_never_on_the_training_thread(monkeypatch):
    """From an accelerator the probe reaches the host without blocking training: the training
    thread never reads it (not even to check it is finite), the worker does, finds it
    non-finite and skips the evaluation."""
    from fxfreeze.runtime.host_tier import HostFuture
    from fxfreeze.runtime.policies import egeria as eg

    readers = []
    real = eg.to_host_later

    class Spy(HostFuture):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def result(self, timeout=None):
            readers.append(threading.current_thread())
            return self.inner.result(timeout)

    monkeypatch.setattr(eg, "to_host_later", lambda tree, copy=True: Spy(real(tree, copy)))
    fm, opt, x, y = _setup({"threshold": 5.0, "patience": 1, "window": 3, "asynchronous": False})
    readers.clear()  # compile's own warm-up of the copies reads on the training thread, before training
    with torch.no_grad():
        next(fm.parameters()).fill_(float("nan"))
    for _ in range(6):
        fm.freezer.step()
    fm(x)
    for _ in range(6):
        fm.freezer.step()
    assert readers and all(t is not threading.main_thread() for t in readers)
    assert fm.num_frozen == 0
    assert any(r.get("skipped") == "non-finite probe activation" for r in fm.freezer.policy.timeline)
    fm.freezer.detach()


def test_nan_activations_skip_the_evaluation():
    fm, opt, x, y = _setup({"threshold": 5.0, "patience": 1, "window": 3})
    with torch.no_grad():
        next(fm.parameters()).fill_(float("nan"))
    for _ in range(6):
        fm.freezer.step()
    fm(x)  # records the probe batch
    for _ in range(6):
        fm.freezer.step()
    assert fm.num_frozen == 0
    assert any(r.get("skipped") == "non-finite probe activation" for r in fm.freezer.policy.timeline)
    fm.freezer.detach()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_reference_failures_are_reported_and_training_goes_on(caplog, monkeypatch):
    fm, opt, x, y = _setup({"threshold": 5.0, "patience": 1, "window": 3})
    pol = fm.freezer.policy
    calls = {"n": 0}
    real = pol._reference_job

    def flaky(jobs, k):
        calls["n"] += 1
        if calls["n"] == 1:
            raise SystemExit  # kills the worker thread
        if calls["n"] == 2:
            raise RuntimeError("quantized kernel exploded")
        return real(jobs, k)

    monkeypatch.setattr(pol, "_reference_job", flaky)
    with caplog.at_level(logging.WARNING, logger="fxfreeze"):
        _train(fm, opt, x, y, 40)
    assert pol.worker.restarts == 1
    assert "died" in caplog.text and "quantized kernel exploded" in caplog.text
    assert any(r.get("plasticity") for r in pol.timeline)  # later evaluations worked
    fm.freezer.detach()


def test_checkpoint_round_trip():
    fm, opt, x, y = _setup({"threshold": 5.0, "patience": 1, "window": 3})
    _train(fm, opt, x, y, 20)
    state = fm.freezer.state_dict()
    fm2, opt2, _, _ = _setup({"threshold": 5.0, "patience": 1, "window": 3})
    fm2.freezer.load_state_dict(state)
    assert fm2.num_frozen == fm.num_frozen
    assert fm2.freezer.policy.next_eval == fm.freezer.policy.next_eval
    fm.freezer.detach()
    fm2.freezer.detach()


def test_a_block_that_cannot_be_quantized_falls_back_with_a_warning(caplog):
    from fxfreeze.runtime.egeria.backends import ReferenceBackend, backend, register_backend

    class Broken(ReferenceBackend):
        name = "int8_static"

        def convert(self, snap, prepared, example_inputs):
            raise RuntimeError("no kernel for this op")

    original = backend("int8_static")
    register_backend(Broken())
    try:
        fm, opt, x, y = _setup({"threshold": 5.0, "patience": 1, "window": 3})
        with caplog.at_level(logging.WARNING, logger="fxfreeze"):
            _train(fm, opt, x, y, 12)
    finally:
        register_backend(original)
    pol = fm.freezer.policy
    # ResNet blocks have no Linear, so int8 dynamic fails too: fp32 with int8-rounded outputs
    assert pol.backends and set(pol.backends.values()) == {"int8_outputs"}
    assert "falls back to int8_outputs" in caplog.text and "no kernel for this op" in caplog.text
    assert any(r.get("plasticity") for r in pol.timeline)
    fm.freezer.detach()


def test_an_embedding_block_is_measured_at_int8_resolution():
    """The embedding block of a BERT-style model has nothing an int8 backend quantizes; its
    reference rounds its outputs to int8, so at the anchor (age 0) it shows a quantization
    floor like its int8 neighbours instead of an exact zero (docs/egeria.md)."""
    torch.manual_seed(0)
    model = zoo.bert_style()
    x = zoo.example_inputs("bert_style", batch=32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cfg = {"egeria": {"eval_interval": 2, "overhead_budget": 0, "asynchronous": False, "probe_size": 16, "freeze": False}}
    fm = fxfreeze.compile(model, zoo.example_inputs("bert_style"), optimizer=opt, config=cfg)
    assert fm.plan.blocks[0].name == "stem"
    for _ in range(4):
        loss = fm(**x)["last_hidden_state"].pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    pol = fm.freezer.policy
    assert pol.backends[0] == "int8_outputs" and pol.backends[1] == "int8_dynamic"
    first = next(r for r in pol.timeline if r.get("plasticity"))
    floor0, floor1 = first["plasticity"][0], first["plasticity"][1]
    assert floor0 > 0 and 0.01 < floor0 / floor1 < 100
    fm.freezer.detach()


def test_a_pause_between_steps_is_neither_a_step_time_nor_contention(monkeypatch):
    """A validation loop between two steps (here 10 s against 0.1 s steps) must not count
    as a slow step, nor, with the worker busy, as the worker's cost to training."""
    from fxfreeze.runtime.policies import egeria as eg
    from fxfreeze.runtime.policies.base import Signals

    fm, opt, x, y = _setup({"freeze": False})
    pol = fm.freezer.policy
    clock = [100.0]
    monkeypatch.setattr(eg.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(pol, "_decide", lambda s: None)  # timing only

    def step(n, dt, busy=False):
        clock[0] += dt
        pol.schedule.worker_was_busy = busy
        pol.decide(Signals(step=n, epoch=0, loss=1.0, lr=0.1, lr_changed=False, num_frozen=0, max_frozen=3))

    for n in range(1, 12):
        step(n, 0.1)
    sched = pol.schedule
    assert sched.step_seconds == pytest.approx(0.1) and sched.idle_step == pytest.approx(0.1)
    step(12, 10.0, busy=True)  # a pause while the worker was busy
    assert sched.step_seconds == pytest.approx(0.1) and sched.contention == 0.0
    step(13, 0.13, busy=True)  # a real step slowed by the worker: 0.03 s charged
    assert sched.contention == pytest.approx(0.03)
    step(14, 10.0)  # a pause with the worker idle: not an idle step either
    assert sched.idle_step == pytest.approx(0.1)
    fm.freezer.detach()


def test_anchor_building_is_charged_in_instalments_over_a_window():
    """The share of the worker's cost spent building anchors is paid over `window`
    evaluations: the next evaluation is not pushed out by the whole build, and over the
    instalments every second is charged."""

    fm, opt, x, y = _setup({"freeze": False, "overhead_budget": 0.01, "window": 4})
    pol = fm.freezer.policy
    sched = pol.schedule
    sched.charge_cpu = False  # the contention estimate (a worker beside an accelerator)
    sched.interval, sched.step_seconds, sched.idle_step = 1, 0.1, 0.1  # 1% of a 0.1 s step: 1 ms per step

    def schedule(step, contention, share=0.0):
        sched.contention, sched.build_share = contention, share
        sched.plan(step, 0.0)
        return sched.next_eval - step

    # 2.0 s of contention, 80% of it building: 0.4 s now + 1.6 s / 4 = 0.8 s -> 800 steps (not 2,000)
    assert schedule(0, 2.0, 0.8) == pytest.approx(800, abs=1)
    # a resume still owes what is left (1.2 s, in instalments of 0.4 s): it is in the state dict
    fm2, _, _, _ = _setup({"freeze": False, "overhead_budget": 0.01, "window": 4})
    fm2.freezer.policy.load_state_dict(pol.state_dict())
    assert (fm2.freezer.policy.schedule.build_debt, fm2.freezer.policy.schedule.instalment) == pytest.approx((1.2, 0.4))
    fm2.freezer.detach()
    assert [schedule(s, 0.0) for s in (1, 2, 3)] == [pytest.approx(400, abs=1)] * 3  # the other three instalments
    assert schedule(4, 0.0) == 1 and sched.build_debt == pytest.approx(0.0)  # paid off: back to the interval
    # without building, the whole contention is charged before the next evaluation, as before
    assert schedule(5, 2.0) == pytest.approx(2000, abs=1)
    fm.freezer.detach()


def test_on_cores_training_keeps_busy_the_worker_is_charged_its_cpu_seconds():
    """Where the worker shares training's cores, an evaluation is charged at least the CPU
    seconds of the jobs finished since the last one (their build share in instalments), also
    when the noisy contention estimate reads less; the estimate where it reads more; where the
    worker does not share training's cores, the contention as before."""
    from fxfreeze.runtime.policies.egeria_schedule import EvaluationSchedule, shares_cores

    assert shares_cores(True, 2, 1, 2) and not shares_cores(True, 1, 1, 2) and not shares_cores(False, 8, 1, 2)
    sched = EvaluationSchedule(eval_interval=1, overhead_budget=0.01, window=4, evaluations_per_run=0, min_window_steps=1)
    sched.step_seconds, sched.idle_step = 0.1, 0.1  # 1% of a 0.1 s step: 1 ms per step
    sched.charge_cpu = True
    sched.job_done(3.0, 0.0, cpu_seconds=0.2)  # 3 s on the worker's clock, 0.2 s of it on a core
    sched.job_done(1.0, 0.0, cpu_seconds=0.1)
    sched.contention = 0.1  # the estimate reads less than the worker's core time
    sched.plan(0, 0.05)
    assert sched.next_eval == pytest.approx(350, abs=1)  # 0.05 + 0.2 + 0.1 s
    sched.plan(400, 0.0)
    assert sched.next_eval == 401  # nothing charged twice: back to the interval
    sched.job_done(1.0, 0.0, cpu_seconds=0.1)
    sched.contention = 0.6  # the estimate reads more: it is charged
    sched.plan(401, 0.0)
    assert sched.next_eval == pytest.approx(401 + 600, abs=1)
    sched.plan(1100, 0.0)
    assert sched.next_eval == 1101
    sched.job_done(2.0, 1.5, cpu_seconds=0.4)  # 75% building: 0.1 s now, 0.3 s over four instalments
    sched.plan(500, 0.0)
    assert sched.next_eval == pytest.approx(500 + 175, abs=1)
    sched.charge_cpu = False
    sched.contention = 0.5
    sched.plan(700, 0.0)
    assert sched.next_eval == pytest.approx(700 + 500 + 75, abs=1)  # the contention, and an instalment still owed


def test_the_policy_charges_cpu_seconds_where_training_uses_every_core(monkeypatch):
    """The policy decides at attach from where training runs and how many threads it uses;
    in synchronous mode training waits for each job, so its time is on the training thread's
    account already and is not charged twice."""
    from fxfreeze.runtime.policies import egeria_schedule as es

    for cores, asynchronous, expected in ((torch.get_num_threads(), True, True), (torch.get_num_threads() + 8, True, False),
                                          (torch.get_num_threads(), False, False)):
        monkeypatch.setattr(es, "usable_cores", lambda cores=cores: cores)
        fm, opt, x, y = _setup({"freeze": False, "asynchronous": asynchronous})
        assert fm.freezer.policy.schedule.charge_cpu is expected
        fm.freezer.detach()


def test_the_probe_graphs_set_up_once_are_not_charged_to_the_schedule(monkeypatch):
    """The first evaluation captures the eval-mode graph and extracts the block graphs (on a
    transformer, seconds): a one-time cost, counted in setup_seconds and main_seconds, never
    in the spacing of evaluations."""
    from fxfreeze.runtime.policies import egeria as eg

    fm, opt, x, y = _setup({"freeze": False, "overhead_budget": 0.01})
    pol = fm.freezer.policy
    real_prepare = pol.probe.prepare
    clock = [0.0]
    real = time.perf_counter
    monkeypatch.setattr(eg.time, "perf_counter", lambda: real() + clock[0])

    def slow_prepare(lo, hi):  # a capture that takes 100 s (the fake clock jumps)
        real_prepare(lo, hi)
        clock[0] += 100.0

    monkeypatch.setattr(pol.probe, "prepare", slow_prepare)
    charged = []
    real_plan = pol.schedule.plan
    monkeypatch.setattr(pol.schedule, "plan", lambda step, cost: (charged.append(cost), real_plan(step, cost)))
    _train(fm, opt, x, y, 4)
    assert charged and max(charged) < 50.0  # the 100 s of set-up never reaches the schedule
    assert pol.setup_seconds >= 100.0 and pol.main_seconds >= pol.setup_seconds
    fm.freezer.detach()


def test_the_one_time_set_up_happens_at_compile_time():
    """The eval-mode graph, the block graphs and every block's reference builder are made by
    ``fxfreeze.compile`` (on the example call), not at evaluations in the middle of training:
    evaluations then make no builder and capture nothing."""
    fm, opt, x, y = _setup({"freeze": False})
    pol = fm.freezer.policy
    assert pol.compile_seconds > 0 and set(pol.refs.builders) == set(range(pol.hi))
    builders = dict(pol.refs.builders)
    graphs = len(fm.graphs)  # the training graph and the probe's eval-mode graph
    assert graphs == 2
    _train(fm, opt, x, y, 12)
    assert pol.evaluations >= 3 and any(r.get("plasticity") for r in pol.timeline)
    assert pol.refs.builders == builders and len(fm.graphs) == graphs
    fm.freezer.detach()


def test_a_model_compiled_without_example_inputs_sets_up_at_its_first_evaluation():
    torch.manual_seed(0)
    model = zoo.resnet_cifar(depth=8, width=8, in_channels=1)
    x, y = torch.randn(64, 1, 16, 16), torch.randint(0, 10, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    cfg = {"egeria": {"eval_interval": 2, "overhead_budget": 0, "asynchronous": False, "probe_size": 16, "freeze": False}}
    fm = fxfreeze.compile(model, optimizer=opt, config=cfg)
    pol = fm.freezer.policy
    assert pol.compile_seconds == 0 and not pol.refs.builders and len(fm.graphs) == 1
    _train(fm, opt, x, y, 6)
    assert pol.refs.builders and pol.setup_seconds > 0
    assert any(r.get("plasticity") for r in pol.timeline)
    fm.freezer.detach()


def test_the_probe_runs_to_a_handful_of_depths_each_deep_enough_for_its_tracked_blocks():
    """One extracted range per depth would grow with the square of the model's depth; the
    probe runs to about 8 depths, each at or past the tracked blocks' end."""
    fm, opt, x, y = _setup({"freeze": False}, model=zoo.resnet_cifar(depth=38, width=4, in_channels=1))
    pol = fm.freezer.policy
    assert pol.hi >= 16
    depths = {pol.probe.depth(pol._tracked(k).stop) for k in range(pol.hi)}
    assert all(pol._tracked(k).stop <= pol.probe.depth(pol._tracked(k).stop) <= pol.hi for k in range(pol.hi))
    assert len(depths) <= 9 and set(pol.probe._ranges) == depths | {pol.hi}
    fm.freezer.detach()


def test_the_probe_batch_takes_its_samples_from_inside_a_dict_of_features():
    """A model called with one dict of features (sentence-transformers): the probe keeps the
    first ``size`` samples of every tensor in it, as copies, and fills from later batches of
    the same structure when the first held a single sample."""
    from fxfreeze.runtime.egeria.probe import ActivationProbe

    ids = torch.arange(24).view(8, 3)
    feats = {"input_ids": ids, "attention_mask": torch.ones(8, 3, dtype=torch.long), "kind": "text"}
    from types import SimpleNamespace

    probe = ActivationProbe(SimpleNamespace(probe_hook=None), size=4, hi=1)
    probe.offer((feats,), {})
    (got,) = probe.args
    assert probe.ready and probe.samples == 4 and got["kind"] == "text"
    assert torch.equal(got["input_ids"], ids[:4]) and got["input_ids"].data_ptr() != ids.data_ptr()
    assert got is not feats

    small = ActivationProbe(SimpleNamespace(probe_hook=None), size=3, hi=1)
    for i in range(4):
        small.offer(({"input_ids": ids[i : i + 1], "attention_mask": torch.ones(1, 3, dtype=torch.long)},), {})
    assert small.ready and small.samples == 3
    assert torch.equal(small.args[0]["input_ids"], ids[:3])


def test_a_block_with_nothing_to_quantize_gets_rounded_outputs_without_a_warning(caplog):
    """An embedding block (lookup + LayerNorm) has no linear or convolution: int8_outputs is
    its natural reference, told at INFO; a real backend failure stays a warning (above)."""
    from fxfreeze.runtime.egeria.builder import build_reference

    class Emb(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.norm = nn.Embedding(50, 16), nn.LayerNorm(16)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.norm(self.emb(ids))

    ref = build_reference(torch.fx.symbolic_trace(Emb()), [torch.randint(0, 50, (4, 6))], "int8")
    assert ref.backend == "int8_outputs" and ref.routine and len(ref.fallbacks) == 2
    lin = build_reference(torch.fx.symbolic_trace(nn.Sequential(nn.Linear(8, 8), nn.ReLU())), [torch.randn(4, 8)], "int8")
    assert lin.backend == "int8_dynamic" and lin.routine and not lin.fallbacks
