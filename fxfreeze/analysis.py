"""Shape, size and FLOP propagation over a captured graph.

Like ``torch.fx.passes.shape_prop``, results live in ``node.meta`` under namespaced keys so
that later passes can read them without recomputing:

- ``fxfreeze.tensor``: True when the node produces a single tensor;
- ``fxfreeze.shape`` / ``fxfreeze.dtype``: its shape and dtype (tensors only);
- ``fxfreeze.bytes``: bytes of all tensors the node produces;
- ``fxfreeze.flops``: forward FLOPs of the node, counted by
  :class:`torch.utils.flop_counter.FlopCounterMode` (matmuls and convolutions; elementwise
  ops count 0, as in that counter).

The example inputs run once, without gradients and without changing the model's buffers or
training flags.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten

from .errors import ExampleInputError
from .trace import Capture, preserved_state

__all__ = [
    "META_TENSOR",
    "META_SHAPE",
    "META_DTYPE",
    "META_BYTES",
    "META_FLOPS",
    "placeholder_values",
    "propagate",
    "batch_size_of",
]

META_TENSOR = "fxfreeze.tensor"
META_SHAPE = "fxfreeze.shape"
META_DTYPE = "fxfreeze.dtype"
META_BYTES = "fxfreeze.bytes"
META_FLOPS = "fxfreeze.flops"


def placeholder_values(
    gm: fx.GraphModule,
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    signature: inspect.Signature | None = None,
    in_spec: Any = None,
) -> list[Any]:
    """The value of every placeholder of ``gm`` for the call ``model(*args, **kwargs)``.

    ``signature`` is ``inspect.signature(model.forward)``; callers on the training step
    pass it precomputed. ``in_spec`` is an exported graph's input spec: the call is
    flattened by it (keyword arguments in the graph's order)."""
    codegen = gm.graph._codegen
    if type(codegen).__name__ == "_PyTreeCodeGen" and getattr(codegen, "pytree_info", None):
        info = codegen.pytree_info
        spec = in_spec if in_spec is not None else info.in_spec
        if spec is not None and spec.num_children == 2 and spec.type is tuple:
            from torch.fx._pytree import tree_flatten_spec

            try:
                return list(tree_flatten_spec((args, kwargs), spec))
            except Exception:  # noqa: BLE001 - a structure the spec does not describe
                flat, _ = tree_flatten((args, kwargs))
                return list(flat)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    try:
        sig = signature if signature is not None else inspect.signature(model.forward)
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        values = [
            bound.arguments[p.name]
            for p in sig.parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
    except TypeError as e:
        raise ExampleInputError(f"example inputs do not match {type(model).__name__}.forward: {e}") from e
    if len(values) < len(placeholders):
        raise ExampleInputError(
            f"the graph has {len(placeholders)} inputs but {type(model).__name__}.forward "
            f"binds {len(values)} from the example inputs"
        )
    return values[: len(placeholders)]


def batch_size_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """Leading dimension of the first tensor input, taken as the batch size."""
    flat, _ = tree_flatten((args, kwargs))
    for x in flat:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return int(x.shape[0])
    return None


def _bytes(value: Any) -> int:
    flat, _ = tree_flatten(value)
    return sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))


class _Prop(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, counter: Any) -> None:
        super().__init__(gm)
        self._counter = counter

    def run_node(self, n: fx.Node) -> Any:
        before = self._counter.get_total_flops() if self._counter is not None else 0
        try:
            result = super().run_node(n)
        except Exception as e:  # noqa: BLE001 - reported as a bad input
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ExampleInputError(
                f"running the graph on the example inputs failed at node {n.name!r} "
                f"({n.op} {n.target}): {type(e).__name__}: {first}"
            ) from e
        after = self._counter.get_total_flops() if self._counter is not None else 0
        n.meta[META_FLOPS] = int(after - before)
        is_tensor = isinstance(result, torch.Tensor)
        n.meta[META_TENSOR] = is_tensor
        if is_tensor:
            n.meta[META_SHAPE] = tuple(int(s) for s in result.shape)
            n.meta[META_DTYPE] = str(result.dtype).replace("torch.", "")
        n.meta[META_BYTES] = _bytes(result)
        return result


def propagate(
    gm: fx.GraphModule, model: nn.Module, capture: Capture, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Annotate every node of ``gm`` with shapes, bytes and FLOPs from one example run."""
    from torch.utils.flop_counter import FlopCounterMode

    values = placeholder_values(gm, model, args, kwargs)
    counter = FlopCounterMode(display=False)
    with preserved_state(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with counter:
            _Prop(gm, counter).run(*values)
