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

from .errors import ExampleInputError, ModelError, TraceError

__all__ = [
    "Capture",
    "capture",
    "normalize_inputs",
    "module_path_of",
    "preserved_state",
    "STRATEGIES",
]

logger = logging.getLogger("fxfreeze")

STRATEGIES = ("auto", "fx", "export", "hooks")

#: An escalated leaf that holds at least this share of the parameters and has several
#: parametrised children probably hides repeated blocks; then export is tried as well.
_HIDDEN_STRUCTURE_SHARE = 0.25
_MAX_ESCALATIONS = 256


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
    counters) and every module's training flag are restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    buffers = {
        name: buf.detach().clone() for name, buf in model.named_buffers() if buf is not None
    }
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buf in model.named_buffers():
                saved = buffers.get(name)
                if saved is not None and buf is not None and saved.shape == buf.shape:
                    buf.copy_(saved)
        for m, mode in modes.items():
            m.training = mode


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
                    root[target] = _resolve(model, target)
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


def _resolve(model: nn.Module, target: str) -> Any:
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


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
    """Specialise forward arguments that the example call does not pass to their defaults."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return {}
    params = list(sig.parameters.values())
    concrete: dict[str, Any] = {}
    for i, p in enumerate(params):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        given = i < len(args) or p.name in kwargs
        if not given and p.default is not inspect.Parameter.empty:
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

    return spec(args), spec(kwargs)


def _trace_export(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[fx.Graph, dict[str, Any]]:
    dyn_args, dyn_kwargs = _dynamic_shapes(args, kwargs)
    dynamic: Any
    if kwargs and not args:
        dynamic = dyn_kwargs
    elif args and not kwargs:
        dynamic = dyn_args
    else:
        dynamic = None
    with preserved_state(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ep = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dynamic)
        except Exception:  # noqa: BLE001 - dynamic shapes are a nicety, retry static
            ep = torch.export.export(model, args, kwargs, strict=False)
    unlifted = ep.module()
    graph = unlifted.graph
    extra: dict[str, Any] = {}
    for node in list(graph.nodes):
        if node.op in ("get_attr", "call_module"):
            target = str(node.target)
            try:
                _resolve(model, target)
            except AttributeError:
                extra[target] = _resolve(unlifted, target)
    # Shape guards are checked by the ops themselves; a guard module would pin the
    # batch size. Drop it (it has no users).
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target) == "_guards_fn" and not node.users:
            graph.erase_node(node)
            extra.pop("_guards_fn", None)
    return graph, extra


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


def _run_eager(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Check that the example inputs fit the model before any capture is attempted."""
    try:
        with preserved_state(model), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - reported to the user as a bad input
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExampleInputError(
            f"{type(model).__name__} fails on the example inputs ({_describe(args, kwargs)}): "
            f"{type(e).__name__}: {first}. Give inputs of the shape and dtype the model expects."
        ) from e


def _describe(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    def d(x: Any) -> str:
        if isinstance(x, torch.Tensor):
            return f"{str(x.dtype).replace('torch.', '')}{list(x.shape)}"
        return type(x).__name__

    parts = [d(a) for a in args] + [f"{k}={d(v)}" for k, v in kwargs.items()]
    return ", ".join(parts) or "no inputs"


def capture(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    strategy: str = "auto",
) -> Capture:
    """Capture ``model`` as an FX graph (see the module docstring for the strategies).

    ``strategy`` forces one of ``"fx"``, ``"export"`` or ``"hooks"``; ``"auto"`` tries fx,
    then export, then hooks, and prefers export over fx when fx had to hide a large
    structured submodule in one leaf and export does not fail.
    """
    model = _check_model(model)
    if strategy not in STRATEGIES:
        raise TraceError(f"unknown capture strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    args, kwargs = normalize_inputs(example_inputs)
    have_inputs = bool(args or kwargs)
    if have_inputs:
        _run_eager(model, args, kwargs)
    reasons: list[str] = []
    common = dict(training=model.training, example_args=args, example_kwargs=kwargs)

    fx_graph: fx.Graph | None = None
    leaves: dict[str, str] = {}
    if strategy in ("auto", "fx"):
        fx_graph, leaves, failure = _trace_fx(model, args, kwargs)
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
                raise TraceError(f"{type(model).__name__}: {failure}")

    if strategy in ("auto", "export"):
        if not have_inputs:
            msg = "torch.export needs example inputs"
            if strategy == "export":
                raise TraceError(f"{type(model).__name__}: {msg}; pass example_inputs")
            reasons.append(msg)
        else:
            try:
                graph, extra = _trace_export(model, args, kwargs)
                return Capture(graph, "export", reasons=reasons, extra_attrs=extra, **common)  # type: ignore[arg-type]
            except Exception as e:  # noqa: BLE001
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                reasons.append(f"torch.export failed ({type(e).__name__}: {first[:300]})")
                if strategy == "export":
                    raise TraceError(f"{type(model).__name__}: {reasons[-1]}") from e

    if fx_graph is not None:
        reasons.append("falling back to the fx graph with leaves: " + ", ".join(leaves))
        return Capture(fx_graph, "fx", reasons=reasons, leaves=leaves, **common)  # type: ignore[arg-type]

    if strategy in ("auto", "hooks"):
        if not have_inputs:
            raise TraceError(
                f"{type(model).__name__} cannot be traced symbolically ({'; '.join(reasons)}); "
                "pass example_inputs so fxfreeze can capture it with torch.export or hooks"
            )
        graph = _trace_hooks(model, args, kwargs)
        reasons.append("captured module execution order with forward hooks (plan only)")
        return Capture(graph, "hooks", reasons=reasons, executable=False, **common)  # type: ignore[arg-type]
    raise TraceError(f"{type(model).__name__}: " + "; ".join(reasons))
