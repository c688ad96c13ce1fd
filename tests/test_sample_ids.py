"""Sample ids carried in the batch (``fxfreeze.with_sample_ids``, the ``fxfreeze_sample_id``
keyword): the dataset wrappers, their errors, and a loop whose calls carry the ids reading
the activation cache exactly as one that declares them with ``wrap_loader``."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import fxfreeze
from fxfreeze import DataError
from fxfreeze.sample_ids import SAMPLE_ID_KEY, pop_sample_ids, signature_with_ids
from _nets import ResidualMLP


class _Dicts(torch.utils.data.Dataset):
    def __init__(self, n: int = 48) -> None:
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i]}


def test_a_dataset_of_dicts_gets_each_items_index():
    ds = fxfreeze.with_sample_ids(_Dicts())
    assert len(ds) == 48 and ds[5][SAMPLE_ID_KEY] == 5 and torch.equal(ds[5]["x"], _Dicts()[5]["x"])
    batch = next(iter(DataLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))))
    assert batch[SAMPLE_ID_KEY].dtype == torch.int64 and torch.equal(batch["x"], _Dicts().x[batch[SAMPLE_ID_KEY]])
    assert ds.x is ds.dataset.x  # the wrapped dataset's attributes show through


def test_a_hugging_face_dataset_gets_a_column_that_follows_its_samples():
    datasets = pytest.importorskip("datasets")
    ds = fxfreeze.with_sample_ids(datasets.Dataset.from_dict({"text": [f"s{i}" for i in range(10)]}))
    assert isinstance(ds, datasets.Dataset) and SAMPLE_ID_KEY in ds.column_names
    shuffled = ds.shuffle(seed=0).select(range(5))
    assert all(row["text"] == f"s{row[SAMPLE_ID_KEY]}" for row in shuffled)
    with pytest.raises(DataError, match="has a 'fxfreeze_sample_id' column already"):
        fxfreeze.with_sample_ids(ds)


def test_datasets_the_ids_cannot_follow_are_refused_with_what_to_do():
    with pytest.raises(DataError, match="item 0 of TensorDataset is a tuple.*wrap_loader"):
        fxfreeze.with_sample_ids(torch.utils.data.TensorDataset(torch.zeros(3, 2)))[0]

    class _Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield {"x": torch.zeros(2)}

    with pytest.raises(DataError, match="map-style.*_Stream is iterable"):
        fxfreeze.with_sample_ids(_Stream())
    with pytest.raises(DataError, match="map-style"):
        fxfreeze.with_sample_ids(42)
    with pytest.raises(DataError, match="has a 'fxfreeze_sample_id' key already"):
        fxfreeze.with_sample_ids([{SAMPLE_ID_KEY: 3}])[0]


def test_the_ids_keyword_joins_a_signature_before_its_var_keyword():
    def f(a, b=1, *rest, c=2, **kw):
        pass

    def g(x):
        pass

    assert list(signature_with_ids(inspect.signature(f)).parameters) == ["a", "b", "rest", "c", SAMPLE_ID_KEY, "kw"]
    assert list(signature_with_ids(inspect.signature(g)).parameters) == ["x", SAMPLE_ID_KEY]
    assert signature_with_ids(None) is None
    kwargs = {"x": 1, SAMPLE_ID_KEY: [4]}
    assert pop_sample_ids(kwargs) == [4] and kwargs == {"x": 1} and pop_sample_ids(kwargs) is None


def _train(mode: str):
    """Three epochs of a residual MLP, 2 blocks frozen at step 3; the ids go in the call
    (``"batch"``), through ``wrap_loader`` (``"loader"``), or the cache is off (``"off"``)."""
    torch.manual_seed(0)
    model = ResidualMLP(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = {"policy": "manual", "manual": {"schedule": {3: 2}}, "cache": {"enabled": mode != "off"}}
    data = fxfreeze.with_sample_ids(_Dicts())
    fm = fxfreeze.compile(model, (torch.randn(2, 8),), optimizer=opt, config=cfg)
    loader = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(3):
        for batch in (fm.wrap_loader(loader) if mode == "loader" else loader):
            ids = batch.pop(SAMPLE_ID_KEY)
            out = fm(batch["x"], **({SAMPLE_ID_KEY: ids} if mode == "batch" else {}))
            loss = nn.functional.cross_entropy(out, batch["y"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return fm, losses


def test_ids_given_in_the_call_read_the_cache_as_wrap_loader_does():
    _, off = _train("off")
    by_loader, loader_losses = _train("loader")
    by_batch, batch_losses = _train("batch")
    assert batch_losses == loader_losses  # bitwise: the same ids, the same reads
    # the uncached run's within rounding: batches partly stored run the prefix on fewer rows (another GEMM)
    torch.testing.assert_close(batch_losses, off, rtol=1e-5, atol=1e-6)
    assert by_batch.activation_cache.stats["partial_batches"] > 0
    assert by_batch.activation_cache.stats == by_loader.activation_cache.stats
    assert by_batch.activation_cache.stats["hits"] > 0 and by_batch.activation_cache.ids is None
    # an evaluation call with ids (an eval set given ids too) runs as without them
    x = torch.randn(4, 8)
    by_batch.eval()
    torch.testing.assert_close(by_batch(x, **{SAMPLE_ID_KEY: torch.arange(4)}), by_batch(x), rtol=0, atol=0)


def test_ids_given_to_an_installed_route_never_reach_the_models_forward():
    model = ResidualMLP(depth=3)
    fm = fxfreeze.compile(model, (torch.randn(2, 8),), policy="manual", config={"cache": {"enabled": True}})
    fm.install()
    x = torch.randn(4, 8)
    torch.testing.assert_close(model(x, **{SAMPLE_ID_KEY: torch.arange(4)}), fm(x), rtol=0, atol=0)
    fm.uninstall()
    with pytest.raises(TypeError):  # the plain model takes no such keyword: only routes remove it
        model(x, **{SAMPLE_ID_KEY: torch.arange(4)})


@pytest.mark.parametrize("bad", [["a", "b"], torch.tensor([0.5, 1.5]), [True, False]])
def test_ids_that_are_not_integers_are_refused_with_what_they_must_be(bad):
    fm = fxfreeze.compile(ResidualMLP(depth=3), (torch.randn(2, 8),), policy="manual", config={"cache": {"enabled": True}})
    with pytest.raises(fxfreeze.FreezeError, match="sample ids must be integers"):
        fm(torch.randn(2, 8), **{SAMPLE_ID_KEY: bad})
