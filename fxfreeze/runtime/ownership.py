"""Which compiled module drives a model, and frozen modules held in eval mode.

- A model compiled twice is driven by the second compile: :func:`register_owner` records the
  compiled module per model (weakly), :func:`owner_of` finds it so that ``compile`` can
  detach the earlier one.
- A frozen block runs in eval mode (BatchNorm on its running statistics, no dropout)
  whoever calls ``train()`` later: :func:`hold_eval` gives the module an instance ``train``
  that keeps it there; :func:`release_eval` takes it away and sets the mode asked for.
  The hold is fxfreeze's, not the module's: a copy (``copy.deepcopy`` for an EMA, SWA or
  best-model snapshot; ``torch.save(model)`` then ``torch.load``) is a frozen block of no
  compiled module and gets its class's own ``train``, and a saved file names nothing of
  fxfreeze, so it loads where fxfreeze is not installed.
"""

from __future__ import annotations

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


class _EvalHold:
    """``train`` of a frozen module: it stays in eval mode, whoever asks."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        return type(self.module).train(self.module, False)

    def __reduce__(self) -> tuple[Any, tuple[nn.Module, str]]:
        # Copied and pickled as ``getattr(copy, "train")``: pickle and deepcopy both build
        # the new module before they set its state, so this finds the class's ``train``.
        return (getattr, (self.module, "train"))


def release_owner(model: nn.Module, fm: Any) -> None:
    """Forget ``fm`` as ``model``'s driver (when it still is: a later compile took over)."""
    ref = _OWNERS.get(model)
    if ref is not None and ref() is fm:
        del _OWNERS[model]


def hold_eval(m: nn.Module) -> None:
    """Put ``m`` in eval mode and keep it there (an instance ``train`` that refuses)."""
    m.__dict__["train"] = _EvalHold(m)
    m.train(False)


def release_eval(m: nn.Module, mode: bool) -> None:
    """Undo :func:`hold_eval` and set ``m``'s mode to ``mode``."""
    m.__dict__.pop("train", None)
    m.train(mode)
