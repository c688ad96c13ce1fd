"""What of a frozen prefix still acts as in training mode after :class:`CutBackward`.

A frozen block runs in eval mode. A graph captured in training mode bakes in what the
block's code did in that mode, and :class:`~fxfreeze.passes.cut_backward.CutBackward` can
switch back only the operations that carry their mode as an argument (dropout, batch norm,
attention dropout). Code that branches on ``self.training`` in Python leaves no such
argument: stochastic depth (``DropPath`` draws ``rand``/``bernoulli`` and rescales), noise
injection, or a buffer a module updates while training (an EMA codebook, a step counter).
In a frozen block these would go on drawing random numbers and writing buffers, unlike the
eager model, and an activation cache would keep one random draw for good.

:func:`training_residue` finds them in a cut graph, inside higher-order operators'
subgraphs too (a ``no_grad`` or autocast region exported as one node): random operations
other than those the cut switched off, and in-place writes to a buffer (or a view of one).
The runtime then captures the training graph again with the frozen blocks in eval mode
(:class:`~fxfreeze.runtime.graphs.GraphCache`). Code whose two modes differ in some other
way (``if self.training: x = 2 * x``) is not seen here.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from ..graph_utils import block_of, resolve_attr
from .cut_backward import META_ORIG_ARGS, MODE_SENSITIVE

__all__ = ["training_residue", "RANDOM_OPS"]

#: Operation names (without leading or trailing underscores) that draw random numbers.
RANDOM_OPS = frozenset({
    "bernoulli", "rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm",
    "normal", "uniform", "exponential", "geometric", "cauchy", "log_normal", "multinomial", "poisson",
    "rrelu", "rrelu_with_noise", "native_dropout", "dropout", "feature_dropout", "alpha_dropout",
    "feature_alpha_dropout", "fused_dropout", "dropout1d", "dropout2d", "dropout3d",
})

#: Operations through which an in-place write still reaches the tensor they were given.
_VIEWS = frozenset({
    "view", "reshape", "select", "slice", "getitem", "narrow", "expand", "t", "transpose", "permute",
    "squeeze", "unsqueeze", "flatten", "unflatten", "as_strided", "alias", "detach", "view_as", "unbind",
    "split", "chunk", "diagonal", "movedim", "contiguous",
})

_INPLACE_OPERATORS = frozenset({
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
})


def _name(n: fx.Node) -> str:
    """The operation's name: ``aten.bernoulli_.float`` -> ``bernoulli_``, ``torch.rand`` ->
    ``rand``, a method call -> the method."""
    t = n.target
    if isinstance(t, str):
        return t
    packet = getattr(t, "overloadpacket", None)
    if packet is not None:
        return str(getattr(packet, "__name__", "")).split(".")[-1]
    return str(getattr(t, "__name__", ""))


def _written(n: fx.Node, name: str) -> list[Any]:
    """The arguments ``n`` writes: those its schema marks mutable (``self`` of ``add_``,
    ``out=`` of ``div.out``), else ``self`` of an in-place method or operator."""
    schema = getattr(n.target, "_schema", None)
    if schema is not None:
        out = []
        for i, a in enumerate(schema.arguments):
            if a.alias_info is not None and a.alias_info.is_write:
                out.append(n.args[i] if i < len(n.args) else n.kwargs.get(a.name))
        return out
    first = n.args[:1]
    if n.target in _INPLACE_OPERATORS or (name.endswith("_") and not name.endswith("__")):
        return [*first, n.kwargs.get("out")]
    return [n.kwargs.get("out")]


def _subgraph(owner: torch.nn.Module, n: fx.Node) -> tuple[fx.GraphModule, int] | None:
    """A higher-order operator's body: (its GraphModule, the position of the first argument
    its placeholders receive)."""
    for i, a in enumerate(n.args):
        if isinstance(a, fx.Node) and a.op == "get_attr":
            sub = _attr(owner, str(a.target))
            if isinstance(sub, fx.GraphModule):
                return sub, i + 1
    return None


def _attr(owner: torch.nn.Module, target: str) -> Any:
    try:
        return resolve_attr(owner, target)
    except AttributeError:
        return None


def _scan(owner: torch.nn.Module, graph: fx.Graph, nodes: list[fx.Node], buffers: dict[fx.Node, str]) -> list[str]:
    """Residue among ``nodes`` of ``graph`` (owned by ``owner``); ``buffers``: nodes that are
    a buffer (or a view of one), by the buffer's name."""
    found: list[str] = []
    for n in nodes:
        if n.op == "get_attr":
            value = _attr(owner, str(n.target))
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                buffers[n] = str(n.target)
            continue
        if n.op not in ("call_function", "call_method"):
            continue
        name = _name(n)
        base = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        if name.strip("_") in _VIEWS and base in buffers:
            buffers[n] = buffers[base]
        if META_ORIG_ARGS in n.meta or (n.op == "call_function" and n.target in MODE_SENSITIVE):
            continue  # switched to inference by the cut
        if name.strip("_") in RANDOM_OPS:
            found.append(f"{name} ({n.name})")
        else:
            hit = [buffers[a] for a in _written(n, name) if isinstance(a, fx.Node) and a in buffers]
            if hit:
                found.append(f"a write to buffer {hit[0]} ({n.name})")
                buffers[n] = hit[0]  # an in-place op returns the tensor it wrote
        sub = _subgraph(owner, n) if n.op == "call_function" else None
        if sub is not None:
            gm, first = sub
            inner = [p for p in gm.graph.nodes if p.op == "placeholder"]
            passed = {p: buffers[a] for p, a in zip(inner, n.args[first:]) if isinstance(a, fx.Node) and a in buffers}
            found += [f"{f} inside {name}" for f in _scan(gm, gm.graph, list(gm.graph.nodes), passed)]
    return found


def training_residue(gm: fx.GraphModule, k: int, start: int = 0) -> dict[int, list[str]]:
    """Per block ``start..k-1`` of ``gm`` (labelled, cut at ``k``): what still acts as in
    training mode (see the module docstring); blocks with nothing are left out.

    Example::

        >>> class Noisy(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x + torch.randn_like(x)
        >>> gm = fx.symbolic_trace(Noisy())
        >>> for n in gm.graph.nodes:
        ...     n.meta["fxfreeze.block"] = 0
        >>> training_residue(gm, 1)
        {0: ['randn_like (randn_like)']}
    """
    nodes = list(gm.graph.nodes)
    buffers: dict[fx.Node, str] = {}
    _scan(gm, gm.graph, [n for n in nodes if n.op == "get_attr"], buffers)
    out: dict[int, list[str]] = {}
    for n in nodes:
        b = block_of(n)
        if b is None or not start <= b < k or n.op == "get_attr":
            continue
        found = _scan(gm, gm.graph, [n], buffers)
        if found:
            out.setdefault(b, []).extend(found)
    return out
