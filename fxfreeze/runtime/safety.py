"""The safety net: undo a freeze that made the training loss worse.

Every adaptive policy can freeze too early: its evidence is a proxy (plasticity, gradient
norms, a learned predictor), and a block frozen before it has converged, or one whose
BatchNorm statistics do not fit eval mode yet, can make training worse. The controller
therefore watches the training loss after every freeze, with no validation data:

- the *baseline* is where the loss stood at the freeze: a line fitted through the last
  ``window`` losses before it, read at its end (with that estimate's standard error);
- for ``watch`` steps after it, the mean of the last ``window`` losses is compared with the
  baseline; a *regression* is a rise by more than ``tolerance`` standard errors of the
  difference and by more than ``min_rise`` of the baseline. A loss that
  falls or stays level (the usual course after a good freeze) never triggers it;
- on a regression the block frozen last is unfrozen, and that block may not freeze again for
  ``hold`` steps, doubled at each further strike of the same block (the policy's proposals
  are capped below it meanwhile).

:class:`SafetyNet` is plain state: the controller feeds it losses and prefix changes and asks
it what to do. Its state is saved with the controller's, so a resume keeps holds and watches.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import Any

__all__ = ["SafetyNet"]

logger = logging.getLogger("fxfreeze")


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    var = sum((x - m) ** 2 for x in xs) / (n - 1) if n > 1 else 0.0
    return m, math.sqrt(var)


def _level(xs: list[float]) -> tuple[float, float]:
    """The loss level at the end of ``xs`` (a line fitted through it, read at its last
    step: a falling loss's mean would overstate where it stands) and that estimate's
    standard error."""
    n = len(xs)
    t = [float(i) for i in range(n)]
    tm = (n - 1) / 2.0
    m = sum(xs) / n
    sxx = sum((x - tm) ** 2 for x in t)
    slope = sum((a - tm) * (y - m) for a, y in zip(t, xs)) / sxx
    resid = [y - (m + slope * (a - tm)) for a, y in zip(t, xs)]
    sd = math.sqrt(sum(r * r for r in resid) / max(n - 2, 1))
    end = n - 1 - tm
    return m + slope * end, sd * math.sqrt(1.0 / n + end * end / sxx)


class SafetyNet:
    """Watches the training loss around freezes (see the module docstring).

    Example::

        >>> from fxfreeze.config import SafetyNetConfig
        >>> net = SafetyNet(SafetyNetConfig(window=10, watch=50))
        >>> for step in range(1, 21):
        ...     net.observe(step, 1.0 + 0.01 * (step % 3))
        >>> net.on_change(20, 0, 2)          # a policy froze blocks 0 and 1
        >>> for step in range(21, 31):
        ...     net.observe(step, 2.0)       # the loss doubled
        >>> net.verdict(30, 2)[0]            # unfreeze block 1
        1
        >>> net.cap(40, 5)                   # block 1 may not freeze for `hold` steps
        1
    """

    def __init__(self, config: Any) -> None:
        self.cfg = config
        self.recent: deque[float] = deque(maxlen=int(config.window))
        #: the freeze being watched: (step it happened, block frozen last, baseline level, its standard error)
        self.watching: tuple[int, int, float, float] | None = None
        self.post: deque[float] = deque(maxlen=int(config.window))
        #: block -> step until which it may not freeze again
        self.hold_until: dict[int, int] = {}
        #: block -> how many times the net has undone its freeze
        self.strikes: dict[int, int] = {}
        self._blind_told = False

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.enabled)

    def observe(self, step: int, loss: float | None) -> None:
        """Record the training loss of ``step`` (None or non-finite: nothing to learn). On an
        accelerator losses arrive a few steps late (:class:`~fxfreeze.runtime.loss_reader.LossReader`):
        one from a step before the watched freeze is not counted as after it."""
        if loss is None or not math.isfinite(loss):
            return
        self.recent.append(float(loss))
        if self.watching is not None and int(step) > self.watching[0]:
            self.post.append(float(loss))

    def on_change(self, step: int, old: int, new: int, watch: bool = True) -> None:
        """The prefix went from ``old`` to ``new`` blocks at ``step``: a freeze starts a
        watch (when ``watch`` and a baseline is there); anything else ends any watch."""
        self.post.clear()
        if watch and new > old and self.enabled and not self.recent and not self._blind_told:
            self._blind_told = True
            logger.warning(
                "fxfreeze: step %d: the safety net has seen no training loss, so it cannot undo this freeze if it "
                "hurts (the model returns no `loss`). Report it each step with fm.freezer.observe_loss(loss) (with a "
                "trainer's FxFreezeCallback: callback.module.freezer.observe_loss(loss) where the loss is computed, "
                "e.g. a Trainer's compute_loss with label smoothing), or turn the net off with "
                "config={'safety_net': {'enabled': False}}", step,
            )
        if watch and new > old and len(self.recent) >= max(5, self.recent.maxlen // 2):  # type: ignore[operator]
            level, se = _level(list(self.recent))
            self.watching = (step, new - 1, level, se)
        else:
            self.watching = None

    def verdict(self, step: int, num_frozen: int) -> tuple[int, str] | None:
        """The prefix to go back to, and why, when the watched freeze made the loss worse;
        None otherwise. Ends the watch after ``watch`` steps."""
        if not self.enabled or self.watching is None:
            return None
        since, block, base, base_se = self.watching
        if num_frozen <= block:  # already undone (by the policy, a resume, a user)
            self.watching = None
            return None
        if len(self.post) >= self.post.maxlen:  # type: ignore[operator]
            post = list(self.post)
            mean, post_sd = _mean_sd(post)
            noise = math.sqrt(base_se * base_se + (post_sd * post_sd) / len(post))
            rise = mean - base
            if rise > float(self.cfg.tolerance) * noise and rise > float(self.cfg.min_rise) * abs(base):
                strikes = self.strikes.get(block, 0) + 1
                self.strikes[block] = strikes
                hold = int(self.cfg.hold if self.cfg.hold is not None else self.cfg.watch) * 2 ** (strikes - 1)
                self.hold_until[block] = step + hold
                self.watching = None
                self.post.clear()
                return block, (f"safety net: the training loss rose from {base:.4g} to {mean:.4g} after step {since} "
                               f"(noise {noise:.2g}); block {block} may freeze again after step {step + hold}")
        if step - since >= int(self.cfg.watch):
            self.watching = None
        return None

    def cap(self, step: int, proposed: int) -> int:
        """``proposed`` lowered to keep blocks on hold trainable."""
        if not self.enabled:
            return proposed
        held = [b for b, until in self.hold_until.items() if step < until]
        return min([proposed, *held])

    # -- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "recent": list(self.recent),
            "watching": None if self.watching is None else list(self.watching),
            "post": list(self.post),
            "hold_until": {int(b): int(s) for b, s in self.hold_until.items()},
            "strikes": {int(b): int(s) for b, s in self.strikes.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent.clear()
        self.recent.extend(float(x) for x in state.get("recent", []))
        w = state.get("watching")
        self.watching = None if w is None else (int(w[0]), int(w[1]), float(w[2]), float(w[3]))
        self.post.clear()
        self.post.extend(float(x) for x in state.get("post", []))
        self.hold_until = {int(b): int(s) for b, s in state.get("hold_until", {}).items()}
        self.strikes = {int(b): int(s) for b, s in state.get("strikes", {}).items()}
