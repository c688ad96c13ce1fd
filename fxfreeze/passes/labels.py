"""Carry block labels from one captured graph of a model to another.

A model is captured more than once: per training mode (tracing bakes the mode in) and per
kind of call (other keyword arguments, shapes that break a graph's guards). The plan's
blocks are defined on the first graph; every later graph gets the same blocks through
:func:`transfer_blocks`:

- graphs with the same compute nodes (the usual case for the other training mode) are
  labelled node by node;
- otherwise by ownership: a node belongs to the block that holds every source node of
  its innermost module known to the source graph (``model.h.3.attn`` -> block 4). Glue of
  a module that spans several blocks (a model's root code, a stack's own code) and nodes of
  modules the source never ran (a loss computed only when ``labels=`` is given) go to the
  preceding block, as the partitioner puts glue between two blocks; leading ones go to
  block 0. Labels are then made non-decreasing in execution order, which
  :class:`CutBackward` relies on: a prefix is a contiguous run of nodes.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from ..graph_utils import COMPUTE_OPS, block_label, label_attributes
from ..plan import HEAD, META_BLOCK
from ..trace import module_path_of
from .base import META_INSERTED, GraphPass, GraphSource, PassResult, unlabelled_nodes

__all__ = ["TransferBlocks", "transfer_blocks"]

_INF = 1 << 30


def _rank(b: int) -> int:
    return _INF if b == HEAD else int(b)


def _ancestors(path: str) -> list[str]:
    """'a.b.c' -> ['a.b.c', 'a.b', 'a', '']: innermost first."""
    out = [path]
    while path:
        path = path.rsplit(".", 1)[0] if "." in path else ""
        out.append(path)
    return out


class TransferBlocks(GraphPass):
    """Label a graph's compute nodes with the blocks of ``src`` (see the module docstring).
    Works on a GraphModule or a :class:`~fxfreeze.passes.base.GraphSource` (in place)."""

    name = "transfer_blocks"

    def __init__(self, src: fx.Graph) -> None:
        self.src = src

    def requires(self, gm: Any) -> str | None:
        missing = unlabelled_nodes(self.src)
        return f"the source graph has compute nodes without a block label ({', '.join(missing)})" if missing else None

    def ensures(self, gm: Any) -> str | None:
        """Every compute node is labelled, and labels never decrease in execution order."""
        missing = unlabelled_nodes(gm.graph)
        if missing:
            return f"compute nodes left without a block label: {', '.join(missing)}"
        high = -1
        for n in gm.graph.nodes:
            if n.op in COMPUTE_OPS and not n.meta.get(META_INSERTED):
                r = _rank(block_label(n))  # type: ignore[arg-type]
                if r < high:
                    return f"node {n.name} is labelled block {block_label(n)} after a later block"
                high = r
        return None

    def call(self, gm: Any) -> PassResult:
        _transfer(self.src, gm.graph)
        return PassResult(gm, True)


def transfer_blocks(src: fx.Graph, dst: fx.Graph) -> None:
    """Annotate ``dst``'s nodes with ``fxfreeze.block`` from ``src`` (see the module
    docstring) through :class:`TransferBlocks`. ``src`` may carry a CutBackward cut: its
    inserted nodes are skipped.

    Example::

        >>> # transfer_blocks(first_capture.graph, eval_capture.graph)
    """
    TransferBlocks(src)(GraphSource(dst, None))


def _transfer(src: fx.Graph, dst: fx.Graph) -> None:
    s_nodes = [n for n in src.nodes if n.op in COMPUTE_OPS and not n.meta.get(META_INSERTED)]
    d_nodes = [n for n in dst.nodes if n.op in COMPUTE_OPS]
    if [n.name for n in s_nodes] == [n.name for n in d_nodes]:
        for a, b in zip(s_nodes, d_nodes):
            b.meta[META_BLOCK] = a.meta.get(META_BLOCK)
    else:
        by_owner: dict[str, set[int]] = {}
        for n in s_nodes:
            b = n.meta.get(META_BLOCK)
            if b is None:
                continue
            for a in _ancestors(module_path_of(n)):
                by_owner.setdefault(a, set()).add(_rank(b))
        ranks: list[int | None] = []
        for n in d_nodes:
            found: set[int] | None = None
            for a in _ancestors(module_path_of(n)):
                if a in by_owner:
                    found = by_owner[a]
                    break
            ranks.append(next(iter(found)) if found is not None and len(found) == 1 else None)
        high = 0  # glue takes the preceding block; labels never decrease
        for n, r in zip(d_nodes, ranks):
            if r is not None:
                high = max(high, r)
            n.meta[META_BLOCK] = HEAD if high == _INF else high
    label_attributes(dst)
