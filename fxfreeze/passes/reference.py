"""Build the reference copy of a block for CPU execution: int8, bf16 or fp32.

Egeria's reference model is a cheap, lower-precision snapshot of the training model run on
the CPU. A :class:`ReferenceBuilder` takes one block as a standalone GraphModule (see
:func:`fxfreeze.passes.subgraph.extract`). On construction (training thread) it normalises a
copy (:func:`normalize`: BatchNorm folded into convolutions, linear/conv calls lifted into
modules) and *prepares* each backend of the precision's chain, which may trace; then
:meth:`ReferenceBuilder.build` turns a state dict of the block's weights (a snapshot) into a
reference with the first backend that converts without error and gives finite outputs on
the calibration inputs. ``build`` never traces, so it runs on the reference worker thread.
Backends:

- ``int8_static``: post-training static quantization through FX graph mode
  (``torch.ao.quantization.quantize_fx``, x86 engine, min/max calibration on the given
  inputs). Best for convolutional blocks.
- ``int8_dynamic``: ``nn.Linear`` weights in int8, activations quantized on the fly. Best
  for Linear-heavy (transformer) blocks. Linear and 2-D convolution *calls* on parameters
  (the ATen graphs ``torch.export`` produces, ``F.linear`` in traced code) are first lifted
  into modules by :func:`lift_modules` so that both int8 backends see them.
- ``int8_outputs``: for a block with nothing an int8 backend can quantize (an embedding
  lookup with LayerNorm, pooling, element-wise ops): fp32 compute with every floating-point
  output rounded to int8 (per tensor, affine, from the tensor's own range). An exact fp32
  reference would measure such a block at a far finer resolution than its quantized
  neighbours: on MiniLM the embedding block's drift was 1e-10 (SP loss) against the int8
  layers' floor of 1e-6, and the exact reference showed it as a steady climb, so Egeria's
  rule never froze it and, as the front of the prefix, nothing behind it either
  (docs/egeria.md). Rounding the outputs gives every block of an int8 reference the same
  resolution, which is what a whole-model int8 reference (the paper's) has.
- ``bf16`` and ``fp32``: a plain copy in that dtype; always works.

``precision="int8"`` picks static for blocks with convolutions and dynamic otherwise, then
falls back to the other int8 backend, then to ``int8_outputs`` and finally to fp32; every
fallback is reported with its reason, never raised. Backends register by name
(:func:`register_backend`), so a torchao pt2e backend can replace the deprecated
``torch.ao.quantization`` one without touching the callers. The deprecation warnings of
``torch.ao.quantization`` are filtered narrowly (by message) whenever a backend runs, so
that they do not reach the user on every refresh.
"""

from __future__ import annotations

import copy
import math
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .base import PassResult

__all__ = [
    "ReferenceBackend",
    "BuiltReference",
    "register_backend",
    "available_backends",
    "build_reference",
    "ReferenceBuilder",
    "fold_batchnorm",
    "normalize",
    "lift_modules",
    "snapshot",
    "relative_error",
    "all_finite",
    "round_to_int8",
    "PRECISIONS",
]

_QUIET = (
    r"torch\.ao\.quantization is deprecated",
    r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
    r"Please use quant_min and quant_max",
    r"must run observer before calling calculate_qparams",
    r"QConfig must specify a FixedQParamsObserver",
)


def _quiet_quantization_warnings() -> None:
    # re-added on every use (a no-op when present: an identical filter is moved, not
    # duplicated) so that code which resets the filters, pytest included, stays quiet too
    for msg in _QUIET:
        warnings.filterwarnings("ignore", message=msg)


class ReferenceBackend(ABC):
    """Turns a snapshot (an fp32 GraphModule in eval mode, owning its weights) into the
    module the reference worker runs.

    :meth:`prepare` runs once per block structure on the *training* thread: it may trace
    (``torch.fx`` symbolic tracing patches ``nn.Module.__call__`` process-wide, so it must
    never run while another thread runs a model). :meth:`convert` runs on the worker for
    every snapshot and must not trace. Either may raise: the caller falls back."""

    name: str = "backend"
    #: dtype the inputs must be cast to (floating inputs only)
    input_dtype: torch.dtype = torch.float32

    def prepare(self, template: fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
        """Structure-only work for blocks shaped like ``template``; returns what
        :meth:`convert` needs (default: nothing)."""
        return None

    @abstractmethod
    def convert(self, snap: fx.GraphModule, prepared: Any, example_inputs: Sequence[Any]) -> nn.Module:
        """Return the converted module for this snapshot (``snap`` may be modified)."""


_BACKENDS: dict[str, ReferenceBackend] = {}


def register_backend(backend: ReferenceBackend) -> None:
    """Make ``backend`` available under ``backend.name``."""
    _BACKENDS[backend.name] = backend


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def _has_module(gm: nn.Module, kinds: tuple[type, ...]) -> bool:
    return any(isinstance(m, kinds) for m in gm.modules())


class _Cast(ReferenceBackend):
    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name = name
        self.input_dtype = dtype
        self.dtype = dtype

    def convert(self, snap: fx.GraphModule, prepared: Any, example_inputs: Sequence[Any]) -> nn.Module:
        return snap.to(self.dtype)


def round_to_int8(t: Any) -> Any:
    """``t`` rounded to the 256 levels of a per-tensor affine int8 quantization over its own
    range (which always includes 0, so zeros stay exact); anything but a non-empty,
    non-quantized floating-point tensor, and an all-zero or non-finite one, is returned as
    is."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0 or t.is_quantized:
        return t
    lo = min(float(t.min()), 0.0)
    hi = max(float(t.max()), 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return t
    scale = (hi - lo) / 255.0
    zero_point = min(255, max(0, int(round(-lo / scale))))
    return torch.quantize_per_tensor(t.float(), scale, zero_point, torch.quint8).dequantize().to(t.dtype)


class _RoundedOutputs(nn.Module):
    """A block run in fp32 whose floating-point outputs are rounded to int8."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any) -> Any:
        # .forward: see BuiltReference.__call__
        return torch.utils._pytree.tree_map(round_to_int8, self.inner.forward(*args))


class _Int8Outputs(ReferenceBackend):
    name = "int8_outputs"

    def convert(self, snap: fx.GraphModule, prepared: Any, example_inputs: Sequence[Any]) -> nn.Module:
        return _RoundedOutputs(snap)


@dataclass
class _Prepared:
    module: nn.Module  # observed, never calibrated
    names: dict[str, str]  # name in ``module`` -> name in the template, for weights


class _Int8Static(ReferenceBackend):
    name = "int8_static"

    def prepare(self, template: fx.GraphModule, example_inputs: Sequence[Any]) -> _Prepared:
        from torch.ao.quantization import QConfig, QConfigMapping
        from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
        from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver
        from torch.ao.quantization.quantize_fx import prepare_fx

        _quiet_quantization_warnings()
        if not _has_module(template, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            raise RuntimeError("no convolution or linear module to quantize")
        torch.backends.quantized.engine = _engine()
        qconfig = QConfig(
            # quant_max 127: the x86/fbgemm kernels need a reduced activation range
            activation=MinMaxObserver.with_args(dtype=torch.quint8, quant_min=0, quant_max=127),
            weight=PerChannelMinMaxObserver.with_args(
                dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-128, quant_max=127
            ),
        )
        mapping = QConfigMapping().set_global(qconfig)
        # modules fx could not trace into when the model was captured stay opaque here too
        opaque = sorted(
            {type(m) for m in template.modules() if m is not template and not type(m).__module__.startswith("torch.")},
            key=lambda t: t.__qualname__,
        )
        custom = PrepareCustomConfig().set_non_traceable_module_classes(opaque)
        by_ptr = {t.data_ptr(): n for n, t in _tensors(template)}
        prepared = prepare_fx(template, mapping, tuple(example_inputs), prepare_custom_config=custom)
        names: dict[str, str] = {}
        for n, t in _tensors(prepared):
            src = by_ptr.get(t.data_ptr())
            if src is not None:
                names[n] = src
        return _Prepared(prepared, names)

    def convert(self, snap: fx.GraphModule, prepared: Any, example_inputs: Sequence[Any]) -> nn.Module:
        from torch.ao.quantization.quantize_fx import convert_fx

        _quiet_quantization_warnings()
        torch.backends.quantized.engine = _engine()
        q = copy.deepcopy(prepared.module)
        src = dict(_tensors(snap))
        with torch.no_grad():
            for n, t in _tensors(q):
                s_name = prepared.names.get(n)
                if s_name is not None:
                    t.copy_(src[s_name])
            q(*example_inputs)  # calibrate the observers on this snapshot
        return convert_fx(q)


def _tensors(m: nn.Module) -> list[tuple[str, torch.Tensor]]:
    out = [(n, p.data) for n, p in m.named_parameters(remove_duplicate=False)]
    out += [(n, b) for n, b in m.named_buffers(remove_duplicate=False) if b is not None and b.numel() > 0]
    return out


class _Int8Dynamic(ReferenceBackend):
    name = "int8_dynamic"

    def convert(self, snap: fx.GraphModule, prepared: Any, example_inputs: Sequence[Any]) -> nn.Module:
        from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

        _quiet_quantization_warnings()
        torch.backends.quantized.engine = _engine()
        # only Linear modules the graph calls directly: one nested in an opaque module (an
        # nn.TransformerEncoderLayer, say) would break that module's fused fast path
        gm = snap
        names = [str(n.target) for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), nn.Linear)]
        if not names:
            raise RuntimeError("no linear module called by the graph to quantize")
        return quantize_dynamic(gm, {name: default_dynamic_qconfig for name in names}, dtype=torch.qint8)


def _engine() -> str:
    engines = torch.backends.quantized.supported_engines
    for e in ("x86", "fbgemm", "qnnpack"):
        if e in engines:
            return e
    raise RuntimeError(f"no int8 CPU engine available (supported: {engines})")


register_backend(_Int8Static())
register_backend(_Int8Dynamic())
register_backend(_Int8Outputs())
register_backend(_Cast("bf16", torch.bfloat16))
register_backend(_Cast("fp32", torch.float32))

#: precision name -> how to pick the backend chain for a block
PRECISIONS: dict[str, Callable[[nn.Module], list[str]]] = {
    "int8": lambda gm: (
        ["int8_static", "int8_dynamic", "int8_outputs", "fp32"]
        if _has_module(gm, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        else ["int8_dynamic", "int8_static", "int8_outputs", "fp32"]
    ),
    "int8_static": lambda gm: ["int8_static", "int8_outputs", "fp32"],
    "int8_dynamic": lambda gm: ["int8_dynamic", "int8_outputs", "fp32"],
    "bf16": lambda gm: ["bf16", "fp32"],
    "fp32": lambda gm: ["fp32"],
}


# -- lifting functional linear/conv calls into modules ---------------------------------------
def _targets(*names: str) -> set[Any]:
    out: set[Any] = set()
    for name in names:
        ns, op, overload = name.split(".")
        try:
            out.add(getattr(getattr(getattr(torch.ops, ns), op), overload))
        except AttributeError:
            continue
    return out


_LINEAR = {F.linear, torch._C._nn.linear} | _targets("aten.linear.default")
_CONV2D = {F.conv2d, torch.conv2d} | _targets("aten.conv2d.default")


def _attr(gm: fx.GraphModule, a: Any) -> torch.Tensor | None:
    if isinstance(a, fx.Node) and a.op == "get_attr":
        obj: Any = gm
        for part in str(a.target).split("."):
            obj = getattr(obj, part, None)
        return obj if isinstance(obj, torch.Tensor) else None
    return None


def _arg(n: fx.Node, i: int, name: str, default: Any) -> Any:
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(name, default)


def lift_modules(gm: fx.GraphModule) -> PassResult:
    """Rewrite ``linear(x, W, b)`` and ``conv2d(x, W, b, ...)`` calls whose weights are graph
    attributes into ``call_module`` nodes of ``nn.Linear`` / ``nn.Conv2d`` modules holding
    those tensors, so that module-based quantization applies to ATen and functional graphs.
    Numerically the identity."""
    modified = False
    count = 0
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or (n.target not in _LINEAR and n.target not in _CONV2D):
            continue
        w = _attr(gm, _arg(n, 1, "weight", None))
        b_node = _arg(n, 2, "bias", None)
        b = _attr(gm, b_node) if b_node is not None else None
        if w is None or (b_node is not None and b is None):
            continue
        if n.target in _LINEAR:
            if w.dim() != 2:
                continue
            mod: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        else:
            stride, padding, dilation, groups = (_arg(n, i, k, d) for i, k, d in (
                (3, "stride", 1), (4, "padding", 0), (5, "dilation", 1), (6, "groups", 1)))
            if w.dim() != 4 or isinstance(padding, str) or any(isinstance(v, fx.Node) for v in (stride, padding, dilation, groups)):
                continue
            mod = nn.Conv2d(w.shape[1] * int(groups), w.shape[0], tuple(w.shape[2:]), stride=stride,
                            padding=padding, dilation=dilation, groups=int(groups), bias=b is not None)
        mod.weight = nn.Parameter(w.detach(), requires_grad=False)
        if b is not None:
            mod.bias = nn.Parameter(b.detach(), requires_grad=False)
        name = f"fxfreeze_lifted_{count}"
        count += 1
        gm.add_submodule(name, mod)
        with gm.graph.inserting_before(n):
            new = gm.graph.call_module(name, (n.args[0],))
        new.meta.update(n.meta)
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
        modified = True
    if modified:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified)


# -- building ----------------------------------------------------------------------------------
def snapshot(gm: fx.GraphModule) -> fx.GraphModule:
    """A CPU fp32 copy of ``gm`` in eval mode that owns its weights (no autograd)."""
    with torch.no_grad():
        snap = copy.deepcopy(gm)
    snap = snap.to("cpu").float()
    for p in snap.parameters():
        p.requires_grad_(False)
    return snap.eval()


def normalize(gm: fx.GraphModule) -> fx.GraphModule:
    """The graph form the backends see: BatchNorm folded into the convolution before it
    (:func:`fold_batchnorm`) and functional linear/conv calls lifted into modules."""
    fold_batchnorm(gm)
    lift_modules(gm)
    return gm


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fold_batchnorm(gm: fx.GraphModule) -> PassResult:
    """Fold each eval-mode BatchNorm module that only reads a convolution module's output
    (which nothing else reads) into that convolution. Numerically the identity up to
    rounding; done here rather than inside quantization so that the folded weights can be
    recomputed for every snapshot without tracing."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    modified = False
    for n in list(gm.graph.nodes):
        if n.op != "call_module" or len(n.args) != 1 or n.kwargs:
            continue
        bn = gm.get_submodule(str(n.target))
        src = n.args[0]
        if not isinstance(bn, _BNS) or bn.training or bn.running_mean is None or not isinstance(src, fx.Node):
            continue
        if src.op != "call_module" or len(src.users) != 1:
            continue
        conv = gm.get_submodule(str(src.target))
        if not isinstance(conv, _CONVS) or conv.training:
            continue
        fused = fuse_conv_bn_eval(conv, bn)
        _set_submodule(gm, str(src.target), fused)
        n.replace_all_uses_with(src)
        gm.graph.erase_node(n)
        modified = True
    if modified:
        gm.graph.lint()
        gm.recompile()
        gm.delete_all_unused_submodules()
    return PassResult(gm, modified)


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


@dataclass
class BuiltReference:
    """A reference block ready to run: ``ref(inputs)``."""

    module: nn.Module
    backend: str
    input_dtype: torch.dtype
    fallbacks: list[str] = field(default_factory=list)

    def cast(self, inputs: Sequence[Any]) -> list[Any]:
        return [x.to(self.input_dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs]

    @torch.no_grad()
    def __call__(self, inputs: Sequence[Any]) -> Any:
        # .forward, not __call__: a GraphModule's call wrapper prints a traceback to stderr
        # on any exception, and a failing backend is an expected event here
        return self.module.forward(*self.cast(inputs))


def all_finite(out: Any) -> bool:
    """Are all floating-point tensors in ``out`` (quantized ones dequantized) finite?"""
    flat, _ = torch.utils._pytree.tree_flatten(out)
    for t in flat:
        if isinstance(t, torch.Tensor):
            if t.is_quantized:
                t = t.dequantize()
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return False
    return True


def _reason(name: str, e: BaseException) -> str:
    msg = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{name}: {type(e).__name__}: {msg}"


class ReferenceBuilder:
    """Builds reference copies of one block, snapshot after snapshot.

    Construct it on the training thread (it prepares every backend of the precision's chain
    once, which may trace); call :meth:`build` with a state dict of the block's current
    weights from any thread."""

    def __init__(self, block: fx.GraphModule, example_inputs: Sequence[Any], precision: str = "int8") -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"unknown reference precision {precision!r}; valid: {', '.join(PRECISIONS)}")
        self.precision = precision
        self.raw = snapshot(block)
        template = normalize(copy.deepcopy(self.raw))
        self.fallbacks: list[str] = []
        self.candidates: list[tuple[ReferenceBackend, Any]] = []
        for name in PRECISIONS[precision](template):
            backend = _BACKENDS[name]
            try:
                self.candidates.append((backend, backend.prepare(copy.deepcopy(template), example_inputs)))
            except Exception as e:  # noqa: BLE001 - any failure means: try the next backend
                self.fallbacks.append(_reason(name, e))

    def build(self, state: Mapping[str, torch.Tensor] | None, example_inputs: Sequence[Any]) -> BuiltReference:
        """A reference with the weights in ``state`` (keys of the block's state dict; None
        keeps the weights the block had at construction)."""
        snap = copy.deepcopy(self.raw)
        if state is not None:
            snap.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        normalize(snap)
        fallbacks = list(self.fallbacks)
        for i, (backend, prepared) in enumerate(self.candidates):
            src = snap if i == len(self.candidates) - 1 else copy.deepcopy(snap)
            try:
                built = BuiltReference(backend.convert(src, prepared, example_inputs), backend.name, backend.input_dtype, fallbacks)
                if not all_finite(built(example_inputs)):
                    raise RuntimeError("its output on the calibration inputs is not finite")
                return built
            except Exception as e:  # noqa: BLE001 - any failure means: try the next backend
                fallbacks.append(_reason(backend.name, e))
        raise RuntimeError("no reference backend works for this block: " + "; ".join(fallbacks))


def build_reference(block: fx.GraphModule, example_inputs: Sequence[Any], precision: str = "int8") -> BuiltReference:
    """One reference copy of ``block`` with its current weights (training thread only)."""
    return ReferenceBuilder(block, example_inputs, precision).build(None, example_inputs)


def relative_error(a: Any, b: Any) -> float:
    """max over floating tensors of ‖a − b‖ / ‖b‖ (0 when ``b`` is all zeros and ``a == b``)."""
    fa, _ = torch.utils._pytree.tree_flatten(a)
    fb, _ = torch.utils._pytree.tree_flatten(b)
    worst = 0.0
    for x, y in zip(fa, fb):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and y.is_floating_point():
            x, y = x.float(), y.float()
            den = float(y.norm())
            num = float((x - y).norm())
            worst = max(worst, num / den if den > 0 else (0.0 if num == 0 else math.inf))
    return worst
