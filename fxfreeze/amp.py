"""Mixed precision that a wrapper of ``model.forward`` applies (accelerate's, among others).

``accelerator.prepare(model)`` with ``mixed_precision="bf16"`` (and so the HF Trainer with
``bf16=True``) replaces ``model.forward`` by an instance attribute that runs the model's own
forward inside ``torch.autocast`` and casts the outputs back to float32. fxfreeze meets that
wrapper in two places, and both went wrong before this module:

- **Capture.** ``torch.export`` calls ``model(...)``, so it ran through the wrapper and
  recorded its autocast region as one higher-order node around the whole model: the plan
  found one block where there are many. A capture now runs the forward the wrapper wraps,
  with the wrapper's autocast entered around it, so the graph records each op's cast and the
  blocks stay visible.
- **Run.** The compiled module runs graphs, not the wrapper, and a route installed on the
  model replaces the wrapper: mixed precision was silently lost. The graphs now run under
  the wrapper's autocast, and the wrapper's conversion of outputs applies to their outputs.

The wrapper is read, not called: its ``torch.autocast`` object is found in the closures along
its ``__wrapped__`` chain (what ``functools.wraps`` and ``torch.autocast`` used as a
decorator leave), so any wrapper built that way is understood, not a list of known ones.
"""

from __future__ import annotations

import contextlib
import sys
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .forwards import ForwardState, bound, temporary_forward

__all__ = ["WrapperAutocast", "wrapper_autocast", "plain_capture"]

#: how far along a wrapper chain to look (accelerate's is three deep)
_MAX_DEPTH = 8


@dataclass(frozen=True)
class WrapperAutocast:
    """The autocast that a wrapper of ``model.forward`` applies, and how to do without it."""

    device_type: str
    dtype: torch.dtype
    #: ``model.forward`` without the wrapper (what a capture runs)
    plain: ForwardState
    #: the wrapper's conversion of outputs (accelerate's ``convert_to_fp32``), or None
    convert_outputs: Callable[[Any], Any] | None = None

    def region(self) -> Any:
        """The wrapper's autocast, to enter around the graphs."""
        return torch.autocast(self.device_type, dtype=self.dtype)

    @contextlib.contextmanager
    def capturing(self, model: nn.Module) -> Iterator[None]:
        """Within the block, ``model.forward`` is the plain forward and the wrapper's
        autocast is on: a capture records each op's cast, not one region."""
        with self.region(), temporary_forward(model, self.plain):
            yield

    def outputs(self, out: Any) -> Any:
        return self.convert_outputs(out) if self.convert_outputs is not None else out


def _callables(fn: Any) -> Iterator[Any]:
    """``fn``, then what it wraps (``__wrapped__``), outermost first."""
    for _ in range(_MAX_DEPTH):
        if fn is None:
            return
        yield fn
        fn = getattr(getattr(fn, "__func__", fn), "__wrapped__", None)


def _closure_values(fn: Any) -> list[Any]:
    fn = getattr(fn, "__func__", fn)
    code_owner = fn if isinstance(fn, types.FunctionType) else getattr(type(fn), "__call__", None)
    values = []
    for cell in getattr(code_owner, "__closure__", None) or ():
        try:
            values.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    return values


def _plain_state(model: nn.Module, inner: Any) -> ForwardState:
    """The forward state that runs ``inner`` (the innermost wrapped forward) on ``model``."""
    func = getattr(inner, "__func__", inner)
    if func is type(model).forward and getattr(inner, "__self__", model) is model:
        return (False, None)  # the class's own forward: no instance attribute
    if isinstance(inner, types.FunctionType):
        return bound(model, inner)
    return (True, inner)


def wrapper_autocast(model: nn.Module, forward: Any) -> WrapperAutocast | None:
    """The autocast that ``forward``, a wrapper set as ``model.forward``, applies around the
    model's own forward; None when there is no wrapper (``forward`` None) or it enters no
    enabled autocast."""
    if forward is None:
        return None
    found: torch.autocast | None = None
    convert: Callable[[Any], Any] | None = None
    inner = forward
    accelerate_ops = sys.modules.get("accelerate.utils.operations")  # read only if imported already
    for fn in _callables(forward):
        inner = fn
        if found is None:
            found = next((v for v in _closure_values(fn) if isinstance(v, torch.autocast)), None)
        converter = getattr(accelerate_ops, "ConvertOutputsToFp32", None)
        if converter is not None and isinstance(getattr(fn, "__func__", fn), converter):
            convert = accelerate_ops.convert_to_fp32
    if found is None or not getattr(found, "_enabled", False):
        return None
    if inner is forward:
        return None  # a wrapper whose inner forward we cannot reach: leave it alone
    return WrapperAutocast(str(found.device), found.fast_dtype, _plain_state(model, inner), convert)


@contextlib.contextmanager
def plain_capture(model: Any) -> Iterator[WrapperAutocast | None]:
    """Around a capture of ``model`` (and what keys its graphs by the autocast state): when
    ``model.forward`` is a mixed-precision wrapper, the plain forward under its autocast
    (see the module docstring); otherwise nothing changes."""
    amp = wrapper_autocast(model, getattr(model, "__dict__", {}).get("forward")) if isinstance(model, nn.Module) else None
    if amp is None:
        yield None
        return
    with amp.capturing(model):
        yield amp
