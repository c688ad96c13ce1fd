"""A deep copy of a routed model (an EMA or SWA copy, a best-model snapshot) computes with its
own weights: the copied route must not send its calls to the original's compiled module,
which would silently evaluate the live training weights instead of the copy's."""

from __future__ import annotations

import copy
import io
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


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def _frozen_routed() -> tuple[nn.Module, "fxfreeze.runtime.FreezableModule"]:
    model = _bn_model()
    fm = fxfreeze.compile(model, (torch.randn(4, 8),), config=CONFIG)
    fm.install()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(3):
        _step(model, opt, i)
    assert fm.num_frozen == 1
    frozen = [m for m in model.modules() if "train" in m.__dict__]
    assert frozen and not any(m.training for m in frozen)  # held in eval mode
    return model, fm


def test_a_routed_model_with_frozen_blocks_saves_whole_and_loads_without_fxfreeze(tmp_path):
    """``torch.save(model)`` at the end of a run, loaded elsewhere: before, the file named
    fxfreeze's eval hold by a method the loaded module lacks, and ``torch.load`` raised
    AttributeError (the save itself succeeded, so the loss showed up only later)."""
    import subprocess
    import sys

    model, fm = _frozen_routed()
    path = tmp_path / "model.pt"
    torch.save(model, path)
    assert b"fxfreeze" not in path.read_bytes()
    x = torch.randn(4, 8)
    torch.save({"x": x, "eval": _own(model.eval(), x), "train_modes": [True] * len(list(model.modules()))}, tmp_path / "ref.pt")
    model.train()
    code = (
        "import sys, torch\n"
        "sys.modules['fxfreeze'] = None\n"  # fxfreeze cannot be imported in this process
        f"m = torch.load({str(path)!r}, weights_only=False)\n"
        f"ref = torch.load({str(tmp_path / 'ref.pt')!r}, weights_only=True)\n"
        "m.eval()\n"
        "torch.testing.assert_close(m(ref['x']), ref['eval'], rtol=0, atol=0)\n"
        "m.train()\n"
        "assert [k.training for k in m.modules()] == ref['train_modes'], 'a loaded module is held in eval'\n"
        "assert type(m).forward.__code__ is m.forward.__func__.__code__\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not any(m.training for m in model.modules() if "train" in m.__dict__)  # the original still holds


def test_a_deep_copy_taken_after_a_freeze_is_not_held_in_eval():
    """A snapshot deep-copied after a freeze (a best-model copy, an EMA or SWA model made
    mid-run) belongs to no compiled module: its ``train()`` reaches every module, so that
    SWA's ``update_bn`` or further training of the copy updates its BatchNorm statistics."""
    model, fm = _frozen_routed()
    snap = copy.deepcopy(model)
    snap.train()
    assert all(m.training for m in snap.modules())
    model.train()
    assert [m.training for m in model.modules()].count(False) >= 2  # the original's frozen Linear and BatchNorm
    x = torch.randn(16, 8)
    before = snap[1].running_mean.clone()
    snap(x)
    assert not torch.equal(snap[1].running_mean, before)


def test_the_compiled_module_refuses_to_be_pickled_or_copied_and_says_what_to_save():
    import pickle

    model, fm = _frozen_routed()
    for attempt in (lambda: pickle.dumps(fm), lambda: copy.deepcopy(fm), lambda: torch.save(fm, io.BytesIO())):
        try:
            attempt()
        except fxfreeze.CopyError as e:
            assert "fm.model" in str(e) and "fm.freezer.state_dict()" in str(e)
            assert isinstance(e, TypeError)
        else:
            raise AssertionError("a compiled module was pickled")
    copy.deepcopy(model)  # the model itself copies
