"""Validated configuration dataclasses (``to_dict`` / ``from_dict``, YAML files).

:class:`FreezeConfig` holds what the controller needs plus one section per policy. Which
policies exist and which dataclass validates each one's section is the registry's
(:mod:`fxfreeze.registry`), so a policy registered from outside is selected and configured
exactly like a built-in one, and adding a policy adds no if/elif chain here. A config is
accepted as an object, a dict or a YAML path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from .config_checks import check_keys, flag, number, positive_int
from .errors import ConfigError
from .policy_configs import AutoFreezeConfig, EgeriaConfig, FreezeOutConfig, ManualConfig, SmartFRZConfig
from .registry import policy_entry, policy_names

__all__ = ["FreezeConfig", "ManualConfig", "FreezeOutConfig", "EgeriaConfig", "AutoFreezeConfig", "SmartFRZConfig",
           "CacheConfig", "SafetyNetConfig", "load_config"]


@dataclass
class CacheConfig:
    """Caching the frozen prefix's outputs (its frontier) per sample, so that later epochs
    skip its forward pass too. See ``docs/cache.md``.

    - ``enabled``: off by default; needs sample ids (``fm.wrap_loader(loader)``);
    - ``memory_budget_mb``: bytes kept in memory; the rest spills to ``directory`` (a new
      temporary folder when None), checked for writability when the model is compiled;
    - ``dtype``: ``float32`` (identical to not caching: bitwise with ``sub_batches`` off),
      ``float16`` or ``bfloat16`` (half the memory);
    - ``sub_batches``: a batch that finds only some of its samples stored (the epoch after a
      mid-epoch freeze, under a shuffling loader) runs the prefix on its missing rows only.
      A kernel picked for the smaller batch may round otherwise than the whole batch's (about
      1e-7 in float32 on CPU convolutions), so turn it off for runs that must equal an
      uncached run bitwise;
    - ``host_budget_mb``: for a frontier on an accelerator, bytes kept in (pinned) host
      memory once ``memory_budget_mb`` on the device is full, before spilling; None (the
      default) is 4096 on an accelerator and 0 on the CPU;
    - ``prefetch``: read the next batch's spilled entries and copy its host rows to the
      device on a background thread;
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
    host_budget_mb: float | None = None
    sub_batches: bool = True

    def __post_init__(self) -> None:
        for name in ("enabled", "prefetch", "random_augmentation", "sub_batches"):
            flag(getattr(self, name), f"cache.{name}")
        if number(self.memory_budget_mb, "cache.memory_budget_mb") < 0:
            raise ConfigError(f"cache.memory_budget_mb must be a non-negative number, got {self.memory_budget_mb!r}")
        if self.host_budget_mb is not None and number(self.host_budget_mb, "cache.host_budget_mb") < 0:
            raise ConfigError(
                f"cache.host_budget_mb must be a non-negative number or None (automatic), got {self.host_budget_mb!r}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError(f"cache.dtype must be 'float32', 'float16' or 'bfloat16', got {self.dtype!r}")
        v = self.verify_fraction
        if not 0 <= number(v, "cache.verify_fraction") <= 1:
            raise ConfigError(f"cache.verify_fraction must be in [0, 1], got {v!r}")
        if self.directory is not None and not isinstance(self.directory, str):
            self.directory = str(self.directory)


@dataclass
class SafetyNetConfig:
    """The safety net under every policy (:mod:`fxfreeze.runtime.safety`): after a freeze
    the training loss is watched, and a rise beyond its noise unfreezes the block frozen last
    and makes that block wait longer before it may freeze again. It needs the training loss:
    a model output with a scalar ``loss`` (Hugging Face models given ``labels=``) is read by
    itself; otherwise call ``fm.freezer.observe_loss(loss)`` (the integrations do).

    - ``enabled``: on by default;
    - ``window``: steps of loss before a freeze that make its baseline, and the length of the
      sliding window compared with it after the freeze;
    - ``watch``: steps after a freeze during which a regression undoes it;
    - ``tolerance``: the post-freeze mean must exceed the baseline by this many standard
      errors (of the difference of two means of noisy per-step losses) ...
    - ``min_rise``: ... and by at least this share of the baseline;
    - ``hold``: steps an unfrozen block waits before it may freeze again (default:
      ``watch``), doubled at each further strike of the same block.
    """

    enabled: bool = True
    window: int = 50
    watch: int = 200
    tolerance: float = 4.0
    min_rise: float = 0.05
    hold: int | None = None

    def __post_init__(self) -> None:
        flag(self.enabled, "safety_net.enabled")
        positive_int(self.window, "safety_net.window", 5)
        positive_int(self.watch, "safety_net.watch")
        if self.hold is not None:
            positive_int(self.hold, "safety_net.hold")
        if not number(self.tolerance, "safety_net.tolerance") > 0:
            raise ConfigError(f"safety_net.tolerance must be a positive number, got {self.tolerance!r}")
        if not number(self.min_rise, "safety_net.min_rise") >= 0:
            raise ConfigError(f"safety_net.min_rise must be a non-negative number, got {self.min_rise!r}")


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
      Trainer and Lightning integrations fill it from the trainer's plan;
    - ``not_before``: no freeze before this optimizer step; a freeze decided earlier waits
      for it. None (the default): 0, unless the model's PEFT adapter reads every parameter's
      gradient until some step (AdaLoRA's rank allocation, up to ``total_step - tfinal``);
    - ``safety_net``: unfreeze when the training loss rises after a freeze
      (:class:`SafetyNetConfig`);
    - one section per built-in policy (``egeria``, ...) and ``cache``; ``sections`` holds
      those of policies registered from outside (``{"mypolicy": {...}}`` at the top level of
      a dict or YAML file lands there). :meth:`section` gives any policy's section.
    """

    policy: str = "egeria"
    lr_change_factor: float = 1.5
    release_optimizer_state: bool = True
    steps_per_epoch: int | None = None
    total_steps: int | None = None
    not_before: int | None = None
    manual: ManualConfig = field(default_factory=ManualConfig)
    freezeout: FreezeOutConfig = field(default_factory=FreezeOutConfig)
    egeria: EgeriaConfig = field(default_factory=EgeriaConfig)
    autofreeze: AutoFreezeConfig = field(default_factory=AutoFreezeConfig)
    smartfrz: SmartFRZConfig = field(default_factory=SmartFRZConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    safety_net: SafetyNetConfig = field(default_factory=SafetyNetConfig)
    sections: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.policy, str):
            raise ConfigError(f"policy must be a name, got {type(self.policy).__name__}")
        policy_entry(self.policy)  # a ConfigError naming the valid policies
        if not number(self.lr_change_factor, "lr_change_factor") > 1.0:
            raise ConfigError(f"lr_change_factor must be > 1, got {self.lr_change_factor!r}")
        flag(self.release_optimizer_state, "release_optimizer_state")
        if self.steps_per_epoch is not None:
            positive_int(self.steps_per_epoch, "steps_per_epoch")
        if self.total_steps is not None:
            positive_int(self.total_steps, "total_steps")
        if self.not_before is not None:
            positive_int(self.not_before, "not_before", minimum=0)
        self.cache = _section(CacheConfig, self.cache, "cache")
        self.safety_net = _section(SafetyNetConfig, self.safety_net, "safety_net")
        for name in _BUILTIN_SECTIONS:
            setattr(self, name, _section(_config_cls(name), getattr(self, name), name))
        if not isinstance(self.sections, Mapping):
            raise ConfigError(f"sections must map policy names to their config sections, got {self.sections!r}")
        checked: dict[str, Any] = {}
        for name, value in self.sections.items():
            if name in _BUILTIN_SECTIONS or name in _OWN_SECTIONS:
                raise ConfigError(f"the section {name!r} is a field of the config, not one of its sections")
            cls = _config_cls(name)
            if cls is None:
                raise ConfigError(f"policy {name!r} takes no config section")
            checked[name] = _section(cls, value, name)
        self.sections = checked

    def section(self, name: str) -> Any:
        """The config section of policy ``name`` (its defaults when the config has none)."""
        if name in _BUILTIN_SECTIONS or name in _OWN_SECTIONS:
            return getattr(self, name)
        if name not in self.sections:
            cls = _config_cls(name)
            if cls is None:
                raise ConfigError(f"policy {name!r} takes no config section")
            self.sections[name] = cls()
        return self.sections[name]

    def to_dict(self) -> dict[str, Any]:
        """Plain data: every field, and each registered policy's section at the top level
        (as in a YAML file)."""
        d = asdict(self)
        extra = d.pop("sections")
        d.update(extra)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FreezeConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"a config must be a mapping, got {type(data).__name__}")
        bad = [k for k in data if not isinstance(k, str)]
        if bad:
            raise ConfigError(f"the fxfreeze config has a key that is not a name: {bad[0]!r}")
        own = {f.name for f in fields(cls)} - {"sections"}
        known = own | {n for n in policy_names() if _config_cls(n) is not None}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown key {unknown[0]!r} in the fxfreeze config; allowed keys: {', '.join(sorted(known))}")
        kwargs = {k: v for k, v in data.items() if k in own}
        kwargs["sections"] = {k: v for k, v in data.items() if k not in own}
        return cls(**kwargs)

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


#: the built-in policies whose sections are fields of FreezeConfig
_BUILTIN_SECTIONS = ("manual", "freezeout", "egeria", "autofreeze", "smartfrz")
#: sections of the controller itself, not of a policy
_OWN_SECTIONS = ("cache", "safety_net")


def _config_cls(name: str) -> type | None:
    return policy_entry(name).config_cls


def _section(cls: type | None, value: Any, where: str) -> Any:
    """A section from a mapping (validated by its dataclass) or an instance of it."""
    if cls is None:
        raise ConfigError(f"policy {where!r} takes no config section")
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"config section {where!r} must be a mapping of its keys (or a {cls.__name__}), got {value!r}")
    check_keys(cls, value, f"config section {where!r}")
    try:
        return cls(**dict(value))
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a plugin's dataclass that does not validate itself
        raise ConfigError(f"config section {where!r}: {e}") from e


def load_config(config: Any = None, policy: str | None = None) -> FreezeConfig:
    """The :class:`FreezeConfig` a caller means: a FreezeConfig as is, a dict (validated), a YAML
    file path (read with ``yaml.safe_load``) or None (the defaults).

    Args:
        config: the configuration in any of those forms.
        policy: a policy name that overrides the configuration's ``policy``.

    Raises :class:`~fxfreeze.errors.ConfigError` naming the key or file at fault.

    Example::

        >>> cfg = load_config({"policy": "manual", "manual": {"schedule": {"2": 1}}})
        >>> cfg.policy, load_config(None, policy="smartfrz").policy
        ('manual', 'smartfrz')
    """
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
