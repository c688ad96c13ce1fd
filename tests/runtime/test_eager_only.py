"""A model neither fx nor torch.export can capture runs its own forward, frozen all the same.

The model below branches on a tensor's value in its root forward (as DeBERTa-v2's loss code
and wav2vec2's masking do): fx cannot trace it and export cannot guard on it. Its twin without
the branch is captured as a graph. With the same weights and the same frozen prefix, the
eager-only module must compute what the graph computes (outputs and every gradient, tolerance
1e-6 relative: the same ops in the same order), including a parameter shared between the
frozen stem and the trainable head, which trains from its trainable use only.
"""

from __future__ import annotations

import copy
import logging
import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxfreeze
from fxfreeze.errors import FxFreezeError


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.bn = nn.BatchNorm1d(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.bn(self.fc(x)))


class _Net(nn.Module):
    """Stem, three residual blocks, a head whose weight is the stem's (tied)."""

    def __init__(self, branchy: bool, d: int = 8) -> None:
        super().__init__()
        self.branchy = branchy
        self.stem = nn.Linear(d, d, bias=False)
        self.blocks = nn.Sequential(*[_Block(d) for _ in range(3)])
        self.drop = nn.Dropout(0.0)
        self.head = nn.Linear(d, d)
        self.head.weight = self.stem.weight  # shared by the stem and the head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x))
        if self.branchy and bool((h.abs().sum() > -1).item()):  # data-dependent: always true
            h = h * 1.0
        return self.head(self.drop(h))


def _pair(**compile_kwargs):
    torch.manual_seed(0)
    graph_model = _Net(branchy=False)
    eager_model = _Net(branchy=True)
    eager_model.load_state_dict(graph_model.state_dict())
    x = torch.randn(6, 8)
    g = fxfreeze.compile(graph_model, (x,), policy="manual")
    e = fxfreeze.compile(eager_model, (x,), **compile_kwargs)
    return g, e, x


def _step(fm, x, y):
    fm.zero_grad(set_to_none=True)
    out = fm(x)
    F.mse_loss(out, y).backward()
    return out.detach(), {n: (None if p.grad is None else p.grad.clone()) for n, p in fm.named_parameters()}


def test_compiles_with_a_warning_that_says_why_and_what_is_lost(caplog):
    with caplog.at_level(logging.WARNING, logger="fxfreeze"):
        g, e, _ = _pair(optimizer=None, config={"policy": "egeria", "cache": {"enabled": True}})
    assert not g.eager_only and e.eager_only and e.strategy == "hooks"
    assert [b.name for b in e.plan.blocks] == [b.name for b in g.plan.blocks]
    text = caplog.text
    assert "_Net could not be captured as a graph" in text and "control flow" in text
    assert "egeria judges only blocks that are one module each" in text
    assert "caching stays off" in text and e.activation_cache is None
    assert type(e.freezer.policy.probe).__name__ == "EagerProbe"
    with pytest.raises(FxFreezeError, match="runs its own forward"):
        e.graph_module(True)
    assert "eager only" in repr(e)


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_equals_the_graph_with_the_same_prefix_frozen(k):
    g, e, x = _pair(policy="manual")
    assert "stem.weight" in g.plan.shared_params
    y = torch.randn(6, 8)
    g.freeze_prefix(k)
    e.freeze_prefix(k)
    assert e.frozen_parameter_names() == g.frozen_parameter_names()
    for _ in range(2):  # train mode; BatchNorm statistics of trainable blocks move alike
        out_g, grads_g = _step(g, x, y)
        out_e, grads_e = _step(e, x, y)
        torch.testing.assert_close(out_e, out_g, rtol=1e-6, atol=1e-7)
        for n, gg in grads_g.items():
            ge = grads_e[n]
            assert (gg is None) == (ge is None), n
            if gg is not None:
                torch.testing.assert_close(ge, gg, rtol=1e-6, atol=1e-7, msg=f"gradient of {n}")
    for n in e.frozen_parameter_names():
        assert grads_e[n] is None
    assert grads_e["stem.weight"] is not None  # the head's use keeps training it


def test_autograd_does_not_enter_the_frozen_prefix():
    _, e, x = _pair(policy="manual")
    e.freeze_prefix(2)  # the stem (its weight shared with the head) and the first block
    seen: list[bool] = []
    h = e.model.blocks[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].requires_grad))
    e(x).sum().backward()
    h.remove()
    assert seen == [False]  # without the cut, the stem's shared weight would pull autograd through block 0
    e.freeze_prefix(1)  # the stem alone: its weight keeps training, from the head's use only
    e.zero_grad(set_to_none=True)
    h = e.model.blocks(e.model.stem(x)).detach()
    F.linear(h, e.model.head.weight, e.model.head.bias).sum().backward()
    from_head = e.model.stem.weight.grad.clone()
    e.zero_grad(set_to_none=True)
    e(x).sum().backward()
    torch.testing.assert_close(e.model.stem.weight.grad, from_head, rtol=1e-6, atol=1e-7)


def test_frozen_batchnorm_statistics_stay_and_an_unfreeze_restores_training():
    _, e, x = _pair(policy="manual")
    e.freeze_prefix(2)
    bn0, bn1 = e.model.blocks[0].bn, e.model.blocks[1].bn
    before0, before1 = bn0.running_mean.clone(), bn1.running_mean.clone()
    e.train()
    e(x).sum().backward()
    assert torch.equal(bn0.running_mean, before0) and not bn0.training
    assert not torch.equal(bn1.running_mean, before1)
    e.freeze_prefix(0)
    assert bn0.training and all(p.requires_grad for p in e.parameters())


def test_a_weight_policy_freezes_and_a_resume_restores_the_prefix():
    torch.manual_seed(0)
    model = _Net(branchy=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(6, 8), torch.randn(6, 8)
    cfg = {"policy": "freezeout", "total_steps": 40, "freezeout": {"t0": 0.3}}
    fm = fxfreeze.compile(model, (x,), optimizer=opt, config=cfg)
    assert fm.eager_only
    for _ in range(30):
        opt.zero_grad(set_to_none=True)
        F.mse_loss(fm(x), y).backward()
        opt.step()
    assert fm.num_frozen > 0
    frozen = fm.frozen_parameter_names()
    state = fm.freezer.state_dict()

    model2 = _Net(branchy=True)
    model2.load_state_dict(model.state_dict())
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.01)
    fm2 = fxfreeze.compile(model2, (x,), optimizer=opt2, config=cfg)
    fm2.freezer.load_state_dict(state)
    assert fm2.num_frozen == fm.num_frozen and fm2.frozen_parameter_names() == frozen
    assert not any(fm2.params_by_name[n].requires_grad for n in frozen)


def test_the_default_policy_evaluates_trains_and_saves_its_state():
    torch.manual_seed(0)
    model = _Net(branchy=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(6, 8), torch.randn(6, 8)
    fm = fxfreeze.compile(model, (x,), optimizer=opt, total_steps=30)
    ref = copy.deepcopy(model)
    for _ in range(30):
        opt.zero_grad(set_to_none=True)
        F.mse_loss(fm(x), y).backward()
        opt.step()
    assert fm.freezer.policy.evaluations > 0 and not fm.freezer.policy.unmeasurable
    ref_params = dict(ref.named_parameters())
    for n, p in model.named_parameters():  # a bias right before BatchNorm gets no gradient
        assert n.endswith("fc.bias") or not torch.equal(p, ref_params[n]), f"{n} did not learn"
    state = fm.freezer.state_dict()
    fm.freezer.load_state_dict(state)
    fm.detach()


class _Talks(_Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        print("the model's own line", file=sys.stderr)
        return super().forward(x)


def test_failed_exports_keep_their_partial_graphs_off_stderr_and_nothing_else(capfd, caplog):
    """torch.export prints a failed export's partial graph to stderr, once per wrapper: a
    model no strategy captures filled the terminal with them. They go to the debug log; what
    the model itself writes to stderr meanwhile still reaches it."""
    with caplog.at_level(logging.DEBUG, logger="fxfreeze"):
        p = fxfreeze.plan(_Talks(branchy=True), (torch.randn(4, 8),))
    assert p.strategy == "hooks"
    err = capfd.readouterr().err
    assert "def forward(self" not in err
    assert "the model's own line" in err
    assert any("partial graph" in r.getMessage() and "def forward(self" in r.getMessage() for r in caplog.records)


def _egeria_run(branchy: bool, steps: int = 90) -> tuple[Any, list[dict[str, Any]]]:
    torch.manual_seed(0)
    model = _Net(branchy=branchy, d=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g)) for _ in range(4)]
    # fixed steps (no budget), synchronous: the two runs evaluate at the same steps
    cfg = {"policy": "egeria", "egeria": {"asynchronous": False, "overhead_budget": 0, "eval_interval": 10,
                                          "evaluations_per_run": 0, "min_window_steps": 10, "window": 3}}
    fm = fxfreeze.compile(model, (data[0][0],), optimizer=opt, config=cfg)
    for s in range(steps):
        x, y = data[s % 4]
        opt.zero_grad(set_to_none=True)
        F.mse_loss(fm(x), y).backward()
        opt.step()
    return fm, [t for t in fm.freezer.policy.timeline if "plasticity" in t]


def test_egeria_measures_an_eager_model_as_it_measures_its_graph_twin():
    """Each block of the eager-only model is captured alone (its module on its recorded
    call); the probe's values come from the model's own forward with hooks. The plasticity
    series must be the graph twin's (same seeds, same steps, synchronous), and so must the
    decisions."""
    fm_g, tl_g = _egeria_run(branchy=False)
    fm_e, tl_e = _egeria_run(branchy=True)
    assert fm_e.eager_only and not fm_g.eager_only
    pe = fm_e.freezer.policy
    assert not pe.unmeasurable and sorted(pe.refs.builders) == sorted(fm_g.freezer.policy.refs.builders)
    assert len(tl_e) == len(tl_g) >= 8
    for a, b in zip(tl_e, tl_g):
        assert a["step"] == b["step"] and set(a["plasticity"]) == set(b["plasticity"])
        for j, v in a["plasticity"].items():
            assert v == pytest.approx(b["plasticity"][j], rel=1e-4), (a["step"], j)
    assert [(e["step"], e["num_frozen"]) for e in fm_e.freezer.history] == \
        [(e["step"], e["num_frozen"]) for e in fm_g.freezer.history]
    fm_e.detach()
    fm_g.detach()


class _GluedStem(nn.Module):
    """A stem of two modules joined by code at the root: no single module to capture."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.blocks = nn.Sequential(*[_Block(8) for _ in range(2)])
        self.head = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b(torch.tanh(self.a(x)) * 2)
        h = self.blocks(h)
        if bool((h.abs().sum() > -1).item()):
            h = h * 1.0
        return self.head(h)


def test_a_block_that_is_not_one_module_is_never_judged_and_training_goes_on(caplog):
    torch.manual_seed(0)
    model = _GluedStem()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(16, 8), torch.randn(16, 8)
    cfg = {"policy": "egeria", "egeria": {"asynchronous": False, "overhead_budget": 0, "eval_interval": 5,
                                          "evaluations_per_run": 0, "min_window_steps": 5}}
    with caplog.at_level(logging.WARNING, logger="fxfreeze"):
        fm = fxfreeze.compile(model, (x,), optimizer=opt, config=cfg)
        for _ in range(30):
            opt.zero_grad(set_to_none=True)
            F.mse_loss(fm(x), y).backward()
            opt.step()
    p = fm.freezer.policy
    assert fm.eager_only and len(fm.plan.blocks[0].modules) == 2
    assert 0 in p.unmeasurable and "modules joined by the model's own code" in p.unmeasurable[0]
    assert "block 0 (stem) has no reference" in caplog.text
    assert fm.num_frozen == 0 and p.evaluations > 0
    fm.detach()


def test_egeria_on_an_eager_model_resumes_exactly():
    """Saved mid-run (anchors and evidence in the policy's state) and resumed in a new
    compile: the same plasticity values at the same steps, and the same freezes."""
    import io

    cfg = {"policy": "egeria", "egeria": {"asynchronous": False, "overhead_budget": 0, "eval_interval": 10,
                                          "evaluations_per_run": 0, "min_window_steps": 10, "window": 3}}
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g)) for _ in range(4)]

    def make() -> tuple[Any, Any, Any]:
        torch.manual_seed(0)
        model = _Net(branchy=True, d=16)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        return model, opt, fxfreeze.compile(model, (data[0][0],), optimizer=opt, config=cfg)

    def train(fm: Any, opt: Any, a: int, b: int) -> None:
        for s in range(a, b):
            x, y = data[s % 4]
            opt.zero_grad(set_to_none=True)
            F.mse_loss(fm(x), y).backward()
            opt.step()

    def after(fm: Any, step: int) -> list[tuple[int, dict[int, float]]]:
        return [(t["step"], t["plasticity"]) for t in fm.freezer.policy.timeline if "plasticity" in t and t["step"] > step]

    model, opt, fm = make()
    train(fm, opt, 0, 45)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "freezer": fm.freezer.state_dict()}, buf)
    train(fm, opt, 45, 90)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2, opt2, fm2 = make()
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    fm2.freezer.load_state_dict(saved["freezer"])
    train(fm2, opt2, 45, 90)
    assert after(fm2, 45) == after(fm, 45) and len(after(fm, 45)) >= 4
    assert fm2.num_frozen == fm.num_frozen > 0
    assert [e for e in fm2.freezer.history if e["step"] > 45] == [e for e in fm.freezer.history if e["step"] > 45]
    fm.detach()
    fm2.detach()


class _RootResiduals(nn.Module):
    """The residual adds at the root, between the layers (``h = h + layer(h)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.GELU()) for _ in range(3)])
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for layer in self.layers:
            h = h + layer(h)
        return self.head(h)


def test_the_module_order_links_tensors_made_between_modules():
    """A hooks capture links a tensor made by code between leaves to the leaf before it: the
    plan is one block per layer, as fx finds, not one block for all the layers."""
    x = torch.randn(4, 8)
    by_fx = fxfreeze.plan(_RootResiduals(), (x,))
    by_hooks = fxfreeze.plan(_RootResiduals(), (x,), strategy="hooks")
    assert by_fx.strategy == "fx" and by_hooks.strategy == "hooks"
    assert [b.name for b in by_hooks.blocks] == [b.name for b in by_fx.blocks] == ["stem", "layers.0", "layers.1", "layers.2"]
    assert [b.params for b in by_hooks.blocks] == [b.params for b in by_fx.blocks]


class _LayerDropNet(nn.Module):
    """An encoder that skips each layer at random while training (LayerDrop, as wav2vec2,
    HuBERT and data2vec do): the draw decides Python control flow, so only hooks capture it."""

    def __init__(self, layerdrop: float, d: int = 8) -> None:
        super().__init__()
        self.layerdrop = layerdrop
        self.stem = nn.Linear(d, d)
        self.layers = nn.ModuleList(_Block(d) for _ in range(4))
        self.head = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for layer in self.layers:
            if self.training and torch.rand([]) < self.layerdrop:
                continue
            h = layer(h)
        return self.head(h)


def test_layers_skipped_at_random_in_the_capture_call_are_blocks_all_the_same(caplog):
    """A hooks capture records the call it makes. In training mode LayerDrop skipped layers
    in that call, and they were in no block: never frozen, and with the layers after them
    frozen they were reported trainable while no gradient reached them."""
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    model = _LayerDropNet(layerdrop=0.5).train()
    with torch.random.fork_rng():
        torch.manual_seed(1)
        skipped = [bool(torch.rand([]) < 0.5) for _ in range(4)]
    assert any(skipped)  # seed 1's first draws skip a layer (the capture draws from that seed)
    torch.manual_seed(1)
    with caplog.at_level(logging.INFO, logger="fxfreeze"):
        fm = fxfreeze.compile(model, (x,), config={"policy": "manual", "manual": {"schedule": {}}})
    assert fm.strategy == "hooks"
    assert [b.name for b in fm.plan.blocks] == ["stem", "layers.0", "layers.1", "layers.2", "layers.3"]
    assert any("LayerDrop" in r.getMessage() and "eval-mode call" in r.getMessage() for r in caplog.records)
    assert model.training and all(m.training for m in model.modules())  # the eval capture left no trace

    fm.freeze_prefix(5)
    assert set(fm.frozen_parameter_names(5)) == {n for n, _ in model.named_parameters() if not n.startswith("head.")}
    torch.manual_seed(2)
    fm(x).square().mean().backward()
    assert all((p.grad is None) == (not n.startswith("head.")) for n, p in model.named_parameters())


def test_a_training_only_module_keeps_the_training_mode_order():
    """Eval mode runs fewer modules here (an auxiliary head used only while training): the
    training call's order is kept, with that head in it."""

    class Aux(_LayerDropNet):
        def __init__(self) -> None:
            super().__init__(layerdrop=0.0)
            self.aux = nn.Linear(8, 2)
            self.unused = nn.Linear(8, 8)  # never called: a second run must not pick eval

        def forward(self, x: torch.Tensor) -> Any:
            out = super().forward(x)
            if self.training and bool((x.sum() > -1e9).item()):  # data-dependent: hooks only
                return out + self.aux(x)
            return out

    torch.manual_seed(0)
    x = torch.randn(4, 8)
    fm = fxfreeze.compile(Aux().train(), (x,), config={"policy": "manual", "manual": {"schedule": {}}})
    assert fm.strategy == "hooks"
    assert "aux" in fm.plan.head.modules


def test_a_dropout_the_frozen_prefix_shares_with_later_code_is_off_in_the_prefix_only():
    """A model that runs its own forward (only hooks capture it) with one ``nn.Dropout``
    after the stem, after each block and before the head: no block owns the module, so no
    freeze held it in eval mode and the frozen prefix went on dropping out. Its calls the
    plan puts in the prefix now run in eval mode, the others in the model's mode."""
    from _nets import SharedDropout

    class Branchy(SharedDropout):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if bool(x.sum() > -1e9):  # data-dependent: hooks only
                return super().forward(x)
            return x

    torch.manual_seed(0)
    model, x = Branchy().train(), torch.randn(4, 8)
    fm = fxfreeze.compile(model, (x,), config={"policy": "manual", "manual": {"schedule": {}}})
    assert fm.eager_only and [b.name for b in fm.plan.blocks] == ["stem", "blocks.0", "blocks.1", "blocks.2"]
    fm.train()
    for k in range(fm.plan.max_frozen + 1):
        fm.freeze_prefix(k)
        torch.manual_seed(3)
        out = fm(x)
        assert model.drop.training
        torch.manual_seed(3)
        torch.testing.assert_close(out, model.by_hand(x, k), rtol=0, atol=0, msg=lambda m: f"k={k}: {m}")
    fm.eval()
    with torch.no_grad():  # no cut in evaluation: every call in eval mode, as the model says
        torch.testing.assert_close(fm(x), SharedDropout.forward(model.eval(), x), rtol=0, atol=0)


def test_a_forward_raising_inside_a_shared_call_leaves_its_module_in_the_model_mode():
    """The shared module is put in eval mode for a prefix call and back after it; a forward
    that raises in between (an out-of-memory retry loop catches and goes on) must not leave
    it in eval mode."""
    from _nets import SharedDropout

    class Failing(SharedDropout):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if bool(x.sum() > -1e9):  # data-dependent: hooks only
                return super().forward(x)
            return x

    torch.manual_seed(0)
    model, x = Failing().train(), torch.randn(4, 8)
    fm = fxfreeze.compile(model, (x,), config={"policy": "manual", "manual": {"schedule": {}}})
    fm.train()
    fm.freeze_prefix(2)

    def boom(module: nn.Module, args: Any, output: Any) -> None:
        raise RuntimeError("out of memory (simulated)")

    handle = model.drop.register_forward_hook(boom)  # runs before the eval call's own restoring hook
    with pytest.raises(RuntimeError, match="simulated"):
        fm(x)
    handle.remove()
    assert model.drop.training
    torch.manual_seed(3)
    out = fm(x)
    torch.manual_seed(3)
    torch.testing.assert_close(out, model.by_hand(x, 2), rtol=0, atol=0)


def test_a_model_whose_eval_path_refuses_the_training_inputs_keeps_the_training_order():
    """The order is recorded again in eval mode only to find layers a training call skipped;
    a model whose eval path raises on the same inputs keeps the training call's order."""

    class EvalFails(_LayerDropNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.training:
                raise ValueError("eval needs other inputs")
            return super().forward(x)

    torch.manual_seed(1)
    model = EvalFails(layerdrop=0.5).train()
    fm = fxfreeze.compile(model, (torch.randn(4, 8),), config={"policy": "manual", "manual": {"schedule": {}}})
    assert fm.strategy == "hooks" and fm.plan.blocks[0].name == "stem"

