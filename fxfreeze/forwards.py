"""A model's ``forward`` as an instance attribute: set it, restore it, give it a signature.

fxfreeze replaces ``model.forward`` in three places: during an export (a forward that drops
outputs a graph cannot return or names the call's arguments), when a training loop's model
is routed to its compiled module, and inside captures of a routed model (the plain forward
again). All three save what was there (an instance attribute or nothing) and put it back.
"""

from __future__ import annotations

import contextlib
import inspect
import types
from typing import Any, Callable, Iterator

from torch import nn

__all__ = [
    "ForwardState", "saved_forward", "restore_forward", "forward_with", "temporary_forward", "bound", "forward_of_copy",
]

#: (had an instance ``forward``, its value)
ForwardState = tuple[bool, Any]


def saved_forward(model: nn.Module) -> ForwardState:
    """What :func:`restore_forward` puts back."""
    return ("forward" in model.__dict__, model.__dict__.get("forward"))


def restore_forward(model: nn.Module, state: ForwardState) -> None:
    had, value = state
    if had:
        model.__dict__["forward"] = value
    else:
        model.__dict__.pop("forward", None)


def forward_with(sig: inspect.Signature | None, run: Callable[[Any, tuple[Any, ...], dict[str, Any]], Any]) -> Any:
    """A new ``forward`` function calling ``run(self, args, kwargs)`` whose signature is
    ``sig`` (plus a positional-only ``self``): bound to an instance, ``inspect.signature``
    shows exactly ``sig``."""

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        return run(self, args, kwargs)

    if sig is not None:
        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
        forward.__signature__ = sig.replace(parameters=[self_param, *sig.parameters.values()])  # type: ignore[attr-defined]
    return forward


@contextlib.contextmanager
def temporary_forward(model: nn.Module, state: ForwardState | None) -> Iterator[None]:
    """Within the block, ``model.forward`` is as ``state`` says (a function to bind, or a
    saved state from :func:`saved_forward`); afterwards what it was. None: no change."""
    if state is None:
        yield
        return
    now = saved_forward(model)
    restore_forward(model, state)
    try:
        yield
    finally:
        restore_forward(model, now)


def bound(model: nn.Module, fn: Any) -> ForwardState:
    """The state of ``model`` with ``fn`` bound as its forward."""
    return (True, types.MethodType(fn, model))


def forward_of_copy(state: ForwardState, original: nn.Module | None, model: nn.Module) -> Any:
    """What ``model`` runs when it holds a route installed on ``original`` that is not its
    own: a ``copy.deepcopy`` of a routed model (an EMA or SWA copy, a best-model snapshot)
    keeps the route, which must not send its calls to the original's compiled module. It
    runs the forward the original had before the route (``state``), rebound to itself."""
    had, value = state
    if not had:
        return types.MethodType(type(model).forward, model)
    if isinstance(value, types.MethodType) and original is not None and value.__self__ is original:
        return types.MethodType(value.__func__, model)
    return value
