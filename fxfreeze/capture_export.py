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
import inspect
import io
import logging
import sys
import warnings
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten, tree_flatten_with_path, tree_unflatten, keystr

from .calls import forward_signature
from .graph_utils import repair_fx_wraps, resolve_attr
from .forwards import bound, forward_with, temporary_forward
from .timebound import CaptureTimeout, time_bound
from .trace_state import fresh_containers, preserved_state, rng_state, without_forward_hooks

__all__ = ["ExportResult", "export_graph", "export_without_forward_hooks", "mode_region_notes", "unknown_outputs"]

logger = logging.getLogger("fxfreeze")

_PLAIN = (torch.Tensor, int, float, bool, str, torch.SymInt, torch.SymFloat, torch.SymBool)


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


def _named_signature(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> inspect.Signature | None:
    """For a forward that takes ``**kwargs`` (PEFT's ``forward(*args, **kwargs)``): a
    signature naming every argument of this call, since torch.export keys dynamic shapes by
    parameter name and cannot key them inside ``**kwargs``. None when the forward names
    them all already (or the call cannot be named)."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None
    params = sig.parameters
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if not var_kw or all(k in named for k in kwargs):
        return None
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(positional):
        return None  # taken by *args: no names to give
    out = [inspect.Parameter(p.name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in positional[: len(args)]]
    out += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in kwargs]
    return inspect.Signature(out)


@contextlib.contextmanager
def _export_forward(model: nn.Module, strip: bool, signature: inspect.Signature | None) -> Iterator[None]:
    """For the duration of an export, ``model.forward`` (an instance attribute, removed
    afterwards) returns None in place of unknown output objects (``strip``) and/or shows
    ``signature``. Nothing changes when neither is asked for."""
    if not strip and signature is None:
        yield
        return
    inner = model.forward

    def run(self: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        out = inner(*args, **kwargs)
        return _strip(out) if strip else out

    fn = forward_with(signature if signature is not None else forward_signature(model), run)
    with temporary_forward(model, bound(model, fn)):
        yield


def _dynamic_shapes(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Every tensor dimension ``Dim.AUTO``, keyed as ``torch.export`` expects: by the
    forward's parameter names (a ``**kwargs`` parameter holds its own dict)."""
    from torch.export import Dim

    def spec(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return {i: Dim.AUTO for i in range(x.dim())}
        if isinstance(x, (list, tuple)):
            return type(x)(spec(v) for v in x)
        if isinstance(x, dict):
            return {k: spec(v) for k, v in x.items()}
        return None

    try:
        sig = inspect.signature(model.forward)
        bound = sig.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return tuple(spec(a) for a in args) + tuple(spec(v) for v in kwargs.values())
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out[name] = {k: spec(v) for k, v in value.items()}
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            out[name] = tuple(spec(v) for v in value)
        else:
            out[name] = spec(value)
    return out


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


@contextlib.contextmanager
def _partial_graph_to_debug_log() -> Iterator[None]:
    """``torch.export`` prints the partial graph of a failed export to stderr (a screenful
    per attempt, and a model no strategy captures makes several): kept off the user's
    terminal, on the ``fxfreeze`` debug log instead. Everything else written to stderr
    meanwhile (by any thread) is passed on when the export ends, so nothing is lost."""
    real, buf = sys.stderr, io.StringIO()
    try:
        with contextlib.redirect_stderr(buf):
            yield
    except BaseException as e:
        text = buf.getvalue()
        dump = getattr(e, "partial_fx_graph", None)
        if isinstance(dump, str) and dump and dump + "\n" in text:
            text = text.replace(dump + "\n", "")  # printed once per wrapper it passes
            logger.debug("fxfreeze: torch.export failed (%s: %s); its partial graph:\n%s", type(e).__name__, e, dump)
        real.write(text)
        raise
    real.write(buf.getvalue())


def export_graph(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *, dynamic: bool, strip: bool) -> ExportResult:
    """Export ``model`` on the example call and return its unlifted graph (see the module
    docstring). Raises whatever ``torch.export`` raises, and ``RuntimeError`` when the
    forward drew random numbers from constants while exporting (``random.random() < p``,
    numpy): export records torch's own draws as operations, but such a draw would stay in
    the graph as the one made here."""
    repair_fx_wraps()
    draws = rng_state()
    with warnings.catch_warnings(), _export_forward(model, strip, _named_signature(model, args, kwargs)), \
            _partial_graph_to_debug_log():
        warnings.simplefilter("ignore")
        dyn = _dynamic_shapes(model, args, kwargs) if dynamic else None
        ep = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dyn)
    if rng_state() != draws:
        raise RuntimeError("the forward draws random numbers outside torch (`random.random()`, numpy), "
                           "which the graph would keep as the draws made while exporting")
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
                resolve_attr(model, target)
            except AttributeError:
                extra[target] = resolve_attr(unlifted, target)
    if guard is None:
        guard = _meta_guard(graph, dict(ep.range_constraints))
    return ExportResult(graph, extra, guard, getattr(unlifted, "_in_spec", None))


#: which argument of export's ``wrap_with_autocast`` node is the region's body
_AUTOCAST_BODY = 4


def export_without_forward_hooks(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], strip: bool, timeout: float | None
) -> tuple[ExportResult, list[str]] | None:
    """Export ``model`` with its submodules' forward hooks taken off, after an export with
    them failed; None when it has none or this fails too. A hook may do what export cannot
    guard on (NEFTune's, which the HF Trainer puts on the input embeddings, bounds its noise
    by a tensor): the model itself still has a graph for its plan, the reference policies'
    measurements and evaluation, while every call runs its own forward, hooks included
    (:mod:`fxfreeze.runtime.own_forward`). Returns the result and the hooked modules' names;
    bounded by ``timeout`` seconds, as every capture is."""
    with without_forward_hooks(model) as names:
        if not names:
            return None
        try:
            with preserved_state(model), time_bound(timeout):
                return export_graph(model, *fresh_containers(args, kwargs), dynamic=True, strip=strip), names
        except (Exception, CaptureTimeout):  # noqa: BLE001 - the caller goes on to its next strategy
            return None


def mode_region_notes(graph: fx.Graph, extra: dict[str, Any]) -> list[str]:
    """Notes on the regions of an exported graph that run under an autocast the forward
    enters itself (``with torch.autocast(...)`` inside it). Export records each as one node,
    so the modules inside cannot fall in different blocks: a region that spans several is
    worth a word, and the way out (enter it around the call, in the training loop, or inside
    each block). A ``torch.no_grad()`` region is one node too, but its modules get no
    gradient to save: one block costs nothing there."""
    notes = []
    for node in graph.nodes:
        if node.op != "call_function" or getattr(node.target, "__name__", "") != "wrap_with_autocast" \
                or len(node.args) <= _AUTOCAST_BODY:
            continue
        body_ref = node.args[_AUTOCAST_BODY]
        body = extra.get(str(body_ref.target)) if isinstance(body_ref, fx.Node) else None
        if not isinstance(body, fx.GraphModule):
            continue
        paths = []
        for n in body.graph.nodes:
            stack = n.meta.get("nn_module_stack") or {}
            path = next(reversed(stack.values()))[0] if stack else ""
            if path:
                paths.append(path.split("."))
        if not paths:
            continue
        depth = 0  # the modules' deepest common ancestor, then its children the region reaches
        while all(len(p) > depth + 1 for p in paths) and len({p[depth] for p in paths}) == 1:
            depth += 1
        children = list(dict.fromkeys(".".join(p[: depth + 1]) for p in paths))
        if len(children) >= 2:
            notes.append(
                f"a torch.autocast region inside the forward spans {', '.join(children)}: export records it as one node, so "
                "they fall in one block; enter it around the model call (in the training loop) or inside each block "
                "to let them freeze apart"
            )
    return notes

