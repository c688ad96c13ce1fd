"""No freeze before a given optimizer step (``FreezeConfig.not_before``).

Why: code in the training loop may read the gradient of every parameter until some step,
and a parameter fxfreeze froze has none. PEFT's AdaLoRA allocates its ranks from
``p * p.grad`` of every LoRA parameter at each ``update_and_allocate(step)`` up to
``total_step - tfinal``: after the first freeze the user's loop raised ``TypeError:
unsupported operand type(s) for *: 'Parameter' and 'NoneType'``. :func:`not_before_of_model`
reads that step from a PEFT model's own config (any adapter config with ``total_step`` and
``tfinal``), so ``compile`` sets it by itself. A warm-up during which nothing may freeze is the
other use.

A deeper decision before that step waits, and the latest one is applied at that step: a
manual schedule decides once, an adaptive policy would decide again anyway. Unfreezing is
never held. The waiting decision is part of the controller's state, so a resume keeps it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..errors import FreezeError
from .policies import Decision

__all__ = ["FreezeGate", "not_before_for", "not_before_of_model"]

logger = logging.getLogger("fxfreeze")


def not_before_of_model(model: nn.Module) -> tuple[int, str] | None:
    """``(step, why)``: the first step at which the model's own training code no longer reads
    every parameter's gradient, when its PEFT adapter config says so (AdaLoRA's rank
    allocation ends at ``total_step - tfinal``); None otherwise.

    Example::

        >>> import torch
        >>> m = torch.nn.Linear(2, 2)
        >>> m.peft_config = {"default": type("C", (), {"total_step": 500, "tfinal": 100})()}
        >>> not_before_of_model(m)[0]
        401
    """
    found: tuple[int, str] | None = None
    for name, mod in model.named_modules():
        configs = getattr(mod, "peft_config", None)
        if not isinstance(configs, Mapping):
            continue
        for adapter, c in configs.items():
            total, final = getattr(c, "total_step", None), getattr(c, "tfinal", None)
            if isinstance(total, int) and isinstance(final, int) and not isinstance(total, bool) and total > final >= 0:
                # the allocation reads them at its step total_step - tfinal too (the final mask);
                # a freeze after fxfreeze's step s first drops the gradients of the loop's step s
                # (0-based) or s + 1 (1-based): s > total_step - tfinal is safe for both
                step = total - final + 1
                if found is None or step > found[0]:
                    found = (step, f"adapter {adapter!r} of {name or type(model).__name__} reads every parameter's "
                                   f"gradient to allocate its ranks until its step {step - 1} (total_step - tfinal)")
    return found


def not_before_for(config: Any, model: nn.Module) -> int:
    """The config's ``not_before``; when it is None, what the model's PEFT config implies
    (:func:`not_before_of_model`, said once), else 0."""
    if config.not_before is not None:
        return int(config.not_before)
    found = not_before_of_model(model)
    if found is None:
        return 0
    logger.info("fxfreeze: no freeze before step %d: %s (set not_before to choose otherwise)", *found)
    return found[0]


class FreezeGate:
    """Holds freezes until step ``not_before``."""

    def __init__(self, not_before: int) -> None:
        self.not_before = int(not_before)
        self._held: Decision | None = None

    def __call__(self, decision: Decision | None, step: int, k: int) -> Decision | None:
        """The decision to apply at optimizer step ``step`` with ``k`` blocks frozen."""
        if not self.not_before:
            return decision
        if step < self.not_before:
            if decision is not None and decision.num_frozen > k:
                if self._held is None:
                    logger.info("fxfreeze step %d: a freeze (%d blocks) waits for step %d (not_before): %s",
                                step, decision.num_frozen, self.not_before, decision.reason)
                self._held = decision
                return None
            if decision is not None:  # an unfreeze, never held; it voids a waiting freeze
                self._held = None
            return decision
        held, self._held = self._held, None
        if decision is None and held is not None and held.num_frozen > k:
            return Decision(held.num_frozen, f"{held.reason} (held until step {self.not_before})")
        return decision

    def state_dict(self) -> dict[str, Any] | None:
        return None if self._held is None else {"num_frozen": self._held.num_frozen, "reason": self._held.reason}

    def load_state_dict(self, state: Any) -> None:
        if state is None:
            self._held = None
        elif isinstance(state, Mapping) and isinstance(state.get("num_frozen"), int) and isinstance(state.get("reason"), str):
            self._held = Decision(state["num_frozen"], state["reason"])
        else:
            raise FreezeError(f"controller state 'held' must be null or a mapping with num_frozen and reason, got {state!r}")
