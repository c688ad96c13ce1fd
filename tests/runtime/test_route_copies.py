"""A deep copy of a routed model (an EMA or SWA copy, a best-model snapshot) computes with its
own weights: the copied route must not send its calls to the original's compiled module,
which would silently evaluate the live training weights instead of the copy's."""

from __future__ import annotations

import copy
import types

import torch
from torch import nn

import fxfreeze
from fxfreeze.integrations._lazy import LazyCompile

CONFIG = {"policy": "manual", "manual": {"schedule": {2: 1}}}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def _own(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What ``model``'s own weights compute, without any route."""
    return type(model).forward(model, x)


def _step(model: nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
    g = torch.Generator().manual_seed(i)
    loss = model(torch.randn(8, 8, generator=g)).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_an_ema_copy_of_an_installed_model_computes_with_its_own_weights():
    model = _model()
    fm = fxfreeze.compile(model, (torch.randn(4, 8),), config=CONFIG)
    fm.install()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = copy.deepcopy(model)
    for i in range(4):
        _step(model, opt, i)
        with torch.no_grad():  # an exponential moving average, as timm's ModelEmaV2 keeps it
            for e, p in zip(ema.parameters(), model.parameters()):
                e.mul_(0.9).add_(p, alpha=0.1)
    assert fm.num_frozen == 1 and fm.training_calls == 4
    x = torch.randn(4, 8)
    torch.testing.assert_close(ema(x), _own(ema, x), rtol=0, atol=0)
    assert fm.training_calls == 4  # the copy's call (training mode) did not reach fm
    assert not torch.allclose(ema(x), model(x))  # the copy is not the live model
    torch.testing.assert_close(model(x), _own(model, x), rtol=1e-6, atol=1e-6)  # the original still routes


def test_a_copy_of_a_model_routed_over_a_mixed_precision_wrapper_keeps_the_wrapper():
    model = _model()
    model.forward = types.MethodType(torch.autocast("cpu", dtype=torch.bfloat16)(nn.Sequential.forward), model)
    fm = fxfreeze.compile(model, (torch.randn(4, 8),), config=CONFIG)
    fm.install()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(2.0)
    x = torch.randn(4, 8)
    out = twin(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _own(twin, x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_a_copy_of_a_model_the_integrations_routed_runs_its_own_forward():
    """The HF Trainer and Lightning callbacks route through LazyCompile before the first call."""
    model = _model()
    lazy = LazyCompile.for_model(model, {"config": CONFIG})
    try:
        x = torch.randn(4, 8)
        model(x)  # compiles on the first call
        assert lazy.module is not None
        snapshot = copy.deepcopy(model)
        with torch.no_grad():
            for p in snapshot.parameters():
                p.zero_()
        calls = lazy.module.training_calls
        assert torch.count_nonzero(snapshot(x)) == 0
        assert lazy.module.training_calls == calls
        torch.testing.assert_close(model(x), _own(model, x), rtol=1e-6, atol=1e-6)
    finally:
        lazy.uninstall()
