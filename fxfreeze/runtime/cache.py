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

On a miss the prefix runs under ``no_grad`` (its modules are in eval mode and deterministic,
so a sample's frontier does not depend on its batch) and the batch's entries are stored. A
batch that finds only some of its samples stored (the epoch after a mid-epoch freeze, under
a shuffling loader) runs the prefix on its missing rows only
(:mod:`fxfreeze.runtime.cache_rows`; checked against a whole-batch run once per prefix).
Frontier values the whole batch shares (rotary tables, no row per sample) are computed at
every call, the others stored. A batch without sample ids (the loop did not go through
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
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import torch

from .dynamo import outside_dynamo
from .cache_rows import disagreement, fits, has_rows, merge_rows, take_rows
from .cache_tiers import HOST, EntryTiers
from .input_prints import InputPrints

__all__ = ["ActivationCache", "CacheStats"]

logger = logging.getLogger("fxfreeze")

class CacheStats(dict):  # a dict so that it prints and serialises plainly
    pass


class ActivationCache(EntryTiers):
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
        sub_batches: bool = True,
    ) -> None:
        self.verify_fraction = float(verify_fraction)
        self._rng = random.Random(seed)
        self._k = 0
        self._old: tuple[int, dict[int, tuple[torch.Tensor, ...]]] | None = None
        self.runner: Callable[[Sequence[Any]], tuple[Any, ...]] | None = None
        self.refill: Callable[[Sequence[Any], Sequence[Any]], tuple[Any, ...]] | None = None
        self.names: list[str] = []  # the graph inputs ``load`` is given, by name
        self.prints = InputPrints()
        self.ids: torch.Tensor | None = None
        self.enabled = True
        #: run the prefix on a batch's missing rows only: None until checked once per prefix
        self.partial: bool | None = None if sub_batches else False
        self.shared_runner: Callable[[list[int]], Any] | None = None
        #: frontier values the whole batch shares (rotary tables: no row per sample), by index,
        #: and what computes them at every call; the other values are stored per sample
        self._shared: tuple[set[int], Callable[[Sequence[Any]], Any]] | None = None
        self._warned_no_ids = False
        pool = ThreadPoolExecutor(1, thread_name_prefix="fxfreeze-cache") if prefetch else None
        stats = CacheStats(hits=0, misses=0, refills=0, spilled=0, corrupt=0, foreign=0, verified=0,
                           uncached_batches=0, spill_failures=0, partial_batches=0)
        super().__init__(memory_budget_mb, host_budget_mb, dtype, directory, pool, stats)
        self.costs: dict[str, list[float]] = {"run": [0.0, 0], "store": [0.0, 0], "load": [0.0, 0]}

    # -- prefix changes ----------------------------------------------------------------------------
    def set_prefix(self, k: int, runner: Any, refill: Any = None, key: bytes | None = None,
                   names: Sequence[str] = (), shared: Any = None) -> None:
        """The prefix is now ``k`` blocks, computed by ``runner(inputs)`` from the graph
        inputs ``names`` (what their fingerprints are kept under); drop what was
        stored for another prefix (keeping the in-memory entries of a shallower one for
        ``refill(inputs, old_frontier)`` when given). ``key`` (32 bytes) identifies the plan,
        the prefix and its frozen weights: spilled entries carry it and are served only
        under it. ``shared(indices)`` builds a runner of those frontier values alone (or
        None): values without a row per sample are computed by it at every call."""
        keep = None
        if refill is not None and 0 < self._k < k and self._mem and self._shared is None:
            keep = (self._k, self._mem)
            self._mem = {}
        self.clear()
        self._old = keep
        self._k = k
        if self.partial:
            self.partial = None  # checked again on the new prefix
        self._disk.set_prefix(k, key)
        self.runner = runner
        self.refill = refill
        self.names = list(names)
        self.shared_runner = shared
        self._shared = None

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
        entries = [HOST if host is not None and i in host else self._get(i) for i in keys]
        if changed is None and prints:  # the entries this batch finds were stored for the same inputs
            present = [r for r, e in enumerate(entries) if e is not None]
            if present:
                some = len(present) < len(keys)  # a full hit compares the batch as it is
                changed = self.prints.differ([keys[r] for r in present], prints.take(present) if some else prints,
                                             strict=True)
        if changed is not None:
            return self._inputs_changed(inputs, changed)
        if all(e is not None for e in entries):
            out = self._with_shared(self._assemble(keys, entries), inputs)
            self._cost("load", t0, len(keys))
            self.stats["hits"] += len(keys)
            if self.verify_fraction > 0 and self._rng.random() < self.verify_fraction:
                self._verify(inputs, out)
            return out
        miss = [r for r, e in enumerate(entries) if e is None]
        if len(miss) < len(keys) and self.partial is not False:
            done = self._fill_rows(inputs, keys, entries, miss, prints)
            if done is not None:
                return done
        out = self._frontier(inputs, keys, prints)
        if isinstance(out, str):
            return self._inputs_changed(inputs, out)
        return self._store(keys, entries, out, prints)

    def _frontier(self, inputs: Sequence[Any], keys: list[int], prints: Any) -> tuple[Any, ...] | str:
        """The frontier of these samples: from a shallower prefix's entries by running the
        blocks between (when every sample has one), else by running the prefix; a str
        saying how when their inputs are not those the shallower entries were stored for."""
        if self._old is not None and self.refill is not None:
            old = self._old[1]
            prev = [old.get(i) for i in keys]
            if all(p is not None for p in prev):
                changed = self.prints.differ(keys, prints, strict=False)
                if changed is not None:
                    return changed
                old_frontier = tuple(torch.stack([p[j] for p in prev]) for j in range(len(prev[0])))  # type: ignore[index]
                with torch.no_grad():
                    out = tuple(self.refill(inputs, old_frontier))
                self.stats["refills"] += len(keys)
                for i in keys:
                    old.pop(i, None)
                return out
        t0 = time.perf_counter()
        with torch.no_grad():
            out = tuple(self.runner(inputs))  # type: ignore[misc]
        self._cost("run", t0, len(keys))
        return out

    def _fill_rows(self, inputs: Sequence[Any], keys: list[int], entries: list[Any], miss: list[int],
                   prints: Any) -> tuple[Any, ...] | None:
        """A batch that finds some of its samples stored: run the prefix on the missing rows
        only (:mod:`fxfreeze.runtime.cache_rows`), store them and return the whole batch's
        frontier. The first such batch of a prefix is also run whole and compared; a prefix
        that gives a sample other values in a smaller batch, fails on one, or hands back other
        rows is run on whole batches from then on (one INFO line). None: run it whole."""
        n, missing = len(keys), set(miss)
        present = [r for r in range(n) if r not in missing]
        sub_prints = prints.take(miss) if prints else prints
        t0 = time.perf_counter()
        have = self._assemble([keys[r] for r in present], [entries[r] for r in present])
        self._cost("load", t0, len(present))
        try:
            part = self._frontier(take_rows(inputs, miss, n), [keys[r] for r in miss], sub_prints)
        except Exception as e:  # a graph that refuses another batch size: run the batch whole
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            return self._no_partial(f"a batch of {len(miss)} raised {type(e).__name__}: {first}")
        if isinstance(part, str):
            return self._inputs_changed(inputs, part)
        rows = self._rows(part)
        if not fits(rows, have, len(miss)):
            return self._no_partial(f"a batch of {len(miss)} gave other rows than the stored ones")
        if self.partial is None:  # once per prefix: a sub-batch's rows are the whole batch's
            with torch.no_grad():
                full = tuple(self.runner(inputs))  # type: ignore[misc]
            diff = disagreement(self._rows(full), rows, miss)
            if diff is not None:  # the whole batch's frontier, already computed, is the one to keep
                self._no_partial(f"a sample's frontier in a smaller batch differs by {diff:.3g}")
                return self._store(keys, entries, full, prints)
            self.partial = True
        out = self._with_shared(merge_rows(n, present, have, miss, rows), inputs)
        self.stats["hits"] += len(present)
        self.stats["partial_batches"] += 1
        return self._store([keys[r] for r in miss], [None] * len(miss), part, sub_prints, result=out)

    def _no_partial(self, why: str) -> None:
        self.partial = False
        logger.info("fxfreeze cache: batches that find part of their samples stored run the frozen prefix on "
                    "every sample, not only on the missing ones (%s)", why)
        return None

    def _store(self, keys: list[int], entries: list[Any], out: tuple[Any, ...],
               prints: Any, result: tuple[Any, ...] | None = None) -> tuple[Any, ...]:
        """Keep the rows of ``out`` whose ``entries`` are None, under ``keys``; return
        ``result`` (default ``out``)."""
        result = out if result is None else result
        if not self._check_batch(out, len(keys)):
            return result
        out = self._rows(out)
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
        return result

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
        """Does every frontier value stored per sample have one row per sample id?

        At a prefix's first store, tensors without (tables the whole batch shares: rotary
        cos and sin of shape ``(1, T, d)`` in Llama-style models) are set apart when
        ``shared_runner`` can compute them alone and another value has rows: they are
        computed at every call, the others cached. Otherwise caching turns off (with a
        warning) and this batch's values are used as computed."""
        skip = self._shared[0] if self._shared is not None else set()
        bad = [j for j, t in enumerate(out) if j not in skip and not has_rows(t, n)]
        if not bad:
            return True
        if self._shared is None and len(self) == 0 and len(bad) < len(out) and self.shared_runner is not None \
                and all(isinstance(out[j], torch.Tensor) for j in bad):
            run = self.shared_runner(bad)
            if run is not None:
                self._shared = (set(bad), run)
                logger.info("fxfreeze cache: %d of the %d values the frozen prefix hands on have no row per sample "
                            "(shapes %s for %d ids); they are computed at every step, the others cached", len(bad),
                            len(out), ", ".join(str(tuple(out[j].shape)) for j in bad[:3]), n)
                return True
        t = out[bad[0]]
        logger.warning(
            "fxfreeze cache: the frozen prefix hands on a value without one row per sample id "
            "(%s for %d ids); caching is now off (check the sample ids, or the model keeps "
            "per-batch state across the cut)", tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__, n)
        self.enabled = False
        self.clear()
        return False

    def _rows(self, out: tuple[Any, ...]) -> tuple[Any, ...]:
        """The frontier values stored per sample (all but the shared ones)."""
        if self._shared is None:
            return out
        idx = self._shared[0]
        return tuple(t for j, t in enumerate(out) if j not in idx)

    def _with_shared(self, rows: tuple[Any, ...], inputs: Sequence[Any]) -> tuple[Any, ...]:
        """The whole frontier: the per-sample ``rows`` with the shared values computed for
        this call put back in their places."""
        if self._shared is None:
            return rows
        idx, run = self._shared
        with torch.no_grad():
            shared = iter(tuple(run(inputs)))
        it = iter(rows)
        return tuple(next(shared) if j in idx else next(it) for j in range(len(rows) + len(idx)))

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
