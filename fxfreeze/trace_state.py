"""Running code on a model without leaving a trace (captures, propagation, probes)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

__all__ = ["preserved_state"]


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Run code on ``model`` without leaving a trace: buffers (BatchNorm running stats,
    counters), every module's training flag and the random number generators (dropout in
    a capture must not shift the user's random stream) are restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    buffers = {
        name: buf.detach().clone() for name, buf in model.named_buffers() if buf is not None
    }
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        with torch.no_grad():
            for name, buf in model.named_buffers():
                saved = buffers.get(name)
                if saved is not None and buf is not None and saved.shape == buf.shape:
                    buf.copy_(saved)
        for m, mode in modes.items():
            m.training = mode
