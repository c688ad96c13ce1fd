"""Running code on a model without leaving a trace (captures, propagation, probes)."""

from __future__ import annotations

import contextlib
import copy
import enum
import random
import sys
import threading
from typing import Any, Iterator

import torch
import torch.utils._pytree as pytree
from torch import nn

__all__ = [
    "preserved_state", "fresh_containers", "watch_checkpoints", "watch_functions", "watch_tensor_hooks", "lost_in_graphs",
    "without_forward_hooks",
    "checkpoint_flags", "CHECKPOINT_FLAGS", "rng_state",
]


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Run code on ``model`` without leaving a trace: buffers (BatchNorm running stats,
    counters), every module's training flag and the random number generators (dropout in
    a capture must not shift the user's random stream) are restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers() if buf is not None}
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        with torch.no_grad():
            for name, buf in model.named_buffers():
                saved = buffers.get(name)
                if saved is None or buf is None or saved.shape != buf.shape:
                    continue
                # A capture may come between a forward and its backward (a second call of
                # the model in the same step, of a new kind). That forward saved buffers for
                # its backward (a slice of BERT's position_ids, BatchNorm's running stats),
                # and a write that bumps their version counter fails it ("modified by an
                # inplace operation"). So only a buffer whose contents changed is put back,
                # and through ``.data``, which writes without bumping the counter, as
                # BatchNorm's own kernel updates its running stats. (The counter cannot tell
                # which buffers changed: that kernel does not always bump it.)
                if not torch.equal(buf, saved):
                    buf.data.copy_(saved)
        for m, mode in modes.items():
            m.training = mode


def rng_state() -> tuple[Any, ...]:
    """A snapshot of the random number generators a forward may draw from (torch's, on the
    CPU and on initialised CUDA devices, Python's ``random``, numpy's global one), to compare
    with ``==``. A symbolic trace draws nothing through its proxies: a change while tracing
    means the forward drew concrete numbers (``torch.rand([]) < p`` deciding to skip a
    layer, ``random.random()``), which a graph would keep as that one draw."""
    cuda = tuple(bytes(s.numpy()) for s in torch.cuda.get_rng_state_all()) if torch.cuda.is_initialized() else ()
    np = sys.modules.get("numpy")
    np_state: Any = None
    if np is not None:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        np_state = (kind, keys.tobytes(), pos, has_gauss, gauss)
    return bytes(torch.random.get_rng_state().numpy()), cuda, random.getstate(), np_state


#: leaves a run of the model cannot change, or that must stay themselves (modules, classes)
_SHARED = (torch.Tensor, type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size,
           torch.layout, torch.memory_format, nn.Module, type, enum.Enum)


def _own_copy(x: Any) -> Any:
    """``x`` for one run: an object the model may change in place (a key/value cache it
    appends to) is a deep copy; tensors, plain values, modules and callables are shared, and
    an object that cannot be copied is shared too."""
    if isinstance(x, _SHARED) or callable(x):
        return x
    try:
        return copy.deepcopy(x)
    except Exception:  # noqa: BLE001 - locks, handles, tensors that are not leaves: nothing better to do
        return x


def fresh_containers(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call's lists, tuples and dicts rebuilt around the same tensors, for one run of the
    model: a forward that writes into its input dict (sentence-transformers adds its outputs
    to the features it is given) must not change the example inputs a capture keeps, nor
    the caller's dict. Other objects among the arguments are copied for the run: a capture
    runs the model (eagerly, or tracing it) on the call it then serves, and a Hugging Face
    ``DynamicCache`` passed by ``generate`` took the run's keys and values, so that the
    real call attended to every token twice."""
    args, kwargs = pytree.tree_map(_own_copy, (tuple(args), dict(kwargs)))
    return tuple(args), dict(kwargs)


def _noting(gen: Any, seen: list[str]) -> Any:
    def generator(*a: Any, **k: Any) -> Any:
        seen.append("non-reentrant")
        return gen(*a, **k)

    return generator


@contextlib.contextmanager
def watch_checkpoints() -> Iterator[list[str]]:
    """Record whether code run inside calls ``torch.utils.checkpoint`` (activation
    checkpointing). A captured graph inlines a checkpointed region: it keeps every activation
    the model meant to recompute, which is what the user turned checkpointing on to avoid.
    The entry points are looked up at call time, so a model that imported ``checkpoint``
    by name is seen too. Yields the list the calls are recorded in."""
    import torch.utils.checkpoint as cp

    seen: list[str] = []
    saved: dict[str, Any] = {}
    # the non-reentrant entry point: torch 2.14 calls the ``_impl`` one (the other remains)
    for entry in ("_checkpoint_without_reentrant_generator", "_checkpoint_without_reentrant_generator_impl"):
        gen = getattr(cp, entry, None)
        if gen is not None:
            saved[entry] = gen
            setattr(cp, entry, _noting(gen, seen))
    fn = getattr(cp, "CheckpointFunction", None)
    if fn is not None:
        class Watched(fn):  # type: ignore[misc, valid-type]
            @classmethod
            def apply(cls, *a: Any, **k: Any) -> Any:
                seen.append("reentrant")
                return fn.apply(*a, **k)

        saved["CheckpointFunction"] = fn
        cp.CheckpointFunction = Watched  # type: ignore[attr-defined]
    try:
        yield seen
    finally:
        for name, value in saved.items():
            setattr(cp, name, value)


@contextlib.contextmanager
def watch_functions() -> Iterator[list[str]]:
    """Record the custom ``torch.autograd.Function`` classes that code run inside (on this
    thread) applies. Both fx and ``torch.export`` trace through ``Function.apply`` into the
    function's ``forward`` and keep only that: its ``backward`` (a gradient reversal layer,
    a straight-through estimator, a reversible layer that recomputes its inputs) is replaced
    by the autograd of the forward, so a graph trains such a model otherwise than its own
    code does. Two of torch's own functions are left to the watches made for them:
    ``torch.utils.checkpoint``'s (:func:`watch_checkpoints`) and the one that runs a
    module's backward hooks (:mod:`fxfreeze.runtime.hook_watch`, which follows their
    registration). Yields the list of qualified class names, each once."""
    from torch.autograd.function import Function
    import torch.utils.checkpoint as cp
    from torch.nn.modules import _functions as module_functions

    original = Function.__dict__["apply"]
    skip = tuple(c for c in (getattr(cp, "CheckpointFunction", None),
                             getattr(module_functions, "BackwardHookFunction", None)) if c is not None)
    thread = threading.get_ident()
    seen: list[str] = []

    def apply(cls: Any, *args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() == thread and not issubclass(cls, skip):
            name = f"{cls.__module__}.{cls.__qualname__}"
            if name not in seen:
                seen.append(name)
        return original.__get__(None, cls)(*args, **kwargs)  # a classmethod, or torch 2.14's C descriptor

    Function.apply = classmethod(apply)  # type: ignore[assignment, method-assign]
    try:
        yield seen
    finally:
        Function.apply = original  # type: ignore[method-assign]


@contextlib.contextmanager
def watch_tensor_hooks() -> Iterator[list[str]]:
    """Record the gradient hooks that code run inside (on this thread) registers on tensors
    (``h.register_hook(fn)`` in a forward: a gradient scaled or clipped on one branch).
    ``torch.export`` drops them, so a graph would train otherwise than the model's code.
    Yields the list of the hooks' names, one entry per registration."""
    original = torch.Tensor.register_hook
    thread = threading.get_ident()
    seen: list[str] = []

    def register_hook(self: torch.Tensor, hook: Any) -> Any:
        if threading.get_ident() == thread:
            seen.append(getattr(hook, "__qualname__", type(hook).__name__))
        return original(self, hook)

    torch.Tensor.register_hook = register_hook  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        torch.Tensor.register_hook = original  # type: ignore[method-assign]


def lost_in_graphs(functions: list[str], hooks: list[str]) -> list[str]:
    """The plan's notes for what the example call did that a graph does not keep
    (:func:`watch_functions`, :func:`watch_tensor_hooks`): training runs the model's own
    forward for it (:mod:`fxfreeze.runtime.own_forward`)."""
    then = ("so training calls run the model's own forward (frozen blocks still cut, no activation cache); "
            "evaluation runs the graphs")
    notes = []
    if functions:
        names = ", ".join(f.rsplit(".", 1)[-1] for f in functions)
        notes.append(f"the forward applies custom autograd Functions ({names}): a graph keeps their forward but not "
                     f"their backward, {then}")
    if hooks:
        notes.append(f"the forward registers {len(hooks)} gradient hook(s) on its tensors (Tensor.register_hook), "
                     f"which a graph does not keep, {then}")
    return notes


@contextlib.contextmanager
def without_forward_hooks(model: nn.Module) -> Iterator[list[str]]:
    """The forward hooks of ``model``'s submodules taken off while code runs inside, and put
    back (the same hook dicts: their handles still remove them). Yields the names of the
    modules that had any. The root's own hooks run around a call, never inside a graph."""
    kinds = ("_forward_pre_hooks", "_forward_hooks")
    saved: list[tuple[nn.Module, dict[str, Any]]] = []
    names: list[str] = []
    for name, m in model.named_modules():
        held = {k: getattr(m, k) for k in kinds if getattr(m, k, None)} if m is not model else {}
        if held:
            names.append(name)
            saved.append((m, held))
            for k in held:
                setattr(m, k, type(held[k])())
    try:
        yield names
    finally:
        for m, held in saved:
            for k, d in held.items():
                setattr(m, k, d)


#: attributes by which libraries switch a module's activation checkpointing on
#: (Hugging Face's ``gradient_checkpointing``, timm's ``grad_checkpointing``)
CHECKPOINT_FLAGS = ("gradient_checkpointing", "grad_checkpointing")


def checkpoint_flags(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The checkpointing switches of ``model``'s modules, as (module, attribute), on or off
    now (the HF Trainer turns them on after compile, at the start of ``train()``)."""
    return [(m, f) for m in model.modules() for f in CHECKPOINT_FLAGS if isinstance(getattr(m, f, None), bool)]
