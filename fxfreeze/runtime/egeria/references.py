"""The reference side of Egeria's evaluations: per block, a builder of low-precision anchors
and the anchor built last.

Two threads touch it, each its own part: builders are prepared on the training thread (they
may trace the block), anchors are built and run by jobs on the reference worker
(:meth:`References.run`), which the training thread never waits for in the default
asynchronous mode.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

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
        #: block -> (built anchor, anchor id): touched only by jobs on the worker thread
        self.built: dict[int, tuple[BuiltReference, int]] = {}
        self.backends: dict[int, str] = {}
        self.fallbacks: dict[int, list[str]] = {}
        #: blocks whose reference cannot be built (a module that cannot be copied), with why
        self.unmeasurable: dict[int, str] = {}

    def prepare(self, j: int, graph_module: torch.fx.GraphModule, inputs: list[Any]) -> bool:
        """On the training thread: make block ``j``'s builder once; True when it was made now
        (a one-time cost). Raises what the builder raises."""
        if j in self.builders:
            return False
        self.builders[j] = ReferenceBuilder(graph_module, inputs, self.precision)
        return True

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
                built = self.builders[j].build(state, inputs)
                out["build_seconds"] += time.perf_counter() - tb
                if built.fallbacks and self.backends.get(j) != built.backend:
                    logger.warning("egeria: block %d reference falls back to %s (%s)", j, built.backend, "; ".join(built.fallbacks))
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
