"""Normalise a block's graph for its low-precision reference copy.

Module-based quantization (``torch.ao.quantization``) only sees ``nn.Linear`` / ``nn.Conv2d``
*modules* and cannot fold a BatchNorm it does not see next to its convolution. Two passes
bring a block's graph (from ``torch.fx`` or ``torch.export``) into that form, both
numerically the identity up to rounding:

- :class:`FoldBatchNorm`: each eval-mode BatchNorm module that only reads a convolution
  module's output is folded into that convolution;
- :class:`LiftModules`: ``linear(x, W, b)`` / ``conv2d(x, W, b, ...)`` calls whose weights are
  graph attributes (ATen graphs, ``F.linear`` in traced code) become ``call_module`` nodes;
- :class:`StripAutocast`: autocast regions a capture under the caller's autocast recorded
  (``wrap_with_autocast`` in ``torch.export`` graphs) run their body plainly. A reference
  runs in its own precision, and it runs on the reference worker thread, where leaving an
  autocast region clears the process-wide autocast cache: that destroys the training
  thread's cached casts, needs the GIL while holding the cache's lock, and deadlocks
  against a training thread casting under autocast (seen with the Trainer's bf16).

:func:`normalize` runs both through :func:`~fxfreeze.passes.run_passes`. Graph passes only:
the reference backends and builder live in :mod:`fxfreeze.runtime.egeria`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..graph_utils import aten_ops
from .base import GraphPass, PassResult, run_passes

__all__ = ["FoldBatchNorm", "LiftModules", "StripAutocast", "fold_batchnorm", "lift_modules", "normalize"]

_LINEAR = {F.linear, torch._C._nn.linear} | aten_ops("aten.linear.default")
_CONV2D = {F.conv2d, torch.conv2d} | aten_ops("aten.conv2d.default")


def _attr(gm: fx.GraphModule, a: Any) -> torch.Tensor | None:
    if isinstance(a, fx.Node) and a.op == "get_attr":
        obj: Any = gm
        for part in str(a.target).split("."):
            obj = getattr(obj, part, None)
        return obj if isinstance(obj, torch.Tensor) else None
    return None


def _arg(n: fx.Node, i: int, name: str, default: Any) -> Any:
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(name, default)


def _module_for(gm: fx.GraphModule, n: fx.Node) -> nn.Module | None:
    """The ``nn.Linear`` / ``nn.Conv2d`` equivalent of call ``n`` (its weights are graph
    attributes), or None when ``n`` is not such a call or cannot be expressed as one."""
    if n.op != "call_function" or (n.target not in _LINEAR and n.target not in _CONV2D):
        return None
    w = _attr(gm, _arg(n, 1, "weight", None))
    b_node = _arg(n, 2, "bias", None)
    b = _attr(gm, b_node) if b_node is not None else None
    if w is None or (b_node is not None and b is None):
        return None
    if n.target in _LINEAR:
        if w.dim() != 2:
            return None
        mod: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    else:
        stride, padding, dilation, groups = (_arg(n, i, k, d) for i, k, d in (
            (3, "stride", 1), (4, "padding", 0), (5, "dilation", 1), (6, "groups", 1)))
        if w.dim() != 4 or isinstance(padding, str) or any(isinstance(v, fx.Node) for v in (stride, padding, dilation, groups)):
            return None
        mod = nn.Conv2d(w.shape[1] * int(groups), w.shape[0], tuple(w.shape[2:]), stride=stride,
                        padding=padding, dilation=dilation, groups=int(groups), bias=b is not None)
    mod.weight = nn.Parameter(w.detach(), requires_grad=False)
    if b is not None:
        mod.bias = nn.Parameter(b.detach(), requires_grad=False)
    return mod


def _lift(gm: fx.GraphModule) -> PassResult:
    """Rewrite ``linear(x, W, b)`` and ``conv2d(x, W, b, ...)`` calls whose weights are graph
    attributes into ``call_module`` nodes of ``nn.Linear`` / ``nn.Conv2d`` modules holding
    those tensors, so that module-based quantization applies to ATen and functional graphs.
    Numerically the identity."""
    modified = False
    count = 0
    for n in list(gm.graph.nodes):
        mod = _module_for(gm, n)
        if mod is None:
            continue
        name = f"fxfreeze_lifted_{count}"
        count += 1
        gm.add_submodule(name, mod)
        with gm.graph.inserting_before(n):
            new = gm.graph.call_module(name, (n.args[0],))
        new.meta.update(n.meta)
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
        modified = True
    if modified:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return PassResult(gm, modified)


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _fold(gm: fx.GraphModule) -> PassResult:
    """Fold each eval-mode BatchNorm module that only reads a convolution module's output
    (which nothing else reads) into that convolution. Numerically the identity up to
    rounding; done here rather than inside quantization so that the folded weights can be
    recomputed for every snapshot without tracing."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    modified = False
    for n in list(gm.graph.nodes):
        if n.op != "call_module" or len(n.args) != 1 or n.kwargs:
            continue
        bn = gm.get_submodule(str(n.target))
        src = n.args[0]
        if not isinstance(bn, _BNS) or bn.training or bn.running_mean is None or not isinstance(src, fx.Node):
            continue
        if src.op != "call_module" or len(src.users) != 1:
            continue
        conv = gm.get_submodule(str(src.target))
        if not isinstance(conv, _CONVS) or conv.training:
            continue
        fused = fuse_conv_bn_eval(conv, bn)
        _set_submodule(gm, str(src.target), fused)
        n.replace_all_uses_with(src)
        gm.graph.erase_node(n)
        modified = True
    if modified:
        gm.recompile()
        gm.delete_all_unused_submodules()
    return PassResult(gm, modified)


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)




class LiftModules(GraphPass):
    """Lift functional linear / conv2d calls on graph attributes into modules (see
    :func:`_lift`)."""

    name = "lift_modules"

    def call(self, gm: fx.GraphModule) -> PassResult:
        return _lift(gm)

    def ensures(self, gm: fx.GraphModule) -> str | None:
        left = [n.name for n in gm.graph.nodes if n.op == "call_function" and _module_for(gm, n) is not None]
        return f"node {left[0]} was left as a function call" if left else None


class FoldBatchNorm(GraphPass):
    """Fold eval-mode BatchNorm modules into the convolution modules they read (see
    :func:`_fold`)."""

    name = "fold_batchnorm"

    def call(self, gm: fx.GraphModule) -> PassResult:
        return _fold(gm)


def _autocast_ops() -> set[Any]:
    ops: set[Any] = set()
    hop = getattr(getattr(torch.ops, "higher_order", None), "wrap_with_autocast", None)
    if hop is not None:
        ops.add(hop)
    return ops


def _autocast_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    ops = _autocast_ops()
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in ops]


class StripAutocast(GraphPass):
    """Run the bodies of ``wrap_with_autocast`` regions without autocast (see the module
    docstring): ``wrap_with_autocast(device, dtype, enabled, cache, body, *xs)`` becomes
    ``body(*xs)``, a ``call_module`` of the region's own submodule. The dtype checks export
    put after such regions (``aten._assert_tensor_metadata``) go too: the values are fp32 now."""

    name = "strip_autocast"

    def call(self, gm: fx.GraphModule) -> PassResult:
        nodes = _autocast_nodes(gm)
        for n in nodes:
            body = n.args[4]
            if not (isinstance(body, fx.Node) and body.op == "get_attr"):
                raise ValueError(f"node {n.name}: the autocast region's body is not a graph attribute")
            n.op = "call_module"
            n.target = str(body.target)
            n.args = tuple(n.args[5:])
        if nodes:
            checks = aten_ops("aten._assert_tensor_metadata.default")
            for n in list(gm.graph.nodes):
                if n.op == "call_function" and n.target in checks and not n.users:
                    gm.graph.erase_node(n)
            gm.graph.eliminate_dead_code()
            gm.recompile()
        return PassResult(gm, bool(nodes))

    def ensures(self, gm: fx.GraphModule) -> str | None:
        left = _autocast_nodes(gm)
        return f"autocast region {left[0].name} is left" if left else None


def lift_modules(gm: fx.GraphModule) -> PassResult:
    """Run :class:`LiftModules` on ``gm`` (in place): functional ``linear`` / ``conv2d`` calls on
    graph attributes become ``nn.Linear`` / ``nn.Conv2d`` modules.

    Example::

        >>> import torch.fx as fx
        >>> class F(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.w = torch.nn.Parameter(torch.randn(3, 2))
        ...     def forward(self, x):
        ...         return torch.nn.functional.linear(x, self.w)
        >>> gm = fx.symbolic_trace(F())
        >>> lift_modules(gm).modified, type(gm.fxfreeze_lifted_0).__name__
        (True, 'Linear')
    """
    return LiftModules()(gm)


def fold_batchnorm(gm: fx.GraphModule) -> PassResult:
    """Run :class:`FoldBatchNorm` on ``gm`` (in place): each eval-mode BatchNorm module that only
    reads a convolution module's output is folded into it.

    Example::

        >>> import torch.fx as fx
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
        >>> gm = fx.symbolic_trace(net)
        >>> fold_batchnorm(gm).modified, [n.op for n in gm.graph.nodes]
        (True, ['placeholder', 'call_module', 'output'])
    """
    return FoldBatchNorm()(gm)

def normalize(gm: fx.GraphModule) -> fx.GraphModule:
    """The graph form the reference backends see: autocast regions run plainly
    (:class:`StripAutocast`), BatchNorm folded into the convolution before it
    (:class:`FoldBatchNorm`) and functional linear/conv calls lifted into modules
    (:class:`LiftModules`). Numerically the identity; returns ``gm``, rewritten in place.

    Example::

        >>> # ref_gm = normalize(snapshot(block_gm))  # then quantize ref_gm
    """
    return run_passes(gm, [StripAutocast(), FoldBatchNorm(), LiftModules()]).graph_module
