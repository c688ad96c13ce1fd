"""The optimizers the controller follows: one given is checked to hold the model's
parameters (:func:`check_holds`); without one, the first that steps them is adopted.

A common loop compiles first and builds the optimizer afterwards
(``fm = fxfreeze.compile(model, x)`` then ``opt = AdamW(fm.parameters())``). Without the
optimizer the controller has no clock: nothing would ever freeze, and nothing would say so.
:class:`OptimizerWatch` therefore registers a global optimizer post-step hook
(``torch.optim.optimizer.register_optimizer_step_post_hook``) and adopts the first optimizer
that steps any of the model's parameters: from that step on it is the controller's clock,
as if it had been passed to ``compile``. Optimizers that step the model's parameters later
(one per parameter group, say) are watched too, for learning-rate steps and for releasing
the state of frozen parameters; only the first one counts steps.

An optimizer that replaces the followed one mid-run (a second training phase with a new
``AdamW``, an optimizer rebuilt after a learning-rate search) would leave the controller
without a clock: no step counted, no decision, no safety net, silently. :class:`ClockWatch`
sees an optimizer the controller does not follow step the model's parameters
:data:`REPLACED_AFTER` times in a row without a step of the followed one, and hands it the
clock (one INFO line). Optimizers that step side by side with the followed one (one per
parameter subset) never get there: each step of the followed one starts the count again.

A loop that drives the controller by hand (``fm.freezer.step()``) ends the watch at its
first such call; an optimizer attached explicitly (``attach_optimizer``, the integrations)
ends it too.

The global hook is only ever removed outside the loop in which torch runs the global hooks
(removing an entry there raises "mutated during iteration"): it is marked finished inside
it and removed at the next safe point. It holds the controller by a weak reference, so a
controller that is dropped without :meth:`close` leaves only an inert closure behind.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Callable

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..errors import ConfigError

__all__ = ["ClockWatch", "OptimizerWatch", "check_holds", "holds_any", "real_optimizer"]

logger = logging.getLogger("fxfreeze")


def real_optimizer(optimizer: Any) -> Any:
    """The optimizer inside wrappers that hold it as ``.optimizer`` (accelerate's, Lightning's)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def holds_any(optimizer: Any, ids: set[int]) -> bool:
    """Does ``optimizer`` (unwrapped) hold a parameter whose ``id`` is in ``ids``?"""
    groups = getattr(real_optimizer(optimizer), "param_groups", [])
    return any(id(p) in ids for g in groups for p in g["params"])


def check_holds(module: Any, opts: list[torch.optim.Optimizer]) -> None:
    """An optimizer that holds none of the model's trainable parameters would leave the
    model untrained: refuse it; one that holds only some is named in a warning."""
    held = {id(p) for o in opts for g in o.param_groups for p in g["params"]}
    frozen = set(module.frozen_parameter_names())
    trainable = [n for n, p in module.params_by_name.items() if p.requires_grad or n in frozen]
    missing = [n for n in trainable if id(module.params_by_name[n]) not in held]
    model = module.plan.model
    if trainable and len(missing) == len(trainable):
        raise ConfigError(
            f"the optimizer holds none of {model}'s {len(trainable)} trainable parameters "
            f"(e.g. {', '.join(missing[:3])}): build it from the model being compiled, "
            "e.g. torch.optim.AdamW(model.parameters())"
        )
    if missing:
        logger.warning(
            "fxfreeze: the optimizer does not hold %d of %s's trainable parameters (%s%s); they will not train",
            len(missing), model, ", ".join(missing[:5]), ", ..." if len(missing) > 5 else "",
        )


class OptimizerWatch:
    """The global hook of one controller without an optimizer (see the module docstring).

    ``params``: the model's parameters; ``adopt(optimizer, first)``: called once for each
    optimizer found stepping them (``first``: it becomes the clock), inside the optimizer's
    ``step`` after its update."""

    def __init__(self, params: list[torch.nn.Parameter], adopt: Callable[[torch.optim.Optimizer, bool], None]) -> None:
        self._ids = {id(p) for p in params}
        self._adopt = adopt
        self._seen: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()
        self.adopted: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()
        self._handle: Any = None
        self._finished = False
        self._in_hook = 0
        me = weakref.ref(self)

        def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            watch = me()
            if watch is not None:
                watch._on_step(optimizer)

        self._handle = register_optimizer_step_post_hook(hook)

    def _on_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._finished or optimizer in self._seen:
            return
        self._seen.add(optimizer)
        if not any(id(p) in self._ids for g in optimizer.param_groups for p in g["params"]):
            return
        first = not self.adopted
        self.adopted.add(optimizer)
        self._in_hook += 1
        try:
            self._adopt(optimizer, first)
        finally:
            self._in_hook -= 1

    def close(self) -> None:
        """Stop watching; the hook is removed now, or at the next safe point when called
        from inside an optimizer's global hooks."""
        self._finished = True
        self.tidy()

    def tidy(self) -> None:
        """Remove a finished watch's hook (outside torch's loop over the global hooks)."""
        if self._finished and self._handle is not None and not self._in_hook:
            self._handle.remove()
            self._handle = None


#: steps in a row of another optimizer, none of the followed one's, after which it is the clock
REPLACED_AFTER = 3


_CLOCKS: "weakref.WeakSet[ClockWatch]" = weakref.WeakSet()
_CLOCK_HOOK: list[Any] = []  # the one global hook every ClockWatch shares, registered once


def _clock_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for watch in list(_CLOCKS):  # a copy: a controller collected meanwhile leaves the set
        watch._on_step(optimizer)


class ClockWatch:
    """Hands the controller's clock to an optimizer that replaced the followed one (see the
    module docstring). ``controller`` needs ``optimizer``, ``module`` and the fields
    :func:`replace_clock` sets; :meth:`clock_stepped` is called after each step of the
    followed optimizer. Every watch shares one global hook (registered once per process): a
    controller that is dropped leaves nothing behind."""

    def __init__(self, controller: Any) -> None:
        self._controller = weakref.ref(controller)
        self._runs: "weakref.WeakKeyDictionary[torch.optim.Optimizer, int]" = weakref.WeakKeyDictionary()
        self._holds: "weakref.WeakKeyDictionary[torch.optim.Optimizer, bool]" = weakref.WeakKeyDictionary()
        _CLOCKS.add(self)
        if not _CLOCK_HOOK:
            _CLOCK_HOOK.append(register_optimizer_step_post_hook(_clock_hook))

    def clock_stepped(self) -> None:
        self._runs.clear()

    def _on_step(self, optimizer: torch.optim.Optimizer) -> None:
        ctl = self._controller()
        if ctl is None or ctl.optimizer is None or optimizer is ctl.optimizer:
            return
        holds = self._holds.get(optimizer)
        if holds is None:  # read once per optimizer: does it hold the model's parameters?
            self._holds[optimizer] = holds = holds_any(optimizer, {id(p) for p in ctl.module.parameters()})
        if not holds:
            return
        self._runs[optimizer] = runs = self._runs.get(optimizer, 0) + 1
        if runs >= REPLACED_AFTER:
            self._runs.clear()
            replace_clock(ctl, optimizer)

    def close(self) -> None:
        _CLOCKS.discard(self)


def adopt_optimizer(ctl: Any, optimizer: torch.optim.Optimizer, first: bool) -> None:
    """An optimizer ``compile`` was not given stepped the model's parameters (inside its
    ``step``, after the update; :class:`OptimizerWatch`): the first becomes the controller's
    clock and this step counts; later ones are watched for learning-rate steps and frozen
    parameters' state."""
    ctl.optimizers.append(optimizer)
    if ctl.config.release_optimizer_state and ctl.num_frozen:
        ctl._release(ctl.module.frozen_parameter_names())
    if not first:
        logger.info("fxfreeze: %s also steps %s's parameters; its frozen parameters' state is released too",
                    type(optimizer).__name__, ctl.plan.model)
        return
    logger.info("fxfreeze: compile got no optimizer; the controller follows the steps of the %s that steps %s's "
                "parameters (pass optimizer= to choose)", type(optimizer).__name__, ctl.plan.model)
    ctl.optimizer = optimizer
    ctl._hook = optimizer.register_step_post_hook(ctl._after_step)  # from its next step on
    ctl._step()  # this step: its own post-step hooks have already run


def replace_clock(ctl: Any, optimizer: torch.optim.Optimizer) -> None:
    """``optimizer`` replaced the one the controller followed (:class:`ClockWatch`): it is
    the clock from now on, this step included (its own post-step hooks have run)."""
    logger.info("fxfreeze: %s stepped %s's parameters %d times without a step of the %s the controller followed; "
                "it follows %s from now on", type(optimizer).__name__, ctl.plan.model, REPLACED_AFTER,
                type(ctl.optimizer).__name__, type(optimizer).__name__)
    old = ctl.optimizer
    if ctl._hook is not None:
        ctl._hook.remove()  # the old one's own hooks (not the global ones torch is running now)
    # the old one is dropped (its state is the user's to free); other optimizers stay watched
    ctl.optimizers = [optimizer] + [o for o in ctl.optimizers if o is not optimizer and o is not old]
    ctl.optimizer = optimizer
    ctl._hook = optimizer.register_step_post_hook(ctl._after_step)  # from its next step on
    if ctl.config.release_optimizer_state and ctl.num_frozen:
        ctl._release(ctl.module.frozen_parameter_names())
    ctl.step_count += REPLACED_AFTER - 1  # its earlier steps, which no hook counted
    ctl._step()  # this step: its own post-step hooks have already run
