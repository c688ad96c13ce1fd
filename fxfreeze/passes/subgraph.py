"""Extract a range of blocks of an annotated graph as a standalone GraphModule.

Egeria's reference model and the training side's activation capture both need "blocks
``lo..hi-1`` as a function": inputs are the values those blocks read from earlier blocks or
from the graph inputs (the *frontier* at cut ``lo``), outputs are each block's *outputs*,
the values it produces that a later block (or the graph output) reads. :func:`extract`
builds that function from a graph whose compute nodes carry ``fxfreeze.block`` (see
:mod:`fxfreeze.plan`). The source graph is not modified; nodes a :class:`CutBackward` pass
inserted are looked through (``detach_tree`` is the identity on values, the autograd mode
switches are dropped), so it may be called on a graph that has a frozen prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch.fx as fx
from torch import nn

from ..graph_utils import COMPUTE_OPS, block_of, resolve_attr
from .base import META_INSERTED, GraphPass, GraphSource, PassResult, unlabelled_nodes
from .cut_backward import detach_tree

__all__ = ["Subgraph", "ExtractBlocks", "extract", "block_outputs", "real_users"]


@dataclass
class Subgraph:
    """Blocks ``lo..hi-1`` as a GraphModule.

    ``inputs`` and ``outputs`` are node names of the *source* graph: call the module with
    the values of ``inputs`` (positionally) and it returns a tuple of the values of
    ``outputs``. ``block_outputs[i]`` lists the outputs that block ``i`` produced."""

    graph_module: fx.GraphModule
    lo: int
    hi: int
    inputs: list[str]
    outputs: list[str]
    block_outputs: dict[int, list[str]] = field(default_factory=dict)


def _source(n: fx.Node) -> fx.Node:
    """Look through ``detach_tree`` nodes a CutBackward pass inserted."""
    while n.meta.get(META_INSERTED) and n.target is detach_tree:
        n = n.args[0]  # type: ignore[assignment]
    return n


def block_outputs(graph: fx.Graph, lo: int = 0, hi: int | None = None) -> dict[int, list[str]]:
    """For each block in ``[lo, hi)``, the names of its nodes read by a node of another, later
    block, the head or the graph output, in execution order: what the block hands on.

    Example::

        >>> # block_outputs(capture.graph, 0, 2) -> {0: ['relu'], 1: ['relu_2']}
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    out: dict[int, list[str]] = {}
    for n in graph.nodes:
        if n.op not in COMPUTE_OPS or n.meta.get(META_INSERTED):
            continue
        b = block_of(n)
        if b is None or b < lo or (hi is not None and b >= hi):
            continue
        users = real_users(n)
        if any(u.op == "output" or (block_of(u) != b and order[u] > order[n]) for u in users):
            out.setdefault(b, []).append(n.name)
    return out


def real_users(n: fx.Node) -> list[fx.Node]:
    """The users of ``n``, looking through the ``detach_tree`` nodes a CutBackward pass
    inserted; its autograd switches are not users.

    Example::

        >>> # [u.name for u in real_users(node)] -> the same before and after CutBackward(k)
    """
    return [uu for u in n.users for uu in _resolve_user(u)]


def _resolve_user(u: fx.Node) -> list[fx.Node]:
    if not u.meta.get(META_INSERTED):
        return [u]
    if u.target is detach_tree:
        res: list[fx.Node] = []
        for uu in u.users:
            res.extend(_resolve_user(uu))
        return res
    return []


class ExtractBlocks(GraphPass):
    """Build blocks ``lo..hi-1`` of a graph as a new GraphModule (the source is not
    modified). The pass reads a :class:`~fxfreeze.passes.base.GraphSource` (a graph and the
    module or attribute dict its targets resolve on) or a GraphModule (its own attributes);
    its result's module is the extracted one, and :attr:`subgraph` describes it."""

    name = "extract_blocks"

    def __init__(self, lo: int, hi: int, outputs: Sequence[str] | None = None, class_name: str = "BlockRange") -> None:
        if isinstance(lo, bool) or isinstance(hi, bool) or not isinstance(lo, int) or not isinstance(hi, int) or lo < 0 or hi <= lo:
            raise ValueError(f"extract needs integers 0 <= lo < hi, got lo={lo!r}, hi={hi!r}")
        self.lo, self.hi = lo, hi
        self.outputs = None if outputs is None else list(outputs)
        self.class_name = class_name
        self.subgraph: Subgraph | None = None

    def __repr__(self) -> str:
        return f"ExtractBlocks({self.lo}, {self.hi})"

    def _nodes(self, graph: fx.Graph) -> list[fx.Node]:
        return [
            n for n in graph.nodes
            if n.op in COMPUTE_OPS and not n.meta.get(META_INSERTED) and (b := block_of(n)) is not None and self.lo <= b < self.hi
        ]

    def requires(self, src: GraphSource | fx.GraphModule) -> str | None:
        missing = unlabelled_nodes(src.graph)
        if missing:
            return f"compute nodes without a block label ({', '.join(missing)}): label the graph with the plan first"
        nodes = self._nodes(src.graph)
        if not nodes:
            return f"no compute node belongs to blocks {self.lo}..{self.hi - 1}"
        names = {n.name for n in nodes}
        bad = [o for o in self.outputs or () if o not in names]
        if bad:
            return f"output {bad[0]!r} is not computed in blocks {self.lo}..{self.hi - 1}"
        return None

    def ensures(self, gm: fx.GraphModule) -> str | None:
        sub = self.subgraph
        if sub is None:
            return "no subgraph was recorded"
        got = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
        return None if got == len(sub.inputs) else f"{got} placeholders for {len(sub.inputs)} inputs"

    def call(self, src: GraphSource | fx.GraphModule) -> PassResult:
        graph = src.graph
        root = src.root if isinstance(src, GraphSource) else src
        lo, hi = self.lo, self.hi
        nodes = self._nodes(graph)
        in_range = set(nodes)
        bo = block_outputs(graph, lo, hi)
        outputs = self.outputs if self.outputs is not None else [name for b in sorted(bo) for name in bo[b]]
        by_name = {n.name: n for n in graph.nodes}

        new = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        inputs: list[str] = []
        attrs: dict[str, Any] = {}

        def value_of(a: fx.Node) -> fx.Node:
            a = _source(a)
            if a in env:
                return env[a]
            if a.op == "get_attr":
                env[a] = new.get_attr(str(a.target))
                attrs[str(a.target)] = None
            else:  # produced before the range, or a graph input: becomes an input
                p = new.placeholder(a.name)
                p.meta.update(a.meta)
                env[a] = p
                inputs.append(a.name)
            return env[a]

        # placeholders first, in source order, so that the signature is stable
        for n in nodes:
            for a in n.all_input_nodes:
                a = _source(a)
                if a not in in_range and a.op != "get_attr" and a not in env:
                    value_of(a)
        for n in nodes:
            env[n] = new.node_copy(n, value_of)
            if n.op == "call_module":
                attrs[str(n.target)] = None
        new.output(tuple(env[by_name[name]] for name in outputs))
        owner = {target: resolve_attr(root, target) for target in attrs}
        gm = fx.GraphModule(owner, new, class_name=self.class_name)
        self.subgraph = Subgraph(gm, lo, hi, inputs, list(outputs), {b: v for b, v in bo.items()})
        return PassResult(gm, True)


def extract(
    graph: fx.Graph,
    root: Mapping[str, Any] | nn.Module,
    lo: int,
    hi: int,
    outputs: Sequence[str] | None = None,
    class_name: str = "BlockRange",
) -> Subgraph:
    """Blocks ``lo..hi-1`` of ``graph`` as a GraphModule over ``root``'s attributes.

    Args:
        graph: a graph whose compute nodes carry ``fxfreeze.block`` labels (a cut is
            looked through).
        root: what ``get_attr`` / ``call_module`` targets resolve on: the model, or a dict.
        lo, hi: the block range, ``0 <= lo < hi``.
        outputs: node names to return; default every block's outputs (:func:`block_outputs`).
        class_name: the class name of the new module.

    Runs :class:`ExtractBlocks` through :func:`~fxfreeze.passes.run_passes` (a bad range or
    output raises :class:`~fxfreeze.errors.PassError`).

    Example::

        >>> # sub = extract(capture.graph, capture.attributes(model), 1, 3)
        >>> # sub.graph_module(*[values[n] for n in sub.inputs])  -> outputs of blocks 1 and 2
    """
    p = ExtractBlocks(lo, hi, outputs, class_name)
    p(GraphSource(graph, root))
    assert p.subgraph is not None  # set by a successful run
    return p.subgraph
