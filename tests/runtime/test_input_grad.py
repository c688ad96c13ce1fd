"""A call whose inputs require a gradient gets it through the frozen blocks, as eager code
with those blocks' parameters frozen does. Before, the frozen prefix was cut for every call:
a GAN's generator, trained through a compiled discriminator (``D(G(z))``), got no gradient
at all once the discriminator froze a block, silently; a gradient penalty
(``autograd.grad(D(x_hat), x_hat)``) raised "appears to not have been used in the graph"."""

from __future__ import annotations

import copy

import torch
from torch import nn

import fxfreeze
from _nets import ResidualMLP

TOL = dict(rtol=1e-5, atol=1e-6)  # graph vs eager sums in another order


def _gan():
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 8))
    disc = ResidualMLP(3)
    return gen, disc, copy.deepcopy(gen), copy.deepcopy(disc)


def _freeze_eager(disc: nn.Module, k: int) -> None:
    for m in [disc.stem, *disc.blocks][:k]:
        m.eval().requires_grad_(False)


def test_the_generator_trains_through_a_discriminator_with_frozen_blocks():
    gen, disc, ref_gen, ref_disc = _gan()
    fd = fxfreeze.compile(disc, (torch.randn(4, 8),), config={"policy": "manual", "manual": {"schedule": {}}})
    fd.freeze_prefix(2)
    _freeze_eager(ref_disc, 2)
    eager_calls = []
    run_eager = fd._run_eager
    fd._run_eager = lambda *a, **k: eager_calls.append(1) or run_eager(*a, **k)
    z = torch.randn(16, 4)
    fd(gen(z).detach()).sum().backward()  # the discriminator's own step: no input gradient, the graph, cut
    assert eager_calls == []
    assert all(p.grad is None for p in gen.parameters())
    disc.zero_grad(set_to_none=True)
    out, want = fd(gen(z)), ref_disc(ref_gen(z))  # the generator's step
    assert eager_calls == [1]
    torch.testing.assert_close(out, want, **TOL)
    out.square().mean().backward()
    want.square().mean().backward()
    for (name, p), q in zip([*gen.named_parameters(), *disc.named_parameters()], [*ref_gen.parameters(), *ref_disc.parameters()]):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, **TOL, msg=name)
    assert all(p.grad is not None for p in gen.parameters())
    assert all(p.grad is None for n, p in disc.named_parameters() if n.startswith(("stem.", "blocks.0.")))


def test_a_gradient_penalty_differentiates_through_the_frozen_blocks_twice():
    _, disc, _, ref_disc = _gan()
    fd = fxfreeze.compile(disc, (torch.randn(4, 8),), config={"policy": "manual", "manual": {"schedule": {}}})
    fd.freeze_prefix(2)
    _freeze_eager(ref_disc, 2)
    x = torch.randn(16, 8)
    grads = []
    for m in (fd, ref_disc):
        x_hat = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(m(x_hat).sum(), x_hat, create_graph=True)
        ((g.norm(dim=1) - 1) ** 2).mean().backward()  # WGAN-GP: the penalty trains the discriminator
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1], **TOL)
    for (name, p), q in zip(disc.named_parameters(), ref_disc.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, **TOL, msg=name)


def test_a_saliency_map_in_eval_mode_and_a_model_without_graphs():
    _, disc, _, ref_disc = _gan()
    for strategy in ("auto", "hooks"):
        fd = fxfreeze.compile(disc, (torch.randn(4, 8),), strategy=strategy, config={"policy": "manual", "manual": {"schedule": {}}})
        assert fd.eager_only == (strategy == "hooks")
        fd.freeze_prefix(3)
        _freeze_eager(ref_disc, 3)
        fd.eval()
        ref_disc.eval()
        maps = []
        for m in (fd, ref_disc):
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
            m(x)[:, 0].sum().backward()
            maps.append(x.grad)
        torch.testing.assert_close(maps[0], maps[1], **TOL)
        fd.detach()
        _freeze_eager(ref_disc, 0)
