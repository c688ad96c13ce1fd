"""Policies by name: the one place that knows which policies exist and how each is configured.

``register_policy(name, policy_cls, config_cls)`` makes ``policy=name`` build
``policy_cls(config, plan)`` and makes the config section ``name`` (in YAML, a dict or a
:class:`~fxfreeze.config.FreezeConfig`) validated by ``config_cls``, a dataclass that checks
its fields in ``__post_init__`` (see :mod:`fxfreeze.config_checks`). A policy defined
outside fxfreeze is selected and configured exactly like a built-in one::

    @dataclass
    class PatienceConfig:
        steps: int = 100

    class PatiencePolicy(fxfreeze.runtime.policies.Policy):
        def decide(self, signals):
            cfg = self.config.section("patience")     # a PatienceConfig
            ...

    fxfreeze.register_policy("patience", PatiencePolicy, PatienceConfig)
    fm = fxfreeze.compile(model, x, config={"policy": "patience", "patience": {"steps": 50}})

Built-in policies are registered here by module path and imported on first use, so that
configuration never imports the runtime (the runtime imports configuration).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from .errors import ConfigError
from .policy_configs import AutoFreezeConfig, EgeriaConfig, FreezeOutConfig, ManualConfig, SmartFRZConfig

__all__ = ["PolicyEntry", "register_policy", "unregister_policy", "policy_names", "policy_entry", "policy_factory"]

#: the policies fxfreeze ships: never unregistered
_BUILTIN = ("manual", "freezeout", "egeria", "autofreeze", "smartfrz")


@dataclass(frozen=True)
class PolicyEntry:
    """A registered policy: its class (or ``"module:Class"``, imported on first use) and
    the dataclass of its config section (None: it takes no section)."""

    name: str
    policy: Any
    config_cls: type | None


_POLICIES: dict[str, PolicyEntry] = {}


def register_policy(name: str, policy_cls: Any, config_cls: type | None = None, *, replace: bool = False) -> None:
    """Make ``policy=name`` build ``policy_cls(config, plan)``.

    Args:
        name: the policy's name; also the name of its config section (an identifier).
        policy_cls: a :class:`~fxfreeze.runtime.policies.Policy` subclass, or its import path
            ``"package.module:Class"`` (imported when first used).
        config_cls: a dataclass validating the section ``name`` (``from_dict``/``to_dict``, as
            the built-in sections in :mod:`fxfreeze.policy_configs`); None: no options.
        replace: allow replacing a registered name (otherwise ``ConfigError``).

    Example::

        >>> import fxfreeze
        >>> from fxfreeze.runtime.policies import Policy
        >>> class Never(Policy):
        ...     name = "never"
        ...     def decide(self, signals):
        ...         return None
        >>> fxfreeze.register_policy("never", Never, replace=True)
        >>> fxfreeze.FreezeConfig(policy="never").policy
        'never'
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"a policy name must be an identifier (it names a config section), got {name!r}")
    if name in _POLICIES and not replace:
        raise ConfigError(f"a policy named {name!r} is already registered; pass replace=True to replace it")
    if config_cls is not None and not isinstance(config_cls, type):
        raise ConfigError(f"config_cls of policy {name!r} must be a class (a dataclass), got {config_cls!r}")
    _POLICIES[name] = PolicyEntry(name, policy_cls, config_cls)


def unregister_policy(name: str) -> None:
    """Remove a policy registered with :func:`register_policy` (a plugin unloading, a test
    cleaning up); configs naming it are refused from then on. Built-in policies stay.

    Example::

        >>> from fxfreeze.runtime.policies import Policy
        >>> class Never(Policy):
        ...     def decide(self, signals):
        ...         return None
        >>> register_policy("never_again", Never); unregister_policy("never_again")
        >>> "never_again" in policy_names()
        False
    """
    if name in _BUILTIN:
        raise ConfigError(f"the built-in policy {name!r} cannot be unregistered")
    if name not in _POLICIES:
        raise ConfigError(f"no policy {name!r} is registered")
    del _POLICIES[name]


def policy_names() -> list[str]:
    """The registered policy names, sorted.

    Example::

        >>> "egeria" in policy_names()
        True
    """
    return sorted(_POLICIES)


def policy_entry(name: str) -> PolicyEntry:
    """The registry entry of ``name`` (its policy class or import path and its config class);
    ``ConfigError`` listing the valid names when there is none.

    Example::

        >>> policy_entry("manual").name
        'manual'
    """
    try:
        return _POLICIES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown policy {name!r}; valid names: {', '.join(policy_names())}") from None


def policy_factory(name: str) -> Callable[[Any, Any], Any]:
    """The policy class of ``name``, imported now if it was registered by path.

    Example::

        >>> policy_factory("manual").__name__
        'ManualPolicy'
    """
    entry = policy_entry(name)
    policy = entry.policy
    if isinstance(policy, str):
        module, attr = policy.split(":")
        policy = getattr(importlib.import_module(module), attr)
        _POLICIES[name] = PolicyEntry(name, policy, entry.config_cls)
    return policy


for _name, _path, _cfg in (
    ("manual", "fxfreeze.runtime.policies.manual:ManualPolicy", ManualConfig),
    ("freezeout", "fxfreeze.runtime.policies.freezeout:FreezeOutPolicy", FreezeOutConfig),
    ("egeria", "fxfreeze.runtime.policies.egeria:EgeriaPolicy", EgeriaConfig),
    ("autofreeze", "fxfreeze.runtime.policies.autofreeze:AutoFreezePolicy", AutoFreezeConfig),
    ("smartfrz", "fxfreeze.runtime.policies.smartfrz:SmartFRZPolicy", SmartFRZConfig),
):
    register_policy(_name, _path, _cfg)
