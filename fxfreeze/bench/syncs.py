"""Counting the host synchronisations of a training step with the PyTorch profiler.

A step whose Python code reads a device value (``.item()``, ``float(t)``, ``bool(t)``, a
tensor used as an index size) makes the host wait for the device to finish everything queued
before it: on a GPU that ends the overlap of the host's launches with the device's work. Such
reads show in the profiler as ``aten::_local_scalar_dense`` on every device; on CUDA the
runtime calls that wait (``cudaDeviceSynchronize``, ``cudaStreamSynchronize``,
``cudaEventSynchronize``, a synchronous ``cudaMemcpy``) show as well.

:func:`count_syncs` runs ``steps`` calls of a step function under the profiler and counts
them, so that a run with fxfreeze can be compared with the same loop without it
(``benchmarks/sync_profile.py``; ``tests/bench/test_syncs.py`` on the CPU).
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import torch

__all__ = ["ASYNC_COPY", "HOST_READ", "SYNC_EVENTS", "count_syncs"]

#: profiler event names that make the host wait for a device
SYNC_EVENTS = (
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "cudaDeviceSynchronize",
    "cudaStreamSynchronize",
    "cudaEventSynchronize",
    "cudaMemcpy",
    "Memcpy DtoH (Device -> Pageable)",  # a copy to unpinned host memory: the host waits for it
)
#: recorded apart: copies to pinned memory with ``non_blocking=True`` (the host does not wait)
ASYNC_COPY = "Memcpy DtoH (Device -> Pinned)"
#: recorded apart, on CUDA runs: ``aten::_local_scalar_dense`` that called no CUDA runtime
#: function, i.e. a read of a host tensor (a loss already copied to pinned memory, a
#: DataLoader's seed); on a run without CUDA every such read counts as a wait (the code path).
#: A read of a device value is a wait either way: its ``cudaStreamSynchronize`` is counted
#: whether or not the profiler files it under the read
HOST_READ = "aten::_local_scalar_dense (host tensor)"


def _calls_cuda(ev: object) -> bool:
    """Does a profiler event call a CUDA runtime function, itself or below?"""
    stack = list(getattr(ev, "cpu_children", []))
    while stack:
        child = stack.pop()
        if child.name.startswith("cuda"):
            return True
        stack.extend(getattr(child, "cpu_children", []))
    return False


def count_syncs(step: Callable[[], object], steps: int) -> Counter[str]:
    """Run ``step()`` ``steps`` times under the profiler; the number of each of
    :data:`SYNC_EVENTS` it recorded, and of :data:`ASYNC_COPY` (events of other threads
    included: a reference worker's waits are counted too, though they do not hold up
    training). Only the events in :data:`SYNC_EVENTS` make the host wait; on CUDA a scalar
    read of a host tensor is counted as :data:`HOST_READ` instead."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(ProfilerActivity.CUDA)
    with profile(activities=acts) as prof:
        for _ in range(int(steps)):
            step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # so that every kernel is recorded; taken off the count below
    counts: Counter[str] = Counter()
    cuda = torch.cuda.is_available()
    for ev in prof.events():
        if ev.name == "aten::_local_scalar_dense" and cuda and not _calls_cuda(ev):
            counts[HOST_READ] += 1
        elif ev.name in SYNC_EVENTS or ev.name == ASYNC_COPY:
            counts[ev.name] += 1
    if torch.cuda.is_available() and counts["cudaDeviceSynchronize"]:
        counts["cudaDeviceSynchronize"] -= 1  # the one above
    return +counts
