"""fx symbolic tracing with leaf escalation, for :mod:`fxfreeze.trace`.

Childless modules are leaves. When tracing raises inside a submodule (the tracer keeps the
stack of modules being traced), that submodule becomes a leaf and the trace is retried.
Forward arguments the example call does not pass are specialised to their defaults, and
plain non-tensor ones it passes to their values (``concrete_args``).

fx proxies parameters, not buffers: code that writes a buffer in place (an EMA
``self.ema.mul_(0.9).add_(...)``, a counter ``self.steps += 1``) runs on the real tensor while
tracing and leaves nothing in the graph, which would then never update it. The trace
watches the buffers: one written or rebound while tracing is put back and the trace is
refused with its name, so that ``torch.export``, which records such writes, is tried.

fx proxies tensors, not random draws made from constants: ``if torch.rand([]) < p:`` (LayerDrop
skipping a layer, stochastic depth written as a branch) or ``random.random()`` runs once
while tracing, and the graph would keep that draw for good (the same layers skipped at
every call). The trace watches the random number generators: a submodule that drew becomes
a leaf (it runs as itself, drawing anew at each call); a draw in the root forward refuses
the trace.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import sys
import warnings
from typing import Any, Mapping

import torch
import torch.fx as fx
from torch import nn

from .graph_utils import repair_fx_wraps
from .trace_state import fresh_containers, preserved_state, rng_state

__all__ = ["trace_fx", "hides_structure"]

logger = logging.getLogger("fxfreeze")

#: An escalated leaf that holds at least this share of the parameters and has several
#: parametrised children probably hides repeated blocks; then export is tried as well.
_HIDDEN_STRUCTURE_SHARE = 0.25
_MAX_ESCALATIONS = 256


def _modes() -> tuple[Any, ...]:
    """The ambient modes a forward may switch inside (``torch.no_grad()``,
    ``torch.autocast``): fx records none of them."""
    amp = tuple(
        (d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)
    )
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), amp)


def _in_checkpoint() -> bool:
    """Called from inside ``torch.utils.checkpoint``: reentrant checkpointing runs its
    region under ``no_grad`` and recomputes it with gradients in the backward, which a
    compiled module leaves to the model's own forward (``runtime/checkpointing.py``)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.endswith(_CHECKPOINT_FILE):
            return True
        frame = frame.f_back
    return False


_CHECKPOINT_FILE = os.path.join("torch", "utils", "checkpoint.py")


class _LeafTracer(fx.Tracer):
    """fx tracer whose leaves are childless modules plus escalated ones, which remembers
    which module was executing when tracing failed, and which notices a forward that
    switches grad mode or autocast inside (``with torch.no_grad():`` around a momentum
    encoder or a teacher, ``with torch.autocast(...)`` around the body). fx runs such a
    context while tracing but records nothing of it: its graph would compute that region
    with gradients, or in float32, unlike the model."""

    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self._leaves = leaves
        self._stack: list[str] = []
        self.failed_stack: list[str] | None = None
        self._start: tuple[Any, ...] | None = None
        #: where the first node created under other modes than the trace began with came from
        self.mode_switch: str | None = None

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        self._start = _modes()
        repair_fx_wraps()
        return super().trace(root, concrete_args)

    def create_node(self, kind: str, target: Any, args: Any, kwargs: Any, name: str | None = None,
                    type_expr: Any = None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if self.mode_switch is None and kind != "placeholder" and _modes() != self._start and not _in_checkpoint():
            grad, inference, amp = _modes()
            what = "autocast " + (", ".join(f"{d} {t}" for d, t in amp) or "off") if amp != self._start[2] else (
                "inference mode" if inference else f"grad mode {'on' if grad else 'off'}")
            where = self._stack[-1] if self._stack else "the root forward"
            self.mode_switch = f"{what} switched inside the forward (in {where})"
        return node

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """Childless modules, escalated ones, and TorchScript modules: fx traced into a
        ``torch.jit.script``-ed block as a call on its C++ object (``layers.0._c.forward``),
        where no parameter shows, so its block owned none and a freeze reaching it changed
        none of their flags and left its modules in training mode."""
        return module_qualified_name in self._leaves or len(m._modules) == 0 or isinstance(m, torch.jit.ScriptModule)

    def create_arg(self, a: Any) -> Any:
        """fx records a mapping as a plain dict: a Hugging Face ``ModelOutput`` (an ordered
        dict with attributes) came back from the graph as a ``dict``, so ``out.logits`` raised
        ``AttributeError`` (LeViT, which fx traces). A mapping of another type is rebuilt as
        that type by a node calling the type with the values as keywords (when its signature
        takes them; otherwise the dict stays)."""
        if isinstance(a, dict) and type(a) is not dict and all(isinstance(k, str) and k.isidentifier() for k in a):
            try:
                inspect.signature(type(a)).bind(**dict.fromkeys(a))
            except (TypeError, ValueError):
                return super().create_arg(a)
            return self.create_node("call_function", type(a), (), super().create_arg(dict(a)))
        return super().create_arg(a)

    def call_module(
        self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        name = self.path_of_module(m)
        self._stack.append(name)
        before = None if self.is_leaf_module(m, name) else rng_state()
        try:
            out = super().call_module(m, forward, args, kwargs)
            if before is not None and rng_state() != before:
                raise RuntimeError(f"{name} draws random numbers that fx would keep as constants")
            return out
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


def _fails_on(model: nn.Module, graph: fx.Graph, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """Run a traced graph once on the example call (no gradient, the model's state kept) and
    return its error, or None. fx follows the forward's Python branches with proxies in
    place of the inputs: ``if not torch.is_tensor(timesteps): timesteps = torch.tensor(
    [timesteps])`` (diffusers' UNets) takes the branch for a number, and the graph then fails
    on the tensor the model itself takes; a failing graph is no capture (export is tried)."""
    args, kwargs = fresh_containers(args, kwargs)
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
        bound.apply_defaults()
    except (TypeError, ValueError):
        return None  # no call to check against
    values = []
    for n in graph.nodes:
        if n.op == "placeholder":
            name = str(n.target).lstrip("*")
            if name not in bound.arguments:  # a specialised argument's placeholder is renamed: `scale_1`
                name = re.sub(r"_\d+$", "", name)
            if name not in bound.arguments:
                return None  # a placeholder the call does not name: nothing to check against
            values.append(bound.arguments[name])
    try:
        with preserved_state(model), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fx.Interpreter(fx.GraphModule(model, graph)).run(*values)
    except Exception as e:  # noqa: BLE001 - whatever the graph raises disqualifies it
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


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


_Buffer = tuple[nn.Module, str, Any, "torch.Tensor | None", "int | None"]


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference tensor keeps no version counter
        return None


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, a NaN equal to a NaN (a buffer may hold NaN as "not set yet")."""
    if a.is_floating_point() or a.is_complex():
        return a.shape == b.shape and bool(torch.all((a == b) | (torch.isnan(a) & torch.isnan(b))))
    return torch.equal(a, b)


def _buffers(model: nn.Module) -> dict[str, _Buffer]:
    """Each buffer: its module, its name there, the object, a copy of its values and its
    version counter (an in-place write that leaves the values as they were bumps it)."""
    out: dict[str, _Buffer] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, torch.jit.ScriptModule):  # a leaf fx does not run (its buffers are no dict)
            continue
        for name, buf in mod._buffers.items():
            key = f"{mod_name}.{name}" if mod_name else name
            if key not in out and isinstance(buf, torch.Tensor):
                out[key] = (mod, name, buf, buf.detach().clone(), _version(buf))
    return out


def _written(before: dict[str, _Buffer]) -> list[str]:
    """Buffers that tracing rebound or wrote, each put back as it was."""
    written = []
    for key, (mod, name, buf, saved, version) in before.items():
        rebound = mod._buffers.get(name) is not buf
        if rebound:
            mod._buffers[name] = buf
        changed = not _same(buf, saved)
        if changed:
            with torch.no_grad():
                buf.data.copy_(saved)  # as preserved_state does
        if rebound or changed or _version(buf) != version:
            written.append(key)
    return written


def trace_fx(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[fx.Graph | None, dict[str, str], str | None]:
    """fx trace with leaf escalation. Returns (graph or None, escalated leaves, failure)."""
    leaves: dict[str, str] = {}
    concrete = _concrete_args(model, args, kwargs)
    for _ in range(_MAX_ESCALATIONS):
        tracer = _LeafTracer(set(leaves))
        before = _buffers(model)
        draws = rng_state()
        try:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    graph = tracer.trace(model, concrete_args=concrete or None)
            finally:
                written = _written(before)
            if rng_state() != draws:
                return None, leaves, ("fx cannot record the random numbers the root forward draws from constants "
                                      "(`torch.rand([]) < p`, `random.random()`): its graph would keep the draw "
                                      "made while tracing (LayerDrop skipping the same layers at every call)")
            if written:
                return None, leaves, (f"fx cannot record the forward's writes to buffers ({', '.join(written[:3])}): it "
                                      "ran them on the buffers while tracing, and its graph would never update them")
            if tracer.mode_switch is not None:
                return None, leaves, (f"fx cannot record a mode the forward switches: {tracer.mode_switch}; its graph "
                                      "would compute that region otherwise than the model")
            used = _drop_var_placeholders(graph)
            if used:
                return None, leaves, (f"fx cannot specialise the forward's {', '.join(used)} to a call (it traces them "
                                      "as one opaque input: `kw.get(...) is not None` would always hold)")
            failed = _fails_on(model, graph, args, kwargs)
            if failed is not None:
                return None, leaves, (f"fx's graph fails on the example inputs the model runs on ({failed}): the "
                                      "forward branches on its inputs' Python types, which fx sees as proxies "
                                      "(`torch.is_tensor(t)` is False for one)")
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
