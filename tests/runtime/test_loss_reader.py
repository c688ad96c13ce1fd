"""The loss reader: losses reach the host in step order, without a read per step on a device
(the batched path is exercised on the CPU by declaring no tensor immediate; the CUDA-event
path runs in tests/test_devices.py where a GPU is visible)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import fxfreeze
from fxfreeze.runtime.loss_reader import LossReader


def test_cpu_losses_and_numbers_are_read_at_once():
    r = LossReader()
    assert r.push(1, torch.tensor(2.0)) == [(1, 2.0)]
    assert r.push(2, 0.5) == [(2, 0.5)]
    assert r.push(3, None) == [] and r.pending == 0
    assert r.push(4, torch.tensor([1.0, 3.0])) == [(4, 2.0)]  # a non-scalar loss: its mean


def test_device_losses_are_read_together_every_n_steps_in_order():
    r = LossReader(every=3, immediate=lambda t: False)
    assert r.push(1, torch.tensor(1.0)) == [] and r.push(2, None) == [] and r.push(3, torch.tensor(3.0)) == []
    assert r.pending == 2
    got = r.push(4, torch.tensor(float("nan")))
    assert [s for s, _ in got] == [1, 3, 4] and got[:2] == [(1, 1.0), (3, 3.0)] and math.isnan(got[2][1])
    assert r.pending == 0
    r.push(5, torch.tensor(5.0))
    assert r.flush() == [(5, 5.0)] and r.pending == 0 and r.flush() == []
    with pytest.raises(ValueError, match="every >= 1"):
        LossReader(every=0)


def test_controller_with_late_losses_still_sees_a_nonfinite_loss_and_feeds_the_safety_net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fm = fxfreeze.compile(model, (torch.randn(2, 4),), optimizer=opt, config={"policy": "manual"})
    fr = fm.freezer
    fr._loss_reader = LossReader(every=4, immediate=lambda t: False)  # as on an accelerator
    seen = []
    orig = fr.policy.decide
    fr.policy.decide = lambda s: (seen.append((s.step, s.loss, s.loss_nonfinite)), orig(s))[1]
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    for i in range(8):  # the controller runs in the optimizer's step hook
        loss = nn.functional.cross_entropy(fm(x), y)
        fr.observe_loss(torch.tensor(float("nan")) if i == 5 else loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # read at steps 4 and 8 only, each time the four before (no read in between)
    assert [s for s, v, _ in seen if v is not None] == [4, 8]
    assert [s for s, _, bad in seen if bad] == [8]  # step 6's NaN, reported when read
    assert len(fr.safety.recent) == 7  # every finite loss reached the safety net
    fr.observe_loss(torch.tensor(1.0))
    opt.step()
    assert fr.step_count == 9 and fr._loss_reader.pending == 1
    state = fr.state_dict()  # a checkpoint reads what is still on the way
    assert fr._loss_reader.pending == 0 and len(state["safety"]["recent"]) == 8
    fm.freezer.detach()
