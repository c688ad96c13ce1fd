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
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["HostCopy", "HostFuture", "HostTier", "to_host", "to_host_later"]

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


def _stage(tree: Any, copy: bool) -> tuple[list[Any], Any, list[tuple[torch.device, torch.dtype, Any, list[int], list[Any]]]]:
    """The training thread's part of a copy to the host: CPU tensors handled at once, and per
    CUDA device and dtype the tensors gathered into one buffer on the device (one ``torch.cat``
    on the training stream: the clone that ``copy`` asks for, ordered before any later update).
    Returns the flattened tree, its spec, and the groups still to copy."""
    flat, spec = tree_flatten(tree)
    out = list(flat)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(flat):
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach()
        if t.device.type == "cpu":
            out[i] = t.clone() if copy else t
        elif t.device.type != "cuda" or t.is_quantized or t.layout != torch.strided:
            out[i] = t.to("cpu")
        else:
            groups.setdefault((t.device, t.dtype), []).append(i)
    staged = []
    for (dev, dtype), idx in groups.items():
        ts = [flat[i].detach() for i in idx]
        # a single tensor without ``copy`` is copied from where it is (no kernel on the device)
        src = ts[0].reshape(-1) if len(ts) == 1 and not copy else torch.cat([t.reshape(-1) for t in ts])
        staged.append((dev, dtype, src, idx, ts))
    return out, spec, staged


def _issue(out: list[Any], staged: list[tuple[torch.device, torch.dtype, Any, list[int], list[Any]]],
           after: dict[torch.device, Any]) -> list[Any]:
    """Copy each staged buffer into pinned memory on the device's side stream, once the side
    stream has passed ``after[device]`` (the training stream, or an event recorded on it); fill
    ``out`` with views of the pinned buffers. Returns one event per buffer."""
    events = []
    for dev, dtype, src, idx, ts in staged:
        side = _side_stream(dev)
        wait_for = after[dev]
        if isinstance(wait_for, torch.cuda.Event):
            side.wait_event(wait_for)
        else:
            side.wait_stream(wait_for)
        with torch.cuda.device(dev), torch.cuda.stream(side):
            host = torch.empty(src.shape, dtype=dtype, pin_memory=True)
            host.copy_(src, non_blocking=True)
        src.record_stream(side)  # the allocator keeps the source until the side stream is done with it
        ev = torch.cuda.Event()
        ev.record(side)
        events.append(ev)
        off = 0
        for i, t in zip(idx, ts):
            out[i] = host[off : off + t.numel()].view(t.shape)
            off += t.numel()
    return events


def _handle(events: list[Any]) -> HostCopy:
    if not events:
        return HostCopy()
    return HostCopy(events[0] if len(events) == 1 else _Events(events))


def to_host(tree: Any, copy: bool = True) -> tuple[Any, HostCopy]:
    """Every tensor in ``tree`` copied to the CPU, and a handle to wait on before reading them.

    ``copy`` says the source may change in place after this call (weights the optimizer
    updates); without it the source must stay as it is (fresh activations, a batch's rows).
    CUDA tensors are gathered per device and dtype into one buffer on the device (one
    ``torch.cat`` on the training stream: the clone that ``copy`` asks for, ordered before any
    later update), copied with ``non_blocking=True`` into one pinned buffer on a side stream,
    behind one event for the whole tree, and handed back as views of that buffer. One pinned
    allocation and one copy per dtype however many tensors the tree holds: a block's weights
    are a dozen tensors or more, and each copy of its own costs the training thread a pinned
    allocation and four CUDA calls. CPU tensors are cloned with ``copy``, else handed on as
    they are. Other devices (and quantized or sparse CUDA tensors) copy synchronously. See
    :func:`to_host_later` for a copy whose pinned allocation leaves the training thread too."""
    out, spec, staged = _stage(tree, copy)
    events = _issue(out, staged, {dev: torch.cuda.current_stream(dev) for dev, *_ in staged})
    return tree_unflatten(out, spec), _handle(events)


class HostFuture:
    """A tree on its way to the host (:func:`to_host_later`): :meth:`result` waits for it and
    returns it, from any thread."""

    def __init__(self, tree: Any = None, future: Future[Any] | None = None) -> None:
        self._tree = tree
        self._future = future

    def done(self) -> bool:
        if self._future is None:
            return True
        if not self._future.done():
            return False
        return self._future.exception() is not None or self._future.result()[1].done()

    def result(self, timeout: float | None = None) -> Any:
        """The tree of host tensors, once every copy has landed (raises what the copy raised)."""
        if self._future is not None:
            tree, handle = self._future.result(timeout)
            handle.wait()
            self._tree, self._future = tree, None
        return self._tree


_copier: ThreadPoolExecutor | None = None
_copier_lock = threading.Lock()


def _copier_pool() -> ThreadPoolExecutor:
    global _copier
    with _copier_lock:
        if _copier is None:
            _copier = ThreadPoolExecutor(1, thread_name_prefix="fxfreeze-host-copy")
        return _copier


def to_host_later(tree: Any, copy: bool = True) -> HostFuture:
    """:func:`to_host`, with only the gathering on the device left to the calling thread.

    The caller's thread records an event after the gathering ``torch.cat`` and goes on; a
    helper thread allocates the pinned buffers and issues the copies on the side stream once
    that event has passed. A pinned allocation the host allocator has not cached (a new size)
    is a ``cudaHostAlloc`` of up to milliseconds per megabyte: on an H200, Egeria's evaluation
    spent 5-38 ms of the training thread in them. Trees without CUDA tensors are done at once."""
    out, spec, staged = _stage(tree, copy)
    if not staged:
        return HostFuture(tree_unflatten(out, spec))
    after = {}
    for dev, *_ in staged:
        if dev not in after:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(dev))
            after[dev] = ev

    def issue() -> tuple[Any, HostCopy]:
        events = _issue(out, staged, after)  # fills ``out`` with the pinned views: before the tree is built
        return tree_unflatten(out, spec), _handle(events)

    return HostFuture(future=_copier_pool().submit(issue))


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
