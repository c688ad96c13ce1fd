"""Finding the freezable building blocks of a captured graph.

The partitioner *proposes* block boundaries; :mod:`fxfreeze.plan` turns a proposal (or a
user-edited one) into a :class:`~fxfreeze.plan.FreezePlan`, and passes *apply* it. Nothing
here knows any class name: blocks are found from structure alone.

1. **Ownership.** Every compute node belongs to the innermost module that produced it
   (``nn_module_stack``). A module, or a group of sibling modules, is *contiguous* when no
   node of another sibling subtree runs between its first and last node (its parent's own
   glue code may).
2. **Runs.** Among the children of a module, ordered by first execution, a *run* is a
   sequence of at least two units of ``k`` consecutive children (``k`` = 1..4) with the same
   module types, each unit contiguous and holding parameters, and each unit depending on
   the previous one through the data flow (a chain, not parallel branches such as q/k/v).
   Units of a single module without children (``nn.LSTM`` layers stacked in a
   ``ModuleList``) form a run only when they hold at least half of the model's parameters:
   a stack of recurrent layers does, a pooler followed by a classifier does not.
3. **Levels.** Runs are searched top-down. A run unit is refined into the runs found inside
   it only when they qualify. Inner units that are layers (modules with children) must
   cover at least 90% of the unit's compute (FLOPs when example inputs gave them, else
   parameters: an embedding table holds many parameters and no FLOPs) and no inner cut may
   be crossed by a *skip*, a tensor that the unit's own code, not the inner units, uses
   after the cut (a residual wrapper's identity branch). Inner units that are groups of
   single ops (conv, norm, activation) must cover 90% of the parameters and keep every
   inner cut no wider, in tensors crossing, than the unit's input cut. So a ResNet stage
   splits into its residual blocks, a residual block does not split at its skip
   connection, an encoder stack (T5's) splits into its layers although every layer reads
   the same mask and position bias computed once (the inner units use those), a U-Net
   down block keeps its two convolutions together, a transformer layer does not split into
   its attention and MLP halves (not a run). Children outside any run are searched for
   runs deeper down (``encoder.layer`` inside a BERT), except a lone module of a type that
   is a run unit elsewhere: it is a block itself (an EfficientNet's last stage holds a
   single inverted-residual block). A unit of several siblings (a run of period 2 or more)
   splits into its members' blocks unless a skip crosses the new cuts or its members are
   single ops: alternating stages (2 then 3 blocks) into their blocks, alternating layers
   of two kinds (a hybrid of state-space and attention layers) into one block per layer.
4. **Order.** Units are taken in execution order, whichever subtree they came from: runs
   in two sibling lists zipped in one loop (a stage's patch embedding, then its layers)
   interleave.
5. **Stem and head.** Everything before the first unit is block 0, the stem (merged into the
   first block when it holds no parameters); nodes between two units go to the preceding
   block (a block runs from its first node to the next block's first node); everything
   after the last unit is the head, which is never frozen, except parameter-free nodes
   right after it that narrow the cut (a residual join in the parent's code). A stretch
   between two units that runs modules with parameters of the next unit's subtree rather
   than the previous one's (an encoder-decoder's decoder embeddings) opens the next block.
6. **Fallback.** With no run anywhere, the contiguous parametrised children of the model
   (descending through wrappers that hold nearly all parameters) are the blocks, and the
   last of them is the head.

Frontiers, the tensors crossing a prefix cut, are computed on a ``networkx`` view of the
graph; they are what an activation cache must hold when that prefix is frozen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

from .graph_index import COMPUTE_OPS, GraphIndex, within

__all__ = [
    "GraphIndex",
    "Proposal",
    "propose",
    "COMPUTE_OPS",
]

#: Runs found independently are kept only when they cover at least this share of the
#: parameters of the largest run (drops stray repeats far from the trunk).
_MIN_RELATIVE_COVERAGE = 0.01
_REFINE_COVERAGE = 0.9
_MAX_PERIOD = 4
#: A run of single leaf modules (``nn.LSTM``, ``nn.GRU`` or ``nn.Linear`` layers chained)
#: counts only when it holds at least this share of the model's parameters: a stack of
#: recurrent layers does, a pooler followed by a classifier does not.
_LEAF_RUN_SHARE = 0.5


@dataclass
class Unit:
    paths: tuple[str, ...]
    lo: int
    hi: int


@dataclass
class Proposal:
    """Proposed boundaries: block ``i`` spans compute positions ``[starts[i], starts[i+1])``
    and the head spans ``[head_start, end)``."""

    starts: list[int]
    head_start: int
    names: list[str]
    notes: list[str] = field(default_factory=list)


def _in_order(units: Iterable[Unit]) -> list[Unit]:
    """Units in execution order. Runs found in sibling subtrees can interleave: two
    ``ModuleList``s zipped in one loop (a patch embedding, then that stage's layers, stage
    after stage) each give a run, found one list after the other. Ordered by their first
    node, every unit is still a contiguous stretch of the graph, so each remains a block; a
    unit overlapping the one before it is dropped (blocks must not overlap)."""
    out: list[Unit] = []
    for u in sorted(units, key=lambda u: u.lo):
        if not out or u.lo > out[-1].hi:
            out.append(u)
    return out


def _unit_name(paths: Sequence[str]) -> str:
    if len(paths) == 1:
        return paths[0]
    return f"{paths[0]}..{paths[-1].rsplit('.', 1)[-1]}"


class _Searcher:
    def __init__(self, index: GraphIndex) -> None:
        self.ix = index
        #: module types that are run units somewhere: a lone module of such a type (the
        #: single block of a last stage) is a unit too, not a place to look deeper
        self.unit_types: set[object] = set()

    def unit(self, paths: Sequence[str]) -> Unit:
        lo, hi = self.ix.group_range(paths)
        return Unit(tuple(paths), lo, hi)

    def runs(self, parent: str, kids: list[str]) -> list[list[Unit]]:
        """Best set of runs among ``kids`` (max parameter coverage, then smallest period)."""
        ix = self.ix
        types = [ix.type_of(k) for k in kids]
        best: list[list[Unit]] = []
        best_cover = 0
        for k in range(1, _MAX_PERIOD + 1):
            found: list[list[Unit]] = []
            i = 0
            while i + 2 * k <= len(kids):
                pattern = types[i : i + k]
                units: list[Unit] = []
                j = i
                while j + k <= len(kids) and types[j : j + k] == pattern:
                    group = kids[j : j + k]
                    if sum(ix.params_of(p) for p in group) == 0 or not ix.contiguous(group, parent):
                        break
                    u = self.unit(group)
                    if units and (u.lo <= units[-1].hi or not ix.depends((units[-1].lo, units[-1].hi), (u.lo, u.hi))):
                        break
                    units.append(u)
                    j += k
                if len(units) >= 2 and k == 1 and not ix.has_children(kids[i]) \
                        and sum(ix.params_of(u.paths[0]) for u in units) < _LEAF_RUN_SHARE * ix.params_of(""):
                    units = []  # a few leaf ops (a pooler Linear then a classifier Linear) are no blocks
                if len(units) >= 2:
                    found.append(units)
                    i = j
                else:
                    i += 1
            cover = sum(ix.params_of(p) for run in found for u in run for p in u.paths)
            if cover > best_cover:
                best, best_cover = found, cover
        return best

    def decompose(self, path: str) -> list[tuple[int, list[Unit]]]:
        """Runs found in ``path``'s subtree as ``(coverage, units)``, in execution order;
        coverage is that of the run as found, before its units were refined."""
        kids = self.ix.children(path)
        if not kids:
            return []
        runs = self.runs(path, kids)
        first_of_run = {run[0].paths[0]: run for run in runs}
        in_run = {p for run in runs for u in run for p in u.paths}
        out: list[tuple[int, list[Unit]]] = []
        for kid in kids:
            if kid in first_of_run:
                run = first_of_run[kid]
                cover = sum(self.ix.params_of(p) for u in run for p in u.paths)
                units: list[Unit] = []
                for u in run:
                    units.extend(self.refine(u))
                out.append((cover, units))
            elif kid not in in_run:
                if self.ix.type_of(kid) in self.unit_types and self.ix.params_of(kid) > 0 and self.ix.contiguous([kid], path):
                    out.append((self.ix.params_of(kid), [self.unit([kid])]))
                else:
                    out.extend(self.decompose(kid))
        return out

    def refine(self, u: Unit) -> list[Unit]:
        if len(u.paths) != 1:
            return self._refine_group(u)
        sub = _in_order(s for _, units in self.decompose(u.paths[0]) for s in units)
        if len(sub) < 2:
            return [u]
        ix = self.ix
        if all(len(s.paths) == 1 and ix.has_children(s.paths[0]) for s in sub):
            # layers (modules of their own): compute coverage, and no skip around them
            if ix.has_flops and ix.flops_in(u.lo, u.hi) > 0:
                covered, total = sum(ix.flops_in(s.lo, s.hi) for s in sub), ix.flops_in(u.lo, u.hi)
            else:
                covered, total = sum(ix.params_of(p) for s in sub for p in s.paths), ix.params_of(u.paths[0])
            if covered < _REFINE_COVERAGE * total or ix.skips(u.lo, u.hi, [(s.lo, s.hi) for s in sub]):
                return [u]
            return sub
        # groups of single ops (conv, norm, activation): parameter coverage, and no inner
        # cut wider than the unit's input cut (a residual block keeps its convolutions)
        covered = sum(ix.params_of(p) for s in sub for p in s.paths)
        if covered < _REFINE_COVERAGE * ix.params_of(u.paths[0]):
            return [u]
        limit = ix.width(u.lo)
        if any(ix.width(s.lo) > limit for s in sub[1:]):
            return [u]
        return sub

    def _refine_group(self, u: Unit) -> list[Unit]:
        """A unit of several siblings (a run of period 2 or more) splits into its members'
        refinements when no skip crosses the new cuts: stages of 2 then 3 blocks, alternating
        (timm's MobileNetV3), into their blocks; layers of two kinds, alternating (a hybrid
        of state-space and attention layers, Jamba), into one block per layer. Members that
        are single ops (a convolution and its norm) stay together."""
        ix = self.ix
        parts = [self.refine(self.unit([p])) for p in u.paths]
        if all(len(p) == 1 for p in parts) and not all(ix.has_children(p) for p in u.paths):
            return [u]
        flat = [s for p in parts for s in p]
        if self.ix.skips(u.lo, u.hi, [(s.lo, s.hi) for s in flat]):
            return [u]
        return flat

    def units(self) -> list[Unit]:
        found = self.decompose("")
        if not found:
            return []
        types = {self.ix.type_of(u.paths[0]) for _, units in found for u in units if len(u.paths) == 1}
        if types:  # again, knowing which types are blocks
            self.unit_types = types
            found = self.decompose("")
        best = max(c for c, _ in found)
        return _in_order(u for c, units in found if c >= _MIN_RELATIVE_COVERAGE * best for u in units)

    def fallback(self) -> list[Unit]:
        ix = self.ix
        path = ""
        total = ix.params_of("")
        while True:
            kids = [k for k in ix.children(path) if ix.params_of(k) > 0]
            if len(kids) == 1 and ix.params_of(kids[0]) >= 0.9 * total:
                path = kids[0]
                continue
            break
        units = []
        for k in kids:
            if ix.contiguous([k], path):
                u = self.unit([k])
                if not units or u.lo > units[-1].hi:
                    units.append(u)
        return units


def propose(index: GraphIndex) -> Proposal:
    """Propose block boundaries for the graph behind ``index``."""
    ix = index
    searcher = _Searcher(ix)
    units = searcher.units()
    notes: list[str] = []
    head_from_last = False
    if not units:
        units = searcher.fallback()
        head_from_last = True
        notes.append(
            "no repeated chain of modules found; blocks are the model's parametrised "
            "children in execution order and the last one is the head"
        )
    if not units:
        # A single opaque module: one block, no head.
        return Proposal(starts=[0], head_start=ix.end, names=["model"], notes=notes + ["one block only"])
    if head_from_last and len(units) >= 2:
        head = units.pop()
        head_start = head.lo
    else:
        head_start = units[-1].hi + 1
        # A join right after the last unit that narrows the cut (``h + block(h)`` written in
        # the parent's forward) belongs to that unit, as such joins between units belong to
        # the unit before them: otherwise the last block's frontier, what the cache holds
        # when everything is frozen, is the join's two inputs instead of its one output.
        while (head_start < ix.end and ix.width(head_start + 1) < ix.width(head_start)
               and not ix.params_in(head_start, head_start + 1)):
            head_start += 1
    starts: list[int] = []
    names: list[str] = []
    if units[0].lo > 0 and ix.params_in(0, units[0].lo):
        starts.append(0)
        names.append("stem")
    for prev, u in zip([None, *units[:-1]], units):
        starts.append(u.lo if prev is None else _start_after(ix, prev, u))
        names.append(_unit_name(u.paths))
    starts[0] = 0  # nodes before the first unit belong to block 0
    return Proposal(starts=starts, head_start=head_start, names=names, notes=notes)


def _shared_depth(a: str, b: str) -> int:
    """How many leading path components ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        n += 1
    return n


def _start_after(ix: GraphIndex, prev: Unit, u: Unit) -> int:
    """Where ``u``'s block starts: at its unit, unless the stretch before it (after ``prev``)
    holds modules with parameters of ``u``'s subtree rather than ``prev``'s. An
    encoder-decoder's decoder embeddings run between the last encoder layer and the first
    decoder layer: they open the decoder, not close the encoder (which they joined before,
    so that freezing the encoder froze them too)."""
    last, first = prev.paths[-1], u.paths[0]
    for p in range(prev.hi + 1, u.lo):
        owner = ix.owner[p]
        if owner and _shared_depth(owner, first) > _shared_depth(owner, last):
            return p if ix.params_in(p, u.lo) else u.lo
    return u.lo


def top_modules(paths: Iterable[str]) -> list[str]:
    """Minimal set of module paths covering ``paths`` (drop descendants), in given order."""
    out: list[str] = []
    for p in paths:
        if not p:
            continue
        if any(within(p, q) for q in out):
            continue
        out = [q for q in out if not within(q, p)]
        out.append(p)
    return out
