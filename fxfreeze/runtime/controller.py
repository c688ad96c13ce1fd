"""The freezing controller: owns the frozen prefix and the policy, runs after each step.

``step()`` runs after every optimizer step (automatically through
``Optimizer.register_step_post_hook`` when ``compile`` got the optimizer; without one, the
first optimizer that steps the model's parameters is adopted: :mod:`.adopt`). It tracks the
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
from typing import Any, Callable

import torch

from ..config import FreezeConfig
from ..errors import FreezeError
from .adopt import ClockWatch, OptimizerWatch, adopt_optimizer, check_holds, real_optimizer
from .gate import FreezeGate, not_before_for
from .horizon import PlannedLength
from .loss_reader import LossReader
from .lr_steps import LrSteps, learning_rates
from .safety import SafetyNet
from .policies import Decision, Signals, make_policy
from .untrainable import UntrainableBlocks

__all__ = ["Freezer"]

logger = logging.getLogger("fxfreeze")
_STATE_VERSION = 1


class Freezer:
    """Controller of one :class:`~fxfreeze.runtime.module.FreezableModule`."""

    def __init__(self, module: Any, config: FreezeConfig, optimizer: Any = None, scheduler: Any = None) -> None:
        self.module = module
        self.config = config
        self.plan = module.plan
        self.policy = make_policy(config, self.plan)
        self.optimizer: torch.optim.Optimizer | None = None
        self.history: list[dict[str, Any]] = []
        self.step_count = 0
        self._epoch = 0
        self._epoch_set = False
        self._lr_steps = LrSteps(config.lr_change_factor)
        self.optimizers: list[torch.optim.Optimizer] = []
        self._unsettled: list[str] = []  # frozen in a round of several optimizers (see _apply)
        self._loss: float | torch.Tensor | None = None
        self._hook: Any = None
        self._watch: OptimizerWatch | None = None
        self.attach_optimizer(optimizer)
        if self.optimizer is None:  # no clock yet: follow the first optimizer that steps the model
            self._watch = OptimizerWatch(list(module.parameters()), lambda o, first: adopt_optimizer(self, o, first))
        self._clock = ClockWatch(self)  # an optimizer that replaces the followed one gets the clock
        self._agree: Callable[[int], int | None] | None = None
        self._agreement_state: Any = None
        self.safety = SafetyNet(config.safety_net)
        self._loss_reader = LossReader()
        self._planned = PlannedLength()  # the run length from an LR scheduler (horizon.py)
        if scheduler is not None:
            self.attach_scheduler(scheduler)
        self._untrainable = UntrainableBlocks(module)
        self._gate = FreezeGate(not_before_for(config, module.model))
        self.policy.attach(self)

    def set_agreement(self, hook: Callable[[int], int | None] | None) -> None:
        """Route every decision through ``hook``: after each optimizer step it gets the prefix
        this process proposes (the policy's decision, or the current prefix) and returns the
        prefix to apply, the same on every process, or None for no change
        (:class:`fxfreeze.distributed.FreezeDDP` broadcasts rank 0's). A hook with
        ``state_dict``/``load_state_dict`` (decisions in flight) is saved with the controller's
        state and restored from it. None removes it.

        Example::

            >>> # fm.freezer.set_agreement(lambda proposed: broadcast_from_rank0(proposed))
        """
        if hook is not None and not callable(hook):
            raise FreezeError(f"the agreement hook must be callable, got {type(hook).__name__}")
        self._agree = hook
        load = getattr(hook, "load_state_dict", None)
        if load is not None and self._agreement_state is not None:  # resumed before the hook was set
            load(self._agreement_state)
            self._agreement_state = None

    def attach_optimizer(self, optimizer: Any) -> None:
        """Run after every step of ``optimizer`` (instead of one attached before) and
        release its state for frozen parameters. ``optimizer`` may be a list: the first one's
        steps are the controller's clock, and every param group of every optimizer is
        watched for learning-rate steps and has its frozen parameters' state released.
        Wrappers that hold the real optimizer as ``.optimizer`` (accelerate's, Lightning's)
        are unwrapped: their own ``step`` may skip the real one (gradient accumulation, an
        overflowing fp16 step), and a skipped step is not a step."""
        given = [] if optimizer is None else list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
        opts: list[torch.optim.Optimizer] = []
        for o in map(real_optimizer, given):
            if not isinstance(o, torch.optim.Optimizer):
                raise FreezeError(f"optimizer must be a torch.optim.Optimizer, got {type(o).__name__}")
            opts.append(o)
        if opts:
            check_holds(self.module, opts)
        if self._watch is not None:  # chosen explicitly: nothing to adopt
            self._watch.close()
            self._watch = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.optimizers = opts
        self.optimizer = opts[0] if opts else None
        if self.optimizer is not None:
            self._hook = self.optimizer.register_step_post_hook(self._after_step)
        if self.config.release_optimizer_state and self.num_frozen:
            self._release(self.module.frozen_parameter_names())

    def attach_scheduler(self, scheduler: Any) -> None:
        """Learn the run's planned length from ``scheduler``'s horizon (a cosine's ``T_max``, a
        one-cycle's ``total_steps``, a linear decay's end: :mod:`fxfreeze.runtime.horizon`),
        for the policies and the cache, when neither the config nor an integration states
        ``total_steps``. Found by itself at the first optimizer step when not given."""
        self._planned.attach(scheduler)

    @property
    def planned_steps(self) -> int | None:
        """The planned number of optimizer steps: the config's ``total_steps`` (set by
        ``compile(total_steps=...)`` and the integrations), else a scheduler's horizon once
        learned, else None."""
        return self.config.total_steps or self._planned.learned

    def _settle(self) -> None:
        """The round of a freeze is over: its parameters drop their gradients and state."""
        frozen = set(self.module.frozen_parameter_names())
        names, self._unsettled = [n for n in self._unsettled if n in frozen], []
        for n in names:
            self.module.params_by_name[n].grad = None
        if self.config.release_optimizer_state:
            self._release(names)

    def _release(self, names: list[str]) -> None:
        """Drop optimizer state (momentum, Adam moments) of these parameters, everywhere."""
        for o in self.optimizers:
            for n in names:
                o.state.pop(self.module.params_by_name[n], None)

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
        self._epoch_set = True

    def observe_loss(self, loss: float | torch.Tensor) -> None:
        """Give the policy and the safety net the latest training loss. Read by itself from a
        model output with a scalar ``loss``; a loop that computes its loss outside the model
        calls this once per step (the integrations do)."""
        self._loss = loss.detach() if isinstance(loss, torch.Tensor) else float(loss)

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._watch is not None:
            self._watch.tidy()  # a finished watch's global hook goes here, outside torch's loop over them
        self._clock.clock_stepped()
        self._step()

    def step(self, loss: float | torch.Tensor | None = None) -> Decision | None:
        """Run once after each optimizer step; returns the decision applied, if any.

        Called by hand, it is the clock: an optimizer followed because ``compile`` got none
        (:mod:`.adopt`) stops driving the controller. Such a call right after that optimizer
        counted its step stands for the same step (only its ``loss`` is taken)."""
        if self._watch is not None:
            followed = self._hook is not None
            self._watch.close()
            self._watch = None
            if followed:
                self._hook.remove()
                self._hook = None
                logger.warning(
                    "fxfreeze: fm.freezer.step() was called by hand while the controller followed %s's steps; "
                    "from now on it counts only these calls (pass optimizer= to compile to let it follow the "
                    "optimizer instead, without calling step())", type(self.optimizer).__name__,
                )
                if loss is not None:
                    self.observe_loss(loss)
                return None
        return self._step(loss)

    def _step(self, loss: float | torch.Tensor | None = None) -> Decision | None:
        if loss is not None:
            self.observe_loss(loss)
        self.step_count += 1
        self.module.check_calls()  # a loop that trains in eval mode, or calls the model itself (routed here once)
        regranted = self._untrainable.regranted(self.num_frozen)  # frozen parameters the user made trainable
        if regranted is not None:
            self._apply(*regranted, watched=False)
        if not self.config.total_steps:
            self._planned.observe(self.step_count, self.optimizers)
        lrs = learning_rates(self.optimizers)
        lr = lrs[0] if lrs else None
        changed, what = self._lr_steps.observe(lrs)
        if changed:
            self._record("lr_change", self.num_frozen, self.num_frozen, what)
        # read without a host synchronisation per step: on an accelerator the losses of
        # earlier steps arrive now (loss_reader.py); on the CPU this step's, at once
        read = self._loss_reader.push(self.step_count, self._loss)
        self._loss = None  # a loss is for the step it was observed in
        nonfinite = False
        loss_v = None
        for st, v in read:
            if not math.isfinite(v):
                nonfinite = True
                continue
            self.safety.observe(st, v)
            if st == self.step_count:
                loss_v = v
        k, top, adaptive = self.num_frozen, self.plan.max_frozen, bool(getattr(self.policy, "adaptive", True))
        seen = self._untrainable.seen(k, top) if adaptive else k  # judged from the first block that trains
        signals = Signals(
            step=self.step_count, epoch=self.epoch, loss=loss_v, lr=lr, lr_changed=changed,
            num_frozen=seen, max_frozen=top, loss_nonfinite=nonfinite,
            epoch_known=bool(self.config.steps_per_epoch) or self._epoch_set,
            total_steps=self.planned_steps,
        )
        decision = self._gate(self.policy.decide(signals), self.step_count, k)  # no freeze before not_before
        undo = self.safety.verdict(self.step_count, self.num_frozen)
        if undo is not None:  # the last freeze made the loss worse: it wins over the policy
            decision = Decision(*undo)
        elif decision is not None and decision.num_frozen > self.num_frozen:  # blocks on hold stay trainable
            capped = self.safety.cap(self.step_count, decision.num_frozen)
            if capped <= self.num_frozen:
                decision = None
            elif capped != decision.num_frozen:
                decision = Decision(capped, decision.reason)
        if adaptive:  # a freeze within the blocks the user froze changes nothing; past them, takes them
            decision = self._untrainable.widen(decision, k, seen, top)
        decision = self._untrainable.cap(decision, k, top)  # something must stay trainable
        if self._agree is not None:  # data-parallel: every rank applies rank 0's decision
            proposed = decision.num_frozen if decision is not None else self.num_frozen
            agreed = self._agree(proposed)
            if agreed is None:  # nothing to apply this step (a decision may be in flight)
                agreed = self.num_frozen
            if agreed != proposed or decision is None:
                decision = None if agreed == self.num_frozen else Decision(agreed, "decided on rank 0")
        if decision is not None and decision.num_frozen != self.num_frozen:
            self._apply(decision.num_frozen, decision.reason, watched=adaptive, in_round=True)
            return decision
        return None

    # -- actions ---------------------------------------------------------------------------
    def freeze_prefix(self, k: int, *, reason: str = "by hand") -> None:
        """Set the frozen prefix to ``k`` blocks, releasing optimizer state as configured.
        A freeze by hand is the user's choice: the safety net does not watch it."""
        self._apply(k, reason, watched=False)

    def _apply(self, k: int, reason: str, watched: bool, in_round: bool = False) -> None:
        """``in_round``: after the clock's step, other optimizers (Muon beside AdamW) may still
        step: newly frozen parameters keep gradients and state until the model's next call."""
        k = self.module.check_prefix(k)
        old = self.num_frozen
        if k == old:
            return
        before = set(self.module.frozen_parameter_names(old))
        later = in_round and len(self.optimizers) > 1
        self.module._set_prefix(k, keep_grads=later)
        newly = [n for n in self.module.frozen_parameter_names(k) if n not in before]
        if later:
            self._unsettled += newly
            self.module._after_round = self._settle
        elif self.config.release_optimizer_state:
            self._release(newly)
        self._record("freeze" if k > old else "unfreeze", old, k, reason)
        self.safety.on_change(self.step_count, old, k, watch=watched)

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
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        self._clock.close()
        self.policy.close()

    # -- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        for st, v in self._loss_reader.flush():  # losses still on the way count before the checkpoint
            if math.isfinite(v):
                self.safety.observe(st, v)
        return {
            "version": _STATE_VERSION,
            "blocks": [b.name for b in self.plan.blocks],
            "num_frozen": self.num_frozen,
            "step": self.step_count,
            "epoch": self._epoch,
            "epoch_set": self._epoch_set,
            **self._lr_steps.state_dict(),
            "learned_total_steps": self._planned.learned,
            "policy_name": self.config.policy,
            "policy": self.policy.state_dict(),
            "safety": self.safety.state_dict(),
            "history": [dict(e) for e in self.history],
            "agreement": self._agree.state_dict() if hasattr(self._agree, "state_dict") else self._agreement_state,
            "held": self._gate.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`. Everything is checked first, and a state that
        fails halfway is rolled back: on error nothing has changed."""
        self._check_state(state)
        before = self.state_dict()
        try:
            self._apply_state(state)
        except Exception as e:  # noqa: BLE001 - roll back, then report one clear error
            self._apply_state(before)
            raise FreezeError(f"the controller state cannot be loaded ({type(e).__name__}: {e}); nothing was changed") from e

    def _check_state(self, state: Any) -> None:
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise FreezeError("not an fxfreeze controller state (key 'version' missing or unsupported)")
        for key in ("blocks", "num_frozen", "step", "epoch", "policy", "history", "policy_name"):
            if key not in state:
                raise FreezeError(f"controller state is missing the key {key!r}")
        names = [b.name for b in self.plan.blocks]
        if not isinstance(state["blocks"], (list, tuple)) or list(state["blocks"]) != names:
            saved = state["blocks"]
            raise FreezeError(
                "controller state was saved for a different plan "
                f"({len(saved) if isinstance(saved, (list, tuple)) else '?'} blocks vs {len(names)}); "
                "compile with the same plan before resuming"
            )
        if state["policy_name"] != self.config.policy:
            raise FreezeError(
                f"controller state was saved with policy {state['policy_name']!r}, this controller uses {self.config.policy!r}"
            )
        for key in ("num_frozen", "step", "epoch"):
            if isinstance(state[key], bool) or not isinstance(state[key], int) or state[key] < 0:
                raise FreezeError(f"controller state key {key!r} must be a non-negative int, got {state[key]!r}")
        self.module.check_prefix(state["num_frozen"])
        if not isinstance(state["policy"], dict) or not isinstance(state["history"], list):
            raise FreezeError("controller state keys 'policy' (a dict) and 'history' (a list) are malformed")

    def _apply_state(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(dict(state["policy"]))  # first: the likeliest to refuse
        self._gate.load_state_dict(state.get("held"))
        k = int(state["num_frozen"])
        self.module._set_prefix(k)
        if self.config.release_optimizer_state:
            self._release(self.module.frozen_parameter_names(k))
        self.step_count = int(state["step"])
        self._epoch = int(state["epoch"])
        self._epoch_set = bool(state.get("epoch_set", False))
        self._lr_steps.load_state_dict(state)
        self.history = [dict(e) for e in state["history"]]
        learned = state.get("learned_total_steps")
        self._planned.learned = int(learned) if isinstance(learned, int) and not isinstance(learned, bool) and learned > 0 else None
        self.safety.load_state_dict(dict(state.get("safety") or {}))
        self._agreement_state = state.get("agreement")
        if self._agreement_state is not None and hasattr(self._agree, "load_state_dict"):
            self._agree.load_state_dict(self._agreement_state)  # type: ignore[union-attr]
            self._agreement_state = None
