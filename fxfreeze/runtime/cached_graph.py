"""The training graph with its frozen prefix served from the activation cache.

With ``k`` blocks frozen and caching on, the training graph is copied and
:class:`~fxfreeze.passes.cache_load.CacheLoad` replaces the prefix by one ``cache_load``
node that returns the prefix's frontier from :class:`~fxfreeze.runtime.cache.ActivationCache`
(computing and storing it on a miss). The copy is built once per prefix. When the prefix
grows from ``k`` to ``k'`` and blocks ``k..k'-1`` read nothing but the old frontier and the
graph inputs, the cache can *refill*: the new frontier is computed from the old cached one
by running only those blocks.

The cache holds one graph's frontier, so it is bound to the first training graph that runs
with a frozen prefix; other kinds of training call (rare: another keyword set) run their own
graph uncached.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from ..passes.cache_load import META_CACHE, CacheLoad, cache_load
from ..errors import PassError
from ..graph_utils import share_modules
from ..passes.cut_backward import copy_graph
from ..passes.subgraph import extract
from .graphs import GraphEntry

__all__ = ["CachedGraph", "cache_pays", "prefix_fingerprint"]

logger = logging.getLogger("fxfreeze")


def prefix_fingerprint(blocks: list[str], k: int, tensors: list[tuple[str, torch.Tensor]]) -> bytes:
    """A sha256 digest of what a frozen prefix's outputs depend on: the plan's ``blocks``,
    ``k``, and a fingerprint of each frozen parameter and buffer (name, shape, dtype, sum,
    sum of squares and a strided sample of 64 values)."""
    h = hashlib.sha256(repr((blocks, k)).encode())
    with torch.no_grad():
        for name, t in tensors:
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            if t.numel() and (t.is_floating_point() or not t.dtype.is_complex):
                v = t.detach().reshape(-1)
                d = v.double()
                h.update(struct.pack("<dd", float(d.sum()), float((d * d).sum())))
                h.update(v[:: max(1, v.numel() // 64)][:64].cpu().double().numpy().tobytes())
    return h.digest()


def _stamp(tensors: list[torch.Tensor]) -> list[tuple[int, int]]:
    """Each tensor's version counter and storage: what any write to it changes (but one
    through ``.data``, which keeps a counter of its own): two integers per frozen tensor."""
    return [(t._version, t.data_ptr()) for t in tensors]


def cache_pays(remaining: int | None, per_epoch: int | None, run: float | None, store: float | None,
               load: float | None) -> bool:
    """Will caching a new frozen prefix pay back before the run ends?

    After a freeze the first epoch *fills*: every sample misses, the prefix runs as it would
    without the cache, and storing its rows costs ``store`` seconds per sample. Every later
    step *reads*: it saves the prefix's ``run`` and pays ``load`` per sample. So the cache
    pays when the steps left after one epoch, times the saving, exceed one epoch of stores.
    Costs are measured (None before the first measurement: then at least one full epoch of
    reading is asked for); an unknown run length or epoch length keeps the cache on.

    Example::

        >>> cache_pays(remaining=300, per_epoch=100, run=2e-3, store=1e-4, load=2e-4)
        True
        >>> cache_pays(remaining=120, per_epoch=100, run=2e-3, store=5e-3, load=2e-4)  # 20 reading steps
        False
        >>> cache_pays(None, 100, None, None, None)
        True
    """
    if remaining is None or not per_epoch:
        return True
    later = remaining - per_epoch
    if later <= 0:
        return False
    if run is None or store is None:
        return later >= per_epoch
    return later * (run - (load or 0.0)) > per_epoch * store


class CachedGraph:
    """Builds and keeps the cached variant of one training graph."""

    def __init__(self, cache: Any, blocks: list[str]) -> None:
        self.cache = cache
        self.blocks = blocks  # the plan's block names, in the key
        self._watched: list[torch.Tensor] = []
        self._stamp: list[tuple[int, int]] = []
        self.entry: GraphEntry | None = None
        self.gm: fx.GraphModule | None = None
        self.k = 0
        self.frontier: list[str] | None = None  # for refilling a deeper prefix
        #: optimizer steps per epoch when known (``fm.wrap_loader``'s length)
        self.epoch_steps: int | None = None
        self._pays: tuple[int, bool] | None = None  # (prefix, decision): taken once per prefix

    def pays(self, k: int, freezer: Any, trains: Callable[[int], list[str]] = lambda k: []) -> bool:
        """Cache the prefix of ``k`` blocks only when it is expected to stay long enough to
        pay back its fill (:func:`cache_pays`, from the steps left
        in the planned run and the fill and read costs measured so far); decided once per
        prefix and logged when the answer is no. Otherwise the prefix runs as without a cache.
        Never when the prefix uses parameters that keep training (``trains(k)``: tied with a
        later block): its outputs change at every step, so stored ones would be stale."""
        if self._pays is None or self._pays[0] != k:
            moving = trains(k)
            if moving:
                self._pays = (k, False)
                logger.info("fxfreeze cache: the prefix of %d blocks is not cached: it uses %s, which still train "
                            "(shared with a later block), so its outputs change at every step", k, ", ".join(moving))
                return False
            cfg = freezer.config if freezer is not None else None
            total = getattr(freezer, "planned_steps", None) if freezer is not None else None
            remaining = None if total is None else total - freezer.step_count
            per_epoch = (cfg.steps_per_epoch if cfg is not None else None) or self.epoch_steps
            c = self.cache
            ok = cache_pays(remaining, per_epoch, c.per_row("run"), c.per_row("store"), c.per_row("load"))
            self._pays = (k, ok)
            if not ok:
                logger.info("fxfreeze cache: the prefix of %d blocks is not cached: %s steps left, %s per epoch; "
                            "filling it would not pay back", k, remaining, per_epoch)
        return self._pays[1]

    def reset(self) -> None:
        """Forget the graph and the stored activations (the model moved: new buffers)."""
        self.entry, self.gm, self.k, self.frontier = None, None, 0, None
        self._pays = None
        self.cache.clear()

    def graph_for(self, entry: GraphEntry, base: fx.GraphModule, model: nn.Module, k: int,
                  frozen: Callable[[int], list[tuple[str, torch.Tensor]]]) -> fx.GraphModule | None:
        """The cached variant of ``base`` (``entry``'s graph module with CutBackward(k)
        applied); None when this entry is not the cached one or the prefix hands on
        nothing cacheable. ``frozen(k)``: the prefix's frozen tensors, by name; their
        fingerprint binds stored entries to this plan, prefix and weights (taken once per
        prefix), and a change to them since (``load_state_dict``, an in-place update: each
        bumps a tensor's version counter) empties the cache, whose activations they made."""
        if self.entry is None:
            self.entry = entry
        elif entry is not self.entry:
            return None
        if self.gm is not None and self.k == k:
            if _stamp(self._watched) == self._stamp:
                return self.gm
            logger.info("fxfreeze cache: the frozen prefix's weights changed since their activations were stored "
                        "(load_state_dict, an update in place); the cache starts again")
            self.reset()
            self.entry = entry
        root = entry.capture.attributes(model)
        gm = share_modules(fx.GraphModule(root, copy_graph(base.graph), class_name=type(model).__name__ + "Cached"),
                           model, skip=entry.capture.extra_attrs)
        res = CacheLoad(k, self.cache)(gm)
        if not res.modified:
            self.gm, self.k = None, k
            self.cache.enabled = False
            logger.warning("fxfreeze cache: the frozen prefix hands on no tensor to cache; caching is off")
            return None
        load = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is cache_load)
        frontier: list[str] = load.meta[META_CACHE]
        in_names = [a.name for a in load.args[1:]]
        prefix = extract(base.graph, root, 0, k, outputs=frontier, class_name="FrozenPrefix")
        order = [in_names.index(n) for n in prefix.inputs]

        def runner(inputs: Any) -> Any:
            return prefix.graph_module(*[inputs[i] for i in order])

        refill = None
        if self.frontier and 0 < self.k < k:
            refill = _refill_fn(base.graph, root, self.k, k, self.frontier, frontier, in_names)
        def shared(idx: list[int]) -> Any:
            return _shared_fn(base.graph, root, k, [frontier[j] for j in idx], in_names)

        named = frozen(k)
        self.cache.set_prefix(k, runner, refill, key=prefix_fingerprint(self.blocks, k, named), names=in_names,
                              shared=shared)
        self.gm, self.k, self.frontier = gm, k, frontier
        self._watched = [t for _, t in named]
        self._stamp = _stamp(self._watched)
        return gm


def _refill_fn(graph: fx.Graph, root: Any, old_k: int, k: int, old: list[str], new: list[str], in_names: list[str]) -> Any:
    """New frontier from the old one: run blocks old_k..k-1 only (None when they read
    anything else than the old frontier and the graph inputs)."""
    try:
        produced = [n for n in new if n not in old]
        mid = extract(graph, root, old_k, k, outputs=produced, class_name="RefillBlocks")
    except PassError:  # nothing of those blocks hands on what the new frontier needs
        return None
    if any(n not in old and n not in in_names for n in mid.inputs) or any(n not in old and n not in produced for n in new):
        return None

    def refill(inputs: Any, old_frontier: Any) -> Any:
        env = dict(zip(in_names, inputs))
        env.update(zip(old, old_frontier))
        env.update(zip(mid.outputs, mid.graph_module(*[env[n] for n in mid.inputs])))
        return tuple(env[n] for n in new)

    return refill


def _shared_fn(graph: fx.Graph, root: Any, k: int, names: list[str], in_names: list[str]) -> Any:
    """A runner of the prefix's frontier values ``names`` alone, from the graph inputs: the
    values the whole batch shares (rotary tables), computed at every call instead of cached.
    Only the nodes they need run (a rotary table needs the positions, not the embeddings).
    None when they cannot be extracted."""
    try:
        sub = extract(graph, root, 0, k, outputs=names, class_name="FrozenShared")
    except PassError:
        return None
    if any(n not in in_names for n in sub.inputs):
        return None
    g = sub.graph_module.graph
    # by hand, not eliminate_dead_code: fx keeps random ops (ATen dropout) and so the prefix feeding them
    live: set[fx.Node] = set()
    stack = [n for n in g.nodes if n.op == "output"]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a not in live:
                live.add(a)
                stack.append(a)
    for n in reversed(list(g.nodes)):
        if n.op not in ("output", "placeholder") and n not in live:
            g.erase_node(n)
    sub.graph_module.recompile()
    order = [in_names.index(n) for n in sub.inputs]

    def run(inputs: Any) -> Any:
        return sub.graph_module(*[inputs[i] for i in order])

    return run
