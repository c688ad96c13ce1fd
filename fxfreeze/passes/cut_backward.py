"""Cut the backward pass at the end of a frozen prefix of blocks.

Given a graph whose compute nodes carry ``node.meta["fxfreeze.block"]`` (see
:mod:`fxfreeze.plan`), :class:`CutBackward` with ``k`` frozen blocks rewrites it so that
autograd records nothing for blocks ``0..k-1``:

1. the prefix runs with gradients disabled: a ``grad_off`` node before its first op and a
   ``grad_restore`` node right after its last op (restoring whatever mode the caller had);
2. every frontier tensor (made in the prefix, used after it) is ``detach()``-ed and its
   later uses rewired to the detached value, so no backward edge leads into the prefix
   even if a caller re-enables gradients;
3. ops with a baked-in training flag inside the prefix (``F.dropout(..., training=True)``,
   ``F.batch_norm``, ATen dropout/batch-norm from ``torch.export``) are switched to
   inference, and attention dropout probabilities (``scaled_dot_product_attention``'s
   ``dropout_p``) to 0, matching the frozen blocks' ``eval()`` mode; a BatchNorm's step
   counter (``num_batches_tracked.add_(1)``, which ``torch.export`` records apart from the
   batch norm) becomes an ``add`` that writes nothing. A leaf module (an fx ``call_module``)
   called in the prefix and elsewhere too (one ``nn.Dropout`` applied after the embedding
   and before the classifier) is no frozen block's, so the runtime cannot hold it in eval
   mode: its calls in the prefix run it in eval mode (:func:`call_in_eval`), its other
   calls as the model's mode says. What is left acting as in training mode, :mod:`.residue`
   finds.

The pass is idempotent and reversible: it first removes what an earlier run inserted and
restores rewritten arguments, so ``CutBackward(0)`` undoes any cut. Parameter flags
(``requires_grad``) and module modes are training state and are set by the runtime.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..graph_utils import COMPUTE_OPS, aten_op, block_of, in_prefix
from ..plan import META_BLOCK
from .base import META_INSERTED, GraphPass, PassResult, unlabelled_nodes
from .cut_ops import detach_tree

__all__ = [
    "CutBackward",
    "UndoCut",
    "undo_cut",
    "grad_off",
    "grad_restore",
    "detach_tree",
    "MODE_SENSITIVE",
    "META_INSERTED",
    "META_ORIG_ARGS",
    "copy_graph",
    "call_in_eval",
    "enter_eval",
    "restore_modes",
    "shared_module_calls",
]

META_ORIG_ARGS = "fxfreeze.orig_args"
#: the target of a node the cut made another operation (restored with its arguments)
META_ORIG_TARGET = "fxfreeze.orig_target"
#: the kind of a node the cut made another kind (a ``call_module`` made a ``call_function``)
META_ORIG_OP = "fxfreeze.orig_op"


def grad_off() -> bool:
    """Graph node target at the start of a frozen prefix: disable autograd, return the previous
    mode (which :func:`grad_restore` puts back).

    Example::

        >>> prev = grad_off(); torch.is_grad_enabled()
        False
        >>> grad_restore(prev); torch.is_grad_enabled()
        True
    """
    prev = torch.is_grad_enabled()
    torch._C._set_grad_enabled(False)
    return prev


def grad_restore(prev: bool, *after: Any) -> None:
    """Graph node target after a frozen prefix's last op: restore the autograd mode ``prev``
    saved by :func:`grad_off`. ``after`` only orders the node after that op.

    Example::

        >>> grad_restore(True); torch.is_grad_enabled()
        True
    """
    torch._C._set_grad_enabled(prev)


def call_in_eval(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Graph node target for a frozen prefix's call of a module it shares with later code:
    call ``module`` in eval mode, then put back each of its modules' modes as they were.

    Example::

        >>> drop = torch.nn.Dropout(0.5).train()
        >>> bool(torch.equal(call_in_eval(drop, torch.ones(4)), torch.ones(4))), drop.training
        (True, True)
    """
    if not module.training:
        return module(*args, **kwargs)
    modes = enter_eval(module)
    try:
        return module(*args, **kwargs)
    finally:
        restore_modes(modes)


def enter_eval(module: torch.nn.Module) -> list[tuple[torch.nn.Module, bool]]:
    """Put ``module`` (its submodules too) in eval mode; returns their modes, for
    :func:`restore_modes`.

    Example::

        >>> net = torch.nn.Sequential(torch.nn.Dropout()).train()
        >>> modes = enter_eval(net); net[0].training
        False
    """
    modes = [(m, m.training) for m in module.modules()]
    module.train(False)
    return modes


def restore_modes(modes: list[tuple[torch.nn.Module, bool]]) -> None:
    """Put back the modes :func:`enter_eval` returned.

    Example::

        >>> net = torch.nn.Sequential(torch.nn.Dropout()).train()
        >>> restore_modes(enter_eval(net)); net[0].training
        True
    """
    for m, mode in modes:
        m.training = mode


#: Functions whose behaviour depends on a training flag (or a dropout probability) baked into
#: the graph when it was traced: target -> (keyword name, positional index, inference value).
MODE_SENSITIVE: dict[Callable[..., Any], tuple[str, int, Any]] = {
    F.dropout: ("training", 2, False),
    F.dropout1d: ("training", 2, False),
    F.dropout2d: ("training", 2, False),
    F.dropout3d: ("training", 2, False),
    F.alpha_dropout: ("training", 2, False),
    F.feature_alpha_dropout: ("training", 2, False),
    F.batch_norm: ("training", 5, False),
    # attention dropout is a probability, not a flag: 0 in eval mode
    F.scaled_dot_product_attention: ("dropout_p", 4, 0.0),
}
for _name, _flag in (
    ("aten.dropout.default", ("train", 2, False)),
    ("aten.native_dropout.default", ("train", 2, False)),
    ("aten.feature_dropout.default", ("train", 2, False)),
    ("aten.alpha_dropout.default", ("train", 2, False)),
    ("aten.batch_norm.default", ("training", 5, False)),
    ("aten.scaled_dot_product_attention.default", ("dropout_p", 4, 0.0)),
):
    _op = aten_op(_name)
    if _op is not None:
        MODE_SENSITIVE[_op] = _flag


_ADD_ = aten_op("aten.add_.Tensor")
_ADD = aten_op("aten.add.Tensor")


def _counts_batches(n: fx.Node) -> bool:
    """``num_batches_tracked.add_(1)`` of a BatchNorm, as ``torch.export`` records it."""
    if n.op != "call_function" or n.target is not _ADD_ or not n.args:
        return False
    buf = n.args[0]
    return isinstance(buf, fx.Node) and buf.op == "get_attr" and str(buf.target).split(".")[-1] == "num_batches_tracked"


def shared_module_calls(nodes: Iterable[fx.Node]) -> dict[str, list[int | None]]:
    """The block of each call, in order (None: the head), of every ``call_module`` target
    called from more than one block (or from a block and the head): no block owns such a
    module, so none holds it in eval mode when it freezes.

    Example::

        >>> gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU()))
        >>> relu = next(n for n in gm.graph.nodes if n.op == "call_module")
        >>> relu.meta["fxfreeze.block"] = 0; shared_module_calls(gm.graph.nodes)
        {}
    """
    calls: dict[str, list[int | None]] = {}
    for n in nodes:
        if n.op == "call_module":
            calls.setdefault(str(n.target), []).append(block_of(n))
    return {t: blocks for t, blocks in calls.items() if len(set(blocks)) > 1}


def _call_in_eval(graph: fx.Graph, n: fx.Node) -> None:
    """Make the ``call_module`` node ``n`` a call of :func:`call_in_eval` on its module."""
    with graph.inserting_before(n):
        mod = graph.get_attr(str(n.target))
    mod.meta[META_INSERTED] = True
    n.meta[META_ORIG_ARGS], n.meta[META_ORIG_TARGET], n.meta[META_ORIG_OP] = (n.args, dict(n.kwargs)), n.target, n.op
    n.op, n.target, n.args = "call_function", call_in_eval, (mod, *n.args)


def _set_inference(n: fx.Node) -> bool:
    spec = MODE_SENSITIVE.get(n.target) if n.op == "call_function" else None
    if spec is None and _counts_batches(n):
        # counts no batch, as a BatchNorm in eval mode: an add that writes nothing (an
        # in-place add of 0 would still bump the counter's version, which the cache watches)
        n.meta[META_ORIG_ARGS], n.meta[META_ORIG_TARGET] = (n.args, dict(n.kwargs)), n.target
        n.target = _ADD
        return True
    if spec is None:
        return False
    name, idx, value = spec
    n.meta[META_ORIG_ARGS] = (n.args, dict(n.kwargs))
    if name in n.kwargs:
        kw = dict(n.kwargs)
        kw[name] = value
        n.kwargs = kw
    elif len(n.args) > idx:
        args = list(n.args)
        args[idx] = value
        n.args = tuple(args)
    else:
        kw = dict(n.kwargs)
        kw[name] = value
        n.kwargs = kw
    return True


def undo_cut(graph: fx.Graph) -> bool:
    """Remove what :class:`CutBackward` inserted into ``graph`` and restore the arguments it
    rewrote (in place; the caller recompiles). Returns whether anything changed;
    :class:`UndoCut` is the same as a pass.

    Example::

        >>> # CutBackward(2)(gm); undo_cut(gm.graph); gm.recompile()   # gm is as before the cut
    """
    changed = False
    for n in list(graph.nodes):
        if META_ORIG_ARGS in n.meta:
            n.args, n.kwargs = n.meta.pop(META_ORIG_ARGS)
            if META_ORIG_TARGET in n.meta:
                n.target = n.meta.pop(META_ORIG_TARGET)
            if META_ORIG_OP in n.meta:
                n.op = n.meta.pop(META_ORIG_OP)
            changed = True
    for n in reversed(list(graph.nodes)):
        if n.meta.get(META_INSERTED):
            if n.target is detach_tree:
                n.replace_all_uses_with(n.args[0])
            graph.erase_node(n)
            changed = True
    return changed


def copy_graph(base: fx.Graph) -> fx.Graph:
    """A copy of ``base`` (nodes, meta, calling convention) whose cut, if any, stays
    reversible: the arguments :class:`CutBackward` saved refer to the copy's nodes. A
    GraphModule owns its graph, so a pass applied to another GraphModule built over the
    same graph would rewrite both.

    Example::

        >>> gm = fx.symbolic_trace(torch.nn.ReLU())
        >>> copy = copy_graph(gm.graph)
        >>> copy is not gm.graph, [n.op for n in copy.nodes] == [n.op for n in gm.graph.nodes]
        (True, True)
    """
    graph = fx.Graph()
    graph._codegen = base._codegen  # torch.export's pytree calling convention
    val_map: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(base, val_map))
    for n in graph.nodes:
        saved = n.meta.get(META_ORIG_ARGS)
        if saved is not None:
            n.meta[META_ORIG_ARGS] = tuple(fx.map_arg(a, lambda x: val_map[x]) for a in saved)
    return graph


class UndoCut(GraphPass):
    """Remove any backward cut from a graph module (what ``CutBackward(0)`` does)."""

    name = "undo_cut"

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = undo_cut(gm.graph)
        if modified:
            gm.recompile()
        return PassResult(gm, modified)

    def ensures(self, gm: fx.GraphModule) -> str | None:
        left = [n.name for n in gm.graph.nodes if n.meta.get(META_INSERTED) or META_ORIG_ARGS in n.meta]
        return f"cut nodes remain: {', '.join(left[:3])}" if left else None


class CutBackward(GraphPass):
    """Freeze the first ``k`` blocks of an annotated graph (``k = 0`` removes any cut).

    Example::

        >>> import fxfreeze
        >>> # gm: a graph module whose compute nodes carry ``fxfreeze.block`` labels
        >>> # CutBackward(2)(gm).modified   -> True; blocks 0 and 1 get no gradient
    """

    name = "cut_backward"

    def __init__(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"CutBackward needs a non-negative int, got {k!r}")
        self.k = k

    def __repr__(self) -> str:
        return f"CutBackward({self.k})"

    def requires(self, gm: Any) -> str | None:
        if self.k == 0:
            return None
        missing = unlabelled_nodes(gm.graph)
        if missing:
            return f"compute nodes without a block label ({', '.join(missing)}): label the graph with the plan first"
        return None

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        modified = undo_cut(graph)
        if self.k > 0:
            modified |= self._cut(graph)
        if modified:
            gm.recompile()
        return PassResult(gm, modified)

    def ensures(self, gm: fx.GraphModule) -> str | None:
        """Only the prefix runs with autograd off: a node of a later block between the
        switches would silently lose its gradients (labels out of execution order)."""
        inside = False
        for n in gm.graph.nodes:
            if n.target is grad_off:
                inside = True
            elif n.target is grad_restore:
                inside = False
            elif inside and n.op in COMPUTE_OPS and not n.meta.get(META_INSERTED) and not in_prefix(n, self.k):
                return (f"node {n.name} (block {block_of(n)}) lies inside the frozen prefix of {self.k} block(s): "
                        "block labels are out of execution order")
        return None

    def _cut(self, graph: fx.Graph) -> bool:
        nodes = list(graph.nodes)
        prefix = [n for n in nodes if in_prefix(n, self.k)]
        if not prefix:
            return False
        prefix_set = set(prefix)
        last = prefix[-1]
        # nodes after the prefix (in order), for rewiring frontier uses
        order = {n: i for i, n in enumerate(nodes)}
        with graph.inserting_before(prefix[0]):
            off = graph.call_function(grad_off, ())
        off.meta[META_INSERTED] = True
        with graph.inserting_after(last):
            restore = graph.call_function(grad_restore, (off, last))
        restore.meta[META_INSERTED] = True
        anchor = restore
        shared = shared_module_calls(nodes)
        for n in prefix:
            if n.op == "call_module" and str(n.target) in shared:
                _call_in_eval(graph, n)
            else:
                _set_inference(n)
            later = [u for u in n.users if u not in prefix_set and u is not restore and order.get(u, 1 << 30) > order[last]]
            if not later:
                continue
            with graph.inserting_after(anchor):
                d = graph.call_function(detach_tree, (n,))
            d.meta[META_INSERTED] = True
            d.meta[META_BLOCK] = n.meta.get(META_BLOCK)
            for u in later:
                u.replace_input_with(n, d)
            anchor = d
        return True
