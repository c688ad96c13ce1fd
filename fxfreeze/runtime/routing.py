"""Routing a model's calls to its compiled module, and back.

A training loop that holds the original model (the HF Trainer, Lightning) trains the
compiled graphs once ``model.forward`` routes to the compiled module
(:meth:`Routing.install`). The route is an instance attribute with the model's own
signature, so wrappers added later (accelerate's autocast) wrap it and libraries that read
the signature see the model's. Inside a capture, and for calls that run eagerly, the route
steps aside: such calls must reach the model's own forward, not the graphs again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import types
import weakref
from typing import Any, Iterator

import torch
from torch import nn

from ..amp import WrapperAutocast, wrapper_autocast
from ..errors import CopyError
from ..forwards import forward_of_copy, forward_with, restore_forward, saved_forward, temporary_forward
from ..sample_ids import pop_sample_ids
from .ddp_watch import active_ddp, check_ddp

__all__ = ["Routing"]

logger = logging.getLogger("fxfreeze")

#: per thread: ids of compiled modules whose installed route steps aside (captures, eager calls)
_BYPASS = threading.local()


class Routing:
    """The routing half of :class:`~fxfreeze.runtime.module.FreezableModule` (which
    provides ``_model``, ``graphs`` and ``_run``)."""

    _model: nn.Module
    graphs: Any
    _installed: tuple[bool, Any] | None
    _eager_forward: Any
    #: training calls that reached the compiled module (its graphs or the model's forward):
    #: calls in training mode, or with gradients on in a loop that trains in eval mode
    training_calls: int = 0
    #: other calls with gradients on (eval mode): a loop that trains in eval mode makes them
    grad_calls: int = 0
    #: the loop trains the model in eval mode (see :meth:`check_calls`)
    _trains_in_eval: bool = False
    #: whether the call running now is a training call (its probe, its loss)
    _call_trains: bool = False
    #: (training_calls, grad_calls) at the last optimizer step
    _calls_at_step: tuple[int, int] = (0, 0)
    _told_eval: bool = False  # the INFO line on training in eval mode, once
    _route_checked: bool = False
    _ddp_seen: Any = None  # a weak reference to the last DDP the calls ran inside (ddp_watch.py)
    #: (the forward wrapper last read, its autocast): see :meth:`wrapper_amp`
    _amp_seen: tuple[Any, WrapperAutocast | None] = (None, None)
    #: work a freeze left for the next call: the optimizer round it was decided in is over then
    _after_round: Any = None

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Pickling or deep-copying the compiled module is refused with what to do instead:
        it holds a live run (controller, optimizer hook, threads), which a copy cannot share
        and a file cannot carry. The model itself copies and saves as a plain model."""
        raise CopyError(
            "a compiled module (fxfreeze.compile's result) cannot be pickled or deep-copied: it "
            "drives a live training run. Save `fm.model` (torch.save(fm.model) or its "
            "state_dict(), which has the same keys as fm.state_dict()) and the freeze state "
            "`fm.freezer.state_dict()`; copy `fm.model` (copy.deepcopy gives a plain model)"
        )

    def count_call(self) -> None:
        """Count this call: a training call is one in training mode, or, in a loop that trains
        in eval mode, one with gradients on (its evaluation runs under ``no_grad``)."""
        if self._after_round is not None:
            after, self._after_round = self._after_round, None
            after()
        training = self._model.training
        grad = torch.is_grad_enabled()
        if training:
            self._trains_in_eval = False  # the loop trains in training mode (again)
        self._call_trains = call = training or (grad and self._trains_in_eval)
        self.training_calls += call
        self.grad_calls += grad and not call
        ddp = active_ddp()
        if ddp is not None and ddp is not (self._ddp_seen and self._ddp_seen()):  # a DDP the loop built: once
            check_ddp(self, ddp)
            self._ddp_seen = weakref.ref(ddp)

    def check_calls(self) -> None:
        """Called at each optimizer step. A step since the last one with no training call
        but calls with gradients on: the loop trains the model in eval mode (``model.eval()``
        to keep dropout off or BatchNorm fixed, or an evaluation's ``eval()`` never undone).
        Its calls with gradients on count as training calls from now on, so that Egeria gets
        its probe, the safety net its losses; until a call in training mode again."""
        now = (self.training_calls, self.grad_calls)
        (t, g), self._calls_at_step = self._calls_at_step, now
        if now[0] == t and now[1] > g and not self._trains_in_eval:
            self._trains_in_eval = True
            if not self._told_eval:
                self._told_eval = True
                logger.info(
                    "fxfreeze: %s is trained in eval mode (an optimizer step after calls with gradients on and none "
                    "in training mode): calls with gradients on count as training calls until one in training mode",
                    type(self._model).__name__,
                )
        self.check_route()

    def check_route(self) -> None:
        """Called at each optimizer step; acts at the first only. A backward reached the
        model's parameters but no training call reached this module: the loop calls the model
        itself, through something that holds it (a sentence-transformers loss, a parent
        module, a closure). Then no graph ran and the policies saw nothing (Egeria's probe, the
        safety net's loss, the cache's batches), so nothing would ever freeze. Route the
        model's calls here (:meth:`install`) and say so."""
        if self._route_checked:
            return
        self._route_checked = True
        if self.training_calls or self.grad_calls or self._installed is not None:
            return
        if not any(p.grad is not None for p in self._model.parameters()):
            return  # no backward yet (a step by hand, say): nothing to tell
        if "forward" in self._model.__dict__ and self.wrapper_amp() is None:
            # something wrapped the model's forward already (accelerate's mixed precision,
            # prepared by the HF Trainer): a route would replace that wrapper (its autocast
            # lost) and captures would run through it (its autocast region baked into the
            # graph as one piece): say what to do instead
            logger.warning(
                "fxfreeze: the first optimizer step trained %s without a call of the compiled module, through a "
                "wrapper of its forward (accelerate's mixed precision, say), which fxfreeze does not route under: "
                "call fm(...) in the loop, or give the HF Trainer / Lightning the FxFreezeCallback (the policies "
                "that read training calls, the default's included, see none and will not freeze)",
                type(self._model).__name__,
            )
            return
        self.install()
        logger.warning(
            "fxfreeze: the first optimizer step trained %s without a call of the compiled module (something "
            "calls the model itself); from now on model(...) runs the compiled module (fm.install()). Call "
            "fm(...) in the loop, or fm.install() after compile, to make this explicit",
            type(self._model).__name__,
        )

    def wrapper_amp(self) -> WrapperAutocast | None:
        """The mixed precision of a wrapper around the model's forward (accelerate's, set by
        ``accelerator.prepare`` or the HF Trainer), under an installed route the one it
        replaced: the graphs run under its autocast and its conversion of outputs
        (:mod:`fxfreeze.amp`). Read again only when the forward changes."""
        if self._installed is not None:
            forward = self._installed[1] if self._installed[0] else None
        else:
            forward = self._model.__dict__.get("forward")
        seen, amp = self._amp_seen
        if forward is not seen:
            amp = wrapper_autocast(self._model, forward)
            self._amp_seen = (forward, amp)
        return amp

    @contextlib.contextmanager
    def _bypass(self) -> Iterator[None]:
        """Calls of the model inside go to its own forward (an installed route steps aside)."""
        active = getattr(_BYPASS, "ids", None)
        if active is None:
            active = _BYPASS.ids = {}
        active[id(self)] = active.get(id(self), 0) + 1
        try:
            yield
        finally:
            active[id(self)] -= 1
            if not active[id(self)]:
                del active[id(self)]

    @contextlib.contextmanager
    def _capturing(self) -> Iterator[None]:
        """A capture sees the plain model: calls reach its own forward, and an installed
        route (with whatever wrapped it since, such as accelerate's autocast) is taken off
        ``model.forward`` meanwhile."""
        with self._bypass(), temporary_forward(self._model, self._installed):
            yield

    def _bypassed(self) -> bool:
        return id(self) in getattr(_BYPASS, "ids", {})

    # -- in place ------------------------------------------------------------------------------------
    def install(self) -> None:
        """Route calls of the original model (``model(...)``) to this module, so that a
        training loop holding the model trains the compiled graphs. The model's
        ``forward`` becomes an instance attribute with the same signature; wrappers added
        later (accelerate's autocast) wrap it. :meth:`uninstall` restores the model."""
        if self._installed is not None:
            return
        model = self._model
        previous = saved_forward(model)
        self.adopt_route(previous, model.forward)
        me, original = weakref.ref(self), weakref.ref(model)

        def run(model_self: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            fm = me()
            if fm is None or model_self is not original():  # a deep copy of the model, or no compiled module
                pop_sample_ids(kwargs)
                return forward_of_copy(previous, original(), model_self)(*args, **kwargs)
            return fm.route(args, kwargs)

        fn = forward_with(self.graphs.signature, run)
        if previous[0]:  # what unwrappers that follow __wrapped__ (accelerate's unwrap_model) reach
            fn.__wrapped__ = previous[1]  # type: ignore[attr-defined]
        model.__dict__["forward"] = types.MethodType(fn, model)

    def adopt_route(self, previous: tuple[bool, Any], eager_forward: Any) -> None:
        """Record that ``model.forward`` routes to :meth:`route` (installed by
        :meth:`install`, or by an integration that compiled on the first call):
        ``previous`` is what :meth:`uninstall` restores (had an instance forward, its
        value) and ``eager_forward`` what runs when a call must run eagerly."""
        self._installed = previous
        self._eager_forward = eager_forward

    def disown_route(self) -> None:
        """The route is no longer this module's to remove: :meth:`uninstall` leaves
        ``model.forward`` alone (an integration keeps its route under a wrapper)."""
        self._installed = None

    def route(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """What an installed ``model(...)`` runs: the compiled graphs, or the model's own
        forward inside a capture or an eager call."""
        if self._bypassed():
            pop_sample_ids(kwargs)  # the model's own forward never takes them
            return self._eager_forward(*args, **kwargs)
        return self._run(args, kwargs)

    def uninstall(self) -> None:
        """Undo :meth:`install`: calls of the model run its own forward again."""
        if self._installed is None:
            return
        restore_forward(self._model, self._installed)
        self._installed = None
        self._eager_forward = self._model.forward

    @property
    def installed(self) -> bool:
        return self._installed is not None
