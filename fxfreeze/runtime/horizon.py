"""The run's planned length, learned from a learning-rate scheduler's horizon.

Policies scale their schedules to the planned number of optimizer steps (Egeria's
evaluation spacing, windows and patience; the cache's payback). The Trainer and Lightning
integrations and ``fxfreeze.compile(total_steps=...)`` state it; a plain loop often states
it only to its scheduler: ``CosineAnnealingLR(opt, T_max=total)``,
``OneCycleLR(opt, total_steps=...)``, Hugging Face's ``get_linear_schedule_with_warmup``
(a ``LambdaLR`` that reaches 0 at the last step). This module reads that horizon.

Two questions, answered separately:

- *the horizon in scheduler steps* (:func:`schedule_horizon`): a handler per scheduler
  type, found along the type's MRO, so a subclass inherits its parent's and a user
  registers one for a scheduler of their own (:func:`register_horizon`). A schedule with no
  end (``StepLR``, ``ExponentialLR``, ``ReduceLROnPlateau``, a warm-up alone) has none;
- *scheduler steps to optimizer steps* (:class:`RunLength`): a scheduler is stepped once
  per optimizer step or once per epoch, which its own attributes do not say. It is observed:
  the scheduler's ``last_epoch`` is read at two optimizer steps once it has moved, and the
  ratio converts the horizon.

The scheduler is given (``fxfreeze.compile(scheduler=...)``, ``fm.freezer.attach_scheduler``)
or found once, at the first optimizer step, among the objects that refer to the optimizer
(:func:`find_schedulers`).
"""

from __future__ import annotations

import gc
import logging
import math
from typing import Any, Callable

import torch

from ..errors import FreezeError

__all__ = ["schedule_horizon", "register_horizon", "find_schedulers", "RunLength", "PlannedLength"]

logger = logging.getLogger("fxfreeze")

_SCHED = torch.optim.lr_scheduler
_BASE: type = getattr(_SCHED, "LRScheduler", getattr(_SCHED, "_LRScheduler", object))
#: scheduler type -> horizon in scheduler steps (None: the schedule does not end)
_HANDLERS: dict[type, Callable[[Any], int | None]] = {}
#: the largest scheduler step searched for a LambdaLR's end
_LAMBDA_SEARCH = 1 << 31


def register_horizon(cls: type, handler: Callable[[Any], int | None]) -> None:
    """Teach fxfreeze the horizon of scheduler type ``cls`` (and its subclasses that have
    none of their own): ``handler(scheduler)`` returns the number of scheduler steps after
    which the schedule has run its course, or None if it has no end.

    Example::

        >>> class Halves(torch.optim.lr_scheduler.LambdaLR):
        ...     def __init__(self, opt, total):
        ...         self.total = total
        ...         super().__init__(opt, lambda s: 1.0 if s < total // 2 else 0.5)
        >>> register_horizon(Halves, lambda s: s.total)
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> schedule_horizon(Halves(opt, 300))
        300
    """
    if not isinstance(cls, type) or not callable(handler):
        raise TypeError("register_horizon(cls, handler): a scheduler type and a callable")
    _HANDLERS[cls] = handler


def schedule_horizon(scheduler: Any) -> int | None:
    """Scheduler steps until ``scheduler``'s schedule ends, or None when it has no end or
    its type is unknown. A handler that fails gives None (and a debug log line): a horizon
    is a hint for scheduling, never a reason to stop training.

    Example::

        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> schedule_horizon(torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=500))
        500
        >>> schedule_horizon(torch.optim.lr_scheduler.StepLR(opt, step_size=30)) is None
        True
    """
    for cls in type(scheduler).__mro__:
        handler = _HANDLERS.get(cls)
        if handler is None:
            continue
        try:
            h = handler(scheduler)
        except Exception as e:  # noqa: BLE001 - a hint only
            logger.debug("fxfreeze: the horizon of %s could not be read: %s", type(scheduler).__name__, e)
            return None
        return int(h) if h is not None and int(h) > 0 else None
    return None


def _positive(x: Any) -> int | None:
    return int(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0 else None


def _lambda_end(sched: Any) -> int | None:
    """A ``LambdaLR``'s end: the first step from which every factor is 0 (Hugging Face's
    linear and polynomial schedules with a warm-up). Found by doubling, then bisection; the
    factor must stay 0 past the point found (checked at twice it), and must fall to it from a
    value that is not an underflow (``0.99 ** s`` is 0.0 in floating point from step 74,141:
    it decays forever, it does not end)."""
    fns = list(getattr(sched, "lr_lambdas", []))
    if not fns:
        return None

    def zero(t: int) -> bool:
        return all(float(f(t)) <= 0.0 for f in fns)

    hi = 1
    while not zero(hi):
        hi *= 2
        if hi > _LAMBDA_SEARCH:
            return None
    lo = hi // 2  # not zero (or 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if zero(mid):
            hi = mid
        else:
            lo = mid
    before = max(abs(float(f(hi - 1))) for f in fns) if hi > 1 else 1.0
    return hi if zero(2 * hi) and zero(hi + 1) and before > 1e-30 else None


def _linear_end(sched: Any) -> int | None:
    # a decay to (nearly) nothing ends the run; a warm-up (end_factor >= start_factor) does not
    start, end = float(getattr(sched, "start_factor", 1.0)), float(getattr(sched, "end_factor", 1.0))
    return _positive(sched.total_iters) if end < start and end <= 0.1 * start else None


def _sequential_end(sched: Any) -> int | None:
    milestones, parts = list(getattr(sched, "_milestones", [])), list(getattr(sched, "_schedulers", []))
    if not parts or len(milestones) != len(parts) - 1:
        return None
    last = schedule_horizon(parts[-1])
    return None if last is None else (milestones[-1] if milestones else 0) + last


def _chained_end(sched: Any) -> int | None:
    ends = [schedule_horizon(s) for s in getattr(sched, "_schedulers", [])]
    ends = [e for e in ends if e is not None]
    return max(ends) if ends else None


for _name, _fn in (
    ("OneCycleLR", lambda s: _positive(s.total_steps)),
    ("CosineAnnealingLR", lambda s: _positive(s.T_max)),
    ("PolynomialLR", lambda s: _positive(s.total_iters)),
    ("LinearLR", _linear_end),
    ("LambdaLR", _lambda_end),
    ("SequentialLR", _sequential_end),
    ("ChainedScheduler", _chained_end),
):
    if hasattr(_SCHED, _name):
        register_horizon(getattr(_SCHED, _name), _fn)


def find_schedulers(optimizers: list[torch.optim.Optimizer]) -> list[Any]:
    """The learning-rate schedulers that drive one of ``optimizers``: objects that refer to
    an optimizer directly or through their ``__dict__`` (one ``gc.get_referrers`` scan per
    optimizer, done once: the scheduler object is not reachable from the optimizer).

    Example::

        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
        >>> find_schedulers([opt]) == [sched]
        True
    """
    found: list[Any] = []
    for opt in optimizers:
        for r in gc.get_referrers(opt):
            # a dict is looked through (one more scan) only when it can be a scheduler's __dict__
            owners = [r] if isinstance(r, _BASE) else (
                [o for o in gc.get_referrers(r) if isinstance(o, _BASE) and getattr(o, "__dict__", None) is r]
                if isinstance(r, dict) and r.get("optimizer") is opt and "last_epoch" in r else []
            )
            for o in owners:
                if getattr(o, "optimizer", None) is opt and all(o is not f for f in found):
                    found.append(o)
    return found


class RunLength:
    """The planned number of optimizer steps, from a scheduler's horizon.

    ``observe(step)`` is called at every optimizer step (``step`` counts them, from 1); the
    scheduler has then been stepped ``last_epoch`` times. Once ``last_epoch`` has moved since
    the first observation, optimizer steps per scheduler step are known, and so is the total:
    the steps done plus the scheduler steps left, converted. Stepped per optimizer step, that
    is known at the second step; stepped per epoch, after the first epoch.

    Example::

        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)  # 10 epochs
        >>> rl = RunLength(sched)
        >>> for step in range(1, 8):            # 4 optimizer steps per epoch
        ...     opt.step()
        ...     total = rl.observe(step)
        ...     if step % 4 == 0:
        ...         sched.step()
        >>> total
        40
    """

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.horizon = schedule_horizon(scheduler)
        self._first: tuple[int, int] | None = None
        #: the planned total, once known
        self.total: int | None = None

    def observe(self, step: int) -> int | None:
        if self.horizon is None or self.total is not None:
            return self.total
        done = getattr(self.scheduler, "last_epoch", None)
        if not isinstance(done, int):
            return None
        if self._first is None:
            self._first = (step, done)
            return None
        s0, d0 = self._first
        if done <= d0:
            return None
        per = (step - s0) / (done - d0)  # optimizer steps per scheduler step
        # at this optimizer step the scheduler has been stepped `done` times (it is stepped
        # after the optimizer): steps before this one, then the scheduler steps left
        self.total = max(step, int(round(step - 1 + (self.horizon - done) * per)))
        return self.total


class PlannedLength:
    """The run's planned length as the controller learns it: from schedulers given
    (:meth:`attach`) or, when none was, from those found at the first observation
    (:func:`find_schedulers`); the first horizon known wins and is kept (``learned``, in the
    controller's state)."""

    def __init__(self) -> None:
        self._run_lengths: list[RunLength] = []
        self._looked = False
        #: the planned total of optimizer steps, once learned
        self.learned: int | None = None

    def attach(self, scheduler: Any) -> None:
        if scheduler is None or not hasattr(scheduler, "last_epoch"):
            raise FreezeError(f"expected a learning-rate scheduler (with last_epoch), got {type(scheduler).__name__}")
        self._looked = True
        if all(r.scheduler is not scheduler for r in self._run_lengths):
            self._run_lengths.append(RunLength(scheduler))

    def observe(self, step: int, optimizers: list[torch.optim.Optimizer]) -> int | None:
        """At each optimizer step (``step`` counts them, from 1): the planned total once known."""
        if self.learned is not None:
            return self.learned
        if not self._looked:
            self._looked = True
            self._run_lengths = [RunLength(s) for s in find_schedulers(optimizers)]
        for r in self._run_lengths:
            total = r.observe(step)
            if total is not None:
                self.learned = total
                logger.info("fxfreeze: the run is planned for %d optimizer steps (the horizon of %s)",
                            total, type(r.scheduler).__name__)
                break
        return self.learned
