"""Reference backends: how a block's snapshot becomes its int8, bf16 or fp32 copy.

Egeria's reference model is a cheap, lower-precision snapshot of the training model run on
the CPU. A backend turns a block's snapshot (a GraphModule normalised by
:func:`fxfreeze.passes.normalize.normalize`) into the module the reference worker runs;
:class:`~fxfreeze.runtime.egeria.builder.ReferenceBuilder` tries the backends of a
precision's chain in order. Backends:

- ``int8_static``: post-training static quantization through FX graph mode
  (``torch.ao.quantization.quantize_fx``, x86 engine, min/max calibration on the given
  inputs). Best for convolutional blocks.
- ``int8_dynamic``: ``nn.Linear`` weights in int8, activations quantized on the fly. Best
  for Linear-heavy (transformer) blocks. Linear and 2-D convolution *calls* on parameters
  (the ATen graphs ``torch.export`` produces, ``F.linear`` in traced code) are first lifted
  into modules by :class:`~fxfreeze.passes.normalize.LiftModules` so that both int8 backends see them.
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
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch import nn

from ...graph_utils import repair_fx_wraps

__all__ = [
    "NothingToQuantize",
    "ReferenceBackend",
    "register_backend",
    "available_backends",
    "backend",
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


class NothingToQuantize(RuntimeError):
    """A backend finds nothing of its kind in the block (an embedding lookup has no linear
    module): the next backend is the block's natural one, not a workaround worth a warning."""


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


def register_backend(impl: ReferenceBackend) -> None:
    """Make ``impl`` available under ``impl.name`` (replacing a backend of that name).

    Example::

        >>> class Pt2e(ReferenceBackend):
        ...     name = "int8_pt2e"
        ...     def convert(self, snap, prepared, example_inputs):
        ...         return snap  # quantize here
        >>> register_backend(Pt2e()); "int8_pt2e" in available_backends()
        True
    """
    _BACKENDS[impl.name] = impl


def available_backends() -> list[str]:
    """Names of the registered backends, sorted.

    Example::

        >>> available_backends()
        ['bf16', 'fp32', 'int8_dynamic', 'int8_outputs', 'int8_static']
    """
    return sorted(_BACKENDS)


def backend(name: str) -> ReferenceBackend:
    """The backend registered as ``name`` (``KeyError`` when there is none).

    Example::

        >>> backend("bf16").input_dtype
        torch.bfloat16
    """
    return _BACKENDS[name]


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
    non-quantized floating-point tensor, and an all-zero or non-finite one, is returned as is.

    Example::

        >>> t = torch.linspace(-1, 1, 1000)
        >>> r = round_to_int8(t)
        >>> r.unique().numel() <= 256, float((r - t).abs().max()) < 0.01
        (True, True)
    """
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
            raise NothingToQuantize("no convolution or linear module to quantize")
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
        repair_fx_wraps()
        prepared = prepare_fx(template, mapping, tuple(example_inputs), prepare_custom_config=custom)
        repair_fx_wraps()  # its graph modules' code records torch's wrapped functions by dotted names
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
        converted = convert_fx(q)
        repair_fx_wraps()
        return converted


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
            raise NothingToQuantize("no linear module called by the graph to quantize")
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
