"""The freeze plan: which blocks a model has, in execution order, and what each costs.

A plan is data. It is deterministic (the same model and inputs give the same plan), it
round-trips through YAML and JSON, and a user may edit it: a block is defined by the name
of its first graph node (``start``) and runs until the next block's start, so deleting an
entry merges two blocks and adding one with another node name splits a block. Passing the
edited plan back (``fxfreeze.plan(model, inputs, plan=edited)`` or ``fxfreeze.compile(...,
plan=edited)``) re-derives every other field from the graph.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch.fx as fx

from .analysis import META_BYTES, META_DTYPE, META_FLOPS, META_SHAPE
from .errors import PlanError
from .partition import GraphIndex, Proposal, top_modules

__all__ = ["Block", "Head", "FreezePlan", "build_plan", "param_uses", "tensor_uses", "block_of", "starts_from_plan", "PLAN_VERSION", "META_BLOCK", "HEAD"]

PLAN_VERSION = 1
#: node.meta key holding the block index of a node (``HEAD`` for the head).
META_BLOCK = "fxfreeze.block"
HEAD = -1


@dataclass
class Block:
    """One freezable building block.

    What it owns: ``modules`` are the top-most modules whose every graph node lies in the
    block (a parent that spans several blocks, such as a model's root or a stack of layers,
    is never listed: its own glue code belongs to the block it runs in, its children to
    theirs); ``params`` and ``buffers`` are the tensors whose first use lies in the block
    (a parameter used by a later block too is in the plan's ``shared_params`` and keeps
    training until its last user freezes)."""

    index: int
    name: str
    start: str
    modules: list[str] = field(default_factory=list)
    num_params: int = 0
    flops: int | None = None
    frontier_bytes: int | None = None
    frontier: list[str] = field(default_factory=list)
    params: list[str] = field(default_factory=list)
    buffers: list[str] = field(default_factory=list)


@dataclass
class Head:
    """What follows the last block; never frozen. Ownership as for :class:`Block`."""

    start: str | None
    modules: list[str] = field(default_factory=list)
    num_params: int = 0
    flops: int | None = None
    params: list[str] = field(default_factory=list)
    buffers: list[str] = field(default_factory=list)


@dataclass
class FreezePlan:
    """Blocks of a model in execution order, with sizes, FLOPs and cache frontiers."""

    model: str
    strategy: str
    blocks: list[Block]
    head: Head
    total_params: int = 0
    total_flops: int | None = None
    batch_size: int | None = None
    inputs: list[str] = field(default_factory=list)
    shared_params: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    version: int = PLAN_VERSION

    # -- convenience -----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.blocks]

    @property
    def max_frozen(self) -> int:
        """The deepest prefix that may be frozen: all blocks when the head trains, else all
        but the last (something must stay trainable)."""
        return len(self.blocks) if self.head.num_params > 0 else max(0, len(self.blocks) - 1)

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {"fxfreeze_plan": d.pop("version"), **d}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FreezePlan":
        if not isinstance(data, Mapping):
            raise PlanError(f"a plan must be a mapping, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("fxfreeze_plan", data.pop("version", None))
        if version != PLAN_VERSION:
            raise PlanError(
                f"unsupported plan version {version!r} (key 'fxfreeze_plan'); this fxfreeze "
                f"reads version {PLAN_VERSION}"
            )
        allowed = {f.name for f in fields(cls)} - {"version"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise PlanError(f"unknown plan key {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
        for key in ("model", "strategy", "blocks", "head"):
            if key not in data:
                raise PlanError(f"plan is missing the key {key!r}")
        if not isinstance(data["blocks"], list) or not data["blocks"]:
            raise PlanError("plan key 'blocks' must be a non-empty list")
        blocks = [_from(Block, b, f"blocks[{i}]") for i, b in enumerate(data["blocks"])]
        head = _from(Head, data["head"], "head")
        data["blocks"], data["head"] = blocks, head
        return cls(**data)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, width=100)

    @classmethod
    def from_yaml(cls, text: str) -> "FreezePlan":
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise PlanError(f"plan is not valid YAML: {e}") from e
        return cls.from_dict(data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "FreezePlan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"plan is not valid JSON: {e}") from e
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        p = Path(path)
        p.write_text(self.to_json() if p.suffix == ".json" else self.to_yaml(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "FreezePlan":
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise PlanError(f"cannot read plan file {str(p)!r}: {e.strerror}") from e
        return cls.from_json(text) if p.suffix == ".json" else cls.from_yaml(text)

    # -- display ---------------------------------------------------------------------------
    def table(self) -> str:
        """A torchinfo-style summary."""
        rows = [("#", "block", "owns modules", "params", "GFLOPs", "cum FLOPs", "frontier/sample")]
        total = self.total_flops or 0
        cum = 0
        for b in self.blocks:
            cum += b.flops or 0
            mods = ", ".join(b.modules)  # whole: the table shows what the block owns
            rows.append(
                (
                    str(b.index),
                    b.name,
                    mods,
                    f"{b.num_params:,}",
                    "-" if b.flops is None else f"{b.flops / 1e9:.4f}",
                    "-" if not total else f"{100 * cum / total:.1f}%",
                    "-" if b.frontier_bytes is None else _human(b.frontier_bytes),
                )
            )
        hm = ", ".join(self.head.modules)
        rows.append(
            (
                "head",
                "(not frozen)",
                hm,
                f"{self.head.num_params:,}",
                "-" if self.head.flops is None else f"{self.head.flops / 1e9:.4f}",
                "100.0%" if total else "-",
                "",
            )
        )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = []
        for j, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
            if j == 0:
                lines.append("-" * len(lines[0]))
        header = (
            f"{self.model}: {len(self.blocks)} blocks, {self.total_params:,} parameters"
            + ("" if self.total_flops is None else f", {self.total_flops / 1e9:.4f} GFLOPs")
            + (f" at batch {self.batch_size}" if self.batch_size else "")
            + f" (captured with {self.strategy})"
        )
        return "\n".join([header, *lines])


def _human(n: int) -> str:
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if v < 1024 or unit == "GiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{n} B"


def _from(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise PlanError(f"plan entry {where} must be a mapping, got {type(data).__name__}")
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise PlanError(f"unknown key {unknown[0]!r} in plan entry {where}; allowed: {', '.join(sorted(allowed))}")
    try:
        return cls(**data)
    except TypeError as e:
        raise PlanError(f"plan entry {where}: {e}") from e


# ---------------------------------------------------------------------------------------
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
    for n in gm.graph.nodes:  # get_attr nodes follow their first user
        if n.op == "get_attr":
            blocks = [u.meta.get(META_BLOCK) for u in n.users if u.meta.get(META_BLOCK) is not None]
            n.meta[META_BLOCK] = min(blocks, key=lambda x: (x == HEAD, x)) if blocks else None
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
    head = Head(
        start=ix.compute[head_start].name if head_start < ix.end else None,
        modules=_owned_modules(ix, head_owners, head_start, ix.end),
        num_params=sum(numel[p] for p in head_params),
        flops=head_flops if have_meta else None,
        params=head_params,
        buffers=head_buffers,
    )
    total_params = sum(numel.values())
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
