"""AutoFreeze baseline: the percentile cut, and the policy on a small model."""

from __future__ import annotations

import torch
from torch import nn

import fxfreeze
from fxfreeze import zoo
from fxfreeze.runtime.policies.rules import autofreeze_cut


def test_cut_rule():
    assert autofreeze_cut([0.01, 0.02, 0.5, 0.03, 0.6], 50) == 2  # median 0.03: two before 0.5
    assert autofreeze_cut([0.9, 0.01, 0.01], 50) == 0  # the front block still changes
    assert autofreeze_cut([], 50) == 0
    assert autofreeze_cut([0.1, 0.2, 0.3, 0.4], 75) == 3


def test_policy_freezes_a_growing_prefix_and_skips_nan():
    torch.manual_seed(0)
    model = zoo.resnet_cifar(depth=14, width=8, in_channels=1)
    x = torch.randn(64, 1, 16, 16)
    y = torch.randint(0, 10, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    fm = fxfreeze.compile(model, x[:2], optimizer=opt, config={"policy": "autofreeze", "autofreeze": {"interval": 3}})
    for i in range(60):
        loss = nn.functional.cross_entropy(fm(x), y)
        if 30 <= i < 33:
            loss = loss * float("nan")
        fm.freezer.observe_loss(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    pol = fm.freezer.policy
    assert any(r.get("skipped") for r in pol.timeline)
    ks = [e["num_frozen"] for e in fm.freezer.history if e["action"] == "freeze"]
    assert ks and ks == sorted(ks)
    assert all("AutoFreeze" in e["reason"] for e in fm.freezer.history if e["action"] == "freeze")
    state = fm.freezer.state_dict()
    fm2 = fxfreeze.compile(zoo.resnet_cifar(depth=14, width=8, in_channels=1), x[:2],
                           config={"policy": "autofreeze", "autofreeze": {"interval": 3}})
    fm2.freezer.load_state_dict(state)
    assert fm2.num_frozen == fm.num_frozen
