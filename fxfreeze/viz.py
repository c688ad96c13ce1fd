"""Graph pictures: the captured graph with nodes clustered by block, the head marked and
frontier edges (those crossing a block boundary) highlighted.

DOT and JSON need nothing extra; SVG (and the picture inside HTML) need Graphviz's ``dot``.
"""

from __future__ import annotations

import html
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch.fx as fx

from .errors import VizError
from .graph_utils import block_label
from .plan import HEAD, FreezePlan

__all__ = ["to_dot", "to_json", "export", "FORMATS"]

FORMATS = ("dot", "svg", "html", "json")
_PALETTE = ("#dbeafe", "#dcfce7", "#fef9c3", "#fce7f3", "#ede9fe", "#ffedd5", "#cffafe", "#f3f4f6")


def _label(n: fx.Node) -> str:
    if n.op == "call_module":
        return f"{n.name}\\n{n.target}"
    if n.op in ("call_function", "call_method"):
        t = getattr(n.target, "__name__", str(n.target))
        return f"{n.name}\\n{t}"
    return f"{n.name}\\n({n.op})"


def _edges(graph: fx.Graph) -> list[tuple[fx.Node, fx.Node, bool]]:
    out = []
    for n in graph.nodes:
        if n.op == "get_attr":
            continue
        for u in n.users:
            bn, bu = block_label(n), block_label(u)
            frontier = bn is not None and bn != HEAD and bn != bu
            out.append((n, u, frontier))
    return out


def _owns(modules: list[str]) -> str:
    """The cluster label's second line: the modules the block owns (as in the plan)."""
    return "\nowns: " + ", ".join(modules) if modules else ""


def to_dot(graph: fx.Graph, plan: FreezePlan) -> str:
    """Graphviz source of ``graph``: one cluster per block of ``plan``, the head in grey, the
    edges that cross a cut (the frontier a cache would hold) in red.

    Example::

        >>> # a = fxfreeze.api.analyze(model, x); open("g.dot", "w").write(to_dot(a.graph, a.plan))
    """
    q = lambda s: '"' + str(s).replace('"', '\\"') + '"'  # noqa: E731
    lines = [
        f"digraph {q(plan.model)} {{",
        "  rankdir=TB; node [shape=box, style=filled, fontname=Helvetica, fontsize=10, fillcolor=white];",
    ]
    members: dict[int, list[fx.Node]] = {}
    loose: list[fx.Node] = []
    for n in graph.nodes:
        if n.op == "get_attr":
            continue
        b = block_label(n)
        if b is None:
            loose.append(n)
        else:
            members.setdefault(b, []).append(n)
    for b, nodes in sorted(members.items(), key=lambda kv: (kv[0] == HEAD, kv[0])):
        if b == HEAD:
            title, color = "head (not frozen)" + _owns(plan.head.modules), "#e5e7eb"
        else:
            blk = plan.blocks[b]
            title, color = f"block {b}: {blk.name}" + _owns(blk.modules), _PALETTE[b % len(_PALETTE)]
        lines.append(f"  subgraph cluster_{'head' if b == HEAD else b} {{")
        lines.append(f"    label={q(title)}; style=filled; color={q(color)};")
        for n in nodes:
            lines.append(f"    {q(n.name)} [label={q(_label(n))}];")
        lines.append("  }")
    for n in loose:
        shape = "ellipse" if n.op == "placeholder" else "doubleoctagon"
        lines.append(f"  {q(n.name)} [label={q(_label(n))}, shape={shape}];")
    for a, b, frontier in _edges(graph):
        attr = " [color=red, penwidth=2.0]" if frontier else ""
        lines.append(f"  {q(a.name)} -> {q(b.name)}{attr};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_json(graph: fx.Graph, plan: FreezePlan) -> str:
    """``graph`` as JSON: its nodes (name, op, target, block) and edges, with the plan's blocks,
    for tools that draw their own picture.

    Example::

        >>> # data = json.loads(to_json(a.graph, a.plan)); data["nodes"][0]["block"]
    """
    nodes: list[dict[str, Any]] = []
    for n in graph.nodes:
        if n.op == "get_attr":
            continue
        b = block_label(n)
        nodes.append(
            {
                "name": n.name,
                "op": n.op,
                "target": getattr(n.target, "__name__", str(n.target)),
                "block": None if b is None else ("head" if b == HEAD else b),
            }
        )
    edges = [{"src": a.name, "dst": b.name, "frontier": f} for a, b, f in _edges(graph)]
    return json.dumps({"plan": plan.to_dict(), "nodes": nodes, "edges": edges}, indent=2)


def _svg(dot_source: str) -> str:
    exe = shutil.which("dot")
    if exe is None:
        raise VizError(
            "SVG export needs Graphviz's `dot`, which is not installed; install it "
            "(Debian/Ubuntu: apt-get install graphviz; macOS: brew install graphviz) or "
            "export .dot or .json instead"
        )
    proc = subprocess.run([exe, "-Tsvg"], input=dot_source.encode(), capture_output=True, check=False)
    if proc.returncode != 0:
        raise VizError(f"Graphviz `dot` failed: {proc.stderr.decode(errors='replace').strip()[:300]}")
    return proc.stdout.decode()


def export(graph: fx.Graph, plan: FreezePlan, path: str | Path, fmt: str | None = None) -> Path:
    """Write the picture of ``graph`` with ``plan``'s blocks to ``path``.

    Args:
        graph, plan: what to draw (an :class:`~fxfreeze.api.Analysis` has both).
        path: the file to write; its suffix picks the format unless ``fmt`` is given.
        fmt: one of :data:`FORMATS` (``svg`` needs Graphviz's ``dot``; ``html`` and ``json``
            need nothing).

    Returns the path written; ``VizError`` for an unknown format or a missing ``dot``.

    Example::

        >>> # export(a.graph, a.plan, "resnet.html")   # what `fxfreeze viz` does
    """
    p = Path(path)
    fmt = (fmt or p.suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        raise VizError(f"unknown picture format {fmt!r} (from {str(p)!r}); use one of: {', '.join(FORMATS)}")
    if fmt == "dot":
        text = to_dot(graph, plan)
    elif fmt == "json":
        text = to_json(graph, plan)
    elif fmt == "svg":
        text = _svg(to_dot(graph, plan))
    else:
        svg = _svg(to_dot(graph, plan))
        rows = "".join(
            f"<tr><td>{b.index}</td><td>{html.escape(b.name)}</td><td>{html.escape(', '.join(b.modules))}</td>"
            f"<td>{b.num_params:,}</td><td>{'' if b.frontier_bytes is None else b.frontier_bytes}</td></tr>"
            for b in plan.blocks
        ) + (
            f"<tr><td>head</td><td>(not frozen)</td><td>{html.escape(', '.join(plan.head.modules))}</td>"
            f"<td>{plan.head.num_params:,}</td><td></td></tr>"
        )
        text = (
            f"<!doctype html><html><head><meta charset='utf-8'><title>fxfreeze: {html.escape(plan.model)}</title>"
            "<style>body{font-family:sans-serif}td,th{padding:2px 8px;text-align:right}</style></head><body>"
            f"<h1>{html.escape(plan.model)}</h1><p>{len(plan.blocks)} blocks, captured with {plan.strategy}. "
            "Red edges cross a block boundary (the cache frontier); the grey cluster is the head.</p>"
            f"<table><tr><th>#</th><th>block</th><th>owns</th><th>params</th><th>frontier bytes/sample</th></tr>{rows}</table>"
            f"{svg}</body></html>"
        )
    try:
        p.write_text(text, encoding="utf-8")
    except OSError as e:
        raise VizError(f"cannot write {str(p)!r}: {e.strerror}") from e
    return p
