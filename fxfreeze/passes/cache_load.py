"""Replace a frozen prefix by a cache-load node.

With ``k`` blocks frozen (and their outputs cacheable), :class:`CacheLoad` rewrites a graph
so that the prefix no longer runs: one ``cache_load`` node, fed the cache object (a
``get_attr``) and the graph inputs the prefix reads, returns the prefix's *frontier* (the
tensors it hands to later blocks, see :func:`cache_frontier`), and ``getitem`` nodes replace
every later use of them. The prefix's nodes are then dead and removed. What the cache does on
a miss (run the prefix, store, return) is runtime state and lives in
:mod:`fxfreeze.runtime.cache`; this pass only builds the graph.

Values crossing the cut that are not tensors (sizes, shapes from ``torch.export``'s symbolic
integers) are not cached: the nodes computing them stay in the graph when anything still
reads them, so they are recomputed from the inputs as before.
"""

from __future__ import annotations

import operator
from typing import Any, Sequence

import torch.fx as fx

from ..analysis import META_TENSOR
from ..graph_utils import in_prefix
from ..plan import META_BLOCK
from .base import META_INSERTED, GraphPass, PassResult, unlabelled_nodes
from .cut_backward import undo_cut
from .subgraph import real_users

__all__ = ["CacheLoad", "cache_frontier", "cache_load", "CACHE_ATTR", "META_CACHE"]

CACHE_ATTR = "fxfreeze_cache"
META_CACHE = "fxfreeze.cache_load"


def cache_load(cache: Any, *inputs: Any) -> tuple[Any, ...]:
    """Graph node target: the frontier of the current batch from ``cache`` (which computes it
    from ``inputs`` on a miss). :class:`CacheLoad` inserts it; it is not called directly.

    Example::

        >>> class Const:
        ...     def load(self, inputs):
        ...         return (inputs[0] * 2,)
        >>> cache_load(Const(), 3)
        (6,)
    """
    return cache.load(inputs)


def _is_tensor(n: fx.Node) -> bool:
    flag = n.meta.get(META_TENSOR)
    if flag is not None:
        return bool(flag)
    val = n.meta.get("val", n.meta.get("example_value"))
    if val is not None:
        return hasattr(val, "shape") and hasattr(val, "dtype")
    return True  # unknown: assume a tensor; the runtime checks what the prefix returns


def cache_frontier(graph: fx.Graph, k: int) -> tuple[list[fx.Node], list[fx.Node]]:
    """The nodes of blocks ``0..k-1`` read after them, split into (cached tensors, other values),
    in graph order: what :class:`CacheLoad` stores and what it leaves to be recomputed. Nodes a
    CutBackward pass inserted are not counted.

    Example::

        >>> # tensors, other = cache_frontier(fm.graph_module(True).graph, 3)
        >>> # [n.name for n in tensors] -> ['relu_6']: one tensor crosses the cut
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    prefix = [n for n in graph.nodes if in_prefix(n, k) and not n.meta.get(META_INSERTED)]
    if not prefix:
        return [], []
    last = order[prefix[-1]]
    pset = set(prefix)
    cached: list[fx.Node] = []
    other: list[fx.Node] = []
    for n in prefix:
        if any(u not in pset and order[u] > last for u in real_users(n)):
            (cached if _is_tensor(n) else other).append(n)
    return cached, other


class CacheLoad(GraphPass):
    """Replace blocks ``0..k-1`` of an annotated graph by one ``cache_load`` node reading
    ``cache`` (any object with ``load(inputs) -> tuple``; it becomes the module's
    ``fxfreeze_cache`` attribute). Rewrites the graph module in place (give it a copy).
    Not modified when the prefix hands on no tensor. The cached node names, in order, are
    the ``cache_load`` node's ``meta["fxfreeze.cache_load"]``.

    Example::

        >>> # res = CacheLoad(2, cache)(gm_copy); res.modified -> True when something is cached
    """

    name = "cache_load"

    def __init__(self, k: int, cache: Any = None) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"CacheLoad needs a positive int, got {k!r}")
        self.k = k
        self.cache = cache

    def __repr__(self) -> str:
        return f"CacheLoad({self.k})"

    def requires(self, gm: Any) -> str | None:
        missing = unlabelled_nodes(gm.graph)
        if missing:
            return f"compute nodes without a block label ({', '.join(missing)}): label the graph with the plan first"
        return None

    def ensures(self, gm: fx.GraphModule) -> str | None:
        """Nothing after the prefix reads a tensor the prefix computes: the cache serves
        them all."""
        loads = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is cache_load]
        if len(loads) != 1:
            return f"expected one cache_load node, found {len(loads)}"
        for n in gm.graph.nodes:
            if n.op == "output" or (n.op != "get_attr" and not in_prefix(n, self.k) and n is not loads[0]):
                stray = [a.name for a in n.all_input_nodes if in_prefix(a, self.k) and _is_tensor(a)]
                if stray:
                    return f"node {n.name} still reads prefix tensor(s) {', '.join(stray[:3])}"
        return None

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        undo_cut(graph)  # a CutBackward cut is meaningless once the prefix is gone
        cached, _ = cache_frontier(graph, self.k)
        if not cached:
            return PassResult(gm, False)
        order = {n: i for i, n in enumerate(graph.nodes)}
        prefix = [n for n in graph.nodes if in_prefix(n, self.k)]
        pset = set(prefix)
        last = prefix[-1]
        inputs = _prefix_inputs(prefix, pset)
        setattr(gm, CACHE_ATTR, self.cache)
        with graph.inserting_after(last):
            # create_node: get_attr() warns when the attribute is not a module, parameter or buffer
            handle = graph.create_node("get_attr", CACHE_ATTR)
        with graph.inserting_after(handle):
            load = graph.call_function(cache_load, (handle, *inputs))
        load.meta[META_CACHE] = [n.name for n in cached]
        anchor = load
        for i, n in enumerate(cached):
            with graph.inserting_after(anchor):
                g = graph.call_function(operator.getitem, (load, i))
            g.meta.update({key: v for key, v in n.meta.items() if key != META_BLOCK})
            for u in list(n.users):
                if u not in pset and order.get(u, len(order)) > order[last] and u is not load:
                    u.replace_input_with(n, g)
            anchor = g
        # remove the prefix explicitly: dead-code elimination keeps random ops (ATen dropout
        # is impure for fx), and with them the whole prefix feeding them
        needed: set[fx.Node] = set()
        stack = [n for n in graph.nodes if n not in pset]
        while stack:
            n = stack.pop()
            for a in n.all_input_nodes:
                if a in pset and a not in needed:
                    needed.add(a)
                    stack.append(a)
        for n in reversed(prefix):
            if n not in needed:
                graph.erase_node(n)
        graph.eliminate_dead_code()
        gm.recompile()
        return PassResult(gm, True)


def _prefix_inputs(prefix: Sequence[fx.Node], pset: set[fx.Node]) -> list[fx.Node]:
    """Graph inputs (placeholders) the prefix reads, in first-use order."""
    seen: list[fx.Node] = []
    for n in prefix:
        for a in n.all_input_nodes:
            if a.op == "placeholder" and a not in seen:
                seen.append(a)
    return seen
