"""Keeping ``torch.compile``'s trace out of the compiled module's bookkeeping, at no cost
when nothing is being compiled.

``torch.compile(fm)`` should trace the graphs fxfreeze runs, not the Python around them:
its counters and lookups would make dynamo guard on them and recompile at every call. A
``torch.compiler.disable`` wrapper keeps dynamo out but adds microseconds to every call in
plain eager training too, so :func:`outside_dynamo` calls it only while dynamo traces (``torch.compiler.is_compiling()``,
which dynamo reads as True and then follows the disabled branch), and the plain function
otherwise.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import torch

__all__ = ["outside_dynamo"]

F = TypeVar("F", bound=Callable[..., Any])


def outside_dynamo(fn: F) -> F:
    """``fn``, skipped by dynamo's trace (a graph break around it), a plain call otherwise."""
    disabled = torch.compiler.disable(fn)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return disabled(*args, **kwargs)
        return fn(*args, **kwargs)

    # dynamo keeps its compiled frames per code object: one per function wrapped, or the
    # wrappers of functions with other arguments would share one and recompile each other
    call.__code__ = call.__code__.replace(co_name=f"{fn.__name__}_outside_dynamo")
    return call  # type: ignore[return-value]
