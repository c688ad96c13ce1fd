"""``fm.wrap_loader(loader)``: a DataLoader that tells the activation cache which dataset
samples each batch holds (the cache stores a frozen prefix's outputs per sample id)."""

from __future__ import annotations

from collections import deque
from typing import Any, Iterator

import torch

from ..errors import FreezeError

__all__ = ["SampleIdLoader"]


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
