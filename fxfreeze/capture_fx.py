"""fx symbolic tracing with leaf escalation, for :mod:`fxfreeze.trace`.

Childless modules are leaves. When tracing raises inside a submodule (the tracer keeps the
stack of modules being traced), that submodule becomes a leaf and the trace is retried.
Forward arguments the example call does not pass are specialised to their defaults, and
plain non-tensor ones it passes to their values (``concrete_args``).
"""

from __future__ import annotations

import inspect
import logging
import warnings
from typing import Any, Mapping

import torch.fx as fx
from torch import nn

__all__ = ["trace_fx", "hides_structure"]

logger = logging.getLogger("fxfreeze")

#: An escalated leaf that holds at least this share of the parameters and has several
#: parametrised children probably hides repeated blocks; then export is tried as well.
_HIDDEN_STRUCTURE_SHARE = 0.25
_MAX_ESCALATIONS = 256


class _LeafTracer(fx.Tracer):
    """fx tracer whose leaves are childless modules plus escalated ones, and which
    remembers which module was executing when tracing failed."""

    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self._leaves = leaves
        self._stack: list[str] = []
        self.failed_stack: list[str] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self._leaves or len(m._modules) == 0

    def call_module(
        self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        name = self.path_of_module(m)
        self._stack.append(name)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_stack is None:
                self.failed_stack = list(self._stack)
            raise
        finally:
            self._stack.pop()


def _concrete_args(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Specialise forward arguments that the example call does not pass to their defaults,
    and plain non-tensor ones it does pass (``both=True``, ``scale=2.0``) to their values:
    a graph is kept per such value (:mod:`fxfreeze.runtime.graphs`), as ``torch.compile``
    specialises on them."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return {}
    params = list(sig.parameters.values())
    concrete: dict[str, Any] = {}
    for i, p in enumerate(params):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if i < len(args) or p.name in kwargs:
            value = args[i] if i < len(args) else kwargs[p.name]
            if value is None or isinstance(value, (bool, int, float, str)):
                concrete[p.name] = value
        elif p.default is not inspect.Parameter.empty:
            concrete[p.name] = p.default
    return concrete


def _drop_var_placeholders(graph: fx.Graph) -> list[str]:
    """fx gives ``*args`` / ``**kwargs`` one placeholder each, a proxy the forward's code
    inspects symbolically. Unused (a forward that accepts extra keywords and ignores them),
    the placeholder is removed: the graph's inputs are then the named parameters, as a call
    binds them. Used, the graph would be wrong for some calls: their targets are returned."""
    used = []
    for n in list(graph.nodes):
        if n.op == "placeholder" and str(n.target).startswith("*"):
            if n.users:
                used.append(str(n.target))
            else:
                graph.erase_node(n)
    return used


def trace_fx(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[fx.Graph | None, dict[str, str], str | None]:
    """fx trace with leaf escalation. Returns (graph or None, escalated leaves, failure)."""
    leaves: dict[str, str] = {}
    concrete = _concrete_args(model, args, kwargs)
    for _ in range(_MAX_ESCALATIONS):
        tracer = _LeafTracer(set(leaves))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph = tracer.trace(model, concrete_args=concrete or None)
            used = _drop_var_placeholders(graph)
            if used:
                return None, leaves, (f"fx cannot specialise the forward's {', '.join(used)} to a call (it traces them "
                                      "as one opaque input: `kw.get(...) is not None` would always hold)")
            return graph, leaves, None
        except Exception as e:  # noqa: BLE001 - any tracing failure drives escalation
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            stack = [s for s in (tracer.failed_stack or []) if s]
            culprit = stack[-1] if stack else None
            if culprit is None or culprit in leaves:
                return None, leaves, f"fx cannot trace the root forward ({msg})"
            leaves[culprit] = msg
            logger.debug("fx trace failed inside %r (%s); making it a leaf", culprit, msg)
    return None, leaves, f"fx needed more than {_MAX_ESCALATIONS} leaf escalations"


def hides_structure(model: nn.Module, leaves: Mapping[str, str]) -> str | None:
    """Name of an escalated leaf that probably hides several freezable blocks."""
    total = sum(p.numel() for p in model.parameters()) or 1
    for path in leaves:
        sub = model.get_submodule(path)
        share = sum(p.numel() for p in sub.parameters()) / total
        owners = [m for m in sub.modules() if any(True for _ in m.parameters(recurse=False))]
        if share >= _HIDDEN_STRUCTURE_SHARE and len(owners) >= 2:
            return path
    return None
