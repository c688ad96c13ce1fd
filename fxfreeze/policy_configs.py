"""The config sections of the built-in policies (``config.egeria``, ``config.manual``...).

Each is a validated dataclass; :mod:`fxfreeze.registry` maps a policy name to its policy
class and its section's class, which is how :class:`~fxfreeze.config.FreezeConfig` validates
a section, for built-in policies and for policies registered from outside alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from .config_checks import flag, number, positive_int, whole
from .errors import ConfigError

__all__ = ["ManualConfig", "FreezeOutConfig", "EgeriaConfig", "AutoFreezeConfig", "SmartFRZConfig"]


@dataclass
class ManualConfig:
    """The ``manual`` policy: a schedule ``{when: k}`` sets the frozen prefix to ``k``
    blocks from step (or epoch) ``when`` on; empty means by hand (``fm.freeze_prefix``)."""

    schedule: dict[int, int] = field(default_factory=dict)
    unit: str = "step"

    def __post_init__(self) -> None:
        if self.unit not in ("step", "epoch"):
            raise ConfigError(f"manual.unit must be 'step' or 'epoch', got {self.unit!r}")
        if not isinstance(self.schedule, Mapping):
            raise ConfigError("manual.schedule must be a mapping {step_or_epoch: num_frozen_blocks}")
        clean: dict[int, int] = {}
        for k, v in self.schedule.items():
            if isinstance(k, str) and k.strip().lstrip("-").isdigit():
                k = int(k)  # JSON object keys are strings
            kk = whole(k, f"manual.schedule key {k!r}")
            vv = whole(v, f"manual.schedule[{k!r}] (a number of blocks)")
            if kk < 0 or vv < 0:
                raise ConfigError(f"manual.schedule entry {k!r}: {v!r} must be non-negative")
            clean[kk] = vv
        self.schedule = dict(sorted(clean.items()))


@dataclass
class FreezeOutConfig:
    """FreezeOut (Brock et al. 2017): block ``i`` of ``n`` freezes at the fraction
    ``scale(t0 + (1 - t0) * i / n)`` of ``total_steps``, with ``scale`` the identity
    (``linear``) or a cube (``cubic``), as in the authors' code."""

    t0: float = 0.5
    scaling: str = "cubic"
    total_steps: int | None = None

    def __post_init__(self) -> None:
        if not (0.0 < number(self.t0, "freezeout.t0") <= 1.0):
            raise ConfigError(f"freezeout.t0 must be in (0, 1], got {self.t0!r}")
        if self.scaling not in ("linear", "squared", "cubic"):
            raise ConfigError(f"freezeout.scaling must be 'linear', 'squared' or 'cubic', got {self.scaling!r}")
        if self.total_steps is not None:
            positive_int(self.total_steps, "freezeout.total_steps")


#: what a learning-rate step does to Egeria's prefix (``runtime.policies.rules.lr_step_rule``)
UNFREEZE_MODES = ("all", "last", "none")


@dataclass
class EgeriaConfig:
    """Egeria (Wang et al., EuroSys 2023): freeze the front block once its plasticity,
    measured against a low-precision reference on the CPU, has stopped changing. See
    ``docs/egeria.md`` for the rule and the experiments behind the defaults.

    - ``eval_interval``: optimizer steps between evaluations (at least; see
      ``overhead_budget``), for runs of thousands of steps;
    - ``evaluations_per_run``: when the run's planned length is known (``total_steps``, set
      by ``fxfreeze.compile(total_steps=...)`` or by the Trainer and Lightning
      integrations), ``eval_interval`` is shortened so that the run holds about this many
      evaluations (never below 5 steps); 0 keeps ``eval_interval`` as is;
    - ``min_window_steps``: the shortening never puts evaluations so close that a
      ``window`` of them spans fewer optimizer steps than this (50): over shorter spans SGD
      noise reads as a trend (windows of 25 steps froze all ten blocks of a ResNet-20 within
      its first 160 steps and cost 0.7 point);
    - ``probe_size``: samples of the first training batch kept as the fixed probe batch (the
      cost of an evaluation grows with it, the SP loss's Gram matrix quadratically: 32 keeps
      evaluations at the planned spacing within ``overhead_budget`` on a 2-core CPU);
    - ``window`` / ``threshold`` / ``noise_limit`` / ``patience``: the front block freezes
      when, over its last ``window`` evaluations, its plasticity's elasticity against the
      anchor's age is under ``threshold`` and the fit's noise under ``noise_limit``, at
      ``patience`` evaluations in a row. The elasticity is about 2 while a block drifts (it
      still learns in one direction), about 1 while it only diffuses under SGD noise, 0 once
      its distance has levelled off, negative when it drifts back; one-sided: only moving
      away counts as learning;
    - ``pretrained_threshold`` / ``detect_pretrained``: blocks whose weights are pretrained
      (:mod:`fxfreeze.pretrained`, judged once at compile time) are held to
      ``pretrained_threshold`` instead: fine-tuning adapts every layer at once, and a
      pretrained block freezes only once its distance has levelled off. Blocks trained from
      scratch converge front first and are held to ``threshold``: diffusing counts as
      settled. ``detect_pretrained=False`` holds every block to ``threshold``;
    - ``pretrained_floor_ratio``: a pretrained block also counts as settled once, over a
      whole window, its function has moved less since the anchor than this multiple of the
      reference's own int8 error (the plasticity at the anchor). 0 (the default): off. See
      ``docs/egeria.md``, "Moved less than the reference's error";
    - ``reference_precision``: ``int8`` (static for convolutional blocks, dynamic for
      Linear ones; blocks with nothing to quantize run in fp32 with their outputs rounded to
      int8), ``int8_static``, ``int8_dynamic``, ``bf16`` or ``fp32``;
    - ``lookahead``: blocks tracked beyond the front one (the front block alone decides; the
      ones behind it are tracked so that their evidence is ready when they reach the front);
    - ``freeze_run``: ``True``: when the front block freezes, the tracked blocks right behind
      it that have settled too (each at ``patience`` evaluations in a row) freeze with it, as
      a leading run. ``False`` (the default): one block per decision, as in Egeria. Measured
      faster in total time on the step schedule (1.30x of the control against 1.05x) but it
      cost accuracy where it froze early: −0.40 on cosine, −0.66 on fine-tuning; beside the
      default in one process, faster to accuracy on cosine (1.02x and 1.12x against 0.92x
      and 0.94x) at −0.30 and −0.25 against −0.10 and −0.10 (``docs/egeria.md``, "Freezing
      a settled run");
    - ``refresh_every``: re-take the reference snapshot every this many evaluations;
    - ``worker_threads``: PyTorch threads of the reference worker;
    - ``worker_nice``: how much lower the worker thread's CPU priority is than training's
      (Linux; 0 = the same): it uses idle cores and yields the ones training needs. Only in
      the asynchronous mode: when training waits for the worker, it keeps training's priority;
    - ``overhead_budget``: the share of training time evaluations may take (the training
      thread's time in them plus what the reference worker costs training: the slowdown of
      the steps it overlaps, and at least its CPU seconds where it shares training's cores);
      evaluations are spaced out to stay under it (0 = no limit);
    - ``freeze``: ``False`` measures and records plasticity (``policy.timeline``) without
      ever freezing: for tuning the threshold, and for measuring the overhead;
    - ``asynchronous``: consume reference results whenever they are ready (default). With
      ``False`` each evaluation waits for its result: slower, but the run is reproducible
      (with ``overhead_budget=0``, evaluations then happen at fixed steps);
    - ``unfreeze_on_lr_change``: on a learning-rate step, keep the frozen prefix (``none``,
      the default), unfreeze the ``last`` frozen block, or ``all`` blocks; tracking restarts
      with fresh anchors either way. On the step schedule, over four seeds, keeping the prefix
      ended within 0.2 point of unfreezing it (better on two seeds, worse on one) and skipped
      22-33% of the backward work against 6-9% (``docs/egeria.md``,
      "Learning-rate steps keep the prefix");
    - ``reference_timeout``: seconds one reference job may run; past it (a hang) the policy
      gives up on the reference with a warning and stops deciding, training goes on.
    """

    eval_interval: int = 50
    evaluations_per_run: int = 60
    min_window_steps: int = 50
    probe_size: int = 32
    window: int = 5
    threshold: float = 1.5
    pretrained_threshold: float = 0.5
    pretrained_floor_ratio: float = 0.0
    detect_pretrained: bool = True
    noise_limit: float = 1.0
    patience: int = 2
    reference_precision: str = "int8"
    lookahead: int = 2
    freeze_run: bool = False
    refresh_every: int = 20
    worker_threads: int = 1
    worker_nice: int = 10
    overhead_budget: float = 0.01
    unfreeze_on_lr_change: str = "none"
    asynchronous: bool = True
    freeze: bool = True
    reference_timeout: float = 120.0

    def __post_init__(self) -> None:
        if not number(self.reference_timeout, "egeria.reference_timeout") > 0:
            raise ConfigError(f"egeria.reference_timeout must be a positive number of seconds, got {self.reference_timeout!r}")
        positive_int(self.eval_interval, "egeria.eval_interval")
        positive_int(self.evaluations_per_run, "egeria.evaluations_per_run", 0)
        positive_int(self.min_window_steps, "egeria.min_window_steps", 0)
        positive_int(self.probe_size, "egeria.probe_size", 2)
        positive_int(self.window, "egeria.window", 3)
        positive_int(self.patience, "egeria.patience")
        positive_int(self.refresh_every, "egeria.refresh_every")
        positive_int(self.lookahead, "egeria.lookahead", 0)
        positive_int(self.worker_threads, "egeria.worker_threads")
        positive_int(self.worker_nice, "egeria.worker_nice", 0)
        for name in ("threshold", "pretrained_threshold", "noise_limit"):
            if not number(getattr(self, name), f"egeria.{name}") > 0:
                raise ConfigError(f"egeria.{name} must be a positive number, got {getattr(self, name)!r}")
        if not number(self.pretrained_floor_ratio, "egeria.pretrained_floor_ratio") >= 0:
            raise ConfigError(f"egeria.pretrained_floor_ratio must be 0 (off) or positive, got {self.pretrained_floor_ratio!r}")
        if not 0 <= number(self.overhead_budget, "egeria.overhead_budget") < 1:
            raise ConfigError(f"egeria.overhead_budget must be in [0, 1), got {self.overhead_budget!r}")
        for name in ("asynchronous", "freeze", "detect_pretrained", "freeze_run"):
            flag(getattr(self, name), f"egeria.{name}")
        from .runtime.egeria.backends import PRECISIONS as precisions  # torch only; torch.ao loads lazily

        if self.reference_precision not in precisions:
            raise ConfigError(
                f"egeria.reference_precision must be one of {', '.join(precisions)}, got {self.reference_precision!r}"
            )
        if self.unfreeze_on_lr_change not in UNFREEZE_MODES:
            raise ConfigError(
                f"egeria.unfreeze_on_lr_change must be one of {', '.join(map(repr, UNFREEZE_MODES))}, "
                f"got {self.unfreeze_on_lr_change!r}"
            )


@dataclass
class AutoFreezeConfig:
    """AutoFreeze (Liu et al. 2021), a baseline: every ``interval`` steps, freeze the front
    blocks whose gradient-norm change is under the ``percentile``-th percentile of the active
    blocks' changes."""

    interval: int = 100
    percentile: float = 50.0

    def __post_init__(self) -> None:
        positive_int(self.interval, "autofreeze.interval")
        p = self.percentile
        if not 0 < number(p, "autofreeze.percentile") < 100:
            raise ConfigError(f"autofreeze.percentile must be in (0, 100), got {p!r}")


@dataclass
class SmartFRZConfig:
    """SmartFRZ (Li et al., ICLR 2023): a learned predictor reads each active block's weight
    history and says whether it may freeze. See ``docs/smartfrz.md``.

    - ``weights``: the predictor weights file; None loads the one shipped in the package
      (regenerate it with ``fxfreeze train-predictor``);
    - ``record_interval``: optimizer steps between weight snapshots; None takes the interval
      the predictor was trained with (from the weights file), which is what its judgement
      is calibrated for;
    - ``stage_interval``: snapshots between freezing stages (decisions);
    - ``min_history``: snapshots a block needs before the predictor judges it;
    - ``threshold``: P(freeze) at or above which a block counts as freezable;
    - ``patience``: stages in a row at which the front block must be freezable;
    - ``seed``: which weight positions are sampled (fixed per block name);
    - ``restart_on_lr_change``: on a learning-rate step, forget the active blocks' histories
      (weights that slow down because the rate fell are not weights that converged: the
      predictor would read the drop as convergence and freeze blocks that still have the
      lower rate's fine convergence ahead);
    - ``contiguous``: freeze only a prefix, the only mode the controller implements: a frozen
      block that follows an active one must still pass gradients back through itself to the
      active one, so freezing it would save only its weight gradients.
    """

    weights: str | None = None
    record_interval: int | None = None
    stage_interval: int = 5
    min_history: int = 10
    threshold: float = 0.5
    patience: int = 2
    seed: int = 0
    restart_on_lr_change: bool = True
    contiguous: bool = True

    def __post_init__(self) -> None:
        if self.weights is not None and not isinstance(self.weights, str):
            self.weights = str(self.weights)
        if self.record_interval is not None:
            positive_int(self.record_interval, "smartfrz.record_interval")
        positive_int(self.stage_interval, "smartfrz.stage_interval")
        positive_int(self.min_history, "smartfrz.min_history", 2)
        positive_int(self.patience, "smartfrz.patience")
        positive_int(self.seed, "smartfrz.seed", 0)
        t = self.threshold
        if not 0 < number(t, "smartfrz.threshold") < 1:
            raise ConfigError(f"smartfrz.threshold must be in (0, 1), got {t!r}")
        flag(self.contiguous, "smartfrz.contiguous")
        flag(self.restart_on_lr_change, "smartfrz.restart_on_lr_change")
        if self.contiguous is not True:
            raise ConfigError(
                "smartfrz.contiguous must be true: fxfreeze freezes a prefix of blocks (a frozen block that follows "
                "an active one must still pass gradients back through itself, so freezing it would save only its "
                "weight gradients)"
            )
