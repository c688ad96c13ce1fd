"""Telling the activation cache which dataset samples each batch holds (it stores a frozen
prefix's outputs per sample id): ``fm.wrap_loader(loader)``, ``with fm.sample_ids(ids):``,
or ids carried in the batch (:mod:`fxfreeze.sample_ids`)."""

from __future__ import annotations

import contextlib
import math
from collections import deque
from typing import Any, Iterator

import torch

from ..errors import FreezeError

__all__ = ["SampleIdLoader", "SampleIds"]


class _RecordingBatchSampler:
    """Wraps a batch sampler; remembers the index lists it hands out, in order."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.issued: deque[list[int]] = deque()

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.inner:
            batch = list(batch)
            self.issued.append(batch)
            yield batch

    def __len__(self) -> int:
        return len(self.inner)


class SampleIdLoader:
    """``fm.wrap_loader(loader)``: yields the loader's batches unchanged while telling the
    activation cache each batch's dataset indices, and prefetches the next batch's spilled
    entries. DataLoader workers return batches in sampler order, so the recorded index lists
    line up with the batches."""

    def __init__(self, module: Any, loader: Any) -> None:
        from torch.utils.data import DataLoader

        if not isinstance(loader, DataLoader):
            raise FreezeError(
                f"wrap_loader needs a torch.utils.data.DataLoader, got {type(loader).__name__}; "
                "for other loops declare each batch's dataset indices with `with fm.sample_ids(ids):`"
            )
        if loader.batch_sampler is None:
            raise FreezeError("wrap_loader needs a DataLoader with automatic batching (batch_size set)")
        self.module = module
        self.recorder = _RecordingBatchSampler(loader.batch_sampler)
        kw: dict[str, Any] = dict(
            batch_sampler=self.recorder, num_workers=loader.num_workers, collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory, timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
            persistent_workers=loader.persistent_workers,
        )
        if loader.num_workers > 0:
            kw["prefetch_factor"] = loader.prefetch_factor
        self.loader = DataLoader(loader.dataset, **kw)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        cache = self.module.activation_cache
        self.recorder.issued.clear()
        it = iter(self.loader)
        try:
            nxt = next(it)
        except StopIteration:
            return
        ids = self.recorder.issued.popleft()
        try:
            while True:
                batch, batch_ids = nxt, ids
                try:
                    nxt = next(it)
                    ids = self.recorder.issued.popleft()
                    if cache is not None:
                        cache.prefetch(ids)
                    last = False
                except StopIteration:
                    last = True
                if cache is not None:
                    cache.ids = torch.tensor(batch_ids)
                yield batch
                if last:
                    return
        finally:
            if cache is not None:
                cache.ids = None


class SampleIds:
    """The sample-id half of :class:`~fxfreeze.runtime.module.FreezableModule` (which
    provides ``_cache``, the activation cache, and ``_cached``, its graph)."""

    _cache: Any
    _cached: Any

    @contextlib.contextmanager
    def sample_ids(self, ids: Any) -> Iterator[None]:
        """Declare the dataset indices of the batch the enclosed forward calls see (for the
        activation cache); ``fm.wrap_loader`` does this for a DataLoader, and a call given
        ``fxfreeze_sample_id=ids`` (a batch from :func:`fxfreeze.with_sample_ids`) for itself.

        Example::

            with fm.sample_ids(batch_indices):
                loss = loss_fn(fm(x), y)
        """
        if self._cache is None:
            yield
            return
        must = "sample ids must be integers, one per sample of the batch (a tensor or list of dataset indices); got"
        try:
            declared = torch.as_tensor(ids).reshape(-1).cpu()
        except (TypeError, ValueError, RuntimeError) as e:
            raise FreezeError(f"{must} {type(ids).__name__}: {e}") from e
        if declared.is_floating_point() or declared.is_complex() or declared.dtype == torch.bool:
            raise FreezeError(f"{must} {type(ids).__name__} of {declared.dtype}")
        prev = self._cache.ids
        self._cache.ids = declared
        try:
            yield
        finally:
            self._cache.ids = prev

    def wrap_loader(self, loader: Any) -> SampleIdLoader:
        """Iterate ``loader`` (a ``torch.utils.data.DataLoader``, any sampler, shuffling or
        ``DistributedSampler``) recording each batch's dataset indices for the cache.

        Example::

            for x, y in fm.wrap_loader(loader):
                loss_fn(fm(x), y).backward()
        """
        try:
            self.set_epoch_steps(len(loader))
        except TypeError:
            pass
        return SampleIdLoader(self, loader)

    def set_epoch_steps(self, steps: float | None) -> None:
        """The number of steps in an epoch, which the cache's payback decision reads (a
        trainer's batches per epoch when fxfreeze does not iterate its loader)."""
        if self._cached is not None and steps:
            self._cached.epoch_steps = max(1, math.ceil(steps))
