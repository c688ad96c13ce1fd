"""``smartfrz``: SmartFRZ (Li et al., ICLR 2023), a learned freeze predictor.

Every ``record_interval`` optimizer steps a fixed random sample of each active block's
weights is recorded (:class:`~fxfreeze.runtime.history.WeightHistory`, a ring buffer of the
predictor's ``window`` snapshots). Every ``stage_interval`` records is a *freezing stage*:
the attention predictor (:class:`~fxfreeze.runtime.predictor.FreezePredictor`) reads the
history of each active block that has at least ``min_history`` snapshots and returns
P(freeze). The leading run of blocks at or above ``threshold`` freezes once the front block
has passed at ``patience`` stages in a row; the prefix only grows. A learning-rate step
clears the active blocks' histories (``restart_on_lr_change``). The predictor is loaded
when the policy is built, so a missing or corrupt weights file fails at
``fxfreeze.compile``, not hours into training.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from ...errors import FreezeError
from ..history import WeightHistory
from ..predictor import load_predictor, relative_depth
from .base import Decision, Policy, Signals
from .rules import smartfrz_rule

__all__ = ["SmartFRZPolicy"]


class SmartFRZPolicy(Policy):
    name = "smartfrz"

    def __init__(self, config: Any, plan: Any) -> None:
        super().__init__(config, plan)
        self.cfg = config.smartfrz
        self.predictor, self.meta = load_predictor(self.cfg.weights)
        self.record_interval = int(self.cfg.record_interval or self.meta.get("record_interval", 10))
        self.hi = plan.max_frozen
        self.names = [b.name for b in plan.blocks[: self.hi]]
        self.history: WeightHistory | None = None
        self.records = 0
        self.streak = 0
        self.timeline: list[dict[str, Any]] = []
        #: training-thread seconds spent recording and predicting (the policy's overhead)
        self.main_seconds = 0.0
        self._last_k = 0

    def attach(self, freezer: Any) -> None:
        named = freezer.module.params_by_name
        blocks = {b.name: [named[n] for n in b.params if n in named] for b in self.plan.blocks[: self.hi]}
        self.history = WeightHistory(blocks, sample_size=self.predictor.sample_size, window=self.predictor.window,
                                     seed=int(self.cfg.seed))

    def decide(self, s: Signals) -> Decision | None:
        if self.history is not None and s.num_frozen < self._last_k:
            # unfrozen (by hand, or a resume to an earlier prefix): their old histories end
            # where they froze, so they start over
            self.history.clear(self.names[s.num_frozen : self._last_k])
            self.streak = 0
        self._last_k = s.num_frozen
        if self.history is not None and s.lr_changed and self.cfg.restart_on_lr_change:
            self.history.clear(self.names[s.num_frozen :])
            self.streak = 0
            self.timeline.append({"step": s.step, "restarted": "learning-rate step: histories cleared"})
        if self.history is None or s.step % self.record_interval != 0 or s.num_frozen >= self.hi:
            return None
        t0 = time.perf_counter()
        try:
            return self._stage(s)
        finally:
            self.main_seconds += time.perf_counter() - t0

    def _stage(self, s: Signals) -> Decision | None:
        assert self.history is not None
        k = s.num_frozen
        active = self.names[k:]
        self.history.record(active)
        self.records += 1
        if self.records % int(self.cfg.stage_interval) != 0:
            return None
        ready: list[str] = []  # the leading active blocks with enough history
        for n in active:
            if self.history.count(n) < int(self.cfg.min_history):
                break
            ready.append(n)
        if not ready:
            return None
        hists = [self.history.history(n) for n in ready]
        bad = [n for n, h in zip(ready, hists) if not bool(torch.isfinite(h).all())]
        if bad:
            self.history.clear(bad)  # weights went non-finite: that history says nothing
            self.streak = 0
            self.timeline.append({"step": s.step, "skipped": f"non-finite weights in {', '.join(bad)}"})
            return None
        depths = [relative_depth(k + i, self.hi) for i in range(len(ready))]
        probs = [float(p) for p in self.predictor.predict(hists, depths)]
        self.timeline.append({"step": s.step, "num_frozen": k,
                              "p_freeze": {k + i: (p if math.isfinite(p) else None) for i, p in enumerate(probs)}})
        thr = float(self.cfg.threshold)
        new, self.streak = smartfrz_rule(probs, k, thr, self.streak, int(self.cfg.patience))
        if new is None:
            return None
        n = new - k
        return Decision(new, f"SmartFRZ: P(freeze) >= {thr:g} for blocks {k}..{new - 1} "
                             f"({', '.join(f'{p:.2f}' for p in probs[:n])})")

    # -- resume -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"records": self.records, "streak": self.streak,
                "history": self.history.state_dict() if self.history is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict):
            raise FreezeError("smartfrz policy state must be a dict")
        self.records = int(state.get("records", 0))
        self.streak = int(state.get("streak", 0))
        hist = state.get("history")
        if hist is not None:
            if self.history is None:
                raise FreezeError("smartfrz policy state can only be loaded once the policy is attached to a module")
            self.history.load_state_dict(hist)
