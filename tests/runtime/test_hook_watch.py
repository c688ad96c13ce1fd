"""A hook added to, or removed from, one of the model's modules after its graphs were
captured takes effect at the next call (the graphs are captured again); nothing else makes
the compiled module capture again, and a frozen prefix stays cut in the new graphs."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import fxfreeze
from _nets import Res


def _compiled(strategy: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), *[Res(16) for _ in range(3)], nn.Linear(16, 3))
    fm = fxfreeze.compile(model, (torch.randn(4, 8),), strategy=strategy, config={"policy": "manual"})
    return model, fm


def _captures(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "capturing again" in r.getMessage()]


@pytest.mark.parametrize("strategy", ["export", "fx"])  # fx: blocks.1 has children, so fx traced into it
def test_a_forward_hook_added_or_removed_after_compile_takes_effect(strategy, caplog):
    model, fm = _compiled(strategy)
    x = torch.randn(4, 8)
    plain = model(x)
    torch.testing.assert_close(fm(x), plain, rtol=1e-6, atol=1e-6)
    seen = []
    with caplog.at_level(logging.INFO, logger="fxfreeze"):
        h = model[2].register_forward_hook(lambda m, i, o: seen.append(o.shape) or o * 0.5)
        out = fm(x)
        torch.testing.assert_close(out, model(x), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(out, plain) and len(seen) >= 1
        [msg] = _captures(caplog)
        assert "hooks added on 2" in msg
        fm(x)  # nothing changed since: no capture
        assert len(_captures(caplog)) == 1
        h.remove()
        torch.testing.assert_close(fm(x), plain, rtol=1e-6, atol=1e-6)
        assert "hooks removed from 2" in _captures(caplog)[-1]


def test_a_backward_hook_added_after_compile_fires():
    model, fm = _compiled("export")
    fm(torch.randn(4, 8))
    grads = []
    model[1].register_full_backward_hook(lambda m, gi, go: grads.append(go[0].shape))
    fm(torch.randn(4, 8)).sum().backward()
    assert grads == [torch.Size([4, 16])]


def test_tensor_hooks_and_the_eager_paths_own_hooks_capture_nothing_again(caplog):
    """Every step's tensor hooks move torch's hook counter; the modules' hooks stay as they
    were, so the graphs stay."""
    model, fm = _compiled("export")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fm.freeze_prefix(2)
    with caplog.at_level(logging.INFO, logger="fxfreeze"):
        for _ in range(5):
            x = torch.randn(4, 8, requires_grad=True)
            x.register_hook(lambda g: g)
            loss = fm(x).sum()
            loss.register_hook(lambda g: g)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert not _captures(caplog) and len(fm.graphs) == 1


def test_the_graphs_captured_again_keep_the_frozen_prefix_cut():
    model, fm = _compiled("export")
    fm.freeze_prefix(2)
    model[3].register_forward_hook(lambda m, i, o: o + 1.0)
    fm(torch.randn(4, 8)).sum().backward()
    assert model[0].weight.grad is None and model[1].lin.weight.grad is None
    assert model[2].lin.weight.grad is not None
    assert not model[1].training or not model[1].lin.training  # the prefix still runs in eval mode


@pytest.mark.parametrize("strategy", ["export", "fx"])
def test_a_model_with_backward_hooks_runs_its_own_forward_while_they_are_registered(strategy, caplog):
    """No graph runs a module's backward hooks (neither capture records their autograd
    functions): before, such a hook silently never fired in training."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), *[Res(16) for _ in range(3)], nn.Linear(16, 3))
    fired = []
    h = model[1].register_full_backward_hook(lambda m, gi, go: fired.append(go[0].shape))
    with caplog.at_level(logging.WARNING, logger="fxfreeze"):
        fm = fxfreeze.compile(model, (torch.randn(4, 8),), strategy=strategy, config={"policy": "manual"})
        fm.freeze_prefix(1)
        for _ in range(2):
            fm(torch.randn(4, 8)).sum().backward()
    assert fired == [torch.Size([4, 16])] * 2 and model[0].weight.grad is None
    assert sum("backward hooks on 1" in r.getMessage() for r in caplog.records) == 1
    h.remove()
    model.zero_grad()
    fm(torch.randn(4, 8)).sum().backward()  # graphs again
    assert len(fired) == 2 and len(fm.graphs) >= 1


def test_hooks_the_models_own_forward_installs_capture_nothing_again(caplog):
    """Hugging Face models install inert output recorders on their layers at the first
    ``output_hidden_states=True`` call, from inside their forward: that call's graph saw
    them, and the other graphs stay."""

    class _Recording(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.blocks, self.head = nn.Linear(8, 16), nn.Sequential(*[Res(16) for _ in range(3)]), nn.Linear(16, 3)
            self.recorded: list[torch.Tensor] = []

        def forward(self, x: torch.Tensor, record: bool = False) -> torch.Tensor:
            if record and not self.blocks[0]._forward_hooks:
                for b in self.blocks:
                    b.register_forward_hook(lambda m, i, o: None)  # inert, as HF's are outside a recording
            return self.head(self.blocks(self.stem(x)))

    torch.manual_seed(0)
    model = _Recording()
    fm = fxfreeze.compile(model, (torch.randn(4, 8),), strategy="export", config={"policy": "manual"})
    with caplog.at_level(logging.INFO, logger="fxfreeze"):
        fm(torch.randn(4, 8))
        fm(torch.randn(4, 8), record=True)
        n = len(fm.graphs)
        fm(torch.randn(4, 8))
        fm(torch.randn(4, 8), record=True)
    assert n == 2 and len(fm.graphs) == 2 and not _captures(caplog)
