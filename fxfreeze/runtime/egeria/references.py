"""The reference side of Egeria's evaluations: per block, a builder of low-precision anchors
and the anchor built last.

Two threads touch it, each its own part: builders are prepared on the training thread (they
may trace the block), anchors are built and run by jobs on the reference worker
(:meth:`References.run`), which the training thread never waits for in the default
asynchronous mode.

Preparing a builder is the largest one-time cost of Egeria (about 0.07 s per ResNet block on
this machine's CPU, more for a transformer layer: the backends trace and insert observers), and
it cannot move to the worker (fx tracing patches ``nn.Module.__call__`` for every thread). The
policy prepares every block's builder in ``fxfreeze.compile``, before training, when the
example call can run. Most blocks repeat one another, so blocks of the same structure share one
builder: the same graph node for node (module types and configurations, constants, tensor
shapes and dtypes, input shapes), each block's state dict keys renamed to the first one's.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Hashable

import torch
from torch import fx

from .builder import BuiltReference, ReferenceBuilder
from .plasticity import block_sp_loss

__all__ = ["References"]

logger = logging.getLogger("fxfreeze")


class References:
    """Per block: its :class:`ReferenceBuilder`, its built anchor (with the anchor's id), the
    backend that built it and the fallbacks taken; blocks whose reference cannot be built."""

    def __init__(self, precision: str) -> None:
        self.precision = precision
        self.builders: dict[int, ReferenceBuilder] = {}
        #: block -> its state dict keys renamed to those of the block whose builder it shares
        self.renames: dict[int, dict[str, str]] = {}
        #: structure -> (builder, the graph's (op, target) rows of the block it was made from)
        self._by_structure: dict[Hashable, tuple[ReferenceBuilder, list[tuple[str, str]]]] = {}
        #: block -> (built anchor, anchor id): touched only by jobs on the worker thread
        self.built: dict[int, tuple[BuiltReference, int]] = {}
        self.backends: dict[int, str] = {}
        self.fallbacks: dict[int, list[str]] = {}
        #: blocks whose reference cannot be built (a module that cannot be copied), with why
        self.unmeasurable: dict[int, str] = {}

    def prepare(self, j: int, graph_module: torch.fx.GraphModule, inputs: list[Any]) -> bool:
        """On the training thread: make block ``j``'s builder once; True when it was made now
        (a one-time cost). Raises what the builder raises. The builder takes the block's
        structure only: every build brings a weight snapshot (copied to the host without
        blocking), so nothing here waits for an accelerator."""
        if j in self.builders:
            return False
        key = structure_key(graph_module, inputs)
        shared = self._by_structure.get(key)
        if shared is not None:
            rename = _rename(graph_module, shared[1])
            if rename is not None:
                self.builders[j], self.renames[j] = shared[0], rename
                return False
        self.builders[j] = ReferenceBuilder(graph_module, inputs, self.precision, weights=False)
        self._by_structure.setdefault(key, (self.builders[j], _targets(graph_module)))
        return True

    def prepare_or_mark(self, j: int, graph_module: torch.fx.GraphModule, inputs: list[Any], name: str) -> bool:
        """:meth:`prepare`, except that a block whose builder cannot be made (a module that
        cannot be copied) is recorded in :attr:`unmeasurable` with a warning naming it
        (``name``), and False returned: it is never judged, training goes on."""
        try:
            return self.prepare(j, graph_module, inputs)
        except Exception as e:  # noqa: BLE001 - a block that cannot be copied: never judged
            self.unmeasurable[j] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            logger.warning(
                "egeria: block %d (%s) has no reference (%s): it is never judged converged, so the "
                "policy will not freeze it or anything after it; training goes on",
                j, name, self.unmeasurable[j],
            )
            return False

    def run(self, jobs: list[Any], k: int) -> dict[str, Any]:
        """On the worker thread: build due anchors, then each block's plasticity. ``jobs`` are
        ``(block, anchor id, inputs, training outputs, weights or None)``; ``k`` the number of
        blocks frozen when they were submitted."""
        for j in [j for j in self.built if j < k]:
            del self.built[j]  # frozen since: its anchor is no longer needed
        out: dict[str, Any] = {"plasticity": {}, "backend": {}, "missing": [], "build_seconds": 0.0}
        for j, anchor_id, inputs, train, state in jobs:
            if state is not None:
                tb = time.perf_counter()
                rename = self.renames.get(j)
                if rename is not None:
                    state = {rename[k]: v for k, v in state.items()}
                built = self.builders[j].build(state, inputs)
                out["build_seconds"] += time.perf_counter() - tb
                if built.fallbacks and self.backends.get(j) != built.backend:
                    # a block with nothing to quantize (embeddings) is told at INFO: it is the design
                    log = logger.info if built.routine else logger.warning
                    log("egeria: block %d reference falls back to %s (%s)", j, built.backend, "; ".join(built.fallbacks))
                self.backends[j] = built.backend
                self.fallbacks[j] = built.fallbacks
                self.built[j] = (built, anchor_id)
            ref = self.built.get(j)
            if ref is None or ref[1] != anchor_id:
                out["missing"].append(j)  # its anchor was never built (a failed job)
                continue
            pred = ref[0](inputs)
            pred = pred if isinstance(pred, (tuple, list)) else (pred,)
            out["plasticity"][j] = (anchor_id, block_sp_loss(train, pred))
            out["backend"][j] = self.backends.get(j)
        return out


def _targets(gm: fx.GraphModule) -> list[tuple[str, str]]:
    return [(n.op, str(n.target)) for n in gm.graph.nodes]


def _rename(gm: fx.GraphModule, targets: list[tuple[str, str]]) -> dict[str, str] | None:
    """``gm``'s state dict keys -> the keys of the same tensors in the block whose graph has
    ``targets`` (structurally equal: node for node), or None when some key is not covered."""
    rename: dict[str, str] = {}
    mods = dict(gm.named_modules())
    for n, (op, target) in zip(gm.graph.nodes, targets):
        if n.op != op:
            return None
        if op == "call_module":
            for suffix in mods[str(n.target)].state_dict():
                rename[f"{n.target}.{suffix}"] = f"{target}.{suffix}"
        elif op == "get_attr":
            rename[str(n.target)] = target
    keys = list(gm.state_dict())
    return rename if all(k in rename for k in keys) else None


def structure_key(gm: fx.GraphModule, inputs: list[Any]) -> Hashable:
    """What makes two blocks interchangeable for a reference builder: the graph node for node
    (op, module class and full repr with its tensors' shapes, dtypes and mode, function,
    arguments with nodes as positions), the inputs' shapes and dtypes. Names do not count."""
    index: dict[fx.Node, int] = {}
    mods = dict(gm.named_modules())

    def canon(a: Any) -> str:
        return repr(fx.node.map_aggregate(a, lambda x: ("%node", index[x]) if isinstance(x, fx.Node) else x))

    def tensors(m: torch.nn.Module) -> tuple[Any, ...]:
        return tuple((k, tuple(t.shape), t.dtype) for k, t in m.state_dict().items())

    rows = []
    for i, n in enumerate(gm.graph.nodes):
        index[n] = i
        if n.op == "call_module":
            m = mods[str(n.target)]
            target: Any = (f"{type(m).__module__}.{type(m).__qualname__}", repr(m), tensors(m), m.training)
        elif n.op == "get_attr":
            obj: Any = gm
            for part in str(n.target).split("."):
                obj = getattr(obj, part)
            target = ("tensor", tuple(obj.shape), obj.dtype) if isinstance(obj, torch.Tensor) else ("object", repr(obj))
        elif n.op == "call_function":
            target = (getattr(n.target, "__module__", None), getattr(n.target, "__qualname__", None), repr(n.target))
        elif n.op == "call_method":
            target = str(n.target)
        else:
            target = n.op
        rows.append((n.op, target, canon(n.args), canon(n.kwargs)))
    shapes = tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else repr(x) for x in inputs)
    return (tuple(rows), shapes)
