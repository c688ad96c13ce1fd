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

from ..plan import HEAD, META_BLOCK
from .cut_backward import META_INSERTED, detach_tree

__all__ = ["Subgraph", "extract", "block_outputs", "real_users"]

_COMPUTE = ("call_function", "call_method", "call_module")


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


def _block(n: fx.Node) -> int | None:
    b = n.meta.get(META_BLOCK)
    if b is None or b == HEAD:
        return None
    return int(b)


def _source(n: fx.Node) -> fx.Node:
    """Look through ``detach_tree`` nodes a CutBackward pass inserted."""
    while n.meta.get(META_INSERTED) and n.target is detach_tree:
        n = n.args[0]  # type: ignore[assignment]
    return n


def block_outputs(graph: fx.Graph, lo: int = 0, hi: int | None = None) -> dict[int, list[str]]:
    """For each block in ``[lo, hi)``, the names of its nodes read by a node of another,
    later block, the head or the graph output, in execution order."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    out: dict[int, list[str]] = {}
    for n in graph.nodes:
        if n.op not in _COMPUTE or n.meta.get(META_INSERTED):
            continue
        b = _block(n)
        if b is None or b < lo or (hi is not None and b >= hi):
            continue
        users = real_users(n)
        if any(u.op == "output" or (_block(u) != b and order[u] > order[n]) for u in users):
            out.setdefault(b, []).append(n.name)
    return out


def real_users(n: fx.Node) -> list[fx.Node]:
    """The users of ``n``, looking through the ``detach_tree`` nodes a CutBackward pass
    inserted; its autograd switches are not users."""
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


def extract(
    graph: fx.Graph,
    root: Mapping[str, Any] | nn.Module,
    lo: int,
    hi: int,
    outputs: Sequence[str] | None = None,
    class_name: str = "BlockRange",
) -> Subgraph:
    """Blocks ``lo..hi-1`` of ``graph`` as a GraphModule over ``root``'s attributes.

    ``outputs`` defaults to every block's outputs (:func:`block_outputs`); it may name any
    node computed in the range. ``root`` resolves ``get_attr`` / ``call_module`` targets
    (the model, or a dict of them)."""
    if lo < 0 or hi <= lo:
        raise ValueError(f"extract needs 0 <= lo < hi, got lo={lo}, hi={hi}")
    nodes = [
        n for n in graph.nodes
        if n.op in _COMPUTE and not n.meta.get(META_INSERTED) and _block(n) is not None and lo <= _block(n) < hi  # type: ignore[operator]
    ]
    if not nodes:
        raise ValueError(f"no compute node belongs to blocks {lo}..{hi - 1}")
    in_range = set(nodes)
    bo = block_outputs(graph, lo, hi)
    if outputs is None:
        outputs = [name for b in sorted(bo) for name in bo[b]]
    by_name = {n.name: n for n in graph.nodes}
    for name in outputs:
        n = by_name.get(name)
        if n is None or n not in in_range:
            raise ValueError(f"output {name!r} is not computed in blocks {lo}..{hi - 1}")

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

    owner: dict[str, Any] = {}
    for target in attrs:
        owner[target] = _resolve(root, target)
    gm = fx.GraphModule(owner, new, class_name=class_name)
    new.lint()
    return Subgraph(gm, lo, hi, inputs, list(outputs), {b: v for b, v in bo.items()})


def _resolve(root: Mapping[str, Any] | nn.Module, target: str) -> Any:
    if isinstance(root, Mapping):
        if target in root:
            return root[target]
        raise ValueError(f"graph attribute {target!r} is not in the given attributes")
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
