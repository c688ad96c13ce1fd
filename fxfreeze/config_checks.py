"""Validation of configuration values: no coercion, and an error that names the key.

A config comes from YAML or a dict a person wrote: ``"no"`` must not become True, ``1.7``
must not become 1, an infinite budget must not pass. These helpers raise
:class:`~fxfreeze.errors.ConfigError` naming the key (``where``); policy config sections,
built-in or registered from outside, use them in ``__post_init__``.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any, Mapping

from .errors import ConfigError

__all__ = ["number", "flag", "whole", "positive_int", "check_keys"]


def number(value: Any, where: str) -> float:
    """A real, finite number (not a bool, not a string): else a ConfigError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def flag(value: Any, where: str) -> bool:
    """true or false only: YAML's "no" is a string, not False."""
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    return value


def whole(value: Any, where: str) -> int:
    """An integer, or a float with no fractional part (YAML may give ``3.0``); never a
    bool, a string or ``1.7`` (which int() would silently truncate)."""
    if isinstance(value, bool):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if not isinstance(value, int):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    return value


def check_keys(cls: type, data: Mapping[str, Any], where: str) -> None:
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{where} has a key that is not a name: {bad[0]!r}")
    allowed = sorted(f.name for f in fields(cls))
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in {where}; allowed keys: {', '.join(allowed)}")


def positive_int(value: Any, where: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where} must be an integer >= {minimum}, got {value!r}")
    return value
