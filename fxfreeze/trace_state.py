"""Running code on a model without leaving a trace (captures, propagation, probes)."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.utils._pytree as pytree
from torch import nn

__all__ = ["preserved_state", "fresh_containers"]


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Run code on ``model`` without leaving a trace: buffers (BatchNorm running stats,
    counters), every module's training flag and the random number generators (dropout in
    a capture must not shift the user's random stream) are restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers() if buf is not None}
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        with torch.no_grad():
            for name, buf in model.named_buffers():
                saved = buffers.get(name)
                if saved is None or buf is None or saved.shape != buf.shape:
                    continue
                # A capture may come between a forward and its backward (a second call of
                # the model in the same step, of a new kind). That forward saved buffers for
                # its backward (a slice of BERT's position_ids, BatchNorm's running stats),
                # and a write that bumps their version counter fails it ("modified by an
                # inplace operation"). So only a buffer whose contents changed is put back,
                # and through ``.data``, which writes without bumping the counter, as
                # BatchNorm's own kernel updates its running stats. (The counter cannot tell
                # which buffers changed: that kernel does not always bump it.)
                if not torch.equal(buf, saved):
                    buf.data.copy_(saved)
        for m, mode in modes.items():
            m.training = mode


def fresh_containers(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call's lists, tuples and dicts rebuilt around the same tensors, for one run of the
    model: a forward that writes into its input dict (sentence-transformers adds its outputs
    to the features it is given) must not change the example inputs a capture keeps, nor
    the caller's dict."""
    args, kwargs = pytree.tree_map(lambda x: x, (tuple(args), dict(kwargs)))
    return tuple(args), dict(kwargs)
