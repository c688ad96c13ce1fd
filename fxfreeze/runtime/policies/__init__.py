"""Freezing policies, registered by name (one handler per name, no if/elif chains)."""

from __future__ import annotations

from typing import Any, Callable

from .base import Decision, Policy, Signals

__all__ = ["Policy", "Signals", "Decision", "register_policy", "available_policies", "make_policy"]

_REGISTRY: dict[str, Callable[[Any, Any], Policy]] = {}


def register_policy(name: str, factory: Callable[[Any, Any], Policy]) -> None:
    """Make ``policy=name`` build ``factory(config, plan)``."""
    _REGISTRY[name] = factory


def available_policies() -> list[str]:
    return sorted(_REGISTRY)


def make_policy(config: Any, plan: Any) -> Policy:
    from ...errors import ConfigError

    try:
        factory = _REGISTRY[config.policy]
    except KeyError:
        raise ConfigError(f"unknown policy {config.policy!r}; valid names: {', '.join(available_policies())}") from None
    return factory(config, plan)


def _register_builtin() -> None:
    from .autofreeze import AutoFreezePolicy
    from .egeria import EgeriaPolicy
    from .freezeout import FreezeOutPolicy
    from .manual import ManualPolicy
    from .smartfrz import SmartFRZPolicy

    register_policy("manual", ManualPolicy)
    register_policy("freezeout", FreezeOutPolicy)
    register_policy("egeria", EgeriaPolicy)
    register_policy("autofreeze", AutoFreezePolicy)
    register_policy("smartfrz", SmartFRZPolicy)


_register_builtin()
