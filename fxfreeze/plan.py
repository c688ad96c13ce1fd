"""The freeze plan: which blocks a model has, in execution order, and what each costs.

A plan is data. It is deterministic (the same model and inputs give the same plan), it
round-trips through YAML and JSON, and a user may edit it: a block is defined by the name
of its first graph node (``start``) and runs until the next block's start, so deleting an
entry merges two blocks and adding one with another node name splits a block. Passing the
edited plan back (``fxfreeze.plan(model, inputs, plan=edited)`` or ``fxfreeze.compile(...,
plan=edited)``) re-derives every other field from the graph
(:mod:`fxfreeze.plan_build`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from .errors import PlanError

__all__ = ["Block", "Head", "FreezePlan", "PLAN_VERSION", "META_BLOCK", "HEAD"]

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
    """What follows the last block; never frozen. Ownership as for :class:`Block`.

    ``trains`` says whether any of the head's parameters reaches one of the model's outputs.
    A head whose only parameters feed a result the model drops (BERT's pooler inside a
    sentence-transformers model, which pools the token embeddings itself) trains nothing:
    freezing every block would leave the loss without a gradient, so the last block never
    freezes (:attr:`FreezePlan.max_frozen`)."""

    start: str | None
    modules: list[str] = field(default_factory=list)
    num_params: int = 0
    flops: int | None = None
    params: list[str] = field(default_factory=list)
    buffers: list[str] = field(default_factory=list)
    trains: bool = True


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
        """The deepest prefix that may be frozen: all blocks when the head trains (has
        parameters that reach an output), else all but the last (something must stay
        trainable)."""
        trains = self.head.num_params > 0 and self.head.trains
        return len(self.blocks) if trains else max(0, len(self.blocks) - 1)

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
        bad = [k for k in data if not isinstance(k, str)]
        if bad:
            raise PlanError(f"the plan has a key that is not a name: {bad[0]!r}")
        allowed = {f.name for f in fields(cls)} - {"version"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise PlanError(f"unknown plan key {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
        for key in ("model", "strategy", "blocks", "head"):
            if key not in data:
                raise PlanError(f"plan is missing the key {key!r}")
        _check_types({k: v for k, v in data.items() if k not in ("blocks", "head")}, "the plan", nullable=("total_flops", "batch_size"))
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
        except UnicodeDecodeError as e:
            raise PlanError(f"plan file {str(p)!r} is not UTF-8 text (a YAML or JSON plan): {e.reason} at byte {e.start}") from e
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


#: the type each plan field must have (lists hold names)
_FIELD_TYPES: dict[str, Any] = {
    "index": int, "name": str, "start": str, "modules": list, "num_params": int, "flops": int,
    "frontier_bytes": int, "frontier": list, "params": list, "buffers": list, "model": str, "strategy": str,
    "total_params": int, "total_flops": int, "batch_size": int, "inputs": list, "shared_params": list, "notes": list,
}


def _check_types(data: Mapping[str, Any], where: str, nullable: tuple[str, ...] = ()) -> None:
    """A hand-edited plan gets a PlanError naming the field, not a TypeError later."""
    for key, value in data.items():
        want = _FIELD_TYPES.get(key)
        if want is None or (value is None and key in nullable):
            continue
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if ok and want is list:
            ok = all(isinstance(v, str) for v in value)
        if not ok:
            what = "a list of names" if want is list else want.__name__
            raise PlanError(f"{where}: {key!r} must be {what}, got {value!r}")


def _from(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise PlanError(f"plan entry {where} must be a mapping, got {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise PlanError(f"plan entry {where} has a key that is not a name: {bad[0]!r}")
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise PlanError(f"unknown key {unknown[0]!r} in plan entry {where}; allowed: {', '.join(sorted(allowed))}")
    _check_types(data, f"plan entry {where}", nullable=("flops", "frontier_bytes") + (("start",) if cls is Head else ()))
    try:
        return cls(**data)
    except TypeError as e:
        raise PlanError(f"plan entry {where}: {e}") from e
