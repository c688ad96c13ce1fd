"""Turning an arbitrary ``nn.Module`` into an FX graph.

Three strategies, tried in order until one gives a usable graph:

``fx``
    ``torch.fx`` symbolic tracing with *leaf escalation*: a module with no children is a
    ``call_module`` leaf, and any submodule whose body cannot be traced (data-dependent
    control flow, ``if src.is_nested`` in ``nn.TransformerEncoderLayer``...) is made a leaf
    and the trace is retried. Arguments the example inputs do not give are specialised to
    their defaults (``concrete_args``), so ``if attention_mask is None`` branches follow the
    call the user actually makes. fx records no grad mode or autocast: a forward that
    switches either inside (``with torch.no_grad():`` around a momentum encoder,
    ``with torch.autocast(...)`` around its body) is left to export, which records both.
``export``
    ``torch.export.export(..., strict=False)`` on the example inputs, with every input
    dimension dynamic. Used when the root's own ``forward`` cannot be traced (Hugging Face
    transformers 5.x: ``'Proxy' object does not support item assignment``) and when the fx
    trace had to hide a large, structured submodule inside one leaf (``nn.TransformerEncoder``
    whose own forward branches on ``src.is_nested``): export runs the Python code with fake
    tensors, so it sees through such branches, and its ``nn_module_stack`` metadata keeps the
    module hierarchy the partitioner needs. The graph is at ATen level and is specialised to
    the training mode the model was in, so a graph is captured per mode.
``hooks``
    Last resort: forward hooks record the execution order of leaf modules on the example
    inputs and tensor identity links them into a graph. Such a graph can be partitioned and
    drawn but not executed: :func:`fxfreeze.compile` runs the model's own forward with the
    plan made from it (``FreezableModule.eager_only``).

The chosen strategy and the reasons for leaving the earlier ones are recorded in
:class:`Capture` and, from there, in the freeze plan.

Every attempt runs under a time bound (:mod:`fxfreeze.timebound`, ``timeout`` seconds,
:data:`DEFAULT_TIMEOUT` by default): past it, export with dynamic shapes falls back to
static shapes, then to the fx graph with leaves, then to hooks, and the notes say so.
Capturing leaves no trace on the model: buffers, training flags and the random number
generators are restored. A capture runs under the caller's autocast state, which an
exported graph bakes in (its dtype checks expect the autocast dtypes), so the runtime keeps
graphs per autocast state (:mod:`fxfreeze.runtime.graphs`).
"""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .capture_export import export_graph, export_without_forward_hooks, mode_region_notes, unknown_outputs
from .capture_fx import hides_structure, trace_fx
from .capture_hooks import trace_hooks
from .amp import plain_capture
from .calls import canonical_call, describe_call, forward_signature, normalize_inputs, plain_mappings
from .errors import ExampleInputError, ModelError, TraceError
from .graph_utils import resolve_attr, share_modules
from .timebound import CaptureTimeout, time_bound
from .trace_state import (
    fresh_containers, lost_in_graphs, preserved_state, watch_checkpoints, watch_functions, watch_tensor_hooks,
)

__all__ = [
    "Capture",
    "capture",
    "normalize_inputs",
    "module_path_of",
    "preserved_state",
    "canonical_call",
    "capture_call",
    "describe_call",
    "forward_signature",
    "unwrap_compiled",
    "STRATEGIES",
    "DEFAULT_TIMEOUT",
]

logger = logging.getLogger("fxfreeze")

STRATEGIES = ("auto", "fx", "export", "hooks")

#: Seconds one capture attempt may take before fxfreeze falls back to the next strategy.
DEFAULT_TIMEOUT = 180.0


def module_path_of(node: fx.Node) -> str:
    """The qualified name of the innermost module that produced ``node`` ('' for root).

    Both fx and export record ``nn_module_stack`` as ``{key: (path, type)}``; export's
    placeholder entry for nodes made outside any module is mapped to the root.
    """
    stack = node.meta.get("nn_module_stack")
    if not stack:
        if node.op == "call_module":
            return str(node.target)
        return ""
    path, _ = list(stack.values())[-1]
    path = str(path)
    if path.startswith("_empty_nn_module_stack"):
        return ""
    if path.startswith("L['self']."):  # dynamo style
        path = path[len("L['self'].") :]
    return path


@dataclass
class Capture:
    """A captured graph and how it was obtained.

    ``graph`` is shared by every :class:`~torch.fx.GraphModule` built from it with
    :meth:`build`; attributes the graph needs that the model lacks (export's lifted
    constants) live in ``extra_attrs``.
    """

    graph: fx.Graph
    strategy: str
    training: bool
    reasons: list[str] = field(default_factory=list)
    leaves: dict[str, str] = field(default_factory=dict)
    executable: bool = True
    extra_attrs: dict[str, Any] = field(default_factory=dict)
    example_args: tuple[Any, ...] = ()
    example_kwargs: dict[str, Any] = field(default_factory=dict)
    #: export only: checks a call's flattened inputs against the graph's shape guards
    guard: Any = None
    in_spec: Any = None
    #: the model's forward called ``torch.utils.checkpoint`` on the example call
    checkpoints: bool = False
    #: the custom ``torch.autograd.Function`` classes the forward applied on the example call
    #: (a graph keeps their forward, not their backward: training runs the model's own forward)
    functions: tuple[str, ...] = ()
    #: gradient hooks the forward registered on its tensors on the example call (a graph drops them)
    tensor_hooks: int = 0
    #: modules whose forward hooks the graph was exported without: every call runs the model's own forward
    hooks_left_out: tuple[str, ...] = ()

    def accepts(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Does the call ``(args, kwargs)`` (canonical, same structure as the example)
        satisfy this graph's guards? fx graphs are shape-generic: always True."""
        if self.guard is None or self.in_spec is None:
            return True
        from torch.fx._pytree import tree_flatten_spec

        try:
            flat = tree_flatten_spec((args, kwargs), self.in_spec)
            self.guard(*flat)
        except Exception:  # noqa: BLE001 - AssertionError from a guard, or a structure mismatch
            return False
        return True

    def attributes(self, model: nn.Module) -> dict[str, Any]:
        """Every ``get_attr`` / ``call_module`` target of the graph, resolved on ``model``
        (or in ``extra_attrs``)."""
        root: dict[str, Any] = {}
        for node in self.graph.nodes:
            if node.op in ("get_attr", "call_module"):
                target = str(node.target)
                if target in self.extra_attrs:
                    root[target] = self.extra_attrs[target]
                    continue
                try:
                    root[target] = resolve_attr(model, target)
                except AttributeError as e:
                    raise TraceError(
                        f"graph node {node.name!r} refers to {target!r}, which the model "
                        "no longer has; re-run fxfreeze.plan/compile on the current model"
                    ) from e
        return root

    def build(self, model: nn.Module) -> fx.GraphModule:
        """A GraphModule over ``self.graph`` that reads ``model``'s parameters, buffers and
        submodules through its modules at each call (:func:`~fxfreeze.graph_utils.share_modules`;
        rebuilt after ``.to()`` moves buffers)."""
        if not self.executable:
            raise TraceError(
                "this graph was captured with the 'hooks' strategy, which records module "
                "order only and cannot run (a compiled module of this model runs its own forward)"
            )
        root = self.attributes(model)
        gm = fx.GraphModule(root, self.graph, class_name=type(model).__name__ + "Graph")
        return share_modules(gm, model, skip=self.extra_attrs)


def unwrap_compiled(model: Any) -> Any:
    """The module inside ``torch.compile(model)`` (an ``OptimizedModule``), else ``model``.
    Captured through the wrapper, the plan's names carried its ``_orig_mod.`` prefix and
    fxfreeze's graphs replaced torch.compile's, which then did nothing."""
    frames = sys.modules.get("torch._dynamo.eval_frame")  # only imported once torch.compile ran
    optimized = getattr(frames, "OptimizedModule", None)
    if optimized is not None and isinstance(model, optimized) and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        return model._orig_mod
    return model


def _check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"expected a torch.nn.Module, got {type(model).__module__}.{type(model).__name__}"
        )
    if not any(True for _ in model.parameters()):
        raise ModelError(
            f"{type(model).__name__} has no parameters: there is nothing to train or freeze"
        )
    return model


def _run_eager(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Check that the example inputs fit the model before any capture is attempted; return
    the output (what a graph of this call must return). A model in training mode runs with
    autograd on, as its training calls do: a forward may do there what a graph loses
    (register a hook on an intermediate tensor, which fails without autograd, or only
    ``if h.requires_grad``), and the capture watches for it. In eval mode it runs without."""
    grad = torch.enable_grad() if model.training else torch.no_grad()
    try:
        with preserved_state(model), grad, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return model(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - reported to the user as a bad input
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExampleInputError(
            f"{type(model).__name__} fails on the example inputs ({describe_call(args, kwargs)}): "
            f"{type(e).__name__}: {first}. Give inputs of the shape and dtype the model expects."
        ) from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else "")[:300]


def _check_timeout(timeout: Any) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise TraceError(f"capture_timeout must be a positive number of seconds or None, got {timeout!r}")
    return float(timeout)


def capture(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    strategy: str = "auto",
    timeout: float | None = DEFAULT_TIMEOUT,
) -> Capture:
    """Capture ``model`` as an FX graph (see the module docstring for the strategies).

    ``strategy`` forces one of ``"fx"``, ``"export"`` or ``"hooks"``; ``"auto"`` tries fx,
    then export, then hooks, and prefers export over fx when fx had to hide a large
    structured submodule in one leaf and export does not fail. ``timeout`` bounds each
    attempt in seconds (None: no bound).

    Example::

        cap = capture(model, {"input_ids": ids, "attention_mask": mask})
        cap.strategy, cap.reasons   # e.g. "export", ["fx cannot trace the root forward (...)"]
    """
    args, kwargs = normalize_inputs(example_inputs)
    return capture_call(model, args, kwargs, strategy=strategy, timeout=timeout)


def capture_call(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    strategy: str = "auto",
    timeout: float | None = DEFAULT_TIMEOUT,
) -> Capture:
    """:func:`capture` on the call ``model(*args, **kwargs)``."""
    model = _check_model(model)
    if strategy not in STRATEGIES:
        raise TraceError(f"unknown capture strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    timeout = _check_timeout(timeout)
    try:
        if args or kwargs:
            args, kwargs = plain_mappings(*canonical_call(forward_signature(model), args, kwargs))
    except TypeError as e:
        params = forward_signature(model).parameters.values()
        sig = "(" + ", ".join(str(p.replace(annotation=p.empty)) for p in params) + ")"
        hint = ""
        if "too many positional" in str(e) and isinstance(args, tuple) and len(args) >= 2:
            hint = "; a whole (inputs, labels) batch? pass the forward's arguments only, e.g. (batch[0],)"
        raise ExampleInputError(
            f"the example inputs ({describe_call(args, kwargs)}) do not fit {type(model).__name__}.forward{sig}: "
            f"{e}{hint}"
        ) from e
    # a first call may come under no_grad; a mixed-precision wrapper of model.forward is
    # captured as its plain forward under its autocast (fxfreeze.amp)
    with torch.enable_grad(), plain_capture(model):
        return _capture(model, args, kwargs, strategy, timeout)


def _capture(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], strategy: str, timeout: float | None
) -> Capture:
    name = type(model).__name__
    have_inputs = bool(args or kwargs)
    strip: list[str] = []
    checkpoints: list[str] = []
    functions: list[str] = []
    hooks: list[str] = []
    if have_inputs:
        with watch_checkpoints() as checkpoints, watch_functions() as functions, watch_tensor_hooks() as hooks:
            strip = unknown_outputs(_run_eager(model, *fresh_containers(args, kwargs)))
    reasons: list[str] = lost_in_graphs(functions, hooks)
    kept = fresh_containers(args, kwargs)  # the caller's state objects stay the caller's
    common = dict(training=model.training, example_args=kept[0], example_kwargs=kept[1], checkpoints=bool(checkpoints),
                  functions=tuple(functions), tensor_hooks=len(hooks))
    bound = f"{timeout:g} s" if timeout else ""

    fx_graph: fx.Graph | None = None
    leaves: dict[str, str] = {}
    if strategy in ("auto", "fx"):
        try:
            with time_bound(timeout):
                fx_graph, leaves, failure = trace_fx(model, *fresh_containers(args, kwargs))
        except CaptureTimeout:
            fx_graph, failure = None, f"fx tracing took longer than {bound}"
        if fx_graph is not None:
            hidden = hides_structure(model, leaves) if strategy == "auto" else None
            if hidden is None:
                if leaves:
                    reasons.append(
                        "fx made these submodules leaves because their bodies cannot be traced: "
                        + "; ".join(f"{k} ({v})" for k, v in leaves.items())
                    )
                return Capture(fx_graph, "fx", reasons=reasons, leaves=leaves, **common)  # type: ignore[arg-type]
            reasons.append(
                f"fx had to make {hidden!r} a single leaf ({leaves[hidden]}), hiding its "
                "inner blocks; trying torch.export"
            )
        else:
            reasons.append(str(failure))
            if strategy == "fx":
                raise TraceError(f"{name}: {failure}")

    if strategy in ("auto", "export"):
        if not have_inputs:
            msg = "torch.export needs example inputs"
            if strategy == "export":
                raise TraceError(f"{name}: {msg}; pass example_inputs")
            reasons.append(msg)
        else:
            if strip:
                reasons.append(
                    "the model's output holds objects a graph cannot return: "
                    + ", ".join(strip)
                    + "; the compiled module returns None in their place (a key/value cache is an "
                    "inference feature that training does not read; calls that need it can run the model itself)"
                )
            for dynamic in (True, False):
                try:
                    with preserved_state(model), time_bound(timeout):
                        res = export_graph(model, *fresh_containers(args, kwargs), dynamic=dynamic, strip=bool(strip))
                    if not dynamic:
                        reasons.append("exported with static shapes: other shapes get their own capture")
                    reasons.extend(mode_region_notes(res.graph, res.extra))
                    return Capture(
                        res.graph, "export", reasons=reasons, extra_attrs=res.extra,
                        guard=res.guard, in_spec=res.in_spec, **common,  # type: ignore[arg-type]
                    )
                except CaptureTimeout:
                    shapes = "dynamic" if dynamic else "static"
                    reasons.append(f"torch.export with {shapes} shapes took longer than {bound}")
                    error: BaseException | None = None
                except Exception as e:  # noqa: BLE001 - each failure is reported in the notes
                    error = e
                    if dynamic:
                        continue  # dynamic shapes are a nicety: retry static
                    reasons.append(f"torch.export failed ({type(e).__name__}: {_first_line(e)})")
            found = export_without_forward_hooks(model, args, kwargs, bool(strip), timeout)  # the hooks' fault?
            if found is not None:
                reasons.append(f"exported without the forward hooks of {', '.join(found[1])}, which every call runs")
                return Capture(found[0].graph, "export", reasons=reasons, extra_attrs=found[0].extra, guard=found[0].guard,
                               in_spec=found[0].in_spec, hooks_left_out=tuple(found[1]), **common)  # type: ignore[arg-type]
            if strategy == "export":
                raise TraceError(f"{name}: {reasons[-1]}") from error

    if fx_graph is not None:
        reasons.append("falling back to the fx graph with leaves: " + ", ".join(leaves))
        return Capture(fx_graph, "fx", reasons=reasons, leaves=leaves, **common)  # type: ignore[arg-type]

    if strategy in ("auto", "hooks"):
        if not have_inputs:
            raise TraceError(
                f"{name} cannot be traced symbolically ({'; '.join(reasons)}); "
                "pass example_inputs so fxfreeze can capture it with torch.export or hooks"
            )
        try:
            with time_bound(timeout):
                graph = trace_hooks(model, *fresh_containers(args, kwargs))
        except CaptureTimeout:
            raise TraceError(f"{name}: every capture strategy took longer than {bound} ({'; '.join(reasons)})") from None
        reasons.append("captured module execution order with forward hooks (no graph that can run)")
        return Capture(graph, "hooks", reasons=reasons, executable=False, **common)  # type: ignore[arg-type]
    raise TraceError(f"{name}: " + "; ".join(reasons))
