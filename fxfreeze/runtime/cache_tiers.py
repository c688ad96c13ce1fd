"""Where the activation cache keeps its per-sample entries: the frontier's device, pinned
host memory, files on disk (see :mod:`fxfreeze.runtime.cache` for the policy around them).

:class:`EntryTiers` holds each sample's frontier rows (already in the storage dtype) on the
frontier's device up to a byte budget, beyond it in the host tier
(:mod:`fxfreeze.runtime.host_tier`) while that has room, beyond that in spill files
(:mod:`fxfreeze.runtime.spill`); it reads them back as the graph wants them (float32 again,
on the frontier's device) and puts a batch of them together. Kept apart from the cache's
decisions (what to run, what to trust) so that each stays readable.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import torch

from .host_tier import HostTier
from .spill import DiskTier

__all__ = ["EntryTiers", "DEFAULT_HOST_BUDGET_MB", "HOST"]

#: the host tier's budget when ``host_budget_mb`` is None and the frontier is on an accelerator
DEFAULT_HOST_BUDGET_MB = 4096.0
#: an entry's marker in a batch: its rows are in the host tier
HOST = ("host tier",)


class EntryTiers:
    """Per-sample frontier rows in three tiers: device, host, disk."""

    def __init__(self, memory_budget_mb: float, host_budget_mb: float | None, dtype: str,
                 directory: str | os.PathLike[str] | None, pool: ThreadPoolExecutor | None,
                 stats: dict[str, int]) -> None:
        self.budget = int(memory_budget_mb * 2**20)
        self.host_budget_mb = host_budget_mb
        self.store_dtype = None if dtype == "float32" else {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
        self._devices: tuple[torch.device, ...] | None = None
        self._lock = threading.Lock()
        self._mem: dict[int, tuple[torch.Tensor, ...]] = {}
        self._bytes = 0
        self._pool = pool
        self.stats = stats
        self._host: HostTier | None = None  # created at the first store, when the frontier's device is known
        self._disk = DiskTier(directory, self.stats, self._pool)
        self.directory = self._disk.directory

    def _assemble(self, keys: list[int], entries: list[Any]) -> tuple[torch.Tensor, ...]:
        """One batch tensor per frontier value from per-sample entries: rows on the device
        are stacked as they are; the host tier's rows come in one copy (prefetched when it
        could be)."""
        pos = [r for r, e in enumerate(entries) if e is HOST]
        if not pos:
            return tuple(torch.stack([e[j] for e in entries]) for j in range(len(entries[0])))
        assert self._host is not None and self._devices is not None
        part = self._restore(self._host.gather([keys[r] for r in pos], self._devices))
        if len(pos) == len(keys):
            return part
        at = {r: n for n, r in enumerate(pos)}
        return tuple(
            torch.stack([part[j][at[r]] if r in at else e[j] for r, e in enumerate(entries)]) for j in range(len(part))
        )

    def _offload(self, over: list[tuple[int, int]], stored: tuple[torch.Tensor, ...]) -> None:
        """Rows beyond the device budget: to the host tier while it has room (one copy for the
        batch's share), the rest to disk."""
        host = self._host_tier(stored)
        if host is not None:
            row_bytes = sum(t[0].numel() * t.element_size() for t in stored)
            n = min(len(over), host.room(row_bytes))
            if n:
                sel = [r for r, _ in over[:n]]
                # a stack of row views: no index tensor to copy to the device
                part = tuple(torch.stack([t[r] for r in sel]) for t in stored)
                host.put([i for _, i in over[:n]], part)
                over = over[n:]
        for row, i in over:
            self._put(i, tuple(t[row] for t in stored))

    def _host_tier(self, stored: tuple[torch.Tensor, ...]) -> HostTier | None:
        if self._host is None:
            mb = self.host_budget_mb
            if mb is None:
                mb = DEFAULT_HOST_BUDGET_MB if any(t.device.type != "cpu" for t in stored) else 0.0
            self._host = HostTier(int(mb * 2**20), self._pool)
        return self._host if self._host.budget > 0 else None

    def get(self, i: int) -> tuple[torch.Tensor, ...] | None:
        """The frontier rows stored for sample ``i`` (None when there are none, or when a
        spilled entry is unreadable or was written under another key: then it is deleted)."""
        i = int(i)
        if self._host is not None and i in self._host and self._devices is not None:
            return tuple(t[0] for t in self._restore(self._host.gather([i], self._devices)))
        return self._get(i)

    def spilled(self) -> list[Path]:
        """The files of the entries spilled to disk."""
        return self._disk.files()

    def _get(self, i: int) -> tuple[torch.Tensor, ...] | None:
        e = self._mem.get(i)
        if e is not None:  # kept on the frontier's own device
            return e if self.store_dtype is None else self._restore(e)
        e = self._disk.get(i)
        return None if e is None else self._restore(e)

    def _restore(self, e: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """An entry as the graph wants it: float32 again, on the frontier's device (spilled
        entries come back from disk on the CPU)."""
        devs = self._devices or ()
        out = []
        for j, t in enumerate(e):
            if self.store_dtype is not None and t.dtype == self.store_dtype:
                t = t.to(torch.float32)
            if j < len(devs) and t.device != devs[j]:
                t = t.to(devs[j], non_blocking=True)
            out.append(t)
        return tuple(out)

    def _put(self, i: int, stored: tuple[torch.Tensor, ...], spill: bool = True) -> bool:
        """Keep sample ``i``'s rows (already in the storage dtype, detached from the batch
        the model goes on using) on the device within the budget, else (``spill``) on disk.
        False when it was not kept (it is recomputed when needed)."""
        size = sum(t.numel() * t.element_size() for t in stored)
        if self._bytes + size <= self.budget:
            self._mem[i] = stored
            self._bytes += size
            return True
        return spill and self._disk.put(i, stored, self.budget / 2**20)

    def prefetch(self, ids: Sequence[int] | torch.Tensor) -> None:
        """Start reading the disk entries of an upcoming batch, and copying its host-tier rows
        to the device, on a background thread."""
        if self._pool is None:
            return
        keys = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        if self._host is not None and len(self._host) and self._devices is not None:
            self._host.prefetch([i for i in keys if i in self._host], self._devices)
        self._disk.prefetch(keys)

    @property
    def memory_bytes(self) -> int:
        """Bytes kept on the frontier's device."""
        return self._bytes

    @property
    def host_bytes(self) -> int:
        """Bytes kept in the host tier."""
        return self._host.bytes if self._host is not None else 0

    def __len__(self) -> int:
        return len(self._mem) + len(self._disk) + (len(self._host) if self._host is not None else 0)
