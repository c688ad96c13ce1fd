"""Positions, ownership and data-flow queries over one captured graph, for the partitioner
(:mod:`fxfreeze.partition`) and the plan (:mod:`fxfreeze.plan`).

Every compute node belongs to the innermost module that produced it (``nn_module_stack``);
a module's *span* is the range of compute positions of its subtree. The *frontier* of a cut
is every tensor produced before it and used at or after it: what an activation cache must
hold when the prefix before the cut is frozen.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

import networkx as nx
import torch.fx as fx
from torch import nn

from .analysis import META_FLOPS, META_TENSOR
from .graph_utils import COMPUTE_OPS
from .trace import module_path_of

__all__ = ["GraphIndex", "COMPUTE_OPS", "within", "kind"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _ancestors(path: str) -> list[str]:
    """'a.b.c' -> ['', 'a', 'a.b', 'a.b.c']."""
    if not path:
        return [""]
    parts = path.split(".")
    return [""] + [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def within(path: str, root: str) -> bool:
    return root == "" or path == root or path.startswith(root + ".")


def kind(m: nn.Module) -> tuple[str, str]:
    """A module's class by module and qualified name, not by identity: a class made for
    each instance counts as one kind. ``torch.nn.utils.parametrize`` (``spectral_norm``,
    ``weight_norm``, ``orthogonal``) gives every module it touches a class of its own,
    ``ParametrizedLinear``; compared by identity, a discriminator's or a vocoder's
    repeated layers were no repetition, and the plan fell back to the model's children.

    Example::

        >>> from torch.nn.utils.parametrizations import weight_norm
        >>> a, b = weight_norm(nn.Linear(2, 2)), weight_norm(nn.Linear(2, 2))
        >>> type(a) is type(b), kind(a) == kind(b)
        (False, True)
    """
    cls = type(m)
    return (cls.__module__, cls.__qualname__)


class GraphIndex:
    """Positions, ownership and data-flow queries over one graph (built once, read often)."""

    def __init__(self, graph: fx.Graph, model: nn.Module) -> None:
        self.graph = graph
        self.model = model
        self.nodes: list[fx.Node] = list(graph.nodes)
        self.compute: list[fx.Node] = [n for n in self.nodes if n.op in COMPUTE_OPS]
        self.cidx: dict[fx.Node, int] = {n: i for i, n in enumerate(self.compute)}
        self.owner: list[str] = [module_path_of(n) for n in self.compute]
        self.end = len(self.compute)  # position of the output node
        spans: dict[str, list[int]] = {}
        for i, o in enumerate(self.owner):
            for a in _ancestors(o):
                s = spans.get(a)
                if s is None:
                    spans[a] = [i, i, 1]
                else:
                    s[1] = i
                    s[2] += 1
        self.spans = spans
        self._params: dict[str, int] = {}
        self.has_flops = bool(self.compute) and all(META_FLOPS in n.meta for n in self.compute)
        self._flops_acc = [0]
        for n in self.compute:
            self._flops_acc.append(self._flops_acc[-1] + int(n.meta.get(META_FLOPS, 0)))
        self.dg = nx.DiGraph()
        for n in self.nodes:
            self.dg.add_node(n.name)
            for u in n.users:
                self.dg.add_edge(n.name, u.name)
        self._width = self._frontier_widths()

    # -- modules -------------------------------------------------------------------------
    def module(self, path: str) -> nn.Module | None:
        try:
            return self.model.get_submodule(path) if path else self.model
        except AttributeError:
            return None

    def params_of(self, path: str) -> int:
        if path not in self._params:
            m = self.module(path)
            self._params[path] = sum(p.numel() for p in m.parameters()) if m is not None else 0
        return self._params[path]

    def children(self, path: str) -> list[str]:
        """Children of ``path`` that own compute nodes, in order of first execution."""
        m = self.module(path)
        if m is None:
            return []
        prefix = path + "." if path else ""
        kids = [prefix + name for name, _ in m.named_children() if prefix + name in self.spans]
        return sorted(kids, key=lambda k: self.spans[k][0])

    def has_children(self, path: str) -> bool:
        m = self.module(path)
        return m is not None and len(m._modules) > 0

    def type_of(self, path: str) -> object:
        """Repetition signature: the module's kind (:func:`kind`); for the generic
        containers (Sequential, ModuleList, ModuleDict) also their children's, so that two
        stages of different make-up do not count as repeats of each other."""
        m = self.module(path)
        if m is None:
            return None
        if type(m) in _CONTAINERS:
            return (kind(m), tuple(kind(c) for c in m.children()))
        return kind(m)

    # -- structure -----------------------------------------------------------------------
    def group_range(self, paths: Sequence[str]) -> tuple[int, int]:
        return min(self.spans[p][0] for p in paths), max(self.spans[p][1] for p in paths)

    def contiguous(self, paths: Sequence[str], parent: str) -> bool:
        lo, hi = self.group_range(paths)
        for i in range(lo, hi + 1):
            o = self.owner[i]
            if any(within(o, p) for p in paths):
                continue
            if within(parent, o):  # glue of the parent or an ancestor
                continue
            return False
        return True

    def depends(self, a: tuple[int, int], b: tuple[int, int]) -> bool:
        """Does any node in compute range ``b`` use (transitively) a node of range ``a``?"""
        seen: set[fx.Node] = set()
        queue = deque(self.compute[a[0] : a[1] + 1])
        while queue:
            n = queue.popleft()
            for u in n.users:
                i = self.cidx.get(u)
                if i is None or i > b[1] or u in seen:
                    continue
                if i >= b[0]:
                    return True
                seen.add(u)
                queue.append(u)
        return False

    # -- cuts ----------------------------------------------------------------------------
    def _is_tensor(self, n: fx.Node) -> bool:
        return bool(n.meta.get(META_TENSOR, True))

    def _last_use(self, n: fx.Node) -> int:
        last = -1
        for u in n.users:
            last = max(last, self.cidx.get(u, self.end))
        return last

    def _frontier_widths(self) -> list[int]:
        diff = [0] * (self.end + 2)
        for i, n in enumerate(self.compute):
            if not self._is_tensor(n):
                continue
            last = self._last_use(n)
            if last > i:
                diff[i + 1] += 1
                diff[last + 1] -= 1
        out, acc = [], 0
        for c in range(self.end + 1):
            acc += diff[c]
            out.append(acc)
        return out

    def flops_in(self, lo: int, hi: int) -> int:
        """Forward FLOPs of compute positions ``[lo, hi]`` (0 without example inputs)."""
        return self._flops_acc[hi + 1] - self._flops_acc[lo]

    def skips(self, lo: int, hi: int, inner: Sequence[tuple[int, int]]) -> bool:
        """Is a cut between two of the ``inner`` ranges of ``[lo, hi]`` crossed by a tensor
        that ``[lo, hi]``'s own code uses after the cut while no inner range after it does
        (a skip connection around the inner ranges)?"""
        covered = [False] * (hi - lo + 1)
        for a, b in inner:
            for i in range(a, b + 1):
                covered[i - lo] = True
        inputs = [n for n in self.nodes if n.op == "placeholder"]
        for cut in (a for a, _ in inner[1:]):
            for n in [*inputs, *self.compute[:cut]]:
                if n.op != "placeholder" and not self._is_tensor(n):
                    continue
                later = [self.cidx[u] for u in n.users if u in self.cidx and cut <= self.cidx[u] <= hi]
                if later and not any(covered[q - lo] for q in later):
                    return True
        return False

    def width(self, cut: int) -> int:
        """Tensors produced before compute position ``cut`` and used at or after it."""
        return self._width[cut]

    def frontier(self, cut: int) -> list[fx.Node]:
        """The nodes whose tensors cross the cut at compute position ``cut``, in order."""
        out = []
        for i in range(cut):
            n = self.compute[i]
            if self._is_tensor(n) and self._last_use(n) >= cut:
                out.append(n)
        return out

    def inputs_after(self, cut: int) -> list[fx.Node]:
        """Graph inputs still needed at or after the cut (passed through, never cached)."""
        return [
            n
            for n in self.nodes
            if n.op == "placeholder" and any(self.cidx.get(u, self.end) >= cut for u in n.users)
        ]

    def params_in(self, lo: int, hi: int) -> bool:
        """Does compute range [lo, hi) use any parameter?"""
        for i in range(lo, hi):
            n = self.compute[i]
            if n.op == "call_module":
                m = self.module(str(n.target))
                if m is not None and any(True for _ in m.parameters()):
                    return True
            for a in n.all_input_nodes:
                if a.op == "get_attr":
                    return True
        return False
