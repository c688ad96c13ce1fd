"""Small helpers on fx graphs that the partitioner, the passes and the runtime share.

One home for each: which node ops compute, how an ATen overload is looked up by name, which
block a node belongs to and whether it lies in a frozen prefix, how a ``get_attr`` /
``call_module`` target is found on a module (or in a dict of attributes), and how a graph
module reads the model's tensors through the model's own modules.
"""

from __future__ import annotations

import builtins
import weakref
from typing import Any, Collection, Mapping

import torch
import torch.fx as fx
from torch import nn

from .plan import HEAD, META_BLOCK

__all__ = [
    "COMPUTE_OPS", "aten_op", "aten_ops", "block_label", "block_of", "in_prefix", "label_attributes", "repair_fx_wraps",
    "resolve_attr", "share_modules",
]

#: node ops that compute something (the rest are placeholders, attributes and the output)
COMPUTE_OPS = ("call_function", "call_method", "call_module")


def aten_op(name: str) -> Any:
    """The operator overload ``torch.ops.<ns>.<op>.<overload>`` named ``"ns.op.overload"``,
    or None where this build of torch lacks it.

    Example::

        >>> aten_op("aten.linear.default") is torch.ops.aten.linear.default
        True
    """
    try:
        ns, op, overload = name.split(".")
        return getattr(getattr(getattr(torch.ops, ns), op), overload)
    except (AttributeError, ValueError):
        return None


def aten_ops(*names: str) -> set[Any]:
    """The overloads of ``names`` this build of torch has (see :func:`aten_op`).

    Example::

        >>> aten_ops("aten.relu.default", "aten.no_such_op.default") == {torch.ops.aten.relu.default}
        True
    """
    return {op for op in map(aten_op, names) if op is not None}


def block_label(n: fx.Node) -> int | None:
    """The plan's label of ``n``: its block index, :data:`~fxfreeze.plan.HEAD` (-1) for the
    head, None for a node no block owns.

    Example::

        >>> import torch.fx as fx
        >>> n = list(fx.symbolic_trace(torch.nn.ReLU()).graph.nodes)[1]
        >>> block_label(n) is None
        True
        >>> n.meta["fxfreeze.block"] = -1; block_label(n), block_of(n)
        (-1, None)
    """
    b = n.meta.get(META_BLOCK)
    return None if b is None else int(b)


def block_of(n: fx.Node) -> int | None:
    """The freezable block ``n`` belongs to; None for the head and for unlabelled nodes.

    Example::

        >>> import torch.fx as fx
        >>> n = list(fx.symbolic_trace(torch.nn.ReLU()).graph.nodes)[1]
        >>> n.meta["fxfreeze.block"] = 2; block_of(n), in_prefix(n, 2), in_prefix(n, 3)
        (2, False, True)
    """
    b = block_label(n)
    return None if b is None or b == HEAD else b


def in_prefix(n: fx.Node, k: int) -> bool:
    """Is ``n`` a compute node of blocks ``0..k-1`` (the frozen prefix of ``k`` blocks)?

    Example::

        >>> import torch.fx as fx
        >>> n = list(fx.symbolic_trace(torch.nn.ReLU()).graph.nodes)[1]
        >>> n.meta["fxfreeze.block"] = 1; in_prefix(n, 1), in_prefix(n, 2)
        (False, True)
    """
    b = block_of(n)
    return n.op in COMPUTE_OPS and b is not None and b < k


def label_attributes(graph: fx.Graph) -> None:
    """Give each ``get_attr`` node the earliest block among its users (the head last), so that
    a parameter read by a block is counted with that block; None when no user has one.

    Example::

        >>> # plan_build labels the compute nodes, then: label_attributes(gm.graph)
    """
    for n in graph.nodes:
        if n.op == "get_attr":
            bs = [u.meta.get(META_BLOCK) for u in n.users if u.meta.get(META_BLOCK) is not None]
            n.meta[META_BLOCK] = min(bs, key=lambda x: (x == HEAD, x)) if bs else None


def resolve_attr(root: Mapping[str, Any] | Any, target: str) -> Any:
    """The object a ``get_attr`` / ``call_module`` target names: ``root[target]`` when
    ``root`` is a dict of attributes, else ``getattr`` along the dotted path.

    Example::

        >>> resolve_attr(torch.nn.Sequential(torch.nn.Linear(2, 3)), "0.bias").shape
        torch.Size([3])
    """
    if isinstance(root, Mapping):
        if target in root:
            return root[target]
        raise KeyError(f"graph attribute {target!r} is not among the given attributes")
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def share_modules(gm: fx.GraphModule, model: nn.Module, skip: Collection[str] = ()) -> fx.GraphModule:
    """Make ``gm`` read its ``get_attr`` targets through ``model``'s own modules.

    ``fx.GraphModule`` copies each target's *value* into a module tree of its own when it is
    built: an exported graph's parameters (``layers.0.l.weight``) would stay the tensors the
    model held then. A parameter swapped in later is not seen: ``torch.func.functional_call``
    (per-sample gradients, meta-learning) substitutes tensors for one call, and a graph
    module built during that call kept the substitutes for every later call (no gradient
    reached the model again, silently). With the modules that own the targets shared (as
    fx's ``call_module`` targets already are), each call reads what the model holds now.
    The model's tensors at its root (``self.pos_embed`` in its own forward) are read from it
    by properties of the graph module's class (fx makes one class per graph module). Targets
    in ``skip`` keep their values (export's lifted constants, which live in the graph module
    only: a module holding one stays the graph module's). Returns ``gm``.

    Example::

        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> g = fx.Graph(); x = g.placeholder("x"); w = g.get_attr("0.weight")
        >>> _ = g.output(g.call_function(torch.matmul, (x, w)))
        >>> gm = share_modules(fx.GraphModule({"0.weight": m[0].weight}, g), m)
        >>> gm.get_submodule("0") is m[0]
        True
    """
    targets = {str(n.target) for n in gm.graph.nodes if n.op in ("get_attr", "call_module")} - set(skip)
    owner = weakref.ref(model)
    for name in targets:  # the model's own tensors at its root: read from it (each graph module has its class)
        if "." not in name and (name in model._parameters or name in model._buffers):
            setattr(type(gm), name, property(lambda _, n=name: getattr(owner(), n)))
    holding = {".".join(t.split(".")[:i]) for t in skip for i in range(1, t.count(".") + 1)}
    modules = dict(model.named_modules())
    shared: list[str] = []
    for path in sorted({t.rsplit(".", 1)[0] for t in targets if "." in t}, key=lambda p: (p.count("."), p)):
        if path in holding or not isinstance(modules.get(path), nn.Module) or any(path.startswith(s + ".") for s in shared):
            continue
        parent, _, name = path.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, modules[path])
        shared.append(path)
    return gm


def repair_fx_wraps() -> int:
    """Drop the entries of torch.fx's table of functions to wrap that name no global of the
    module they were recorded for; returns how many.

    Why: fx adds a call of ``torch.fx._symbolic_trace._assert_is_none`` for each ``None``
    argument it specialises (every Hugging Face model fx traces has some). Traced again, as
    torch's quantization traces a block's graph module for Egeria's int8 reference, the call
    is marked as a wrapped function, and the new graph module's code, which names it by its
    qualified name, emits ``wrap("torch.fx._symbolic_trace._assert_is_none")``: fx records
    that dotted name against the code's globals, where no such key exists, and every later fx
    trace in the process raised ``KeyError`` in ``_patch_wrapped_functions``. After LeViT,
    every model compiled next ran eagerly (``torch.export`` traces with fx too), Egeria's int8
    references failed, and so would the user's own traces. Called before fxfreeze traces and
    after torch's quantization builds its graph modules.

    Example::

        >>> class M(torch.nn.Module):
        ...     def forward(self, x, y=None):
        ...         return x if y is None else x + y
        >>> gm = fx.symbolic_trace(M(), concrete_args={"y": None})
        >>> again = fx.symbolic_trace(gm)  # its code records the dotted name
        >>> repair_fx_wraps() >= 1
        True
        >>> repair_fx_wraps()
        0
    """
    try:
        from torch.fx import _symbolic_trace as st

        table = st._wrapped_fns_to_patch
    except (ImportError, AttributeError):  # another torch: nothing of this to repair
        return 0
    bad = [key for key, frame in list(table.items()) if key[1] not in frame and not hasattr(builtins, key[1])]
    for key in bad:
        table.pop(key, None)
    return len(bad)

