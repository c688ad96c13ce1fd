"""``manual``: freeze by hand (``fm.freeze_prefix(k)``) or by a step/epoch schedule."""

from __future__ import annotations

from typing import Any

from ...errors import ConfigError
from .base import Decision, Policy, Signals

__all__ = ["ManualPolicy"]


class ManualPolicy(Policy):
    """Applies ``config.manual.schedule`` ({step or epoch: k}). A scheduled value is applied
    once, when it comes due, so a prefix set by hand in between is not overridden."""

    name = "manual"
    adaptive = False  # the user's schedule: the safety net leaves it alone

    def __init__(self, config: Any, plan: Any) -> None:
        super().__init__(config, plan)
        self._applied: int | None = None  # schedule key last applied
        for when, k in config.manual.schedule.items():
            if k > plan.max_frozen:
                raise ConfigError(
                    f"manual.schedule[{when}] asks for {k} frozen blocks, but the plan of {plan.model} has "
                    f"{len(plan.blocks)} blocks and allows at most {plan.max_frozen} frozen (the head trains)"
                )

    def decide(self, signals: Signals) -> Decision | None:
        cfg = self.config.manual
        if not cfg.schedule:
            return None
        if cfg.unit == "epoch" and not signals.epoch_known:
            raise ConfigError(
                "manual.unit is 'epoch' but nothing tells the controller the epoch: set steps_per_epoch in the "
                "config, call fm.freezer.set_epoch(epoch) each epoch, or use a Trainer/Lightning callback"
            )
        now = signals.step if cfg.unit == "step" else signals.epoch
        due = [key for key in cfg.schedule if key <= now]
        if not due:
            return None
        key = max(due)
        if key == self._applied:
            return None
        self._applied = key
        k = cfg.schedule[key]
        if k == signals.num_frozen:
            return None
        return Decision(k, f"schedule: {k} blocks from {cfg.unit} {key}")

    def state_dict(self) -> dict[str, Any]:
        return {"applied": self._applied}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._applied = state.get("applied")
