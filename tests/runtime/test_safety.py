"""The safety net: a freeze that makes the training loss rise is undone, the block waits
longer before it may freeze again, and a good freeze or the user's own schedule is left alone."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import fxfreeze
from fxfreeze.config import SafetyNetConfig
from fxfreeze.registry import unregister_policy
from fxfreeze.runtime.policies import Decision, Policy
from fxfreeze.runtime.safety import SafetyNet


@dataclass
class _AtConfig:
    """Freeze ``blocks`` blocks at step ``step``, and ask again every step after it."""

    step: int = 12
    blocks: int = 2


class _FreezeAt(Policy):
    name = "freeze_at"

    def decide(self, s):
        cfg = self.config.section("freeze_at")
        if s.step >= cfg.step and s.num_frozen < cfg.blocks:
            return Decision(cfg.blocks, "test policy")
        return None


@pytest.fixture(autouse=True, scope="module")
def _registered():
    fxfreeze.register_policy("freeze_at", _FreezeAt, _AtConfig, replace=True)
    yield
    unregister_policy("freeze_at")


def _stream(net: SafetyNet, steps, value, start):
    rng = random.Random(start)
    for step in range(start, start + steps):
        net.observe(step, value + rng.gauss(0, 0.02))


def test_a_rise_is_undone_and_the_block_waits_longer_each_strike():
    net = SafetyNet(SafetyNetConfig(window=20, watch=100, hold=30))
    _stream(net, 40, 1.0, 1)
    net.on_change(40, 1, 3)
    _stream(net, 19, 1.3, 41)
    assert net.verdict(59, 3) is None  # the post-freeze window is not full yet
    _stream(net, 1, 1.3, 60)
    k, why = net.verdict(60, 3)
    assert k == 2 and "rose from 0.99" in why and "after step 90" in why
    assert net.cap(61, 5) == 2 and net.cap(90, 5) == 5  # held for 30 steps
    _stream(net, 20, 1.0, 61)
    net.on_change(95, 2, 3)  # frozen again: a second strike doubles the hold
    _stream(net, 20, 1.4, 96)
    k, why = net.verdict(115, 3)
    assert k == 2 and net.cap(174, 5) == 2 and net.cap(175, 5) == 5


def test_a_falling_or_level_loss_is_left_alone_and_the_watch_ends():
    net = SafetyNet(SafetyNetConfig(window=20, watch=50))
    _stream(net, 40, 1.0, 1)
    net.on_change(40, 0, 2)
    for step in range(41, 120):
        net.observe(step, 1.0 - 0.002 * (step - 40) + random.Random(step).gauss(0, 0.05))
        assert net.verdict(step, 2) is None
    assert net.watching is None  # over after `watch` steps
    # noise alone, at the level of the baseline, never triggers it
    net2 = SafetyNet(SafetyNetConfig(window=20, watch=200))
    _stream(net2, 40, 1.0, 1)
    net2.on_change(40, 0, 1)
    rng = random.Random(7)
    for step in range(41, 240):
        net2.observe(step, 1.0 + rng.gauss(0, 0.3))
        assert net2.verdict(step, 1) is None


def test_state_round_trip():
    net = SafetyNet(SafetyNetConfig(window=10, watch=40))
    _stream(net, 12, 1.0, 1)
    net.on_change(12, 0, 2)
    _stream(net, 4, 2.0, 13)
    net2 = SafetyNet(SafetyNetConfig(window=10, watch=40))
    net2.load_state_dict(net.state_dict())
    _stream(net, 6, 2.0, 17)
    _stream(net2, 6, 2.0, 17)
    assert net.verdict(22, 2) == net2.verdict(22, 2) and net.verdict(22, 2) is None  # both fired once
    assert net.state_dict() == net2.state_dict()


class _BNNet(nn.Module):
    """Blocks of Linear + BatchNorm whose running statistics move slowly (momentum 0.001):
    frozen early, a block runs its BatchNorm in eval mode on statistics far from the data's,
    and the loss jumps. That is what a too-early freeze does to a real network."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16, momentum=0.0), nn.ReLU()) for _ in range(4)
        )
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        for b in self.blocks:
            x = b(x) + 0 * x  # a residual-style join per block keeps the plan at one block per layer
        return self.head(x)


def _train(enabled: bool, policy: str = "freeze_at", config=None, steps: int = 60):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(4, 16, generator=g) * 3
    model = _BNNet()
    x0 = torch.randn(32, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cfg = {"policy": policy, "safety_net": {"enabled": enabled, "window": 10, "watch": 30}, **(config or {})}
    fm = fxfreeze.compile(model, (x0,), optimizer=opt, config=cfg)
    for _ in range(steps):
        y = torch.randint(0, 4, (32,), generator=g)
        x = centers[y] + 20.0 + torch.randn(32, 16, generator=g)  # far from BatchNorm's initial statistics
        loss = nn.functional.cross_entropy(fm(x), y)
        fm.freezer.observe_loss(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    hist = [dict(e) for e in fm.freezer.history]
    fm.freezer.detach()
    return hist


def test_a_too_early_freeze_is_undone_in_a_real_run():
    hist = _train(enabled=True)
    acts = [(e["action"], e["num_frozen"]) for e in hist]
    assert acts[0] == ("freeze", 2)
    undo = [e for e in hist if e["action"] == "unfreeze"]
    assert undo and undo[0]["num_frozen"] == 1 and "safety net" in undo[0]["reason"]
    # the policy asks for 2 blocks at every step after 12: held for `watch` (30) steps, it
    # gets no more than 1 until then
    again = [e for e in hist if e["step"] > undo[0]["step"] and e["num_frozen"] >= 2]
    assert again and again[0]["step"] == undo[0]["step"] + 30
    # switched off, the harmful freeze stays
    assert [(e["action"], e["num_frozen"]) for e in _train(enabled=False)] == [("freeze", 2)]


def test_the_users_schedule_is_not_watched():
    hist = _train(enabled=True, policy="manual", config={"manual": {"schedule": {12: 2}}})
    assert [(e["action"], e["num_frozen"]) for e in hist] == [("freeze", 2)]


@pytest.mark.parametrize("bad", [{"window": 2}, {"tolerance": 0}, {"min_rise": -1}, {"enabled": "yes"}, {"hold": 0}])
def test_bad_safety_config_is_refused(bad):
    with pytest.raises(fxfreeze.ConfigError, match="safety_net"):
        fxfreeze.FreezeConfig.from_dict({"safety_net": bad})


def test_a_freeze_with_no_loss_seen_says_the_net_is_blind_once(caplog):
    """A plain loop whose model returns logits and which never calls ``observe_loss``: the
    first watched freeze warns (once) that the net cannot undo it; with losses, no warning."""
    import logging

    def run(observe: bool) -> list[str]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), *[nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(3)], nn.Linear(16, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        fm = fxfreeze.compile(model, (torch.randn(4, 8),), optimizer=opt, config={"policy": "freeze_at", "freeze_at": {"step": 12, "blocks": 1}})
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fxfreeze"):
            for step in range(30):
                if step == 20:
                    fm.freezer.policy.config.section("freeze_at").blocks = 2  # a second freeze: no second warning
                x = torch.randn(16, 8)
                loss = nn.functional.cross_entropy(fm(x), (x[:, 0] > 0).long())
                if observe:
                    fm.freezer.observe_loss(loss)
                opt.zero_grad()
                loss.backward()
                opt.step()
        assert fm.num_frozen == 2
        fm.freezer.detach()
        return [r.getMessage() for r in caplog.records if "safety net has seen no training loss" in r.getMessage()]

    blind = run(observe=False)
    assert len(blind) == 1 and "step 12" in blind[0] and "observe_loss" in blind[0]
    assert run(observe=True) == []
