"""Validated configuration dataclasses (``to_dict`` / ``from_dict``, YAML files).

:class:`FreezeConfig` holds what the controller needs plus one sub-config per policy; each
policy registers its config type in :mod:`fxfreeze.runtime.policies`, so adding a policy
adds no if/elif chain here. A config is accepted as an object, a dict or a YAML path.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError

__all__ = ["FreezeConfig", "ManualConfig", "FreezeOutConfig", "EgeriaConfig", "AutoFreezeConfig", "SmartFRZConfig",
           "CacheConfig", "load_config"]


def _number(value: Any, where: str) -> float:
    """A real, finite number (not a bool, not a string): else a ConfigError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _flag(value: Any, where: str) -> bool:
    """true or false only: YAML's "no" is a string, not False."""
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    return value


def _whole(value: Any, where: str) -> int:
    """An integer, or a float with no fractional part (YAML may give ``3.0``); never a
    bool, a string or ``1.7`` (which int() would silently truncate)."""
    if isinstance(value, bool):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if not isinstance(value, int):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    return value


def _check_keys(cls: type, data: Mapping[str, Any], where: str) -> None:
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{where} has a key that is not a name: {bad[0]!r}")
    allowed = sorted(f.name for f in fields(cls))
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in {where}; allowed keys: {', '.join(allowed)}")


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
            kk = _whole(k, f"manual.schedule key {k!r}")
            vv = _whole(v, f"manual.schedule[{k!r}] (a number of blocks)")
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
        if not (0.0 < _number(self.t0, "freezeout.t0") <= 1.0):
            raise ConfigError(f"freezeout.t0 must be in (0, 1], got {self.t0!r}")
        if self.scaling not in ("linear", "squared", "cubic"):
            raise ConfigError(f"freezeout.scaling must be 'linear', 'squared' or 'cubic', got {self.scaling!r}")
        if self.total_steps is not None:
            _positive_int(self.total_steps, "freezeout.total_steps")


def _positive_int(value: Any, where: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where} must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass
class EgeriaConfig:
    """Egeria (Wang et al., EuroSys 2023): freeze the front block once its plasticity,
    measured against a low-precision reference on the CPU, has stopped changing. See
    ``docs/egeria.md`` for the rule and the experiments behind the defaults.

    - ``eval_interval``: optimizer steps between evaluations (at least; see
      ``overhead_budget``);
    - ``probe_size``: samples of the first training batch kept as the fixed probe batch;
    - ``window`` / ``threshold`` / ``noise_limit`` / ``patience``: the front block freezes
      when, over its last ``window`` evaluations, its plasticity's elasticity against the
      anchor's age is under ``threshold`` (1 = still moving steadily, 0 = levelled off) and
      the fit's noise under ``noise_limit``, at ``patience`` evaluations in a row;
    - ``reference_precision``: ``int8`` (static for convolutional blocks, dynamic for
      Linear ones; blocks with nothing to quantize run in fp32 with their outputs rounded to
      int8), ``int8_static``, ``int8_dynamic``, ``bf16`` or ``fp32``;
    - ``lookahead``: blocks tracked beyond the front one (the front block alone decides; the
      ones behind it are tracked so that their evidence is ready when they reach the front);
    - ``refresh_every``: re-take the reference snapshot every this many evaluations;
    - ``worker_threads``: PyTorch threads of the reference worker;
    - ``overhead_budget``: the share of training time evaluations may take (training-side
      probe plus the reference worker's busy time); evaluations are spaced out to stay
      under it (0 = no limit);
    - ``freeze``: ``False`` measures and records plasticity (``policy.timeline``) without
      ever freezing: for tuning the threshold, and for measuring the overhead;
    - ``asynchronous``: consume reference results whenever they are ready (default). With
      ``False`` each evaluation waits for its result: slower, but the run is reproducible
      (with ``overhead_budget=0``, evaluations then happen at fixed steps);
    - ``unfreeze_on_lr_change``: on a learning-rate step, unfreeze ``all`` blocks, the
      ``last`` frozen one, or ``none``; tracking restarts either way;
    - ``reference_timeout``: seconds one reference job may run; past it (a hang) the policy
      gives up on the reference with a warning and stops deciding, training goes on.
    """

    eval_interval: int = 50
    probe_size: int = 64
    window: int = 5
    threshold: float = 0.5
    noise_limit: float = 1.0
    patience: int = 2
    reference_precision: str = "int8"
    lookahead: int = 2
    refresh_every: int = 20
    worker_threads: int = 1
    overhead_budget: float = 0.01
    unfreeze_on_lr_change: str = "all"
    asynchronous: bool = True
    freeze: bool = True
    reference_timeout: float = 120.0

    def __post_init__(self) -> None:
        if not _number(self.reference_timeout, "egeria.reference_timeout") > 0:
            raise ConfigError(f"egeria.reference_timeout must be a positive number of seconds, got {self.reference_timeout!r}")
        _positive_int(self.eval_interval, "egeria.eval_interval")
        _positive_int(self.probe_size, "egeria.probe_size", 2)
        _positive_int(self.window, "egeria.window", 3)
        _positive_int(self.patience, "egeria.patience")
        _positive_int(self.refresh_every, "egeria.refresh_every")
        _positive_int(self.lookahead, "egeria.lookahead", 0)
        _positive_int(self.worker_threads, "egeria.worker_threads")
        for name in ("threshold", "noise_limit"):
            if not _number(getattr(self, name), f"egeria.{name}") > 0:
                raise ConfigError(f"egeria.{name} must be a positive number, got {getattr(self, name)!r}")
        if not 0 <= _number(self.overhead_budget, "egeria.overhead_budget") < 1:
            raise ConfigError(f"egeria.overhead_budget must be in [0, 1), got {self.overhead_budget!r}")
        for name in ("asynchronous", "freeze"):
            _flag(getattr(self, name), f"egeria.{name}")
        from .passes.reference import PRECISIONS as precisions  # torch only; torch.ao loads lazily

        if self.reference_precision not in precisions:
            raise ConfigError(
                f"egeria.reference_precision must be one of {', '.join(precisions)}, got {self.reference_precision!r}"
            )
        if self.unfreeze_on_lr_change not in ("all", "last", "none"):
            raise ConfigError(
                f"egeria.unfreeze_on_lr_change must be 'all', 'last' or 'none', got {self.unfreeze_on_lr_change!r}"
            )


@dataclass
class AutoFreezeConfig:
    """AutoFreeze (Liu et al. 2021), a baseline: every ``interval`` steps, freeze the front
    blocks whose gradient-norm change is under the ``percentile``-th percentile of the active
    blocks' changes."""

    interval: int = 100
    percentile: float = 50.0

    def __post_init__(self) -> None:
        _positive_int(self.interval, "autofreeze.interval")
        p = self.percentile
        if not 0 < _number(p, "autofreeze.percentile") < 100:
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
    contiguous: bool = True

    def __post_init__(self) -> None:
        if self.weights is not None and not isinstance(self.weights, str):
            self.weights = str(self.weights)
        if self.record_interval is not None:
            _positive_int(self.record_interval, "smartfrz.record_interval")
        _positive_int(self.stage_interval, "smartfrz.stage_interval")
        _positive_int(self.min_history, "smartfrz.min_history", 2)
        _positive_int(self.patience, "smartfrz.patience")
        _positive_int(self.seed, "smartfrz.seed", 0)
        t = self.threshold
        if not 0 < _number(t, "smartfrz.threshold") < 1:
            raise ConfigError(f"smartfrz.threshold must be in (0, 1), got {t!r}")
        _flag(self.contiguous, "smartfrz.contiguous")
        if self.contiguous is not True:
            raise ConfigError(
                "smartfrz.contiguous must be true: fxfreeze freezes a prefix of blocks (a frozen block that follows "
                "an active one must still pass gradients back through itself, so freezing it would save only its "
                "weight gradients)"
            )


@dataclass
class CacheConfig:
    """Caching the frozen prefix's outputs (its frontier) per sample, so that later epochs
    skip its forward pass too. See ``docs/cache.md``.

    - ``enabled``: off by default; needs sample ids (``fm.wrap_loader(loader)``);
    - ``memory_budget_mb``: bytes kept in memory; the rest spills to ``directory`` (a new
      temporary folder when None), checked for writability when the model is compiled;
    - ``dtype``: ``float32`` (bitwise identical to not caching), ``float16`` or
      ``bfloat16`` (half the memory);
    - ``prefetch``: read the next batch's spilled entries on a background thread;
    - ``verify_fraction``: share of cache hits recomputed and compared (0 = never);
    - ``random_augmentation``: declare that the inputs are randomly augmented: a sample's
      frontier then differs every epoch, so caching stays off (one warning says so).
    """

    enabled: bool = False
    memory_budget_mb: float = 1024.0
    directory: str | None = None
    dtype: str = "float32"
    prefetch: bool = True
    verify_fraction: float = 0.0
    random_augmentation: bool = False

    def __post_init__(self) -> None:
        for name in ("enabled", "prefetch", "random_augmentation"):
            _flag(getattr(self, name), f"cache.{name}")
        if _number(self.memory_budget_mb, "cache.memory_budget_mb") < 0:
            raise ConfigError(f"cache.memory_budget_mb must be a non-negative number, got {self.memory_budget_mb!r}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError(f"cache.dtype must be 'float32', 'float16' or 'bfloat16', got {self.dtype!r}")
        v = self.verify_fraction
        if not 0 <= _number(v, "cache.verify_fraction") <= 1:
            raise ConfigError(f"cache.verify_fraction must be in [0, 1], got {v!r}")
        if self.directory is not None and not isinstance(self.directory, str):
            self.directory = str(self.directory)


@dataclass
class FreezeConfig:
    """Everything the freezing controller is configured by.

    - ``policy``: which policy decides (``egeria``, the default; ``smartfrz``; ``autofreeze``;
      ``freezeout``; ``manual``);
    - ``lr_change_factor``: a learning-rate change by more than this factor (either way) is
      reported to the policy as an LR step (Egeria unfreezes on it);
    - ``release_optimizer_state``: drop optimizer state (momentum, Adam moments) of frozen
      parameters, freeing memory; on unfreeze they start from fresh state;
    - ``steps_per_epoch``: lets epoch-based schedules work without ``freezer.set_epoch``;
    - ``total_steps``: the planned length of training in optimizer steps, for policies that
      schedule by it (FreezeOut, when its own ``freezeout.total_steps`` is not set). The
      Trainer and Lightning integrations fill it from the trainer's plan.
    """

    policy: str = "egeria"
    lr_change_factor: float = 1.5
    release_optimizer_state: bool = True
    steps_per_epoch: int | None = None
    total_steps: int | None = None
    manual: ManualConfig = field(default_factory=ManualConfig)
    freezeout: FreezeOutConfig = field(default_factory=FreezeOutConfig)
    egeria: EgeriaConfig = field(default_factory=EgeriaConfig)
    autofreeze: AutoFreezeConfig = field(default_factory=AutoFreezeConfig)
    smartfrz: SmartFRZConfig = field(default_factory=SmartFRZConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)

    def __post_init__(self) -> None:
        from .runtime.policies import available_policies

        if not isinstance(self.policy, str):
            raise ConfigError(f"policy must be a name, got {type(self.policy).__name__}")
        if self.policy not in available_policies():
            raise ConfigError(f"unknown policy {self.policy!r}; valid names: {', '.join(available_policies())}")
        if not _number(self.lr_change_factor, "lr_change_factor") > 1.0:
            raise ConfigError(f"lr_change_factor must be > 1, got {self.lr_change_factor!r}")
        _flag(self.release_optimizer_state, "release_optimizer_state")
        if self.steps_per_epoch is not None:
            _positive_int(self.steps_per_epoch, "steps_per_epoch")
        if self.total_steps is not None:
            _positive_int(self.total_steps, "total_steps")
        for name, cls in _SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, Mapping):
                setattr(self, name, _sub(cls, value, name))
            elif not isinstance(value, cls):
                raise ConfigError(
                    f"config section {name!r} must be a mapping of its keys (or a {cls.__name__}), got {value!r}"
                )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FreezeConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"a config must be a mapping, got {type(data).__name__}")
        _check_keys(cls, data, "the fxfreeze config")
        return cls(**dict(data))

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "FreezeConfig":
        import yaml

        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"cannot read config file {str(p)!r}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
        if data is None:
            data = {}
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from e


_SECTIONS: dict[str, type] = {
    "manual": ManualConfig,
    "freezeout": FreezeOutConfig,
    "egeria": EgeriaConfig,
    "autofreeze": AutoFreezeConfig,
    "smartfrz": SmartFRZConfig,
    "cache": CacheConfig,
}


def _sub(cls: type, data: Mapping[str, Any], where: str) -> Any:
    _check_keys(cls, data, f"config section {where!r}")
    return cls(**dict(data))


def load_config(config: Any = None, policy: str | None = None) -> FreezeConfig:
    """Accept a FreezeConfig, a dict, a YAML path or None; ``policy`` overrides its policy."""
    if config is None:
        cfg = FreezeConfig() if policy is None else FreezeConfig(policy=policy)
        return cfg
    if isinstance(config, FreezeConfig):
        cfg = config
    elif isinstance(config, Mapping):
        cfg = FreezeConfig.from_dict(config)
    elif isinstance(config, (str, Path)):
        cfg = FreezeConfig.from_yaml(config)
    else:
        raise ConfigError(f"config must be a FreezeConfig, a dict or a YAML path, got {type(config).__name__}")
    if policy is not None and policy != cfg.policy:
        d = cfg.to_dict()
        d["policy"] = policy
        cfg = FreezeConfig.from_dict(d)
    return cfg
