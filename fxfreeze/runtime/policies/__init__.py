"""Freezing policies. Which exist, and how each is configured, is :mod:`fxfreeze.registry`'s:
``register_policy(name, policy_cls, config_cls)`` adds one (built-in or from outside)."""

from __future__ import annotations

from typing import Any

from ...registry import policy_factory, policy_names, register_policy
from .base import Decision, Policy, Signals

__all__ = ["Policy", "Signals", "Decision", "register_policy", "available_policies", "make_policy"]


def available_policies() -> list[str]:
    """The registered policy names."""
    return policy_names()


def make_policy(config: Any, plan: Any) -> Policy:
    """The policy ``config.policy`` names, built on ``config`` and ``plan``."""
    return policy_factory(config.policy)(config, plan)
