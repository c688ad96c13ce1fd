"""Build a block's reference copy from a snapshot of its weights.

A :class:`ReferenceBuilder` takes one block as a standalone GraphModule (see
:func:`fxfreeze.passes.subgraph.extract`). On construction (training thread) it normalises a
copy (:func:`fxfreeze.passes.normalize.normalize`: BatchNorm folded into convolutions,
linear/conv calls lifted into modules) and *prepares* each backend of the precision's chain
(:mod:`.backends`), which may trace; then :meth:`ReferenceBuilder.build` turns a state dict
of the block's weights (a snapshot) into a reference with the first backend that converts
without error and gives finite outputs on the calibration inputs. ``build`` never traces,
so it runs on the reference worker thread.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn

from ...passes.normalize import normalize
from .backends import PRECISIONS, NothingToQuantize, ReferenceBackend, backend

__all__ = ["BuiltReference", "ReferenceBuilder", "build_reference", "snapshot", "all_finite", "relative_error"]


def snapshot(gm: fx.GraphModule, weights: bool = True) -> fx.GraphModule:
    """A CPU fp32 copy of ``gm`` in eval mode that owns its weights (no autograd): what a
    reference is built from.

    ``weights=False`` copies the structure only: every parameter and buffer becomes a CPU
    tensor of zeros of its shape, and nothing is read from ``gm``'s tensors. A block on a GPU
    then costs no copy to the host on the training thread (a copy to pageable memory makes the
    host wait for the device); the weights come later, copied without blocking.

    Example::

        >>> gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
        >>> s = snapshot(gm); s.training, s.weight.requires_grad, s.weight is gm.weight
        (False, False, False)
        >>> bool(snapshot(gm, weights=False).weight.abs().sum() == 0)
        True
    """
    memo: dict[int, Any] = {}
    if not weights:
        for t in [*gm.parameters(), *gm.buffers()]:
            z = torch.zeros(t.shape, dtype=t.dtype, device="cpu")
            memo[id(t)] = nn.Parameter(z, requires_grad=False) if isinstance(t, nn.Parameter) else z
    with torch.no_grad():
        snap = copy.deepcopy(gm, memo)
    snap = snap.to("cpu").float()
    for p in snap.parameters():
        p.requires_grad_(False)
    _devices_to_cpu(snap)
    return snap.eval()


_DEVICE_STRING = re.compile(r"^(cuda|mps|xpu|hpu|npu|mtia|privateuseone)(:\d+)?$")


def _devices_to_cpu(gm: fx.GraphModule) -> None:
    """Point every device named in ``gm``'s graph at the CPU. A graph captured with
    ``torch.export`` on a GPU names its device in its nodes (``arange(..., device=cuda:0)``,
    ``_assert_tensor_metadata(x, device=cuda:0)``, ``x.to("cuda")``): on the CPU copy the
    reference runs on, those would fail ("Tensor device mismatch") or move data back. Nested
    graphs (the body of an autocast region) are rewritten as well."""
    cpu = torch.device("cpu")
    changed = False

    def fix(a: Any) -> Any:
        nonlocal changed
        if isinstance(a, torch.device) and a.type != "cpu":
            changed = True
            return cpu
        if isinstance(a, str) and _DEVICE_STRING.match(a):
            changed = True
            return "cpu"
        return a

    for sub in [m for m in gm.modules() if isinstance(m, fx.GraphModule)]:  # the bodies of regions too
        changed = False
        for n in sub.graph.nodes:
            if n.op in ("call_function", "call_method"):
                n.args = fx.node.map_aggregate(n.args, fix)
                n.kwargs = dict(fx.node.map_aggregate(n.kwargs, fix))
        if changed:
            sub.recompile()


@dataclass
class BuiltReference:
    """A reference block ready to run: ``ref(inputs)``."""

    module: nn.Module
    backend: str
    input_dtype: torch.dtype
    fallbacks: list[str] = field(default_factory=list)
    #: every fallback was a backend finding nothing of its kind to quantize (expected, not news)
    routine: bool = True

    def cast(self, inputs: Sequence[Any]) -> list[Any]:
        return [x.to(self.input_dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs]

    @torch.no_grad()
    def __call__(self, inputs: Sequence[Any]) -> Any:
        # .forward, not __call__: a GraphModule's call wrapper prints a traceback to stderr
        # on any exception, and a failing backend is an expected event here
        return self.module.forward(*self.cast(inputs))


def all_finite(out: Any) -> bool:
    """Are all floating-point tensors in ``out`` (quantized ones dequantized) finite?

    Example::

        >>> all_finite((torch.ones(2), [torch.tensor([1.0, float("nan")])]))
        False
    """
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
    weights from any thread. ``weights=False`` reads only the block's structure, never its
    tensors (see :func:`snapshot`); every :meth:`build` must then bring the weights."""

    def __init__(self, block: fx.GraphModule, example_inputs: Sequence[Any], precision: str = "int8",
                 weights: bool = True) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"unknown reference precision {precision!r}; valid: {', '.join(PRECISIONS)}")
        self.precision = precision
        self.has_weights = bool(weights)
        self.raw = snapshot(block, weights=self.has_weights)
        template = normalize(copy.deepcopy(self.raw))
        self.fallbacks: list[str] = []
        self.routine = True  # only NothingToQuantize so far
        self.candidates: list[tuple[ReferenceBackend, Any]] = []
        for name in PRECISIONS[precision](template):
            impl = backend(name)
            try:
                # a backend without structure-only work gets nothing to prepare: no copy (a copy of
                # a block's graph module is a third of a builder's time, on the training thread)
                prepared = (None if type(impl).prepare is ReferenceBackend.prepare
                            else impl.prepare(copy.deepcopy(template), example_inputs))
                self.candidates.append((impl, prepared))
            except Exception as e:  # noqa: BLE001 - any failure means: try the next backend
                self.fallbacks.append(_reason(name, e))
                self.routine = self.routine and isinstance(e, NothingToQuantize)

    def build(self, state: Mapping[str, torch.Tensor] | None, example_inputs: Sequence[Any]) -> BuiltReference:
        """A reference with the weights in ``state`` (keys of the block's state dict; None
        keeps the weights the block had at construction)."""
        if state is None and not self.has_weights:
            raise ValueError("this builder was made from the block's structure only (weights=False): give build() "
                             "the block's state dict")
        snap = copy.deepcopy(self.raw)
        if state is not None:
            snap.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        normalize(snap)
        fallbacks, routine = list(self.fallbacks), self.routine
        for i, (impl, prepared) in enumerate(self.candidates):
            src = snap if i == len(self.candidates) - 1 else copy.deepcopy(snap)
            try:
                built = BuiltReference(impl.convert(src, prepared, example_inputs), impl.name, impl.input_dtype,
                                       fallbacks, routine)
                if not all_finite(built(example_inputs)):
                    raise RuntimeError("its output on the calibration inputs is not finite")
                return built
            except Exception as e:  # noqa: BLE001 - any failure means: try the next backend
                fallbacks.append(_reason(impl.name, e))
                routine = routine and isinstance(e, NothingToQuantize)
        raise RuntimeError("no reference backend works for this block: " + "; ".join(fallbacks))


def build_reference(block: fx.GraphModule, example_inputs: Sequence[Any], precision: str = "int8") -> BuiltReference:
    """One reference copy of ``block`` with its current weights, in ``precision`` (training
    thread only: preparing may trace). Egeria builds many with one :class:`ReferenceBuilder`.

    Example::

        >>> net = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()))
        >>> ref = build_reference(net, [torch.randn(4, 8)], "int8")
        >>> ref.backend
        'int8_dynamic'
    """
    return ReferenceBuilder(block, example_inputs, precision).build(None, example_inputs)


def relative_error(a: Any, b: Any) -> float:
    """max over the floating tensors of ``a`` and ``b`` of ‖a − b‖ / ‖b‖ (0 when ``b`` is all zeros
    and ``a == b``): how far a reference's output is from the fp32 one.

    Example::

        >>> relative_error(torch.tensor([1.0, 1.1]), torch.tensor([1.0, 1.0])) < 0.08
        True
    """
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
