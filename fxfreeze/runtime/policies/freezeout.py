"""``freezeout``: FreezeOut (Brock, Lim, Ritchie, Weston 2017), freezing times only.

Block ``i`` of the ``n`` freezable blocks freezes at step
``scale(t0 + (1 - t0) * i / n) * total_steps`` where ``scale`` is ``x``, ``x**2`` or
``x**3`` (as in the authors' code). FreezeOut also anneals each layer's learning rate to
zero before its freeze; fxfreeze leaves learning rates to the user's scheduler.
"""

from __future__ import annotations

from typing import Any

from ...errors import ConfigError
from .base import Decision, Policy, Signals

__all__ = ["FreezeOutPolicy", "freeze_times"]

_SCALE = {"linear": 1, "squared": 2, "cubic": 3}


def freeze_times(n: int, t0: float, scaling: str, total_steps: int) -> list[int]:
    """Step at which each of ``n`` blocks freezes, non-decreasing."""
    p = _SCALE[scaling]
    return [int(round((t0 + (1 - t0) * i / n) ** p * total_steps)) for i in range(n)]


class FreezeOutPolicy(Policy):
    name = "freezeout"
    adaptive = False  # the user's schedule: the safety net leaves it alone

    def __init__(self, config: Any, plan: Any) -> None:
        super().__init__(config, plan)
        fo = config.freezeout
        total = fo.total_steps if fo.total_steps is not None else config.total_steps
        if total is None:
            raise ConfigError(
                "policy 'freezeout' needs the length of training: set freezeout.total_steps (or total_steps, "
                "or pass total_steps= to fxfreeze.compile; the Trainer and Lightning integrations set it)"
            )
        self.times = freeze_times(plan.max_frozen, float(fo.t0), fo.scaling, int(total))

    def decide(self, signals: Signals) -> Decision | None:
        k = sum(1 for t in self.times if t <= signals.step)
        k = min(k, signals.max_frozen)
        if k > signals.num_frozen:
            return Decision(k, f"FreezeOut: block {k - 1} due at step {self.times[k - 1]}")
        return None
