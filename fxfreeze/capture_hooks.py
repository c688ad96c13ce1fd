"""The last-resort capture: forward hooks record the execution order of leaf modules on the
example inputs, and tensor identity links them into a graph. Such a graph can be
partitioned and drawn but not executed (a model captured this way runs its own forward).

A tensor made by code between modules (a residual ``x + f(x)``) has no producing leaf. When
it leaves an enclosing module, it is linked to the last leaf that ran inside that module; a
floating-point tensor a leaf reads that is still unknown (made by the root's own code) is
linked to the last leaf that ran before it. A block's output then feeds the next block, as
in the model, and the partitioner sees one block after another instead of disconnected
pieces. (Integer and boolean tensors, ids and masks, are usually made from the inputs: they
stay unlinked.)

The order is recorded in the model's mode. In training mode, code may skip layers at random
(LayerDrop: wav2vec2, HuBERT and data2vec skip each encoder layer with probability
``layerdrop``), and a plan from one such call would leave a skipped layer out of every
block. So when a training-mode call leaves modules with parameters unused, the order is
recorded again in eval mode and kept when that call ran every module the first one ran,
and more."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .trace_state import fresh_containers, preserved_state

__all__ = ["trace_hooks"]

logger = logging.getLogger("fxfreeze")


def trace_hooks(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> fx.Graph:
    """Record leaf-module execution order with forward hooks (a graph that cannot run)."""
    again = fresh_containers(args, kwargs)  # the call may change its containers (pop a key)
    graph, ran = _record(model, args, kwargs, in_eval=False)
    unused = [n for n, m in model.named_modules() if m not in ran and n and any(True for _ in m.parameters(recurse=False))]
    if not model.training or not unused:
        return graph
    try:
        eval_graph, eval_ran = _record(model, *again, in_eval=True)
    except Exception as e:  # noqa: BLE001 - an eval path the training call's inputs do not suit: keep that call's order
        logger.debug("fxfreeze: %s in eval mode raised %s; the training call's module order is kept", type(model).__name__, e)
        return graph
    if eval_ran > ran:
        logger.info(
            "fxfreeze: %s left %s unused in a training-mode call (skipped at random, as LayerDrop does): "
            "its module order is taken from an eval-mode call, which ran them",
            type(model).__name__, ", ".join(unused[:3]) + (", ..." if len(unused) > 3 else ""),
        )
        return eval_graph
    return graph


def _record(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], in_eval: bool) -> tuple[fx.Graph, set[nn.Module]]:
    """The order graph of one call (in the model's modes, or all in eval mode), and the
    modules that ran."""
    graph = fx.Graph()
    ran: set[nn.Module] = set()
    produced: dict[int, fx.Node] = {}
    placeholders: list[fx.Node] = []

    def flat_tensors(x: Any) -> list[torch.Tensor]:
        leaves_, _ = torch.utils._pytree.tree_flatten(x)
        return [t for t in leaves_ if isinstance(t, torch.Tensor)]

    for i, a in enumerate(args):
        ph = graph.placeholder(f"arg{i}")
        placeholders.append(ph)
        for t in flat_tensors(a):
            produced[id(t)] = ph
    for k, v in kwargs.items():
        ph = graph.placeholder(k)
        placeholders.append(ph)
        for t in flat_tensors(v):
            produced[id(t)] = ph
    names = {m: n for n, m in model.named_modules()}
    last: list[fx.Node] = []
    keep_alive: list[Any] = []

    def hook(mod: nn.Module, inp: Any, out: Any) -> None:
        ran.add(mod)
        path = names.get(mod, "")
        srcs = [produced[id(t)] if id(t) in produced else last[0]
                for t in flat_tensors(inp) if id(t) in produced or (last and t.is_floating_point())]
        node = graph.create_node("call_module", path, tuple(dict.fromkeys(srcs)), {}, name=path.replace(".", "_") or "root")
        stack = {}
        parts = path.split(".")
        for j in range(1, len(parts) + 1):
            p = ".".join(parts[:j])
            stack[p] = (p, type(model.get_submodule(p)).__qualname__)
        node.meta["nn_module_stack"] = stack
        keep_alive.append(out)
        for t in flat_tensors(out):
            produced[id(t)] = node
        last[:] = [node]

    def container_hook(mod: nn.Module, inp: Any, out: Any) -> None:
        ran.add(mod)
        if not last:
            return
        keep_alive.append(out)
        for t in flat_tensors(out):
            produced.setdefault(id(t), last[0])  # made between the leaves inside: the last one

    handles = [
        m.register_forward_hook(hook if len(m._modules) == 0 else container_hook)
        for n, m in model.named_modules()
        if n and not isinstance(m, torch.jit.ScriptModule)  # TorchScript takes no hooks: its work goes to the next
    ]
    try:
        with preserved_state(model), torch.no_grad():
            if in_eval:
                model.eval()
            out = model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    outs = [produced[id(t)] for t in flat_tensors(out) if id(t) in produced]
    graph.output(tuple(dict.fromkeys(outs)) if outs else (last[0] if last else None))
    return graph, ran
