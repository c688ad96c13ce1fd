"""Copies between an accelerator and host memory that never block the training thread.

Two users:

- :class:`HostTier`, the activation cache's second tier: frontier rows in host memory, between
  the rows kept on the frontier's device (``cache.memory_budget_mb``) and the spill files on
  disk. A frontier on a GPU that does not fit in the GPU's budget goes to host memory before
  disk, and comes back with one copy per batch, prepared while the previous batch trains;
- :func:`to_host`, the snapshots Egeria's reference worker reads (a block's weights at an
  anchor, the probe's activations at an evaluation).

On a CUDA device a copy to the host is staged as a device-to-device clone on the training
stream (microseconds: the source may be overwritten by the next optimizer step), then copied
to pinned memory with ``non_blocking=True`` on a side stream, behind an event. The training
stream never waits for it; whoever reads the host copy (the worker thread, or a cache read an
epoch later) waits for the event first. A copy back to the device is gathered into one pinned
staging buffer and copied on the side stream; the training stream waits for that copy's
event on the device (``wait_event``), not the host. On the CPU the tier is plain memory and
the copies are ordinary ones; other devices copy synchronously.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Sequence

import torch
from torch.utils._pytree import tree_map

__all__ = ["HostCopy", "HostTier", "to_host"]

_streams: dict[torch.device, Any] = {}
_streams_lock = threading.Lock()


def _side_stream(device: torch.device) -> Any:
    """One side stream per CUDA device, for copies between it and the host."""
    with _streams_lock:
        s = _streams.get(device)
        if s is None:
            s = _streams[device] = torch.cuda.Stream(device=device)
        return s


class HostCopy:
    """A copy to the host that may still be in flight: :meth:`wait` before reading it (from any
    thread; it blocks only the caller, and only while a CUDA copy is still running)."""

    def __init__(self, event: Any = None) -> None:
        self.event = event

    def done(self) -> bool:
        return self.event is None or bool(self.event.query())

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()
            self.event = None


def to_host(tree: Any, copy: bool = True) -> tuple[Any, HostCopy]:
    """Every tensor in ``tree`` copied to the CPU, and a handle to wait on before reading them.

    ``copy`` says the source may change in place after this call (weights the optimizer
    updates); without it the source must stay as it is (fresh activations, a batch's rows).
    CUDA tensors: (with ``copy``) a clone on the device, ordered before any later update on the
    training stream, then a ``non_blocking`` copy into pinned memory on a side stream, behind
    one event for the whole tree. CPU tensors are cloned with ``copy``, else handed on as they
    are. Other devices copy synchronously."""
    cuda: list[torch.device] = []

    def leaf(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        t = t.detach()
        if t.device.type == "cpu":
            return t.clone() if copy else t
        if t.device.type != "cuda":
            return t.to("cpu")
        if t.device not in cuda:
            cuda.append(t.device)
        src = t.clone() if copy else t  # the clone: on the training stream, before any later update
        side = _side_stream(t.device)
        side.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(side):
            host = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            host.copy_(src, non_blocking=True)
        src.record_stream(side)  # the allocator keeps the clone until the side stream is done with it
        return host

    out = tree_map(leaf, tree)
    if not cuda:
        return out, HostCopy()
    events = []
    for dev in cuda:
        ev = torch.cuda.Event()
        ev.record(_side_stream(dev))
        events.append(ev)
    return out, HostCopy(events[0] if len(events) == 1 else _Events(events))


class _Events:
    def __init__(self, events: list[Any]) -> None:
        self.events = events

    def query(self) -> bool:
        return all(e.query() for e in self.events)

    def synchronize(self) -> None:
        for e in self.events:
            e.synchronize()


class HostTier:
    """Cached frontier rows in host memory, up to ``budget`` bytes (see the module docstring).

    Rows are stored a batch at a time (:meth:`put`: one copy per batch, each sample's entry a
    row of it) and read a batch at a time (:meth:`gather`: the batch's rows in one pinned
    buffer, one copy to the device). :meth:`prefetch` starts that gather and copy for an
    upcoming batch on ``pool`` while the current one trains."""

    def __init__(self, budget: int, pool: ThreadPoolExecutor | None = None) -> None:
        self.budget = int(budget)
        self.bytes = 0
        self._pool = pool
        self._lock = threading.Lock()
        self._rows: dict[int, tuple[torch.Tensor, ...]] = {}
        self._pending: dict[int, HostCopy] = {}
        self._staged: dict[tuple[int, ...], Future[Any]] = {}
        self.stats = {"stored": 0, "served": 0, "prefetched": 0}

    def __contains__(self, i: object) -> bool:
        return i in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def room(self, row_bytes: int) -> int:
        """How many rows of ``row_bytes`` still fit."""
        if row_bytes <= 0:
            return 0
        return max(0, (self.budget - self.bytes) // row_bytes)

    def clear(self) -> None:
        with self._lock:
            self._rows, self._pending, self._staged = {}, {}, {}
            self.bytes = 0

    def put(self, ids: Sequence[int], batch: tuple[torch.Tensor, ...]) -> None:
        """Keep row ``r`` of every tensor in ``batch`` as sample ``ids[r]``'s entry (the caller
        checked :meth:`room`). Tensors on a CUDA device are copied to pinned memory without
        blocking; CPU tensors are kept as they are (the caller's own copy)."""
        if not ids:
            return
        host, handle = to_host(batch, copy=False)
        row = sum(t[0].numel() * t.element_size() for t in host)
        with self._lock:
            for r, i in enumerate(ids):
                self._rows[int(i)] = tuple(t[r] for t in host)
                if handle.event is not None:
                    self._pending[int(i)] = handle
            self.bytes += row * len(ids)
        self.stats["stored"] += len(ids)

    def _host_rows(self, i: int) -> tuple[torch.Tensor, ...]:
        with self._lock:
            handle = self._pending.pop(i, None)
            rows = self._rows[i]
        if handle is not None:
            handle.wait()  # a copy still in flight: only when read back within a few steps of storing
        return rows

    def _stage(self, ids: tuple[int, ...], devices: Sequence[torch.device]) -> tuple[tuple[torch.Tensor, ...], Any]:
        """The rows of ``ids`` on ``devices`` (one tensor per frontier value), and the event
        the reading stream must wait for (None when nothing is in flight)."""
        rows = [self._host_rows(i) for i in ids]
        out = []
        events: list[tuple[Any, Any]] = []
        for j, dev in enumerate(devices):
            parts = [r[j] for r in rows]
            if dev.type != "cuda":
                out.append(torch.stack(parts).to(dev))
                continue
            buf = torch.empty((len(parts), *parts[0].shape), dtype=parts[0].dtype, pin_memory=True)
            torch.stack(parts, out=buf)
            side = _side_stream(dev)
            with torch.cuda.device(dev), torch.cuda.stream(side):
                out.append(buf.to(dev, non_blocking=True))
                ev = torch.cuda.Event()
                ev.record(side)
            events.append((dev, ev))
        return tuple(out), events

    def prefetch(self, ids: Sequence[int], devices: Sequence[torch.device]) -> None:
        """Start gathering and copying the host rows of an upcoming batch (CUDA frontiers only:
        on the CPU it would be the same work, on another thread)."""
        key = tuple(int(i) for i in ids)
        if (self._pool is None or not key or key in self._staged
                or not any(d.type == "cuda" for d in devices) or not all(i in self._rows for i in key)):
            return
        self._staged[key] = self._pool.submit(self._stage, key, list(devices))
        self.stats["prefetched"] += len(key)

    def gather(self, ids: Sequence[int], devices: Sequence[torch.device]) -> tuple[torch.Tensor, ...]:
        """The rows of ``ids`` as one tensor per frontier value on ``devices``, ready for the
        current stream to use (a prefetched copy when there is one)."""
        key = tuple(int(i) for i in ids)
        fut = self._staged.pop(key, None)
        staged = None
        if fut is not None:
            try:
                staged = fut.result()
            except Exception:  # noqa: BLE001 - the prefetch failed (say, no pinned memory left): copy now
                staged = None
        out, events = staged if staged is not None else self._stage(key, devices)
        for dev, ev in events:
            cur = torch.cuda.current_stream(dev)
            cur.wait_event(ev)  # the device waits, the host does not
            for t in out:
                if t.device == dev:
                    t.record_stream(cur)
        self.stats["served"] += len(key)
        return out
