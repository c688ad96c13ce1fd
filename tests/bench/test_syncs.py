"""No hidden host synchronisation in a training step without a decision (issue 18): every
built-in policy's per-step work, and a step with a frozen prefix, read no device value.

On the CPU the profiler still records ``aten::_local_scalar_dense``, the op behind ``.item()``
and ``float(t)``, which on a GPU makes the host wait for the device; the loss reader is set to
its accelerator path (no read in these steps). This caught AutoFreeze reading every block's
gradient norm every step. ``benchmarks/sync_profile.py`` runs the same comparison on a GPU with
the CUDA runtime's own synchronisation calls.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxfreeze
from fxfreeze import zoo
from fxfreeze.bench.syncs import SYNC_EVENTS, count_syncs
from fxfreeze.registry import policy_names


def _loop(policy: str | None, config: dict | None = None):
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 16, 16), torch.randint(0, 10, (16,))
    model = zoo.resnet_cifar(depth=8, width=8, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    f = model
    if policy is not None:
        cfg = {"policy": policy, "total_steps": 1000, "manual": {"schedule": {500: 1}, "unit": "step"}, **(config or {})}
        f = fxfreeze.compile(model, x[:2], optimizer=opt, config=cfg)
        f.freezer._loss_reader._immediate = lambda t: False  # as for a loss on an accelerator
        f.freezer._loss_reader.every = 10**6

    def step() -> None:
        loss = nn.functional.cross_entropy(f(x), y)
        if policy is not None:
            f.freezer.observe_loss(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):  # warm-up (the first steps capture and build)
        step()
    return f, step


def test_the_plain_loop_reads_nothing():
    _, step = _loop(None)
    assert not count_syncs(step, 4)


@pytest.mark.parametrize("policy", sorted(policy_names()))
def test_a_step_without_a_decision_reads_no_device_value(policy):
    f, step = _loop(policy)
    before = len(f.freezer.history)
    got = {k: v for k, v in count_syncs(step, 6).items() if k in SYNC_EVENTS}
    assert len(f.freezer.history) == before  # no decision was taken in these steps
    assert not got, f"{policy}: {dict(got)} in 6 steps"
    f.freezer.detach()


def test_a_step_with_a_frozen_prefix_reads_no_device_value():
    f, step = _loop("manual", {"manual": {"schedule": {1: 2}, "unit": "step"}})
    assert f.num_frozen == 2
    got = {k: v for k, v in count_syncs(step, 4).items() if k in SYNC_EVENTS}
    assert not got, got
    f.freezer.detach()
