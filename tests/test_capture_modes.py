"""A forward that switches grad mode or autocast inside (a momentum encoder under
``torch.no_grad()``, a body under ``torch.autocast``) is not captured by fx, which would
record none of it: its graph computed the encoder with gradients (an optimizer over all
parameters then trained it) and the body in float32. ``torch.export`` records both."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxfreeze
from fxfreeze.errors import TraceError
from fxfreeze.trace import capture
from _nets import AutocastBody, Res


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))


class _Momentum(nn.Module):
    """BYOL/MoCo-style: the target encoder runs without gradients inside the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.online, self.target, self.head = _mlp(), _mlp(), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = self.target(x)
        return ((self.head(self.online(x)) - t) ** 2).mean()


def test_a_no_grad_region_in_the_forward_is_captured_by_export_and_keeps_its_gradients_out():
    torch.manual_seed(0)
    model, x = _Momentum(), torch.randn(4, 8)
    with pytest.raises(TraceError, match=r"grad mode off switched inside the forward \(in target"):
        capture(model, (x,), strategy="fx")
    fm = fxfreeze.compile(model, (x,), config={"policy": "manual"})
    assert fm.strategy == "export" and any("grad mode off" in r for r in fm.plan.notes)
    assert not any("region inside the forward spans" in n for n in fm.plan.notes)  # no_grad: nothing to split
    assert "target" in fm.plan.names and "online" in fm.plan.names
    gm = fm.graph_module()
    gm.graph.lint()
    loss = fm(x)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    expected = type(model).forward(model, x)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    assert not any(n.startswith("target.") for n in grads)  # as in eager: no gradient reaches it
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-6, atol=1e-7, msg=n)
    assert set(grads) == {n for n, p in model.named_parameters() if p.grad is not None}


def test_an_autocast_body_is_captured_by_export_and_computes_in_its_dtype():
    torch.manual_seed(0)
    model, x = AutocastBody(depth=3), torch.randn(4, 8)
    with pytest.raises(TraceError, match="autocast cpu torch.bfloat16 switched inside the forward"):
        capture(model, (x,), strategy="fx")
    fm = fxfreeze.compile(model, (x,), config={"policy": "manual"})
    assert fm.strategy == "export"
    # export records the region as one node, so stem and blocks are one block: the notes say why
    assert fm.plan.names == ["stem", "blocks"]
    assert any("torch.autocast region inside the forward spans stem, blocks" in n for n in fm.plan.notes)
    fm.graph_module().graph.lint()
    torch.testing.assert_close(fm(x), type(model).forward(model, x), rtol=0, atol=0)  # bf16 inside, as eager


def test_an_autocast_around_the_call_is_not_a_switch_inside_the_forward():
    """The caller's own autocast (a training loop's) is the mode the trace starts in: fx
    still captures, and the graph is kept for that autocast state."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), Res(16), Res(16), nn.Linear(16, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert capture(model, (torch.randn(4, 8),)).strategy == "fx"
        with torch.no_grad():  # a first call under no_grad: captured with gradients on
            assert capture(model, (torch.randn(4, 8),)).strategy == "fx"


def test_reentrant_checkpointing_is_not_a_switch_the_graph_would_lose():
    """``checkpoint(..., use_reentrant=True)`` runs its region under ``no_grad`` and
    recomputes it with gradients in the backward; a compiled module leaves training calls of
    such a model to its own forward, so fx's graph may stand (it did before this check)."""
    from torch.utils.checkpoint import checkpoint

    class _Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.blocks = nn.Linear(8, 16), nn.ModuleList(Res(16) for _ in range(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.stem(x)
            for b in self.blocks:
                h = checkpoint(b, h, use_reentrant=True)
            return h

    cap = capture(_Checkpointed(), (torch.randn(4, 8, requires_grad=True),))
    assert cap.strategy == "fx" and cap.checkpoints


class _Counting(nn.Module):
    """Writes its buffers in the forward as EMA layers and counters do, on the buffers
    themselves (fx runs these on the real tensors while tracing and records nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.head = nn.Linear(8, 8), nn.Linear(8, 3)
        self.register_buffer("ema", torch.zeros(8))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        self.ema.mul_(0.9).add_(h.detach().mean(0), alpha=0.1)
        self.steps += 1
        return self.head(h - self.ema)


def test_writes_to_buffers_fx_cannot_record_send_the_capture_to_export():
    torch.manual_seed(0)
    model, x = _Counting(), torch.randn(4, 8)
    ref = _Counting()
    ref.load_state_dict(model.state_dict())
    with pytest.raises(TraceError, match=r"writes to buffers \(ema, steps\)"):
        capture(model, (x,), strategy="fx")
    assert torch.equal(model.ema, torch.zeros(8)) and int(model.steps) == 0  # what the trace ran was put back
    fm = fxfreeze.compile(model, (x,), config={"policy": "manual"})
    assert fm.strategy == "export" and any("writes to buffers" in n for n in fm.plan.notes)
    for _ in range(3):  # before, fx's graph left both buffers as compiled: outputs drifted from the second call
        x = torch.randn(4, 8)
        torch.testing.assert_close(fm(x), ref(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.ema, ref.ema, rtol=1e-6, atol=1e-7)
    assert int(model.steps) == int(ref.steps) == 3


def test_a_buffer_holding_nan_that_the_forward_only_reads_keeps_fx():
    class Marked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.register_buffer("unset", torch.full((8,), float("nan")))  # NaN as "not set yet"

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) + torch.nan_to_num(self.unset)

    assert capture(Marked(), (torch.randn(2, 8),), strategy="fx").strategy == "fx"


class _Named(dict):
    """A mapping output read by attribute, as Hugging Face's ``ModelOutput`` is."""

    def __init__(self, logits=None, features=None) -> None:
        super().__init__(logits=logits, features=features)

    __getattr__ = dict.__getitem__


class _Positional(dict):
    """A mapping whose constructor does not take its keys: it stays a plain dict."""

    def __init__(self, pairs) -> None:
        super().__init__(pairs)


class _Outputs(nn.Module):
    def __init__(self, kind: type) -> None:
        super().__init__()
        self.stem, self.blocks, self.head, self.kind = nn.Linear(8, 16), nn.Sequential(Res(16), Res(16)), nn.Linear(16, 3), kind

    def forward(self, x: torch.Tensor):
        h = self.blocks(self.stem(x))
        if self.kind is _Named:
            return _Named(logits=self.head(h), features=h)
        return _Positional([("logits", self.head(h)), ("features", h)])


def test_a_mapping_output_keeps_its_type_under_fx():
    """fx records a returned mapping as a plain dict; the graph rebuilds the model's own
    type when its constructor takes the keys, else it stays a dict (as before)."""
    x = torch.randn(4, 8)
    for kind, expected in ((_Named, _Named), (_Positional, dict)):
        torch.manual_seed(0)
        model = _Outputs(kind)
        fm = fxfreeze.compile(model, (x,), policy="manual")
        assert fm.strategy == "fx"
        out = fm(x)
        assert type(out) is expected and list(out) == ["logits", "features"]
        torch.testing.assert_close(out["logits"], model.head(model.blocks(model.stem(x))), rtol=0, atol=0)
        fm.graph_module(True).graph.lint()
        fm.freeze_prefix(2)  # the rewritten graph keeps it
        assert type(fm(x)) is expected


class _ConvRes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.conv(x))


class _Optional(nn.Module):
    """An optional argument left None, which fx specialises with an ``_assert_is_none`` node
    (convolutions: Egeria's int8 reference is torch's static quantization)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.blocks = nn.Conv2d(1, 4, 3, padding=1), nn.Sequential(_ConvRes(), _ConvRes())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        h = self.blocks(self.stem(x))
        return self.head(h if scale is None else h * scale)


class _Branchy(nn.Module):
    """fx cannot trace it (a branch on a size); torch.export can."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.blocks, self.head = nn.Linear(8, 16), nn.Sequential(Res(16), Res(16)), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x))
        return self.head(h * 2 if x.size(0) > 2 else h)


def test_compiling_a_model_fx_specialises_leaves_fx_working_for_later_traces():
    """A graph module whose code calls ``torch.fx._symbolic_trace._assert_is_none`` (one per
    ``None`` argument fx specialises: every Hugging Face model fx traces) records that dotted
    name in fx's table of functions to wrap, and torch's quantization (Egeria's int8
    reference) does it again. Every later fx trace in the process then raised ``KeyError``:
    the next model compiled fell back to running eagerly (export traces with fx too), Egeria's
    int8 references failed, and the user's own ``symbolic_trace`` broke."""
    import builtins

    from torch.fx import _symbolic_trace as st

    x = torch.randn(4, 1, 4, 4)
    torch.manual_seed(0)
    model = _Optional()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fm = fxfreeze.compile(model, (x,), optimizer=opt, config={"egeria": {
        "eval_interval": 1, "asynchronous": False, "overhead_budget": 0.0, "probe_size": 4}})
    assert fm.strategy == "fx"
    for _ in range(3):  # Egeria builds its int8 references
        fm(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert fm.freezer.policy.backends and "int8_static" in set(fm.freezer.policy.backends.values())
    assert not [k for k, f in st._wrapped_fns_to_patch.items() if k[1] not in f and not hasattr(builtins, k[1])]
    torch.fx.symbolic_trace(_mlp())  # the user's own trace
    assert fxfreeze.compile(_Branchy(), (torch.randn(4, 8),), policy="manual").strategy == "export"
    fm.freezer.detach()


class _BNBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.bn = nn.Linear(16, 16), nn.BatchNorm1d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.bn(self.lin(x)))


class _Scripted(nn.Module):
    """Blocks compiled with ``torch.jit.script`` (older code bases, exported layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.head = nn.Linear(8, 16), nn.Linear(16, 3)
        self.blocks = nn.ModuleList([torch.jit.script(_BNBlock()) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def test_a_torchscript_block_is_a_leaf_whose_parameters_freeze():
    """fx traced into a scripted block as a call on its C++ object, where no parameter
    shows: the block owned none, so a freeze reaching it set none of their flags, left its
    BatchNorm updating its statistics, and reported them trainable while no gradient reached
    them. As a leaf its parameters are its own: frozen, in eval mode, equal to eager
    (exact), the statistics still."""
    torch.manual_seed(0)
    model = _Scripted()
    ref = _Scripted()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(8, 8)
    fm = fxfreeze.compile(model, (x,), policy="manual")
    assert fm.plan.names == ["stem", "blocks.0", "blocks.1", "blocks.2"]
    fm.train()
    fm.freeze_prefix(2)
    assert fm.frozen_parameter_names() == ["stem.weight", "stem.bias", "blocks.0.lin.weight", "blocks.0.lin.bias",
                                           "blocks.0.bn.weight", "blocks.0.bn.bias"]
    stats = model.blocks[0].bn.running_mean.clone()
    for p in [*ref.stem.parameters(), *ref.blocks[0].parameters()]:
        p.requires_grad_(False)
    ref.blocks[0].eval()
    out, exp = fm(x), ref(x)
    torch.testing.assert_close(out, exp, rtol=0, atol=0)
    out.square().mean().backward()
    exp.square().mean().backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=n)
    assert torch.equal(model.blocks[0].bn.running_mean, stats)
    fm.graph_module(True).graph.lint()


class _SkipBlock(nn.Module):
    """Stochastic depth written as a branch: while training, skip the block with probability p."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.rand(1).item() < self.p:
            return x
        return x + torch.relu(self.fc(x))


class _SkipNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 8)
        self.blocks = nn.ModuleList(_SkipBlock(0.5) for _ in range(4))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def test_a_block_drawing_random_numbers_from_constants_is_a_leaf_that_draws_at_every_call():
    """fx ran ``torch.rand(1).item() < p`` once while tracing (no proxy in it) and its graph
    kept that draw: the same blocks skipped at every call, whatever the seed, unlike the
    model. A block that draws is now a leaf: it runs as itself and draws anew."""
    torch.manual_seed(0)
    model, x = _SkipNet().train(), torch.randn(4, 8)
    fm = fxfreeze.compile(model, (x,), config={"policy": "manual", "manual": {"schedule": {}}})
    assert fm.strategy == "fx"
    assert [b.name for b in fm.plan.blocks] == ["stem", "blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert any("blocks.0 draws random numbers" in n for n in fm.plan.notes)
    graph = fm.graphs.primary(True).capture.graph
    assert {n.target for n in graph.nodes if n.op == "call_module"} >= {f"blocks.{i}" for i in range(4)}
    graph.lint()
    fm.train()
    fm.freeze_prefix(2)  # stem and blocks.0 frozen: blocks.0 runs in eval mode, never skipped
    ref = _SkipNet().train()
    ref.load_state_dict(model.state_dict())
    ref.blocks[0].eval()
    frozen = set(fm.frozen_parameter_names(2))
    for n, p in ref.named_parameters():
        p.requires_grad_(n not in frozen)
    outs = set()
    for seed in range(6):
        torch.manual_seed(seed)
        out = fm(x)
        torch.manual_seed(seed)
        expected = ref(x)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)  # the same draws, the same ops
        outs.add(round(out.sum().item(), 4))
    assert len(outs) > 1  # the draws differ from call to call
    out.square().mean().backward()
    expected.square().mean().backward()
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        assert (a.grad is None) == (b.grad is None), n
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


class _Timestepped(nn.Module):
    """``forward(x, t)`` normalising its timestep as diffusers' UNets do: a number becomes a
    one-element tensor, a tensor is broadcast to the batch. fx's proxy is no tensor to
    ``torch.is_tensor``, so fx records the branch for a number."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.temb = nn.Linear(8, 16), nn.Linear(1, 16)
        self.blocks = nn.Sequential(*[Res(16) for _ in range(3)])
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        if not torch.is_tensor(t):
            t = torch.tensor([t], dtype=torch.long, device=x.device)
        elif t.dim() == 0:
            t = t[None]
        t = t * torch.ones(x.shape[0], dtype=t.dtype, device=t.device)
        return self.head(self.blocks(self.stem(x) + self.temb(t.float()[:, None] / 1000)))


def test_a_graph_fx_traced_down_a_branch_the_inputs_do_not_take_sends_the_capture_to_export():
    """fx's graph for ``_Timestepped`` calls ``torch.tensor([t])`` on the timestep tensor and
    fails on the very inputs the model runs on: ``compile`` raised ``ExampleInputError``
    ("only integer tensors of a single element can be converted to an index"), refusing
    diffusers' ``UNet2DModel``. A traced graph is now run once on the example call; one that
    fails is no capture, and export (which follows the tensor branch) takes the model."""
    torch.manual_seed(0)
    model, x, t = _Timestepped(), torch.randn(4, 8), torch.tensor([10, 20, 30, 40])
    ref = _Timestepped()
    ref.load_state_dict(model.state_dict())
    with pytest.raises(TraceError, match=r"fx's graph fails on the example inputs.*torch.is_tensor"):
        capture(model, (x, t), strategy="fx")
    fm = fxfreeze.compile(model, (x, t), config={"policy": "manual"})
    assert fm.strategy == "export" and len(fm.plan.blocks) == 4
    fm.freeze_prefix(2)
    for n, p in ref.named_parameters():
        p.requires_grad_(n not in set(fm.frozen_parameter_names()))
    out, exp = fm(x, t), ref(x, t)
    torch.testing.assert_close(out, exp, rtol=1e-6, atol=1e-7)
    out.sum().backward()
    exp.sum().backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
    for e in fm.graphs.entries():
        fm.graph_module_of(e).graph.lint()
