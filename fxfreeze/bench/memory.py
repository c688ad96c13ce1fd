"""Bytes that autograd saves for backward: the memory activation checkpointing is there to
cut, counted exactly (every tensor packed by ``saved_tensors_hooks``), independent of the
allocator and of the device. ``benchmarks/checkpoint_memory.py`` and
``tests/runtime/test_checkpointing.py`` compare a model's own forward with fxfreeze's by it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["saved_bytes"]


def saved_bytes(forward: Callable[[], Any]) -> tuple[int, Any]:
    """Run ``forward()`` and return the bytes of the tensors it saved for backward, with its
    output (call ``.backward()`` on it to free them). A tensor saved twice counts twice.

    Example::

        >>> x = torch.randn(4, 8, requires_grad=True)
        >>> n, out = saved_bytes(lambda: (x * x).sum())
        >>> n  # x, saved once per operand of the product
        256
    """
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return total, out
