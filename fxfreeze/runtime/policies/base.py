"""The policy interface: per-step signals in, a frozen-prefix decision out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from ...config import FreezeConfig
from ...plan import FreezePlan

__all__ = ["Signals", "Decision", "Policy"]


@dataclass(frozen=True)
class Signals:
    """What a policy sees after each optimizer step."""

    step: int
    epoch: int
    loss: float | None
    lr: float | None
    lr_changed: bool
    num_frozen: int
    max_frozen: int
    #: the latest observed loss was NaN or infinite (``loss`` is then None)
    loss_nonfinite: bool = False
    #: the epoch is known (``steps_per_epoch`` configured or ``set_epoch`` called)
    epoch_known: bool = True
    #: the planned number of optimizer steps, when known
    total_steps: int | None = None


@dataclass(frozen=True)
class Decision:
    """Set the frozen prefix to ``num_frozen`` blocks, for ``reason``."""

    num_frozen: int
    reason: str


class Policy(ABC):
    """Decides how many leading blocks are frozen. Stateless policies need only
    :meth:`decide`; stateful ones also implement :meth:`state_dict` /
    :meth:`load_state_dict` so that a resume continues where training stopped."""

    name: str = "policy"
    #: decides from evidence gathered while training (the safety net watches its freezes);
    #: False for a schedule the user wrote (``manual``, ``freezeout``)
    adaptive: bool = True

    def __init__(self, config: FreezeConfig, plan: FreezePlan) -> None:
        self.config = config
        self.plan = plan

    @abstractmethod
    def decide(self, signals: Signals) -> Decision | None:
        """Return a decision, or None to leave the prefix as it is."""

    def attach(self, freezer: Any) -> None:
        """Called once by the controller; policies that need the module (to measure
        activations, say) take it from ``freezer.module``."""
        return None

    def close(self) -> None:
        """Release background resources (threads); called by ``Freezer.detach``."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
