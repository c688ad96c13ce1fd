"""Capturing a model with ``torch.export`` (``strict=False``), for :mod:`fxfreeze.trace`.

Three things beyond calling ``torch.export.export``:

- **Outputs a graph cannot return.** A graph returns tensors in registered pytree
  containers. Hugging Face models return their key/value cache (``DynamicCache``) as well,
  an object export refuses ("Found <class DynamicCache> in output"). The cache is an
  inference feature that training never reads, so when the eager run's output holds such
  objects the model is exported through a forward that returns None in their place; the
  capture's notes say which outputs were dropped.
- **Guards.** The graph is exported with every input dimension dynamic, but export may
  still specialise some (a batch of 1, a shape the model's code branches on). The
  unlifted module checks those guards in a ``_guards_fn`` node; fxfreeze removes that node
  from the graph (a failed guard there would be a crash mid-step) and keeps the function
  to ask, before running a graph, whether a call satisfies its guards; a call that does
  not gets its own capture (:mod:`fxfreeze.runtime.graphs`).
- **Attributes.** Lifted constants that the model does not own are returned separately.
"""

from __future__ import annotations

import contextlib
import functools
import types
import warnings
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten, tree_flatten_with_path, tree_unflatten, keystr

__all__ = ["ExportResult", "export_graph", "unknown_outputs", "resolve"]

_PLAIN = (torch.Tensor, int, float, bool, str, torch.SymInt, torch.SymFloat, torch.SymBool)


def resolve(obj: Any, target: str) -> Any:
    """``getattr`` along a dotted path (``"layer.0.weight"``)."""
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def unknown_outputs(out: Any) -> list[str]:
    """Paths and types of output leaves that are neither tensors nor plain values, e.g.
    ``"['past_key_values'] (DynamicCache)"``."""
    try:
        leaves, _ = tree_flatten_with_path(out)
    except Exception:  # noqa: BLE001 - an output pytree cannot describe: nothing to strip
        return []
    return [f"{keystr(p)} ({type(v).__name__})" for p, v in leaves if v is not None and not isinstance(v, _PLAIN)]


def _strip(out: Any) -> Any:
    leaves, spec = tree_flatten(out)
    return tree_unflatten([v if v is None or isinstance(v, _PLAIN) else None for v in leaves], spec)


@contextlib.contextmanager
def _stripping_forward(model: nn.Module) -> Iterator[None]:
    """Make ``model.forward`` return None in place of unknown output objects, for the
    duration of an export (an instance attribute, removed afterwards)."""
    had = "forward" in model.__dict__
    previous = model.__dict__.get("forward")
    inner = model.forward

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return _strip(inner(*args, **kwargs))

    functools.update_wrapper(forward, type(model).forward)  # export binds by the signature
    model.__dict__["forward"] = types.MethodType(forward, model)
    try:
        yield
    finally:
        if had:
            model.__dict__["forward"] = previous
        else:
            model.__dict__.pop("forward", None)


def _dynamic_shapes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    from torch.export import Dim

    def spec(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return {i: Dim.AUTO for i in range(x.dim())}
        if isinstance(x, (list, tuple)):
            return type(x)(spec(v) for v in x)
        if isinstance(x, dict):
            return {k: spec(v) for k, v in x.items()}
        return None

    if kwargs and not args:
        return spec(kwargs)  # by argument name
    # positional specs, then keyword ones in the signature's order (calls are canonical)
    return tuple(spec(a) for a in args) + tuple(spec(v) for v in kwargs.values())


class ExportResult:
    """A graph exported from a model, with what it needs to run and to be guarded."""

    def __init__(self, graph: fx.Graph, extra: dict[str, Any], guard: Callable[..., Any] | None, in_spec: Any) -> None:
        self.graph = graph
        self.extra = extra
        self.guard = guard
        self.in_spec = in_spec


def _meta_guard(graph: fx.Graph, ranges: dict[Any, Any]) -> Callable[..., None]:
    """A guard from the placeholders' symbolic shapes, for torch versions whose unlifted
    module has no ``_guards_fn``: static sizes must match, a symbol must take one value
    across inputs and stay in its range."""
    specs: list[list[Any] | None] = []
    for ph in graph.find_nodes(op="placeholder"):
        v = ph.meta.get("val")
        if isinstance(v, torch.Tensor):
            specs.append([d if isinstance(d, int) else d.node.expr for d in v.shape])
        else:
            specs.append(None)

    def guard(*flat: Any) -> None:
        env: dict[Any, int] = {}
        for spec, x in zip(specs, flat):
            if spec is None or not isinstance(x, torch.Tensor):
                continue
            if x.dim() != len(spec):
                raise AssertionError("rank differs")
            for size, s in zip(x.shape, spec):
                if isinstance(s, int):
                    if size != s:
                        raise AssertionError(f"size {size} != {s}")
                elif getattr(s, "is_Symbol", False):
                    if env.setdefault(s, size) != size:
                        raise AssertionError("sizes that must be equal differ")
                    r = ranges.get(s)
                    if r is not None and not (int(r.lower) <= size <= float(r.upper)):
                        raise AssertionError(f"size {size} outside {r}")

    return guard


def export_graph(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *, dynamic: bool, strip: bool) -> ExportResult:
    """Export ``model`` on the example call and return its unlifted graph (see the module
    docstring). Raises whatever ``torch.export`` raises."""
    dyn = _dynamic_shapes(args, kwargs) if dynamic else None
    with warnings.catch_warnings(), (_stripping_forward(model) if strip else contextlib.nullcontext()):
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dyn)
    unlifted = ep.module()
    graph = unlifted.graph
    extra: dict[str, Any] = {}
    guard: Callable[..., Any] | None = None
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target) == "_guards_fn" and not node.users:
            guard = getattr(unlifted, "_guards_fn", None)
            graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op in ("get_attr", "call_module"):
            target = str(node.target)
            try:
                resolve(model, target)
            except AttributeError:
                extra[target] = resolve(unlifted, target)
    if guard is None:
        guard = _meta_guard(graph, dict(ep.range_constraints))
    return ExportResult(graph, extra, guard, getattr(unlifted, "_in_spec", None))
