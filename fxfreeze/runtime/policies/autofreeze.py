"""``autofreeze``: AutoFreeze (Liu, Agarwal, Venkataraman 2021), a gradient-norm baseline.

Every ``interval`` steps, each active block's gradient L1 norm, accumulated over the
interval, is compared with the previous interval's: ``change = |n_t - n_{t-1}| / n_{t-1}``.
The ``percentile``-th percentile of the changes over the active blocks is the cut-off; the
front blocks whose change is below it, up to the first one at or above it, freeze (the prefix
only grows, never the head). Non-finite gradients skip the interval.

The norms are summed on the gradients' device and read once per interval: reading them every
step (27 ``.item()`` calls per step on a ResNet-8, ``benchmarks/sync_profile.py``) would make
the host wait for the device at each one.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ...errors import FreezeError
from .base import Decision, Policy, Signals
from .rules import autofreeze_changes, autofreeze_rule

__all__ = ["AutoFreezePolicy"]


class AutoFreezePolicy(Policy):
    name = "autofreeze"

    def __init__(self, config: Any, plan: Any) -> None:
        super().__init__(config, plan)
        self.cfg = config.autofreeze
        self.hi = plan.max_frozen
        self.module: Any = None
        self._acc: dict[int, float | torch.Tensor] = {}  # on the device until the interval ends
        self._prev: dict[int, float] = {}
        self._count = 0
        self._bad = False
        self.timeline: list[dict[str, Any]] = []
        self._params: dict[int, list[torch.nn.Parameter]] = {}

    def attach(self, freezer: Any) -> None:
        self.module = freezer.module
        named = self.module.params_by_name
        for i, b in enumerate(self.plan.blocks[: self.hi]):
            self._params[i] = [named[n] for n in b.params if n in named]

    def decide(self, s: Signals) -> Decision | None:
        if self.module is None:
            return None
        k = s.num_frozen
        for i in range(k, self.hi):
            tot = _l1(self._params.get(i, []))
            if tot is not None:
                self._acc[i] = self._acc.get(i, 0.0) + tot
            else:
                self._acc.setdefault(i, 0.0)
        self._count += 1
        if s.loss_nonfinite:
            self._bad = True
        if self._count < self.cfg.interval:
            return None
        acc = self._read()
        bad = self._bad or not all(math.isfinite(v) for v in acc.values())
        self._acc, self._count, self._bad = {}, 0, False
        if bad:
            self._prev = {}
            self.timeline.append({"step": s.step, "skipped": "non-finite gradients or loss"})
            return None
        changes = autofreeze_changes(acc, self._prev)
        self._prev = acc
        self.timeline.append({"step": s.step, "num_frozen": k, "changes": {i: changes[i] for i in sorted(changes)}})
        new = autofreeze_rule(changes, k, self.hi, float(self.cfg.percentile))
        if new is None:
            return None
        return Decision(new, f"AutoFreeze: gradient-norm change of blocks {k}..{new - 1} under the "
                             f"{self.cfg.percentile:g}th percentile")

    def _read(self) -> dict[int, float]:
        """The interval's norms on the host: the one read of the interval."""
        return {i: float(v) for i, v in self._acc.items()}

    def state_dict(self) -> dict[str, Any]:
        """The previous interval's norms and the interval in progress (its accumulated norms
        and step count): a resume inside an interval decides at the same step."""
        return {
            "prev": {int(i): float(v) for i, v in self._prev.items()},
            "acc": {int(i): v for i, v in self._read().items()},
            "count": self._count,
            "bad": self._bad,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict):
            raise FreezeError("autofreeze policy state must be a dict")
        self._prev = {int(i): float(v) for i, v in state.get("prev", {}).items()}
        self._acc = {int(i): float(v) for i, v in state.get("acc", {}).items()}
        self._count = int(state.get("count", 0))
        self._bad = bool(state.get("bad", False))


def _l1(params: list[torch.nn.Parameter]) -> torch.Tensor | None:
    """The L1 norm of the parameters' gradients, as a float32 scalar on the first gradient's
    device (no host read); None when none has a gradient."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return None
    dev = grads[0].device
    parts = [g.abs().sum(dtype=torch.float32) for g in grads]
    return torch.stack([t if t.device == dev else t.to(dev, non_blocking=True) for t in parts]).sum()
