"""Which compiled module drives a model, and frozen modules held in eval mode.

- A model compiled twice is driven by the second compile: :func:`register_owner` records the
  compiled module per model (weakly), :func:`owner_of` finds it so that ``compile`` can
  detach the earlier one.
- A frozen block runs in eval mode (BatchNorm on its running statistics, no dropout)
  whoever calls ``train()`` later: :func:`hold_eval` gives the module an instance ``train``
  that keeps it there; :func:`release_eval` takes it away and sets the mode asked for.
"""

from __future__ import annotations

import types
import weakref
from typing import Any

from torch import nn

__all__ = ["owner_of", "register_owner", "release_owner", "hold_eval", "release_eval"]

#: original model -> weak reference to the module compiled from it (a second compile takes over)
_OWNERS: "weakref.WeakKeyDictionary[nn.Module, weakref.ref[Any]]" = weakref.WeakKeyDictionary()


def owner_of(model: nn.Module) -> Any:
    """The compiled module currently driving ``model`` (None if none is alive)."""
    ref = _OWNERS.get(model)
    return ref() if ref is not None else None


def register_owner(model: nn.Module, fm: Any) -> None:
    """Record ``fm`` as the compiled module driving ``model``."""
    _OWNERS[model] = weakref.ref(fm)


def _frozen_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """``train`` of a frozen module: it stays in eval mode, whoever asks."""
    return type(self).train(self, False)


def release_owner(model: nn.Module, fm: Any) -> None:
    """Forget ``fm`` as ``model``'s driver (when it still is: a later compile took over)."""
    ref = _OWNERS.get(model)
    if ref is not None and ref() is fm:
        del _OWNERS[model]


def hold_eval(m: nn.Module) -> None:
    """Put ``m`` in eval mode and keep it there (an instance ``train`` that refuses)."""
    m.__dict__["train"] = types.MethodType(_frozen_train, m)
    m.train(False)


def release_eval(m: nn.Module, mode: bool) -> None:
    """Undo :func:`hold_eval` and set ``m``'s mode to ``mode``."""
    m.__dict__.pop("train", None)
    m.train(mode)
