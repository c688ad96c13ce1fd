"""SmartFRZ at run time: the weight-history recorder, the predictor and its weights file,
and the policy inside a training loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import fxfreeze
from fxfreeze import zoo
from fxfreeze.runtime.history import WeightHistory, sample_positions
from fxfreeze.runtime.policies.rules import leading_run
from fxfreeze.runtime.policies.smartfrz import SmartFRZPolicy
from fxfreeze.runtime.predictor import (
    FreezePredictor,
    batch_histories,
    default_weights_path,
    load_predictor,
    normalize_history,
    relative_depth,
    save_predictor,
)


# -- recorder ---------------------------------------------------------------------------------
def test_sample_positions_are_fixed_per_block_and_fit_any_size():
    a = sample_positions([100, 5000, 7], 1024, seed=0, key="layer1.0")
    b = sample_positions([100, 5000, 7], 1024, seed=0, key="layer1.0")
    c = sample_positions([100, 5000, 7], 1024, seed=0, key="layer1.1")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert sum(t.numel() for t in a) == 1024
    assert all(int(t.max()) < n for t, n in zip(a, [100, 5000, 7]) if t.numel())
    small = sample_positions([10, 20], 1024, seed=3, key="tiny")  # fewer values than samples: with replacement
    assert sum(t.numel() for t in small) == 1024 and int(small[0].max()) < 10 and int(small[1].max()) < 20


def test_history_is_a_ring_buffer_of_sampled_values_oldest_first():
    lin = nn.Linear(40, 30)
    h = WeightHistory({"fc": list(lin.parameters())}, sample_size=64, window=4, seed=0)
    for i in range(6):
        with torch.no_grad():
            lin.weight.fill_(float(i))
            lin.bias.fill_(float(i))
        h.record()
    got = h.history("fc")
    assert got.shape == (4, 64) and h.count("fc") == 6
    assert [float(r[0]) for r in got] == [2.0, 3.0, 4.0, 5.0]
    state = h.state_dict()
    h2 = WeightHistory({"fc": list(lin.parameters())}, sample_size=64, window=4, seed=0)
    h2.load_state_dict(state)
    assert torch.equal(h2.history("fc"), got)
    h2.record()
    assert [float(r[0]) for r in h2.history("fc")] == [3.0, 4.0, 5.0, 5.0]
    with pytest.raises(fxfreeze.FreezeError, match="sample_size=64.*uses 32"):
        WeightHistory({"fc": list(lin.parameters())}, sample_size=32, window=4).load_state_dict(state)
    with pytest.raises(fxfreeze.FreezeError, match="block 'conv'"):
        h2.load_state_dict({"history": {"conv": got}})


# -- predictor --------------------------------------------------------------------------------
def test_predictor_shapes_masks_and_scale_invariance():
    torch.manual_seed(0)
    m = FreezePredictor(sample_size=32, window=6, hidden=16, dim=8).eval()
    hists = [torch.randn(t, 32) for t in (1, 3, 6, 9)]  # longer than the window: the newest 6 count
    x, valid = batch_histories(hists, 6)
    assert x.shape == (4, 6, 32) and valid.sum(1).tolist() == [1, 3, 6, 6]
    assert torch.allclose(x[3], normalize_history(hists[3][-6:]))
    depth = torch.tensor([0.0, 0.25, 0.5, 1.0])
    logits = m(x, valid, depth)
    assert logits.shape == (4,) and torch.isfinite(logits).all()
    p = m.predict(hists, depth.tolist())
    assert torch.equal(p, m.predict(hists, depth.tolist()))  # deterministic
    scaled = m.predict([3.0 * h + 1.0 for h in hists], depth.tolist())  # weights in other units: same answer
    torch.testing.assert_close(scaled, p, rtol=1e-4, atol=1e-5)
    # padding positions do not matter
    x2 = x.clone()
    x2[0, :5] = 123.0
    torch.testing.assert_close(m(x2, valid, depth)[0], logits[0])
    with pytest.raises(fxfreeze.PredictorError, match="6 x 32"):
        m(torch.zeros(1, 5, 32), torch.ones(1, 5, dtype=torch.bool), torch.zeros(1))
    with pytest.raises(fxfreeze.PredictorError, match="one relative depth per history"):
        m(x, valid, torch.zeros(3))
    assert [relative_depth(i, 5) for i in (0, 2, 4)] == [0.0, 0.5, 1.0] and relative_depth(0, 1) == 0.0


def test_shipped_weights_load_and_give_deterministic_probabilities():
    m, meta = load_predictor()
    assert default_weights_path().is_file()
    assert (m.sample_size, m.window) == (1024, 30)
    assert meta["record_interval"] >= 1 and "leave_one_out" in meta and meta["quick"] is False
    g = torch.Generator().manual_seed(0)
    moving = [torch.cumsum(torch.randn(30, 1024, generator=g), 0)]  # a random walk: still moving
    p1 = m.predict(moving, [0.5])
    m2, _ = load_predictor()
    assert torch.equal(p1, m2.predict(moving, [0.5])) and 0.0 <= float(p1) <= 1.0


def test_weights_round_trip_and_bad_files_are_clear_errors(tmp_path: Path):
    m = FreezePredictor(sample_size=16, window=4, hidden=8, dim=4)
    path = tmp_path / "w.fxtf"
    save_predictor(m, path, {"record_interval": 7})
    back, meta = load_predictor(path)
    assert meta["record_interval"] == 7 and back.config == m.config
    h = [torch.randn(4, 16)]
    torch.testing.assert_close(back.predict(h, [0.0]), m.predict(h, [0.0]), rtol=0, atol=2e-3)  # stored as float16

    with pytest.raises(fxfreeze.PredictorError, match=r"missing\.fxtf.*does not exist.*fxfreeze train-predictor --out"):
        load_predictor(tmp_path / "missing.fxtf")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "corrupt.fxtf"
    bad.write_bytes(bytes(data))
    with pytest.raises(fxfreeze.PredictorError, match=r"corrupt\.fxtf.*corrupt.*fxfreeze train-predictor"):
        load_predictor(bad)
    trunc = tmp_path / "trunc.fxtf"
    trunc.write_bytes(path.read_bytes()[:100])
    with pytest.raises(fxfreeze.PredictorError, match="trunc.fxtf.*corrupt"):
        load_predictor(trunc)
    not_ours = tmp_path / "other.fxtf"
    not_ours.write_text("hello")
    with pytest.raises(fxfreeze.PredictorError, match="other.fxtf"):
        load_predictor(not_ours)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(fxfreeze.PredictorError, match="cannot write.*--out"):
        save_predictor(m, blocker / "w.fxtf")  # its folder would be a file
    # at compile time, through the config: nothing trains before the error
    with pytest.raises(fxfreeze.PredictorError, match=r"corrupt\.fxtf"):
        fxfreeze.compile(zoo.resnet20(), config={"policy": "smartfrz", "smartfrz": {"weights": str(bad)}})


# -- policy -----------------------------------------------------------------------------------
def test_leading_run():
    assert leading_run([0.9, 0.8, 0.2, 0.9], 0.5) == 2
    assert leading_run([0.1, 0.9], 0.5) == 0
    assert leading_run([float("nan"), 0.9], 0.5) == 0


def test_config_validation():
    for bad in ({"threshold": 1.5}, {"stage_interval": 0}, {"contiguous": False}, {"min_history": 1}, {"bogus": 1}):
        with pytest.raises(fxfreeze.ConfigError, match="smartfrz"):
            fxfreeze.FreezeConfig.from_dict({"policy": "smartfrz", "smartfrz": bad})


class _Stillness(FreezePredictor):
    """P(freeze) = 1 when the sampled weights moved less than ``tol`` (relative) over the
    history: a stand-in predictor whose answer the test controls."""

    def __init__(self, tol: float) -> None:
        super().__init__(sample_size=1024, window=30, hidden=4, dim=4)
        self.tol = tol

    def forward(self, x: torch.Tensor, valid: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        first = valid.float().argmax(1)
        moved = torch.stack([(x[i, -1] - x[i, int(first[i])]).abs().mean() for i in range(x.shape[0])])
        return torch.where(moved < self.tol, 10.0, -10.0)


def _train(fm: nn.Module, opt: torch.optim.Optimizer, steps: int, lr_of_block: dict[str, float] | None = None) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 16, 16, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(fm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_policy_freezes_a_growing_prefix_from_predictions_and_resumes(tmp_path: Path):
    torch.manual_seed(0)
    model = zoo.resnet_cifar(depth=14, width=8, in_channels=1)
    plan = fxfreeze.plan(model, (torch.randn(2, 1, 16, 16),))
    # front blocks learn slowly, deep ones fast: the predictor sees the front ones still first
    groups = [{"params": [p for n, p in model.named_parameters() if n in set(b.params)], "lr": 1e-3 * 10 ** (i / 2)}
              for i, b in enumerate(plan.blocks)]
    rest = [p for n, p in model.named_parameters() if not any(n in b.params for b in plan.blocks)]
    opt = torch.optim.SGD(groups + [{"params": rest, "lr": 0.05}], lr=0.05)
    cfg = {"policy": "smartfrz", "smartfrz": {"record_interval": 2, "stage_interval": 2, "min_history": 4, "patience": 1}}
    fm = fxfreeze.compile(model, (torch.randn(2, 1, 16, 16),), optimizer=opt, config=cfg)
    pol = fm.freezer.policy
    assert isinstance(pol, SmartFRZPolicy) and pol.record_interval == 2
    pol.predictor = _Stillness(tol=0.05)
    _train(fm, opt, 60)
    ks = [e["num_frozen"] for e in fm.freezer.history if e["action"] == "freeze"]
    assert ks and ks == sorted(ks) and ks[-1] >= 1, fm.freezer.history
    assert all("SmartFRZ" in e["reason"] for e in fm.freezer.history if e["action"] == "freeze")
    stages = [r for r in pol.timeline if "p_freeze" in r]
    assert stages and all(set(r["p_freeze"]) == set(range(r["num_frozen"], len(plan.blocks))) for r in stages)
    # only active blocks are recorded: a frozen block's history stops growing
    k = fm.num_frozen
    frozen_counts = [pol.history.count(n) for n in pol.names[:k]]
    _train(fm, opt, 4)
    assert [pol.history.count(n) for n in pol.names[:k]] == frozen_counts

    state = fm.freezer.state_dict()
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)
    model2 = zoo.resnet_cifar(depth=14, width=8, in_channels=1)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05)
    fm2 = fxfreeze.compile(model2, (torch.randn(2, 1, 16, 16),), optimizer=opt2, config=cfg)
    fm2.freezer.load_state_dict(loaded)
    pol2 = fm2.freezer.policy
    assert fm2.num_frozen == fm.num_frozen and pol2.records == pol.records
    for n in pol.names[fm.num_frozen :]:
        assert torch.equal(pol2.history.history(n), pol.history.history(n))
    # unfrozen blocks start their histories over (the old ones end where they froze)
    fm.freeze_prefix(0)
    _train(fm, opt, 1)
    assert all(pol.history.count(n) <= 1 for n in pol.names[:k]) and pol.streak == 0


def test_policy_with_shipped_predictor_runs_and_records_probabilities():
    torch.manual_seed(0)
    model = zoo.resnet_cifar(depth=8, width=8, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    cfg = {"policy": "smartfrz", "smartfrz": {"record_interval": 1, "stage_interval": 2, "min_history": 3}}
    fm = fxfreeze.compile(model, (torch.randn(2, 1, 16, 16),), optimizer=opt, config=cfg)
    _train(fm, opt, 12)
    stages = [r for r in fm.freezer.policy.timeline if "p_freeze" in r]
    assert stages and all(0.0 <= p <= 1.0 for r in stages for p in r["p_freeze"].values())
    assert fm.freezer.policy.main_seconds > 0


@pytest.mark.parametrize("restart", [True, False])
def test_a_learning_rate_step_restarts_the_histories(restart):
    """Weights that slow down because the rate fell are not weights that converged: after
    a step (÷10) the active blocks' histories start over, so the predictor never judges a
    window that straddles the drop."""
    torch.manual_seed(0)
    model = zoo.resnet_cifar(depth=8, width=8, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cfg = {"policy": "smartfrz", "smartfrz": {"record_interval": 1, "stage_interval": 100, "min_history": 3,
                                              "restart_on_lr_change": restart}}
    fm = fxfreeze.compile(model, (torch.randn(2, 1, 16, 16),), optimizer=opt, config=cfg)
    pol = fm.freezer.policy
    _train(fm, opt, 6)
    assert all(pol.history.count(n) == 6 for n in pol.names)
    for g in opt.param_groups:
        g["lr"] = 0.005
    _train(fm, opt, 2)
    counts = [pol.history.count(n) for n in pol.names]
    assert counts == ([2] * len(counts) if restart else [8] * len(counts))  # restarted at the step that saw the drop
    assert any("restarted" in r for r in pol.timeline) == restart
    fm.freezer.detach()
