"""What a graph would lose is kept by training through the model's own forward.

Activation checkpointing: a model whose forward calls ``torch.utils.checkpoint`` (or has
Hugging Face's ``gradient_checkpointing`` on) saves no more for its backward under fxfreeze
than without it, trains to the same gradients, and still freezes. Custom autograd
Functions: a gradient reversal layer, a straight-through estimator and a function that
recomputes its layer in its backward keep their backward, with any prefix frozen. Gradient
hooks a forward registers on its tensors are kept likewise."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint  # bound by name, as model code does

import fxfreeze
from fxfreeze.bench.memory import saved_bytes
from _nets import TokenStack


class _Net(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.inp = nn.Linear(8, 32)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 32)) for _ in range(4))
        self.out = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = h + (checkpoint(b, h, use_reentrant=self.reentrant) if self.training else b(h))
        return self.out(h)


class _Branchy(_Net):
    """The same with control flow on a tensor's value: no graph at all (``fm.eager_only``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() > -1e9):
            return super().forward(x)
        return x


def test_a_model_without_a_graph_that_checkpoints_reentrantly_still_trains_after_the_prefix():
    torch.manual_seed(0)
    model = _Branchy(reentrant=True)
    x = torch.randn(16, 8, requires_grad=True)
    fm = fxfreeze.compile(model, (x,), config={"policy": "manual"})
    assert fm.eager_only
    fm.train()
    fm.freeze_prefix(2)
    fm(x).sum().backward()
    assert model.blocks[0][0].weight.grad is None and model.blocks[1][0].weight.grad is not None


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_forward_that_checkpoints_keeps_its_memory_and_gradients_and_freezes(reentrant, caplog):
    torch.manual_seed(0)
    model = _Net(reentrant)
    ref = copy.deepcopy(model)
    x = torch.randn(16, 8, requires_grad=reentrant)  # reentrant checkpointing needs an input with grad
    with caplog.at_level(logging.INFO, logger="fxfreeze"):
        fm = fxfreeze.compile(model, (x,), config={"policy": "manual"})
        assert fm._analysis.capture.checkpoints
        fm.train()
        got, out = saved_bytes(lambda: fm(x))
    want, ref_out = saved_bytes(lambda: ref(x))
    assert got == want  # without the fix the graph saved every block's activations
    out.sum().backward()
    ref_out.sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert sum("checkpoints activations" in r.getMessage() for r in caplog.records) == 1
    model.zero_grad(set_to_none=True)
    fm.freeze_prefix(3)
    fm(x).sum().backward()
    assert model.inp.weight.grad is None and model.blocks[1][0].weight.grad is None
    assert model.blocks[2][0].weight.grad is not None
    model.eval()
    n = len(fm.graphs)
    with torch.no_grad():  # evaluation: a graph (with gradients on, x, which requires one, would get it eagerly)
        torch.testing.assert_close(fm(x), ref.eval()(x), rtol=1e-5, atol=1e-6)
    assert len(fm.graphs) == n + 1


def test_hugging_face_gradient_checkpointing_switched_on_after_compile_is_kept():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                  intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForSequenceClassification(cfg).train()
    batch = {"input_ids": torch.randint(0, 100, (4, 16)), "labels": torch.randint(0, 2, (4,))}
    fm = fxfreeze.compile(model, batch, config={"policy": "manual"})
    plain, _ = saved_bytes(lambda: fm(**batch).loss)
    # what the HF Trainer does at the start of train(), after the callback compiled the model
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref = copy.deepcopy(model)
    got, out = saved_bytes(lambda: fm(**batch).loss)
    want, ref_out = saved_bytes(lambda: ref(**batch).loss)
    assert got == want and got < plain / 4
    out.backward()
    ref_out.backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def _same_as_eager_with_each_prefix_frozen(fm, model: nn.Module, ref: nn.Module, x: torch.Tensor, upto: int) -> None:
    """For k = 0..upto-1 frozen blocks: the compiled module's output and every gradient equal
    eager code's with the same parameters frozen and the same modules in eval mode (the
    model's own forward runs, from the same seed: exact output)."""
    names = {id(m): n for n, m in model.named_modules()}
    for k in range(upto):
        fm.freeze_prefix(k)
        frozen = set(fm.frozen_parameter_names(k))
        for name, q in ref.named_parameters():
            q.requires_grad_(name not in frozen)
        ref.train()
        for m in fm.frozen_modules:
            ref.get_submodule(names[id(m)]).eval()
        model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        out = fm(x)
        torch.manual_seed(1)
        ref_out = ref(x)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
        out.pow(2).mean().backward()
        ref_out.pow(2).mean().backward()
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            assert (p.grad is None) == (q.grad is None), (k, name)
            if q.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8, msg=f"k={k} {name}")


class _ReverseGrad(torch.autograd.Function):
    """Gradient reversal (domain-adversarial training): identity forward, negated backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:  # type: ignore[override]
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return -ctx.lam * g, None


class _Straight(torch.autograd.Function):
    """Straight-through rounding (quantization-aware training): its backward passes the
    gradient on, where rounding's own gradient is zero."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return g


class _QuantBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.l2(torch.relu(_Straight.apply(self.l1(x) * 4) / 4))


class _Adversarial(nn.Module):
    """A feature extractor of straight-through blocks, a label head and a domain head behind
    a gradient reversal layer (with ``reverse``)."""

    def __init__(self, reverse: bool) -> None:
        super().__init__()
        self.reverse = reverse
        self.inp = nn.Linear(8, 16)
        self.blocks = nn.Sequential(*[_QuantBlock() for _ in range(3)])
        self.label, self.domain = nn.Linear(16, 2), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.inp(x))
        return self.label(h) + self.domain(_ReverseGrad.apply(h, 0.5) if self.reverse else h)


@pytest.mark.parametrize("reverse", [False, True])
def test_custom_autograd_functions_keep_their_backward_with_every_prefix_frozen(reverse, caplog):
    torch.manual_seed(0)
    model = _Adversarial(reverse)
    ref = copy.deepcopy(model)
    x = torch.randn(8, 8)
    with caplog.at_level(logging.INFO, logger="fxfreeze"):
        fm = fxfreeze.compile(model, (x,), config={"policy": "manual"})
        cap = fm._analysis.capture  # (a function's forward runs without autograd: fx's graph is refused for that)
        want = ["_Straight"] + (["_ReverseGrad"] if reverse else [])
        assert sorted(f.rsplit(".", 1)[-1] for f in cap.functions) == sorted(want)
        assert any("custom autograd Functions" in n and "_Straight" in n for n in fm.plan.notes), fm.plan.notes
        # without the fix: rounding's zero gradient, the reversal lost
        _same_as_eager_with_each_prefix_frozen(fm, model, ref, x, fm.plan.max_frozen + 1)
    assert sum("custom autograd Functions" in r.getMessage() for r in caplog.records) == 1
    model.eval()
    n = len(fm.graphs)
    with torch.no_grad():  # evaluation runs a graph: its forward is the model's
        torch.testing.assert_close(fm(x), ref.eval()(x), rtol=1e-5, atol=1e-6)
    assert len(fm.graphs) == n + 1


class _Recompute(torch.autograd.Function):
    """A layer run without autograd and recomputed in the backward (as reversible layers and
    memory-saving kernels do): its parameters are not the function's inputs, so it computes
    their gradients only when its input requires one."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        ctx.save_for_backward(x)
        return layer(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        x = x.detach().requires_grad_()
        with torch.enable_grad():
            out = ctx.layer(x)
        torch.autograd.backward(out, g)
        return x.grad, None


class _Recomputing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(3))
        self.out = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = h + _Recompute.apply(h, b)
        return self.out(h)


def test_a_function_that_recomputes_its_layer_trains_the_first_layer_after_the_prefix():
    torch.manual_seed(0)
    model = _Recomputing()
    ref = copy.deepcopy(model)
    x = torch.randn(8, 8)
    fm = fxfreeze.compile(model, (x,), config={"policy": "manual"})
    assert [f.rsplit(".", 1)[-1] for f in fm._analysis.capture.functions] == ["_Recompute"]
    ref(x).pow(2).mean().backward()  # nothing frozen: the gradients the trainable layers must get
    for k in range(1, fm.plan.max_frozen + 1):
        fm.freeze_prefix(k)
        frozen = set(fm.frozen_parameter_names(k))
        model.zero_grad(set_to_none=True)
        fm(x).pow(2).mean().backward()
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            if name in frozen:
                assert p.grad is None, (k, name)
            else:  # without the leaves, the first layer after the prefix got no gradient
                assert p.grad is not None, (k, name)
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=f"k={k} {name}")


def test_a_model_without_custom_functions_records_none():
    model = _Net(reentrant=False).eval()
    fm = fxfreeze.compile(model, (torch.randn(4, 8),), config={"policy": "manual"})
    assert fm._analysis.capture.functions == () and not fm._analysis.capture.checkpoints
    assert not any("autograd Functions" in n for n in fm.plan.notes)


class _Hooked(nn.Module):
    """Gradient hooks registered in the forward: each block's branch scaled down (only when
    it requires a gradient, as such code guards it) and the features' gradient clipped (a
    hook that fails without autograd: the capture's example call must run with it)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
        self.out = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            r = b(h)
            if r.requires_grad:
                r.register_hook(lambda g: g * 0.1)
            h = h + r
        h.register_hook(lambda g: g.clamp(-1e-3, 1e-3))
        return self.out(h)


def test_gradient_hooks_registered_in_the_forward_are_kept(caplog):
    torch.manual_seed(0)
    model = _Hooked()
    ref = copy.deepcopy(model)
    x = torch.randn(8, 8)
    caplog.set_level(logging.INFO, logger="fxfreeze")
    fm = fxfreeze.compile(model, (x,), config={"policy": "manual"})  # without the fix: ExampleInputError
    assert fm._analysis.capture.tensor_hooks == 4
    assert any("gradient hook" in n for n in fm.plan.notes), fm.plan.notes
    # an exported graph drops the hooks (clipping and scaling lost); with every block frozen the
    # last hook's tensor needs no gradient, and registering it fails in eager code too
    _same_as_eager_with_each_prefix_frozen(fm, model, ref, x, fm.plan.max_frozen)
    assert sum("gradient hooks" in r.getMessage() for r in caplog.records) == 1


def _noise_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """NEFTune's, as the HF Trainer puts it on the input embeddings: in training, uniform noise
    bounded by a tensor, which ``torch.export`` cannot guard on."""
    if module.training:
        dims = torch.tensor(output.size(1) * output.size(2))
        bound = 5.0 / torch.sqrt(dims)
        output = output + torch.zeros_like(output).uniform_(-bound, bound)
    return output


def test_forward_hooks_export_cannot_take_are_left_out_of_the_graph_and_run_on_every_call(caplog):
    """Hugging Face models are exported (fx cannot trace their root; this one is exported by
    request), and export traces a module's hooks. Before: the hook made the whole model
    uncapturable (eager-only, a plan from module order), and Egeria, with no graph of the
    stem to measure, never froze anything (NEFTune under the Trainer)."""
    torch.manual_seed(0)
    model = TokenStack()
    model.emb.register_forward_hook(_noise_hook)
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 50, (4, 12))
    caplog.set_level(logging.INFO, logger="fxfreeze")
    fm = fxfreeze.compile(model, (ids,), strategy="export", config={"policy": "manual"})
    assert not fm.eager_only and fm._analysis.capture.hooks_left_out == ("emb",)
    assert fm.plan.names == ["stem", "layers.0", "layers.1", "layers.2"]
    assert any("without the forward hooks of emb" in n for n in fm.plan.notes), fm.plan.notes
    # a frozen block runs in eval mode: no noise once the stem is frozen
    _same_as_eager_with_each_prefix_frozen(fm, model, ref, ids, 3)
    assert sum("forward hooks that torch.export could not take" in r.getMessage() for r in caplog.records) == 1
    fm.freeze_prefix(0)
    model.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(fm(ids), ref(ids), rtol=1e-6, atol=1e-6)

    opt = torch.optim.SGD(model.parameters(), lr=0.05)  # Egeria measures the blocks on the graph
    model.train()
    cfg = {"egeria": {"eval_interval": 2, "window": 3, "patience": 1, "asynchronous": False, "overhead_budget": 0.0}}
    fm = fxfreeze.compile(model, (ids,), optimizer=opt, strategy="export", config=cfg)
    for _ in range(8):
        opt.zero_grad()
        fm(ids).pow(2).mean().backward()
        opt.step()
    assert fm.freezer.policy.evaluations >= 3 and not fm.freezer.policy.unmeasurable


class _InPlaceJoins(nn.Module):
    """Residual joins written in place on each block's output (``result += input``, as
    torchvision's MobileNetV3 blocks do), and a straight-through head: the model trains
    through its own forward, with the frozen blocks' outputs handed on as leaves."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Tanh(), nn.Linear(16, 16)) for _ in range(3))
        self.out = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            y = b(h)  # a linear layer's output: its backward does not need it
            y += h
            h = y
        return self.out(_Straight.apply(h * 4) / 4)


def test_a_frozen_output_written_in_place_by_the_model_trains_through_its_own_forward():
    """The frozen blocks' outputs were leaves that require a gradient, and the model's next
    line wrote one in place: "a leaf Variable that requires grad is being used in an
    in-place operation" at the first call after a freeze (Faster R-CNN and Mask R-CNN with
    a MobileNetV3 or ResNet backbone, under torch 2.14)."""
    torch.manual_seed(0)
    model = _InPlaceJoins()
    ref = copy.deepcopy(model)
    x = torch.randn(8, 8)
    fm = fxfreeze.compile(model, (x,), config={"policy": "manual"})
    assert [f.rsplit(".", 1)[-1] for f in fm._analysis.capture.functions] == ["_Straight"]
    _same_as_eager_with_each_prefix_frozen(fm, model, ref, x, fm.plan.max_frozen + 1)
