"""The activation cache of a frozen prefix: per-sample frontier tensors by sample id.

Egeria and AutoFreeze cache the outputs of frozen layers so that later epochs skip their
forward pass as well. :class:`ActivationCache` stores, for each sample id (its index in the
dataset), the frontier tensors the frozen prefix produced for it:

- on the frontier's device up to ``memory_budget_mb`` (GPU-resident when the frontier is on a
  GPU); beyond that in host memory up to ``host_budget_mb`` (pinned, copied without blocking the
  training stream and prefetched a batch ahead: :mod:`fxfreeze.runtime.host_tier`; by default
  4 GiB for a frontier on an accelerator, none on the CPU, where the first budget is host
  memory already); beyond that, entries spill to files in ``directory``
  (:mod:`fxfreeze.runtime.spill`; a fresh temporary folder by default), one file per sample: a small header (shapes and
  dtypes), the raw bytes, and a CRC-32 of them. A file that is truncated or whose checksum
  fails is detected, deleted and recomputed, never used. Files are plain data, no pickle;
- optionally in float16 (half the memory, no longer bitwise);
- bound to its run and to the exact frozen weights: spill files live in a folder of this
  cache instance and start with a key over the plan, the prefix and a fingerprint of the
  frozen parameters and buffers; a file whose key differs (another run sharing
  ``directory``, stale weights) is never served, it is recomputed;
- degrading, never failing: a spill folder that becomes unwritable mid-run turns spilling
  off with one warning (entries beyond the memory budget are then recomputed);
- invalidated whenever the frozen prefix changes. When it grows from ``k`` to ``k' > k``
  and every sample of a batch still has its ``k`` entry, the new frontier is computed from
  the old one by running blocks ``k..k'-1`` only (the prefix does not run again).

On a miss the prefix runs under ``no_grad`` on the whole batch (its modules are in eval mode
and deterministic, so a sample's frontier does not depend on its batch) and the batch's
entries are stored. A batch without sample ids (the loop did not go through
``fm.wrap_loader``) is computed, not cached, with one warning. Each stored sample keeps a
fingerprint of its input (:mod:`fxfreeze.runtime.input_prints`); a read whose input differs
from it (random augmentation the config did not declare, multi-scale inputs, ids that do not
follow the data) drops the cache, turns caching off and warns. ``verify_fraction`` of the
hits are also recomputed and compared, which catches a prefix whose output varies for the
same input.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .dynamo import outside_dynamo
from .host_tier import HostTier
from .input_prints import InputPrints
from .spill import DiskTier

__all__ = ["ActivationCache", "CacheStats"]

logger = logging.getLogger("fxfreeze")
#: the host tier's budget when ``host_budget_mb`` is None and the frontier is on an accelerator
DEFAULT_HOST_BUDGET_MB = 4096.0

class CacheStats(dict):  # a dict so that it prints and serialises plainly
    pass


class ActivationCache:
    """Frontier tensors of the frozen prefix, per sample id. See the module docstring."""

    def __init__(
        self,
        memory_budget_mb: float = 1024.0,
        directory: str | os.PathLike[str] | None = None,
        dtype: str = "float32",
        verify_fraction: float = 0.0,
        prefetch: bool = True,
        seed: int = 0,
        host_budget_mb: float | None = None,
    ) -> None:
        self.budget = int(memory_budget_mb * 2**20)
        self.host_budget_mb = host_budget_mb
        self.store_dtype = None if dtype == "float32" else {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
        self.verify_fraction = float(verify_fraction)
        self._devices: tuple[torch.device, ...] | None = None
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._mem: dict[int, tuple[torch.Tensor, ...]] = {}
        self._bytes = 0
        self._k = 0
        self._old: tuple[int, dict[int, tuple[torch.Tensor, ...]]] | None = None
        self.runner: Callable[[Sequence[Any]], tuple[Any, ...]] | None = None
        self.refill: Callable[[Sequence[Any], Sequence[Any]], tuple[Any, ...]] | None = None
        self.names: list[str] = []  # the graph inputs ``load`` is given, by name
        self.prints = InputPrints()
        self.ids: torch.Tensor | None = None
        self.enabled = True
        self._warned_no_ids = False
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fxfreeze-cache") if prefetch else None
        self.stats = CacheStats(hits=0, misses=0, refills=0, spilled=0, corrupt=0, foreign=0, verified=0,
                                uncached_batches=0, spill_failures=0)
        self._host: HostTier | None = None  # created at the first store, when the frontier's device is known
        self._disk = DiskTier(directory, self.stats, self._pool)
        self.directory = self._disk.directory
        #: measured seconds and rows: computing the prefix, storing rows, serving rows (hits)
        self.costs: dict[str, list[float]] = {"run": [0.0, 0], "store": [0.0, 0], "load": [0.0, 0]}

    # -- prefix changes ----------------------------------------------------------------------------
    def set_prefix(self, k: int, runner: Any, refill: Any = None, key: bytes | None = None,
                   names: Sequence[str] = ()) -> None:
        """The prefix is now ``k`` blocks, computed by ``runner(inputs)`` from the graph
        inputs ``names`` (what their fingerprints are kept under); drop what was
        stored for another prefix (keeping the in-memory entries of a shallower one for
        ``refill(inputs, old_frontier)`` when given). ``key`` (32 bytes) identifies the plan,
        the prefix and its frozen weights: spilled entries carry it and are served only
        under it."""
        keep = None
        if refill is not None and 0 < self._k < k and self._mem:
            keep = (self._k, self._mem)
            self._mem = {}
        self.clear()
        self._old = keep
        self._k = k
        self._disk.set_prefix(k, key)
        self.runner = runner
        self.refill = refill
        self.names = list(names)

    def clear(self) -> None:
        with self._lock:
            self._mem = {}
            self._bytes = 0
            self._old = None
            self._disk.clear()
        if self._host is not None:
            self._host.clear()

    def close(self) -> None:
        self.clear()
        self.prints.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        self._disk.close()

    # -- the graph's entry point ---------------------------------------------------------------------
    @outside_dynamo  # torch.compile(fm): a graph break here, not a recompilation per batch of ids
    def load(self, inputs: Sequence[Any]) -> tuple[Any, ...]:
        assert self.runner is not None
        ids = self.ids
        if ids is None or not self.enabled:
            if ids is None and self.enabled and not self._warned_no_ids:
                logger.warning(
                    "fxfreeze cache: a training batch came without sample ids, so the frozen prefix ran "
                    "uncached; iterate `fm.wrap_loader(loader)`, use `with fm.sample_ids(ids):`, or, under the HF "
                    "Trainer or Lightning, train on `fxfreeze.with_sample_ids(dataset)` (dict items)"
                )
                self._warned_no_ids = True
            self.stats["uncached_batches"] += 1
            with torch.no_grad():
                return tuple(self.runner(inputs))
        keys = [int(i) for i in ids.tolist()]
        t0 = time.perf_counter()
        changed = self.prints.poll()
        prints = self.prints.of(inputs, self.names, len(keys))
        host = self._host
        entries = [_HOST if host is not None and i in host else self._get(i) for i in keys]
        if changed is None and prints:  # the entries this batch finds were stored for the same inputs
            present = [r for r, e in enumerate(entries) if e is not None]
            if present:
                some = len(present) < len(keys)  # a full hit compares the batch as it is
                changed = self.prints.differ([keys[r] for r in present], prints.take(present) if some else prints,
                                             strict=True)
        if changed is not None:
            return self._inputs_changed(inputs, changed)
        if all(e is not None for e in entries):
            out = self._assemble(keys, entries)
            self._cost("load", t0, len(keys))
            self.stats["hits"] += len(keys)
            if self.verify_fraction > 0 and self._rng.random() < self.verify_fraction:
                self._verify(inputs, out)
            return out
        out = None
        if self._old is not None and self.refill is not None:
            old_k, old = self._old
            prev = [old.get(i) for i in keys]
            if all(p is not None for p in prev):
                changed = self.prints.differ(keys, prints, strict=False)
                if changed is not None:
                    return self._inputs_changed(inputs, changed)
                old_frontier = tuple(torch.stack([p[j] for p in prev]) for j in range(len(prev[0])))  # type: ignore[index]
                with torch.no_grad():
                    out = tuple(self.refill(inputs, old_frontier))
                self.stats["refills"] += len(keys)
                for i in keys:
                    old.pop(i, None)
        if out is None:
            t0 = time.perf_counter()
            with torch.no_grad():
                out = tuple(self.runner(inputs))
            self._cost("run", t0, len(keys))
        if not self._check_batch(out, len(keys)):
            return out
        self.stats["misses"] += sum(1 for e in entries if e is None)
        self._devices = tuple(t.device for t in out)  # where entries read back from disk go
        t0 = time.perf_counter()
        # one copy of the batch (in the storage dtype); each sample's entry is a row of it
        stored = tuple(
            (t.detach().to(self.store_dtype) if self.store_dtype is not None and t.is_floating_point() else t.detach().clone())
            for t in out
        )
        rows = 0
        over: list[tuple[int, int]] = []  # (row, id) beyond the device budget
        for row, (i, e) in enumerate(zip(keys, entries)):
            if e is None:
                if not self._put(i, tuple(t[row] for t in stored), spill=False):
                    over.append((row, i))
                rows += 1
        if over:
            self._offload(over, stored)
        self.prints.record(keys, prints)
        self._cost("store", t0, rows)
        return out

    def _inputs_changed(self, inputs: Sequence[Any], how: str) -> tuple[Any, ...]:
        """A sample came back with another input than its entry was computed from: the
        cache's premise fails, so caching turns off (with a warning) and this batch is computed."""
        logger.warning(
            "fxfreeze cache: a sample's input to the frozen prefix is not the one its cached activations "
            "were computed from (%s): random augmentation, inputs of another size each epoch (multi-scale "
            "images; sequences padded to each batch's longest: pad them to one length), a model called twice "
            "per batch on different inputs, or sample ids that do not follow the data. Caching is now off and "
            "the prefix runs on every batch; declare augmentation with cache.random_augmentation=True", how)
        self.enabled = False
        self.clear()
        with torch.no_grad():
            return tuple(self.runner(inputs))  # type: ignore[misc]

    def _assemble(self, keys: list[int], entries: list[Any]) -> tuple[torch.Tensor, ...]:
        """One batch tensor per frontier value from per-sample entries: rows on the device
        are stacked as they are; the host tier's rows come in one copy (prefetched when it
        could be)."""
        pos = [r for r, e in enumerate(entries) if e is _HOST]
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

    def _cost(self, what: str, since: float, rows: int) -> None:
        c = self.costs[what]
        c[0] += time.perf_counter() - since
        c[1] += rows

    def per_row(self, what: str) -> float | None:
        """Measured seconds per sample to ``run`` the prefix, ``store`` a row or ``load`` one
        (None before the first)."""
        s, n = self.costs[what]
        return s / n if n else None

    def _check_batch(self, out: tuple[Any, ...], n: int) -> bool:
        """Does every frontier value have one row per sample id? If not, caching turns off
        (with a warning) and this batch's values are used as computed."""
        for t in out:
            if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != n:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                logger.warning(
                    "fxfreeze cache: the frozen prefix hands on a value without one row per sample id "
                    "(%s for %d ids); caching is now off (check the sample ids, or the model keeps "
                    "per-batch state across the cut)", shape, n)
                self.enabled = False
                self.clear()
                return False
        return True

    def _verify(self, inputs: Sequence[Any], cached: tuple[torch.Tensor, ...]) -> None:
        with torch.no_grad():
            fresh = tuple(self.runner(inputs))  # type: ignore[misc]
        self.stats["verified"] += 1
        tol = 0 if self.store_dtype is None else 1e-2
        for a, b in zip(cached, fresh):
            if a.shape != b.shape or not torch.allclose(a.float(), b.float(), rtol=tol, atol=tol):
                diff = float((a.float() - b.float()).abs().max()) if a.shape == b.shape else float("inf")
                logger.warning(
                    "fxfreeze cache: a cached frontier differs from a fresh computation (max difference %.3g): "
                    "the frozen prefix is not deterministic for a given input (randomness in it, or its weights "
                    "written through `.data`, which the cache does not see). Caching is now off", diff)
                self.enabled = False
                self.clear()
                return

    # -- storage ---------------------------------------------------------------------------------------
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


_HOST = ("host tier",)  # an entry's marker in a batch: its rows are in the host tier
