"""Compiling a model in place, on its first call.

Training loops (the HF Trainer, Lightning) hold the model and call it; they build the
optimizer themselves and feed batches whose exact keyword set (``labels=``, columns the
collator added) only the first call reveals. :class:`LazyCompile` therefore routes the
model's ``forward`` (an instance attribute with the model's own signature, installed
before wrappers such as accelerate's autocast, which then wrap it) to a function that
compiles the model with that first call as the example inputs, then hands every call to
the compiled module (:meth:`FreezableModule.route`). The optimizer and a saved freezer
state may arrive before or after that first call.

When training ends, :meth:`release` gives the model back as plain training would leave it:
every parameter's ``requires_grad`` as before, no module held in eval mode, no optimizer hook
or reference worker left running, and its own forward. Otherwise a second stage of training
on the same model (a new Trainer without the callback, a loop of the user's own) would
silently keep the frozen prefix frozen: the Trainer builds its optimizer from the parameters
that require gradients, so those parameters would not even be in it. The next training run
with the callback (:meth:`reopen`) compiles the model again on its first call.
"""

from __future__ import annotations

import base64
import inspect
import io
import logging
import threading
import time
import types
import weakref
from typing import Any

import torch
from torch import nn

from ..calls import forward_signature
from ..errors import DistributedError, FreezeError
from ..forwards import forward_of_copy, forward_with, restore_forward, saved_forward
from ..runtime.adopt import holds_any
from ..sample_ids import SAMPLE_ID_KEY, pop_sample_ids, signature_with_ids

__all__ = ["LazyCompile", "encode_state", "decode_state", "data_parallel"]

logger = logging.getLogger("fxfreeze")
_PASS = threading.local()  # depth > 0: routes pass calls straight to the model (a capture runs)
_BY_MODEL: "weakref.WeakKeyDictionary[nn.Module, LazyCompile]" = weakref.WeakKeyDictionary()


def encode_state(state: dict[str, Any]) -> str:
    """A freezer state as text (JSON-safe), for checkpoints that are JSON (the Trainer's
    ``trainer_state.json``). Plain data only: decoded with ``weights_only=True``."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_state(text: str) -> dict[str, Any]:
    """Inverse of :func:`encode_state`; a clear error for anything else."""
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
        state = torch.load(io.BytesIO(data), weights_only=True)
    except Exception as e:  # noqa: BLE001 - any decoding failure is a bad checkpoint
        raise FreezeError(f"the saved fxfreeze state in this checkpoint cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise FreezeError("the saved fxfreeze state in this checkpoint is not a freezer state")
    return state


def _passing() -> bool:
    return getattr(_PASS, "depth", 0) > 0


class _Passing:
    def __enter__(self) -> None:
        _PASS.depth = getattr(_PASS, "depth", 0) + 1

    def __exit__(self, *exc: Any) -> None:
        _PASS.depth -= 1


def _by_name(forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The call as one dict of keyword arguments (positional ones named by the signature);
    the positional tuple when a ``*args`` parameter takes some."""
    sig = inspect.signature(forward)
    bound = sig.bind(*args, **kwargs)
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                return args
            continue
        if kind is inspect.Parameter.POSITIONAL_ONLY:
            return args
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


def data_parallel(world_size: Any, find_unused: bool, static_graph: bool, trainer: str, fix: str) -> bool:
    """Whether the trainer runs its own DDP over several processes, which the callbacks
    support on two conditions. Every rank must freeze the same blocks at the same step:
    the compiled module then applies rank 0's decisions (:func:`agree_on_rank_0`), since
    each rank's policy measures its own batches. And DDP must find unused parameters: it was
    built while every block trained, and the parameters a freeze takes stop producing
    gradients, so without ``find_unused_parameters`` (or with a static graph) the step after
    the first freeze raises "Expected to have finished reduction". Refused before the first
    step when it is off (``fix`` says how to turn it on)."""
    if not (isinstance(world_size, int) and world_size > 1):
        return False
    if not find_unused or static_graph:
        why = "a static graph" if static_graph else "find_unused_parameters off"
        raise DistributedError(
            f"{trainer} trains on {world_size} processes with DDP's {why}: the parameters a freeze takes stop "
            f"producing gradients after DDP was built, and DDP would raise at the step after the first freeze. {fix}"
        )
    return True


def holding(optimizer: Any, model: nn.Module) -> Any:
    """Of a trainer's optimizers (a list), those that hold a parameter of ``model``, in their
    order (the first is the controller's clock); ``optimizer`` itself when it is one, or
    when none of the list holds any (the controller then says what is wrong). A GAN's
    LightningModule builds one optimizer per network, and the compiled network may be the
    second's."""
    if not isinstance(optimizer, (list, tuple)):
        return optimizer
    ids = {id(p) for p in model.parameters()}
    return [o for o in optimizer if holds_any(o, ids)] or list(optimizer)


class LazyCompile:
    """Routes ``model(...)`` to a :class:`FreezableModule` compiled on the first call.

    ``compile_kwargs`` are :func:`fxfreeze.compile`'s keyword arguments (``policy``,
    ``config``, ``plan``, ...). Use :meth:`install` once, :meth:`set_optimizer` when the
    loop has built its optimizer, :meth:`load_state` to resume; ``module`` is the compiled
    module once the model ran (None before).
    """

    def __init__(self, model: nn.Module, compile_kwargs: dict[str, Any]) -> None:
        if not isinstance(model, nn.Module):
            raise FreezeError(f"expected a torch.nn.Module to compile, got {type(model).__name__}")
        self.model = model
        self.compile_kwargs = dict(compile_kwargs)
        self.module: Any = None
        #: the trainer's optimizer, or its optimizers (those holding the model's parameters drive it)
        self.optimizer: Any = None
        self.pending_state: dict[str, Any] | None = None
        #: the trainer's planned number of optimizer steps, passed to compile
        self.total_steps: int | None = None
        #: the trainer's optimizer steps per epoch (the activation cache's payback horizon)
        self.epoch_steps: float | None = None
        self._previous: tuple[bool, Any] | None = None
        self._original: Any = None
        #: called with this object once the model is compiled
        self.on_compiled: Any = None
        #: seconds the first call spent compiling (capture, plan, controller)
        self.compile_seconds = 0.0
        #: training ended (:meth:`release`): calls run the model's own forward
        self.released = False
        #: the trainer's own DDP runs this process among others: every rank applies rank 0's decisions
        self.data_parallel = False
        self._route: Any = None
        #: (a PEFT model's base model, its forward before, the forward naming the ids): see _name_ids_on_base
        self._base: tuple[nn.Module, Any, Any] | None = None
        self._final_state: dict[str, Any] | None = None

    @classmethod
    def for_model(cls, model: nn.Module, compile_kwargs: dict[str, Any]) -> "LazyCompile":
        """The installed LazyCompile of ``model``, or a new installed one: a callback that
        is rebuilt (the Trainer re-creates restored callbacks) takes over the same route."""
        lazy = _BY_MODEL.get(model)
        if lazy is None or not lazy.installed:
            lazy = cls(model, compile_kwargs)
            lazy.install()
            _BY_MODEL[model] = lazy
        elif lazy.released:  # a route kept under a wrapper after an earlier run: a new run
            lazy.reopen(compile_kwargs)
        return lazy

    @property
    def installed(self) -> bool:
        return self._previous is not None

    def install(self) -> None:
        """Route the model's calls through this object (idempotent)."""
        if self._previous is not None:
            return
        model = self.model
        self._previous = previous = saved_forward(model)
        self._original = model.forward
        me, original = weakref.ref(self), weakref.ref(model)

        def run(model_self: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            lazy = me()
            ids = pop_sample_ids(kwargs)  # not an input of the model's: only the compiled module takes them
            if lazy is None or model_self is not original():  # a deep copy (an EMA, SWA): not routed
                return forward_of_copy(previous, original(), model_self)(*args, **kwargs)
            if _passing() or lazy.released:
                return lazy._original(*args, **kwargs)
            # installed over a mixed-precision wrapper (accelerate's), the route replaced it: the
            # compiled module applies its autocast (fxfreeze.amp)
            if lazy.module is None:
                lazy._compile(args, kwargs)
            if ids is not None:
                kwargs[SAMPLE_ID_KEY] = ids
            return lazy.module.route(args, kwargs)

        # the model's signature, and the sample ids' keyword: a trainer keeping only the columns
        # forward names (the HF Trainer) keeps them (fxfreeze.with_sample_ids)
        self._route = types.MethodType(forward_with(signature_with_ids(forward_signature(model)), run), model)
        model.__dict__["forward"] = self._route
        self._name_ids_on_base()

    def _name_ids_on_base(self) -> None:
        """The HF Trainer reads the columns to keep from a PEFT model's *base* model's
        ``forward``: give that one the ids' keyword too (calls it gets never carry them: the
        route above took them out), so that a PEFT model's batches keep their ids."""
        get = getattr(self.model, "get_base_model", None)
        try:
            base = get() if callable(get) else None
        except Exception:  # a wrapper whose base cannot be read: nothing to name
            base = None
        if not isinstance(base, nn.Module) or base is self.model:
            return
        state, ref = saved_forward(base), weakref.ref(base)

        def run(base_self: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            pop_sample_ids(kwargs)
            return forward_of_copy(state, ref(), base_self)(*args, **kwargs)  # a deep copy rebinds to itself

        shim = types.MethodType(forward_with(signature_with_ids(forward_signature(base)), run), base)
        base.__dict__["forward"] = shim
        self._base = (base, state, shim)

    def _unname_ids_on_base(self) -> None:
        if self._base is not None:
            base, state, shim = self._base
            if base.__dict__.get("forward") is shim:
                restore_forward(base, state)
            self._base = None

    def uninstall(self) -> None:
        """Stop routing: the model runs its own forward again (the compiled module, if
        any, is detached: its blocks unfrozen, its controller stopped)."""
        if self.module is not None:
            self.module.detach()
        if self._previous is not None:
            restore_forward(self.model, self._previous)
            self._previous = None
        self._unname_ids_on_base()

    def release(self) -> None:
        """Training is over: detach the compiled module (its blocks unfrozen, held modules
        released, its controller and worker stopped) and let the model run its own forward.
        The route is removed where it is still the model's forward; under a wrapper installed
        over it since (accelerate's autocast) it stays and passes calls through, so that the
        wrapper keeps working. ``module`` stays for inspection (``module.freezer.history``);
        :meth:`state` keeps the final freezer state (a checkpoint written after training)."""
        if self.released:
            return
        self.released = True
        fm = self.module
        on_top = self.model.__dict__.get("forward") is self._route
        if fm is not None:
            self._final_state = fm.freezer.state_dict()
            if not on_top:
                fm.disown_route()  # its uninstall would remove the wrapper above the route
            fm.detach()
        if on_top and self._previous is not None:
            restore_forward(self.model, self._previous)
            self._previous = None
            self._unname_ids_on_base()
        if fm is not None:
            logger.info("fxfreeze: training ended; %s is given back unfrozen, running its own forward",
                        type(self.model).__name__)

    def reopen(self, compile_kwargs: dict[str, Any] | None = None) -> None:
        """A new training run after :meth:`release`: the next call compiles the model again
        (with ``compile_kwargs`` when given). No-op unless released."""
        if not self.released:
            return
        self.released = False
        self.module = None
        self._final_state = None
        if compile_kwargs is not None:
            self.compile_kwargs = dict(compile_kwargs)
        if self._previous is None:
            self.install()

    @torch.compiler.disable  # the Trainer's torch_compile=True: capture outside dynamo's trace
    def _compile(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        from ..runtime.compile import compile as fx_compile
        from ..forwards import temporary_forward

        example: Any = kwargs if not args else (args if not kwargs else None)
        if example is None:  # positional and keyword: bind to names so one dict holds both
            example = _by_name(self._original, args, kwargs)
        t0 = time.perf_counter()
        with _Passing(), temporary_forward(self.model, self._previous):  # capture the plain model
            kwargs = dict(self.compile_kwargs)
            if self.total_steps is not None and "total_steps" not in kwargs:
                kwargs["total_steps"] = self.total_steps
            fm = fx_compile(self.model, example, optimizer=holding(self.optimizer, self.model), **kwargs)
        self.compile_seconds = time.perf_counter() - t0
        fm.adopt_route(self._previous, self._original)  # type: ignore[arg-type]
        fm.set_epoch_steps(self.epoch_steps)
        self.module = fm
        logger.info(
            "fxfreeze: compiled %s on its first call: %d blocks (%s)",
            type(self.model).__name__, len(fm.plan.blocks), ", ".join(fm.plan.names),
        )
        if self.data_parallel:
            from ..runtime.agreement import agree_on_rank_0

            agree_on_rank_0(fm)
        if self.pending_state is not None:
            state, self.pending_state = self.pending_state, None
            fm.freezer.load_state_dict(state)
        if self.on_compiled is not None:
            self.on_compiled(self)

    def set_optimizer(self, optimizer: Any) -> None:
        """The optimizer whose steps drive the controller (wrappers are unwrapped), or a
        list of them: those that hold the model's parameters drive it (:func:`holding`)."""
        self.optimizer = optimizer
        if self.module is not None:
            self.module.freezer.attach_optimizer(holding(optimizer, self.model))

    def load_state(self, state: dict[str, Any]) -> None:
        """Resume: the freezer state applies now, or on the first call."""
        if self.module is None or self.released:
            self.pending_state = state
        else:
            self.module.freezer.load_state_dict(state)

    def state(self) -> dict[str, Any] | None:
        """The freezer state to checkpoint (None before the first call: nothing to save but
        a state still waiting to be applied)."""
        if self.released and self._final_state is not None and self.pending_state is None:
            return self._final_state
        if self.module is not None and not self.released:
            return self.module.freezer.state_dict()
        return self.pending_state
