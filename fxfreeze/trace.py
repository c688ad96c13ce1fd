"""Turning an arbitrary ``nn.Module`` into an FX graph.

Three strategies, tried in order until one gives a usable graph:

``fx``
    ``torch.fx`` symbolic tracing with *leaf escalation*: a module with no children is a
    ``call_module`` leaf, and any submodule whose body cannot be traced (data-dependent
    control flow, ``if src.is_nested`` in ``nn.TransformerEncoderLayer``...) is made a leaf
    and the trace is retried. Arguments the example inputs do not give are specialised to
    their defaults (``concrete_args``), so ``if attention_mask is None`` branches follow the
    call the user actually makes.
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
    Last resort, for planning only: forward hooks record the execution order of leaf modules
    on the example inputs and tensor identity links them into a graph. Such a graph can be
    partitioned and drawn but not executed, so :func:`fxfreeze.compile` refuses it.

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

import contextlib
import inspect
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
import torch.fx as fx
from torch import nn

from .capture_export import export_graph, resolve, unknown_outputs
from .errors import ExampleInputError, ModelError, TraceError
from .timebound import CaptureTimeout, time_bound

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
    "STRATEGIES",
    "DEFAULT_TIMEOUT",
]

logger = logging.getLogger("fxfreeze")

STRATEGIES = ("auto", "fx", "export", "hooks")

#: An escalated leaf that holds at least this share of the parameters and has several
#: parametrised children probably hides repeated blocks; then export is tried as well.
_HIDDEN_STRUCTURE_SHARE = 0.25
_MAX_ESCALATIONS = 256
#: Seconds one capture attempt may take before fxfreeze falls back to the next strategy.
DEFAULT_TIMEOUT = 180.0


Inputs = tuple[tuple[Any, ...], dict[str, Any]]


def normalize_inputs(example_inputs: Any) -> Inputs:
    """Split example inputs into ``(args, kwargs)``.

    A tuple or list is positional, a dict is keyword (Hugging Face models are called as
    ``model(input_ids=..., attention_mask=...)``), a single tensor is one positional
    argument and ``None`` means no inputs.
    """
    if example_inputs is None:
        return (), {}
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        bad = [k for k in example_inputs if not isinstance(k, str)]
        if bad:
            raise ExampleInputError(
                f"example_inputs dict keys must be argument names (str); got {bad[0]!r}"
            )
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise ExampleInputError(
        "example_inputs must be a tensor, a tuple of positional arguments or a dict of "
        f"keyword arguments; got {type(example_inputs).__name__}"
    )


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


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Run code on ``model`` without leaving a trace: buffers (BatchNorm running stats,
    counters), every module's training flag and the random number generators (dropout in
    a capture must not shift the user's random stream) are restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    buffers = {
        name: buf.detach().clone() for name, buf in model.named_buffers() if buf is not None
    }
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        with torch.no_grad():
            for name, buf in model.named_buffers():
                saved = buffers.get(name)
                if saved is not None and buf is not None and saved.shape == buf.shape:
                    buf.copy_(saved)
        for m, mode in modes.items():
            m.training = mode


def canonical_call(
    signature: inspect.Signature | None, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """One form for equivalent calls: ``m(x, mask=y)`` and ``m(input=x, mask=y)`` both
    become ``(x,), {"mask": y}`` (arguments that can be positional are positional until
    the first one left out; keyword arguments follow in the signature's order). Raises
    ``TypeError`` (the model's own complaint) when the call does not fit ``signature``."""
    if signature is None:
        return args, kwargs
    bound = signature.bind(*args, **kwargs)
    return bound.args, bound.kwargs


def forward_signature(model: nn.Module) -> inspect.Signature | None:
    """``inspect.signature(model.forward)``, or None when it cannot be read."""
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


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
                    root[target] = resolve(model, target)
                except AttributeError as e:
                    raise TraceError(
                        f"graph node {node.name!r} refers to {target!r}, which the model "
                        "no longer has; re-run fxfreeze.plan/compile on the current model"
                    ) from e
        return root

    def build(self, model: nn.Module) -> fx.GraphModule:
        """A GraphModule over ``self.graph`` that shares ``model``'s current parameters,
        buffers and submodules (rebuilt after ``.to()`` moves buffers)."""
        if not self.executable:
            raise TraceError(
                "this graph was captured with the 'hooks' strategy, which records module "
                "order only and cannot run; fxfreeze can plan this model but not compile it"
            )
        root = self.attributes(model)
        gm = fx.GraphModule(root, self.graph, class_name=type(model).__name__ + "Graph")
        return gm


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


def _trace_fx(
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


def _hides_structure(model: nn.Module, leaves: Mapping[str, str]) -> str | None:
    """Name of an escalated leaf that probably hides several freezable blocks."""
    total = sum(p.numel() for p in model.parameters()) or 1
    for path in leaves:
        sub = model.get_submodule(path)
        share = sum(p.numel() for p in sub.parameters()) / total
        owners = [m for m in sub.modules() if any(True for _ in m.parameters(recurse=False))]
        if share >= _HIDDEN_STRUCTURE_SHARE and len(owners) >= 2:
            return path
    return None


def _trace_hooks(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> fx.Graph:
    """Record leaf-module execution order with forward hooks (planning only)."""
    graph = fx.Graph()
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
        path = names.get(mod, "")
        srcs = [produced[id(t)] for t in flat_tensors(inp) if id(t) in produced]
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

    handles = [
        m.register_forward_hook(hook)
        for n, m in model.named_modules()
        if n and len(m._modules) == 0
    ]
    try:
        with preserved_state(model), torch.no_grad():
            out = model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    outs = [produced[id(t)] for t in flat_tensors(out) if id(t) in produced]
    graph.output(tuple(dict.fromkeys(outs)) if outs else (last[0] if last else None))
    return graph


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
    the output (what a graph of this call must return)."""
    try:
        with preserved_state(model), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return model(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - reported to the user as a bad input
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExampleInputError(
            f"{type(model).__name__} fails on the example inputs ({describe_call(args, kwargs)}): "
            f"{type(e).__name__}: {first}. Give inputs of the shape and dtype the model expects."
        ) from e


def describe_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """``"int64[2, 12], attention_mask=int64[2, 12]"``: a call's inputs in one line."""

    def d(x: Any) -> str:
        if isinstance(x, torch.Tensor):
            return f"{str(x.dtype).replace('torch.', '')}{list(x.shape)}"
        if x is None or isinstance(x, (bool, int, float)):
            return repr(x)
        return type(x).__name__

    parts = [d(a) for a in args] + [f"{k}={d(v)}" for k, v in kwargs.items()]
    return ", ".join(parts) or "no inputs"


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
            args, kwargs = canonical_call(forward_signature(model), args, kwargs)
    except TypeError as e:
        raise ExampleInputError(
            f"the example inputs ({describe_call(args, kwargs)}) do not fit {type(model).__name__}.forward: {e}"
        ) from e
    with torch.enable_grad():  # a first call may come under no_grad
        return _capture(model, args, kwargs, strategy, timeout)


def _capture(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], strategy: str, timeout: float | None
) -> Capture:
    name = type(model).__name__
    have_inputs = bool(args or kwargs)
    strip: list[str] = []
    if have_inputs:
        strip = unknown_outputs(_run_eager(model, args, kwargs))
    reasons: list[str] = []
    common = dict(training=model.training, example_args=args, example_kwargs=kwargs)
    bound = f"{timeout:g} s" if timeout else ""

    fx_graph: fx.Graph | None = None
    leaves: dict[str, str] = {}
    if strategy in ("auto", "fx"):
        try:
            with time_bound(timeout):
                fx_graph, leaves, failure = _trace_fx(model, args, kwargs)
        except CaptureTimeout:
            fx_graph, failure = None, f"fx tracing took longer than {bound}"
        if fx_graph is not None:
            hidden = _hides_structure(model, leaves) if strategy == "auto" else None
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
                        res = export_graph(model, args, kwargs, dynamic=dynamic, strip=bool(strip))
                    if not dynamic:
                        reasons.append("exported with static shapes: other shapes get their own capture")
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
                graph = _trace_hooks(model, args, kwargs)
        except CaptureTimeout:
            raise TraceError(f"{name}: every capture strategy took longer than {bound} ({'; '.join(reasons)})") from None
        reasons.append("captured module execution order with forward hooks (plan only)")
        return Capture(graph, "hooks", reasons=reasons, executable=False, **common)  # type: ignore[arg-type]
    raise TraceError(f"{name}: " + "; ".join(reasons))
