"""A frozen block runs in eval mode, also where its training-mode code leaves more in a graph
than dropout and batch norm: stochastic depth (a random draw and a rescale), a buffer it
updates while training. Before, the training graph kept doing both in frozen blocks: an
exported model's frozen DropPath went on dropping samples and its EMA buffers on moving (and
fx's graph never updated a buffer its forward wrote by a chained in-place op: row 41)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxfreeze
from fxfreeze.passes.cut_backward import detach_tree
from _nets import StochasticDepthMLP

VARIANTS = [("fx", False), ("export", False), ("export", True), ("auto", True)]
TOL = dict(rtol=1e-5, atol=1e-6)  # float32 sums in another order (graph vs eager): not bitwise


def _pair(strategy: str, no_grad: bool):
    torch.manual_seed(0)
    model = StochasticDepthMLP(3, no_grad=no_grad).train()
    ref = copy.deepcopy(model)
    fm = fxfreeze.compile(model, (torch.randn(4, 8),), strategy=strategy, config={"policy": "manual", "manual": {"schedule": {}}})
    return model, ref, fm


def _freeze_ref(ref: nn.Module, k: int) -> None:
    """What a frozen prefix of ``k`` blocks means in eager code: eval mode, no gradients."""
    blocks = [ref.stem, *ref.blocks]
    for i, b in enumerate(blocks):
        b.train(i >= k)
        for p in b.parameters():
            p.requires_grad_(i >= k)


def _compare(model: nn.Module, ref: nn.Module, fm, seed: int) -> None:
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    out = fm(x)
    torch.manual_seed(seed)
    want = ref(x)
    torch.testing.assert_close(out, want, **TOL)
    out.square().sum().backward()
    want.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, **TOL, msg=name)
        p.grad = q.grad = None
    for (name, b), c in zip(model.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, c, **TOL, msg=name)


@pytest.mark.parametrize("strategy, no_grad", VARIANTS)
def test_frozen_blocks_draw_nothing_and_write_no_buffer_as_in_eval_mode(strategy, no_grad):
    model, ref, fm = _pair(strategy, no_grad)
    assert fm.strategy == ("fx" if strategy == "fx" else "export")
    _compare(model, ref, fm, 0)
    for step, k in enumerate([2, 3, 0, 1, 3]):  # deeper, back to none (the safety net), again
        fm.freeze_prefix(k)
        _freeze_ref(ref, k)
        frozen_state = {n: b.clone() for n, b in model.named_buffers() if n.startswith(tuple(f"blocks.{i}." for i in range(k - 1)))}
        for seed in range(2):
            _compare(model, ref, fm, 10 * step + seed + 1)
        for n, b in frozen_state.items():
            assert torch.equal(model.get_buffer(n), b), n  # a frozen block's buffers stay as they were
        for e in fm.graphs.entries():
            if e.graph_module is not None:
                e.graph_module.graph.lint()
    training = [e for e in fm.graphs.entries() if e.training]
    if fm.strategy == "export":  # the DropPath draws are inline: captured again with the frozen blocks held
        assert training and all(e.held == 3 for e in training)
        assert set(fm.graphs.residue) == {1, 2, 3}
    else:  # fx keeps DropPath a module call (its own mode); the EMA write is inline
        assert set(fm.graphs.residue) == {1, 2, 3} and all(e.held == 3 for e in training)


def test_a_model_whose_training_code_the_cut_switches_is_not_captured_again():
    """Dropout and BatchNorm only: the cut is enough, no capture beyond the first."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.2), nn.Linear(16, 16), nn.BatchNorm1d(16),
                          nn.ReLU(), nn.Linear(16, 3)).train()
    fm = fxfreeze.compile(model, (torch.randn(4, 8),), strategy="export", config={"policy": "manual", "manual": {"schedule": {}}})
    fm(torch.randn(4, 8))
    entries = fm.graphs.entries()
    fm.freeze_prefix(2)
    fm(torch.randn(4, 8)).sum().backward()
    assert fm.graphs.residue == {} and fm.graphs.entries() == entries  # the same graphs, cut at 2 only:
    for e in entries:  # each graph is cut after block 1, its code generated from it
        cuts = [n.meta.get("fxfreeze.block") for n in e.graph_module.graph.nodes if n.target is detach_tree]
        assert cuts and max(cuts) == 1, cuts
        assert e.graph_module.code == e.graph_module.graph.python_code("self").src
    frozen = set(fm.frozen_parameter_names(2))
    assert frozen and all((p.grad is None) == (n in frozen) for n, p in model.named_parameters())


def test_the_activation_cache_keeps_eval_mode_outputs_of_blocks_with_stochastic_depth():
    """Before, the cache stored the frozen prefix's training-mode outputs: one random DropPath
    draw per sample, served every epoch after."""
    torch.manual_seed(0)
    model = StochasticDepthMLP(3).train()
    ref = copy.deepcopy(model)
    fm = fxfreeze.compile(model, (torch.randn(4, 8),), strategy="export",
                          config={"policy": "manual", "manual": {"schedule": {}}, "cache": {"enabled": True}})
    fm.freeze_prefix(3)
    _freeze_ref(ref, 3)
    data = torch.randn(8, 8, generator=torch.Generator().manual_seed(5))
    for epoch in range(3):  # the first fills, the next read
        with fm.sample_ids(torch.arange(8)):
            torch.manual_seed(epoch)
            out = fm(data)
        torch.manual_seed(epoch)
        torch.testing.assert_close(out, ref(data), **TOL)
    assert len(fm.activation_cache) == 8


@pytest.mark.parametrize("strategy", ["auto", "export"])
def test_a_frozen_layer_under_spectral_norm_stops_its_power_iteration_as_in_eval_mode(strategy):
    """spectral_norm updates its ``_u``/``_v`` buffers in training mode only; frozen (eval),
    eager code leaves them, and so must the compiled module."""
    from torch.nn.utils.parametrizations import spectral_norm

    class Disc(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = spectral_norm(nn.Linear(8, 16))
            self.layers = nn.ModuleList([nn.Sequential(spectral_norm(nn.Linear(16, 16)), nn.LeakyReLU(0.2)) for _ in range(3)])
            self.head = nn.Linear(16, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.stem(x)
            for layer in self.layers:
                h = h + layer(h)
            return self.head(h)

    torch.manual_seed(0)
    model = Disc()
    ref = copy.deepcopy(model)
    fm = fxfreeze.compile(model, (torch.randn(4, 8),), strategy=strategy, config={"policy": "manual", "manual": {"schedule": {}}})
    assert fm.plan.names == ["stem", "layers.0", "layers.1", "layers.2"]
    fm.freeze_prefix(2)
    for m in (ref.stem, ref.layers[0]):
        m.eval().requires_grad_(False)
    frozen_u = model.layers[0][0].parametrizations.weight[0]._u.clone()
    for seed in range(3):
        x = torch.randn(8, 8, generator=torch.Generator().manual_seed(seed))
        out, want = fm(x), ref(x)
        torch.testing.assert_close(out, want, **TOL)
        out.sum().backward()
        want.sum().backward()
    assert torch.equal(model.layers[0][0].parametrizations.weight[0]._u, frozen_u)
    for (name, b), c in zip(model.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, c, **TOL, msg=name)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, **TOL, msg=name)
