"""Validated configuration dataclasses (``to_dict`` / ``from_dict``, YAML files).

:class:`FreezeConfig` holds what the controller needs plus one sub-config per policy; each
policy registers its config type in :mod:`fxfreeze.runtime.policies`, so adding a policy
adds no if/elif chain here. A config is accepted as an object, a dict or a YAML path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError

__all__ = ["FreezeConfig", "ManualConfig", "FreezeOutConfig", "load_config", "UNAVAILABLE_POLICIES"]

#: Policies that are designed but not shipped yet (their issues are open).
UNAVAILABLE_POLICIES = ("egeria", "smartfrz", "autofreeze")


def _check_keys(cls: type, data: Mapping[str, Any], where: str) -> None:
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
            try:
                kk, vv = int(k), int(v)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"manual.schedule entry {k!r}: {v!r} must map an integer to an integer") from e
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
        if not (0.0 < float(self.t0) <= 1.0):
            raise ConfigError(f"freezeout.t0 must be in (0, 1], got {self.t0!r}")
        if self.scaling not in ("linear", "squared", "cubic"):
            raise ConfigError(f"freezeout.scaling must be 'linear', 'squared' or 'cubic', got {self.scaling!r}")
        if self.total_steps is not None and int(self.total_steps) <= 0:
            raise ConfigError(f"freezeout.total_steps must be a positive integer, got {self.total_steps!r}")


@dataclass
class FreezeConfig:
    """Everything the freezing controller is configured by.

    - ``policy``: which policy decides (``manual``, ``freezeout``);
    - ``lr_change_factor``: a learning-rate change by more than this factor (either way) is
      reported to the policy as an LR step (Egeria unfreezes on it);
    - ``release_optimizer_state``: drop optimizer state (momentum, Adam moments) of frozen
      parameters, freeing memory; on unfreeze they start from fresh state;
    - ``steps_per_epoch``: lets epoch-based schedules work without ``freezer.set_epoch``.
    """

    policy: str = "manual"
    lr_change_factor: float = 1.5
    release_optimizer_state: bool = True
    steps_per_epoch: int | None = None
    manual: ManualConfig = field(default_factory=ManualConfig)
    freezeout: FreezeOutConfig = field(default_factory=FreezeOutConfig)

    def __post_init__(self) -> None:
        from .runtime.policies import available_policies

        if not isinstance(self.policy, str):
            raise ConfigError(f"policy must be a name, got {type(self.policy).__name__}")
        if self.policy in UNAVAILABLE_POLICIES:
            raise ConfigError(
                f"policy {self.policy!r} is not available in this version of fxfreeze yet; "
                f"available policies: {', '.join(available_policies())}"
            )
        if self.policy not in available_policies():
            raise ConfigError(f"unknown policy {self.policy!r}; valid names: {', '.join(available_policies())}")
        if not float(self.lr_change_factor) > 1.0:
            raise ConfigError(f"lr_change_factor must be > 1, got {self.lr_change_factor!r}")
        if self.steps_per_epoch is not None and int(self.steps_per_epoch) <= 0:
            raise ConfigError(f"steps_per_epoch must be a positive integer, got {self.steps_per_epoch!r}")
        if isinstance(self.manual, Mapping):
            self.manual = _sub(ManualConfig, self.manual, "manual")
        if isinstance(self.freezeout, Mapping):
            self.freezeout = _sub(FreezeOutConfig, self.freezeout, "freezeout")

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
