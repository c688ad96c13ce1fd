"""Deriving a :class:`~fxfreeze.plan.FreezePlan` from block boundaries on a graph.

:func:`build_plan` turns a :class:`~fxfreeze.partition.Proposal` (the partitioner's, or
one re-derived from an edited plan by :func:`starts_from_plan`) into a plan: per block the
modules, parameters and buffers it owns, its FLOPs and its cache frontier; and it labels
every node with its block (``node.meta["fxfreeze.block"]``), which the passes read.
"""

from __future__ import annotations

from typing import Sequence

import networkx as nx
import torch.fx as fx

from .analysis import META_BYTES, META_DTYPE, META_FLOPS, META_SHAPE
from .errors import PlanError
from .graph_index import GraphIndex
from .graph_utils import label_attributes
from .partition import Proposal, top_modules
from .plan import HEAD, META_BLOCK, Block, FreezePlan, Head

__all__ = ["build_plan", "starts_from_plan", "tensor_uses", "param_uses", "block_of"]


def tensor_uses(ix: GraphIndex, buffers: bool = False) -> tuple[dict[str, list[int]], dict[str, int]]:
    """For each parameter (or buffer), by canonical name: the compute positions that use
    it, directly (``get_attr``) or inside a leaf module; and its numel."""
    model = ix.model
    named = (lambda **kw: model.named_buffers(**kw)) if buffers else (lambda **kw: model.named_parameters(**kw))
    canonical: dict[int, str] = {}
    numel: dict[str, int] = {}
    for name, t in named():
        canonical[id(t)] = name
        numel[name] = t.numel()
    alias: dict[str, str] = {}
    for name, t in named(remove_duplicate=False):
        alias[name] = canonical[id(t)]
    uses: dict[str, list[int]] = {}
    for i, n in enumerate(ix.compute):
        if n.op == "call_module":
            m = ix.module(str(n.target))
            if m is not None:
                inner = m.named_buffers if buffers else m.named_parameters
                for tname, _ in inner(prefix=str(n.target), remove_duplicate=False):
                    if tname in alias:
                        uses.setdefault(alias[tname], []).append(i)
        for a in n.all_input_nodes:
            if a.op == "get_attr" and str(a.target) in alias:
                uses.setdefault(alias[str(a.target)], []).append(i)
    return uses, numel


def param_uses(ix: GraphIndex) -> tuple[dict[str, list[int]], dict[str, int]]:
    """For each parameter (canonical name): compute positions that use it; and numels."""
    return tensor_uses(ix)


def _live(ix: GraphIndex) -> set[int]:
    """Compute positions whose result reaches the graph's output (the rest is dead code a
    capture kept, such as a pooler whose output the model drops)."""
    names: set[str] = set()
    for n in ix.nodes:
        if n.op == "output":
            names |= nx.ancestors(ix.dg, n.name)
    # an in-place op nobody reads (``y.add_(self.bias)``) is live when what it writes is
    for n in reversed(ix.nodes):
        if not n.users and n.args and isinstance(n.args[0], fx.Node) and n.args[0].name in names and _writes_in_place(n):
            names |= {n.name} | nx.ancestors(ix.dg, n.name)
    return {i for i, n in enumerate(ix.compute) if n.name in names}


def _writes_in_place(n: fx.Node) -> bool:
    if n.op not in ("call_method", "call_function"):
        return False
    t = getattr(n.target, "overloadpacket", n.target)  # aten.mul_.Tensor -> aten.mul_
    name = t if isinstance(t, str) else getattr(t, "__name__", str(t))
    return (name.endswith("_") and not name.endswith("__")) or name in ("iadd", "isub", "imul", "itruediv")


def _owned_modules(ix: GraphIndex, owners: Sequence[str], lo: int, hi: int) -> list[str]:
    """The top-most modules whose every compute node lies in ``[lo, hi)``, found from the
    owners of the nodes in that range; an owner whose own nodes spill out of the range
    (glue of a module spanning several blocks) is not listed."""
    out: dict[str, None] = {}
    for o in owners:
        if not o:
            continue
        parts = o.split(".")
        for i in range(1, len(parts) + 1):
            a = ".".join(parts[:i])
            span = ix.spans.get(a)
            if span is not None and span[0] >= lo and span[1] < hi:
                out[a] = None
                break
    return top_modules(out)


def block_of(pos: int, starts: Sequence[int], head_start: int) -> int:
    if pos >= head_start:
        return HEAD
    b = 0
    for i, s in enumerate(starts):
        if pos >= s:
            b = i
    return b


def _input_desc(gm: fx.GraphModule) -> list[str]:
    out = []
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        if META_SHAPE in n.meta:
            out.append(f"{n.target}: {n.meta.get(META_DTYPE)}{list(n.meta[META_SHAPE])}")
        else:
            out.append(str(n.target))
    return out


def starts_from_plan(ix: GraphIndex, plan: FreezePlan) -> Proposal:
    """Boundaries of a (possibly user-edited) plan on this graph, validated."""
    by_name = {n.name: i for i, n in enumerate(ix.compute)}
    starts, names = [], []
    for i, b in enumerate(plan.blocks):
        if b.start not in by_name:
            raise PlanError(
                f"block {i} ({b.name!r}) starts at node {b.start!r}, which is not a compute "
                "node of this model's graph; run `fxfreeze plan` to see valid node names"
            )
        starts.append(by_name[b.start])
        names.append(b.name)
    if plan.head.start is None:
        head_start = ix.end
    elif plan.head.start not in by_name:
        raise PlanError(f"the head starts at node {plan.head.start!r}, which is not in this model's graph")
    else:
        head_start = by_name[plan.head.start]
    seq = starts + [head_start]
    for a, b, name in zip(seq, seq[1:], names):
        if b <= a:
            raise PlanError(f"block {name!r} is empty or out of order: block starts must increase in execution order")
    starts[0] = 0
    return Proposal(starts=starts, head_start=head_start, names=names, notes=list(plan.notes))


def _first_users(
    uses: dict[str, list[int]], starts: Sequence[int], head_start: int, n_blocks: int
) -> tuple[list[list[str]], list[str], list[str]]:
    """Tensors by the block of their first use (then the head's), and those used by more
    than one block."""
    per_block: list[list[str]] = [[] for _ in range(n_blocks)]
    head: list[str] = []
    shared: list[str] = []
    for name in sorted(uses, key=lambda k: (min(uses[k]), k)):
        bs = {block_of(i, starts, head_start) for i in uses[name]}
        if len(bs) > 1:
            shared.append(name)
        first = block_of(min(uses[name]), starts, head_start)
        (head if first == HEAD else per_block[first]).append(name)
    return per_block, head, shared


def build_plan(
    ix: GraphIndex,
    gm: fx.GraphModule,
    proposal: Proposal,
    *,
    model_name: str,
    strategy: str,
    batch_size: int | None,
    notes: Sequence[str] = (),
) -> FreezePlan:
    """Derive every field of the plan from boundaries and annotate ``node.meta``."""
    starts, head_start = proposal.starts, proposal.head_start
    n_blocks = len(starts)
    have_meta = any(META_FLOPS in n.meta for n in ix.compute)
    flops = [0] * n_blocks
    head_flops = 0
    owners: list[list[str]] = [[] for _ in range(n_blocks)]
    head_owners: list[str] = []
    for i, n in enumerate(ix.compute):
        b = block_of(i, starts, head_start)
        n.meta[META_BLOCK] = b
        f = int(n.meta.get(META_FLOPS, 0))
        if b == HEAD:
            head_flops += f
            head_owners.append(ix.owner[i])
        else:
            flops[b] += f
            owners[b].append(ix.owner[i])
    label_attributes(gm.graph)  # get_attr nodes follow their first user
    uses, numel = param_uses(ix)
    block_params, head_params, shared = _first_users(uses, starts, head_start, n_blocks)
    buses, _ = tensor_uses(ix, buffers=True)
    block_buffers, head_buffers, _ = _first_users(buses, starts, head_start, n_blocks)
    blocks = []
    for k in range(n_blocks):
        cut = starts[k + 1] if k + 1 < n_blocks else head_start
        front = ix.frontier(cut)
        fb: int | None = None
        if have_meta and batch_size:
            fb = sum(int(n.meta.get(META_BYTES, 0)) for n in front) // batch_size
        blocks.append(
            Block(
                index=k,
                name=proposal.names[k],
                start=ix.compute[starts[k]].name if starts[k] < ix.end else "",
                modules=_owned_modules(ix, owners[k], starts[k], cut),
                num_params=sum(numel[p] for p in block_params[k]),
                flops=flops[k] if have_meta else None,
                frontier_bytes=fb,
                frontier=[n.name for n in front],
                params=block_params[k],
                buffers=block_buffers[k],
            )
        )
    live = _live(ix)
    head = Head(
        start=ix.compute[head_start].name if head_start < ix.end else None,
        modules=_owned_modules(ix, head_owners, head_start, ix.end),
        num_params=sum(numel[p] for p in head_params),
        flops=head_flops if have_meta else None,
        params=head_params,
        buffers=head_buffers,
        trains=any(i in live for p in head_params for i in uses[p] if i >= head_start),
    )
    total_params = sum(numel.values())
    if head.num_params and not head.trains:
        notes = [
            *notes,
            f"no parameter of the head ({', '.join(head.modules) or head.start}) reaches an output: "
            "the last block stays trainable",
        ]
    return FreezePlan(
        model=model_name,
        strategy=strategy,
        blocks=blocks,
        head=head,
        total_params=total_params,
        total_flops=(sum(flops) + head_flops) if have_meta else None,
        batch_size=batch_size,
        inputs=_input_desc(gm),
        shared_params=shared,
        notes=list(dict.fromkeys([*notes, *proposal.notes])),
    )
