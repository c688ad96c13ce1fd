"""Learning-rate *steps*, told apart from smooth schedules and warm-ups.

The controller records a step-schedule drop (``lr_change`` in its history), and policies
that restart their evidence at one read it from :class:`~fxfreeze.runtime.policies.Signals`.
A *step* is a fall by ``factor`` right after a step at which the rate barely moved. A smooth
schedule changes by large ratios only near zero (the tail of a cosine), where the ratio was
already far from 1 the step before; a rising rate (warm-up) is no step.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

__all__ = ["LrSteps", "learning_rates"]


def learning_rates(optimizers: Iterable[torch.optim.Optimizer]) -> list[float | None]:
    """The learning rate of every param group of every optimizer (None where it is not a number)."""
    out: list[float | None] = []
    for o in optimizers:
        for g in o.param_groups:
            lr = g.get("lr")
            out.append(float(lr) if isinstance(lr, (int, float)) or torch.is_tensor(lr) else None)
    return out


class LrSteps:
    """The last rates seen and how far each moved at the step before (plain state)."""

    def __init__(self, factor: float) -> None:
        self.log_factor = math.log(float(factor))
        self.last: list[float | None] = []
        self.log_ratios: list[float] = []

    def observe(self, lrs: list[float | None]) -> tuple[bool, str]:
        """Did a param group's rate just drop by a step? Returns (changed, description)."""
        log_f = self.log_factor
        if len(self.last) != len(lrs):
            self.last, self.log_ratios = list(lrs), [0.0] * len(lrs)
            return False, ""
        changed, what = False, ""
        for i, (lr, last) in enumerate(zip(lrs, self.last)):
            if lr is None or last is None or lr <= 0 or last <= 0:
                continue
            log_r = math.log(last / lr)  # > 0: the rate fell
            if log_r >= log_f and self.log_ratios[i] < log_f / 4 and not changed:
                changed, what = True, f"learning rate {last:g} -> {lr:g}" + (f" (param group {i})" if len(lrs) > 1 else "")
            self.log_ratios[i] = abs(log_r)
        self.last = list(lrs)
        return changed, what

    def state_dict(self) -> dict[str, Any]:
        return {"last_lr": self.last[0] if self.last else None, "last_lrs": list(self.last),
                "last_log_ratios": list(self.log_ratios)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        lrs = state.get("last_lrs")
        self.last = list(lrs) if isinstance(lrs, list) else ([state["last_lr"]] if state.get("last_lr") is not None else [])
        ratios = state.get("last_log_ratios")
        self.log_ratios = list(ratios) if isinstance(ratios, list) and len(ratios) == len(self.last) else [0.0] * len(self.last)
