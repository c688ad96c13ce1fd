"""``not_before``: no freeze before a given optimizer step. A freeze decided earlier waits
and is applied at that step (a manual schedule decides once); unfreezing is never held; the
waiting freeze survives a resume; the config is checked."""

from __future__ import annotations

import logging

import pytest
import torch

import fxfreeze
from fxfreeze.runtime.gate import FreezeGate, not_before_of_model
from fxfreeze.runtime.policies import Decision

from _nets import Res


def _compile(schedule: dict, not_before: int | None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), Res(16), Res(16), Res(16), torch.nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cfg = {"policy": "manual", "manual": {"schedule": schedule, "unit": "step"}, "not_before": not_before,
           "safety_net": {"enabled": False}}
    return fxfreeze.compile(model, (torch.randn(4, 8),), optimizer=opt, config=cfg), opt


def _train(fm, opt, steps: int) -> None:
    for _ in range(steps):
        loss = fm(torch.randn(4, 8)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _freezes(fm) -> list[tuple[int, int]]:
    return [(e["step"], e["num_frozen"]) for e in fm.freezer.history if e["action"] in ("freeze", "unfreeze")]


def test_a_freeze_before_not_before_waits_for_it(caplog):
    fm, opt = _compile({2: 2}, None)
    _train(fm, opt, 6)
    assert _freezes(fm) == [(2, 2)]
    fm, opt = _compile({2: 2}, 5)
    with caplog.at_level(logging.INFO, logger="fxfreeze"):
        _train(fm, opt, 4)
        assert fm.num_frozen == 0 and "waits for step 5 (not_before)" in caplog.text
        _train(fm, opt, 2)
    assert _freezes(fm) == [(5, 2)]
    assert "held until step 5" in fm.freezer.history[-1]["reason"]


def test_an_unfreeze_is_never_held_and_voids_a_waiting_freeze():
    gate = FreezeGate(10)
    assert gate(Decision(3, "freeze"), step=2, k=1) is None
    assert gate(Decision(0, "unfreeze"), step=3, k=1) == Decision(0, "unfreeze")
    assert gate(None, step=10, k=0) is None  # the waiting freeze went with the unfreeze
    assert gate(Decision(2, "later"), step=11, k=0) == Decision(2, "later")
    assert FreezeGate(0)(Decision(2, "x"), step=0, k=0) == Decision(2, "x")


def test_a_waiting_freeze_survives_a_resume():
    fm, opt = _compile({2: 2}, 5)
    _train(fm, opt, 3)
    state = fm.freezer.state_dict()
    assert state["held"] == {"num_frozen": 2, "reason": "schedule: 2 blocks from step 2"}
    fm2, opt2 = _compile({2: 2}, 5)
    fm2.freezer.load_state_dict(state)
    _train(fm2, opt2, 3)
    assert _freezes(fm2) == [(5, 2)]
    bad = dict(state, held={"num_frozen": "2"})
    with pytest.raises(fxfreeze.FreezeError, match="held"):
        fm2.freezer.load_state_dict(bad)
    assert fm2.num_frozen == 2  # a refused state changes nothing


def test_not_before_is_checked_and_read_from_an_adalora_style_config():
    for bad in (-1, 2.5, True, "10"):
        with pytest.raises(fxfreeze.ConfigError, match="not_before"):
            fxfreeze.FreezeConfig.from_dict({"not_before": bad})
    m = torch.nn.Linear(2, 2)
    assert not_before_of_model(m) is None
    m.peft_config = {"default": type("AdaLoraLike", (), {"total_step": 500, "tfinal": 100})()}
    step, why = not_before_of_model(m)
    assert step == 401 and "'default'" in why
    m.peft_config = {"default": type("LoraLike", (), {"r": 8})()}
    assert not_before_of_model(m) is None
