"""``manual``: freeze by hand (``fm.freeze_prefix(k)``) or by a step/epoch schedule."""

from __future__ import annotations

from typing import Any

from .base import Decision, Policy, Signals

__all__ = ["ManualPolicy"]


class ManualPolicy(Policy):
    """Applies ``config.manual.schedule`` ({step or epoch: k}). A scheduled value is applied
    once, when it comes due, so a prefix set by hand in between is not overridden."""

    name = "manual"

    def __init__(self, config: Any, plan: Any) -> None:
        super().__init__(config, plan)
        self._applied: int | None = None  # schedule key last applied

    def decide(self, signals: Signals) -> Decision | None:
        cfg = self.config.manual
        if not cfg.schedule:
            return None
        now = signals.step if cfg.unit == "step" else signals.epoch
        due = [key for key in cfg.schedule if key <= now]
        if not due:
            return None
        key = max(due)
        if key == self._applied:
            return None
        self._applied = key
        k = min(cfg.schedule[key], signals.max_frozen)
        if k == signals.num_frozen:
            return None
        return Decision(k, f"schedule: {k} blocks from {cfg.unit} {key}")

    def state_dict(self) -> dict[str, Any]:
        return {"applied": self._applied}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._applied = state.get("applied")
