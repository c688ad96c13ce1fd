"""The freezing controller: owns the frozen prefix and the policy, runs after each step.

``step()`` runs after every optimizer step (automatically through
``Optimizer.register_step_post_hook`` when ``compile`` got the optimizer). It tracks the
step, epoch and learning rate, asks the policy, applies freeze and unfreeze decisions,
releases optimizer state of newly frozen parameters and records every event in
``history`` and on the standard logger ``fxfreeze`` (whose level it never touches).

``state_dict()`` / ``load_state_dict()`` hold the frozen prefix, the counters, the policy's
state and the history, as plain Python data (``torch.load(..., weights_only=True)`` reads
it); parameters are referred to by name, so a resume in a fresh process restores the same
frozen set.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from ..config import FreezeConfig
from ..errors import FreezeError
from .policies import Decision, Signals, make_policy

__all__ = ["Freezer"]

logger = logging.getLogger("fxfreeze")
_STATE_VERSION = 1


class Freezer:
    """Controller of one :class:`~fxfreeze.runtime.module.FreezableModule`."""

    def __init__(self, module: Any, config: FreezeConfig, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.module = module
        self.config = config
        self.plan = module.plan
        self.policy = make_policy(config, self.plan)
        self.optimizer = optimizer
        self.history: list[dict[str, Any]] = []
        self.step_count = 0
        self._epoch = 0
        self._last_lr: float | None = None
        self._last_log_ratio = 0.0
        self._loss: float | None = None
        self._hook: Any = None
        self.attach_optimizer(optimizer)
        #: set by fxfreeze.distributed.FreezeDDP: maps this rank's proposed prefix to the agreed one
        self.agree: Any = None
        self.policy.attach(self)

    def attach_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Run after every step of ``optimizer`` (instead of one attached before) and
        release its state for frozen parameters. Wrappers that hold the real optimizer as
        ``.optimizer`` (accelerate's, Lightning's) are unwrapped: their own ``step`` may skip
        the real one (gradient accumulation, an overflowing fp16 step), and a skipped step
        is not a step."""
        while optimizer is not None and isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
            optimizer = optimizer.optimizer
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise FreezeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.optimizer = optimizer
        if optimizer is not None:
            self._hook = optimizer.register_step_post_hook(self._after_step)
        if optimizer is not None and self.config.release_optimizer_state and self.num_frozen:
            for n in self.module.frozen_parameter_names():
                optimizer.state.pop(self.module.params_by_name[n], None)

    # -- signals ---------------------------------------------------------------------------
    @property
    def num_frozen(self) -> int:
        return self.module.num_frozen

    @property
    def epoch(self) -> int:
        spe = self.config.steps_per_epoch
        return self.step_count // spe if spe else self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Tell epoch-based policies which epoch is running."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise FreezeError(f"epoch must be a non-negative int, got {epoch!r}")
        self._epoch = epoch

    def observe_loss(self, loss: float | torch.Tensor) -> None:
        """Give the policy the latest training loss (optional)."""
        self._loss = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)

    def _lr(self) -> float | None:
        if self.optimizer is None or not self.optimizer.param_groups:
            return None
        lr = self.optimizer.param_groups[0].get("lr")
        return float(lr) if isinstance(lr, (int, float)) or torch.is_tensor(lr) else None

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.step()

    def step(self, loss: float | torch.Tensor | None = None) -> Decision | None:
        """Run once after each optimizer step; returns the decision applied, if any."""
        if loss is not None:
            self.observe_loss(loss)
        self.step_count += 1
        lr = self._lr()
        changed = False
        if lr is not None and self._last_lr is not None and self._last_lr > 0 and lr > 0:
            # a *step*: a jump by the factor right after a step at which the rate barely moved.
            # A smooth schedule changes by large ratios only near zero (the tail of a cosine,
            # the start of a warm-up), where the ratio was already far from 1 the step before.
            log_r = abs(math.log(lr / self._last_lr))
            log_f = math.log(float(self.config.lr_change_factor))
            changed = log_r >= log_f and self._last_log_ratio < log_f / 4
            self._last_log_ratio = log_r
        if changed:
            self._record("lr_change", self.num_frozen, self.num_frozen, f"learning rate {self._last_lr:g} -> {lr:g}")
        if lr is not None:
            self._last_lr = lr
        loss_v = self._loss
        nonfinite = loss_v is not None and not math.isfinite(loss_v)
        if nonfinite:
            loss_v = None
        signals = Signals(
            step=self.step_count,
            epoch=self.epoch,
            loss=loss_v,
            lr=lr,
            lr_changed=changed,
            num_frozen=self.num_frozen,
            max_frozen=self.plan.max_frozen,
            loss_nonfinite=nonfinite,
        )
        decision = self.policy.decide(signals)
        if self.agree is not None:  # data-parallel: every rank applies rank 0's decision
            proposed = decision.num_frozen if decision is not None else self.num_frozen
            agreed = self.agree(proposed)
            if agreed != proposed or decision is None:
                decision = None if agreed == self.num_frozen else Decision(agreed, "decided on rank 0")
        if decision is not None and decision.num_frozen != self.num_frozen:
            self.freeze_prefix(decision.num_frozen, reason=decision.reason)
            return decision
        return None

    # -- actions ---------------------------------------------------------------------------
    def freeze_prefix(self, k: int, *, reason: str = "by hand") -> None:
        """Set the frozen prefix to ``k`` blocks, releasing optimizer state as configured."""
        k = self.module.check_prefix(k)
        old = self.num_frozen
        if k == old:
            return
        before = set(self.module.frozen_parameter_names(old))
        self.module._set_prefix(k)
        newly = [n for n in self.module.frozen_parameter_names(k) if n not in before]
        if self.optimizer is not None and self.config.release_optimizer_state:
            named = self.module.params_by_name
            for n in newly:
                self.optimizer.state.pop(named[n], None)
        self._record("freeze" if k > old else "unfreeze", old, k, reason)

    def _record(self, action: str, old: int, new: int, reason: str) -> None:
        lo, hi = sorted((old, new))
        event = {
            "step": self.step_count,
            "epoch": self.epoch,
            "action": action,
            "num_frozen": new,
            "blocks": [b.name for b in self.plan.blocks[lo:hi]],
            "reason": reason,
        }
        self.history.append(event)
        if action == "lr_change":
            logger.info("step %d: %s", self.step_count, reason)
        else:
            logger.info(
                "step %d: %s %s (now %d of %d blocks frozen): %s",
                self.step_count, action, ", ".join(event["blocks"]), new, len(self.plan.blocks), reason,
            )

    def detach(self) -> None:
        """Stop running after optimizer steps and stop the policy's background work."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.policy.close()

    # -- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "blocks": [b.name for b in self.plan.blocks],
            "num_frozen": self.num_frozen,
            "step": self.step_count,
            "epoch": self._epoch,
            "last_lr": self._last_lr,
            "policy_name": self.config.policy,
            "policy": self.policy.state_dict(),
            "history": [dict(e) for e in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise FreezeError("not an fxfreeze controller state (key 'version' missing or unsupported)")
        for key in ("blocks", "num_frozen", "step", "epoch", "policy", "history", "policy_name"):
            if key not in state:
                raise FreezeError(f"controller state is missing the key {key!r}")
        names = [b.name for b in self.plan.blocks]
        if list(state["blocks"]) != names:
            raise FreezeError(
                "controller state was saved for a different plan "
                f"({len(state['blocks'])} blocks vs {len(names)}); compile with the same plan before resuming"
            )
        if state["policy_name"] != self.config.policy:
            raise FreezeError(
                f"controller state was saved with policy {state['policy_name']!r}, this controller uses {self.config.policy!r}"
            )
        k = self.module.check_prefix(int(state["num_frozen"]))
        self.module._set_prefix(k)
        if self.optimizer is not None and self.config.release_optimizer_state:
            named = self.module.params_by_name
            for n in self.module.frozen_parameter_names(k):
                self.optimizer.state.pop(named[n], None)
        self.step_count = int(state["step"])
        self._epoch = int(state["epoch"])
        self._last_lr = state.get("last_lr")
        self.policy.load_state_dict(dict(state["policy"]))
        self.history = [dict(e) for e in state["history"]]
