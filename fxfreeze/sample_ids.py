"""Sample ids that travel with the batch, for the activation cache under any training loop.

The activation cache stores a frozen prefix's outputs per dataset sample, so every training
batch must say which samples it holds. A loop of one's own says so with ``fm.wrap_loader``
or ``with fm.sample_ids(ids):``; the HF Trainer and Lightning build and iterate their data
loaders themselves (samplers, accelerate's sharding, the batches skipped on a resume), so
there the ids must ride in the batch: :func:`with_sample_ids` adds a ``fxfreeze_sample_id``
column to a dataset of dict items, the default collators stack it like any other column,
and whatever calls the model with the batch's keywords (``model(**batch)``) passes it on.
Every route to the compiled module takes that keyword out before the model sees it and
declares it for the call; the Trainer callback's route shows it in its signature so that the
Trainer keeps the column (it drops the columns the model's ``forward`` does not name), and
the Lightning callback takes it out of a dict batch before the training step sees it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from .errors import DataError

__all__ = ["SAMPLE_ID_KEY", "with_sample_ids", "SampleIdDataset", "pop_sample_ids", "signature_with_ids"]

#: the batch key (and keyword) that carries each sample's id
SAMPLE_ID_KEY = "fxfreeze_sample_id"


class SampleIdDataset(torch.utils.data.Dataset):
    """A map-style dataset of dict items, each given its index under :data:`SAMPLE_ID_KEY`
    (see :func:`with_sample_ids`)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        if not isinstance(item, Mapping):
            raise DataError(
                f"with_sample_ids needs a dataset whose items are dicts (the HF Trainer's kind); item {index} of "
                f"{type(self.dataset).__name__} is a {type(item).__name__}. For a loop of your own iterate "
                "`fm.wrap_loader(loader)` instead, or declare each batch's ids with `with fm.sample_ids(ids):`"
            )
        if SAMPLE_ID_KEY in item:
            raise DataError(f"item {index} of {type(self.dataset).__name__} has a '{SAMPLE_ID_KEY}' key already")
        return {**item, SAMPLE_ID_KEY: index}

    def __getattr__(self, name: str) -> Any:  # the wrapped dataset's attributes (features, column_names)
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def with_sample_ids(dataset: Any) -> Any:
    """``dataset`` with each item's index as a ``fxfreeze_sample_id`` column: what the
    activation cache needs under the HF Trainer and Lightning, whose loops fxfreeze does not
    iterate. A Hugging Face ``datasets.Dataset`` gets a real column (kept through
    ``shuffle``, ``select`` and ``map``, so ids stay those of the samples); any other
    map-style dataset of dict items is wrapped. An iterable dataset has no indices and is
    refused.

    Example::

        >>> import fxfreeze, torch
        >>> data = [{"x": torch.zeros(3), "labels": 0}, {"x": torch.ones(3), "labels": 1}]
        >>> fxfreeze.with_sample_ids(data)[1]["fxfreeze_sample_id"]
        1
    """
    if isinstance(dataset, torch.utils.data.IterableDataset):
        raise DataError(
            f"with_sample_ids needs a map-style dataset (indexable, with a length); {type(dataset).__name__} is "
            "iterable: the activation cache needs ids that name the same sample every epoch"
        )
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise DataError(f"with_sample_ids needs a map-style dataset (indexable, with a length), got {type(dataset).__name__}")
    column_names = getattr(dataset, "column_names", None)
    if callable(getattr(dataset, "add_column", None)) and isinstance(column_names, list):  # datasets.Dataset
        if SAMPLE_ID_KEY in column_names:
            raise DataError(f"the dataset has a '{SAMPLE_ID_KEY}' column already")
        return dataset.add_column(SAMPLE_ID_KEY, list(range(len(dataset))))
    return SampleIdDataset(dataset)


def pop_sample_ids(kwargs: dict[str, Any]) -> Any:
    """Take the sample ids out of a call's keyword arguments (None when it has none)."""
    return kwargs.pop(SAMPLE_ID_KEY, None) if SAMPLE_ID_KEY in kwargs else None


def signature_with_ids(sig: inspect.Signature | None) -> inspect.Signature | None:
    """``sig`` with a keyword-only ``fxfreeze_sample_id=None`` (before ``**kwargs``, if any):
    the signature a route shows so that a trainer that keeps only the columns ``forward``
    names keeps the ids."""
    if sig is None or SAMPLE_ID_KEY in sig.parameters:
        return sig
    params = list(sig.parameters.values())
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    params.insert(at, inspect.Parameter(SAMPLE_ID_KEY, inspect.Parameter.KEYWORD_ONLY, default=None))
    return sig.replace(parameters=params)
