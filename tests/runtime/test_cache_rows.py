"""The shapes of what the activation cache serves: a batch that finds only some of its samples
stored runs the frozen prefix on its missing rows only (``fxfreeze/runtime/cache_rows.py``),
and falls back to whole batches for a prefix that cannot take a smaller one; frontier values
the whole batch shares (rotary tables) are computed at every call, the rest cached."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fxfreeze
from fxfreeze.passes.cache_load import cache_load
from fxfreeze.runtime.cache import ActivationCache
from fxfreeze.runtime.cache_rows import disagreement, fits, merge_rows, take_rows

from test_cache import _run


class _Prefix:
    """A stand-in prefix: ``fn`` of the first input; records the batch sizes it ran on."""

    def __init__(self, fn=lambda x: (x * 2 + 1,)) -> None:
        self.fn = fn
        self.sizes: list[int] = []

    def __call__(self, inputs):
        self.sizes.append(inputs[0].shape[0])
        return self.fn(*inputs)


def _cache(prefix, **kw) -> ActivationCache:
    c = ActivationCache(prefetch=False, **kw)
    c.set_prefix(1, prefix)
    return c


def _load(c: ActivationCache, x: torch.Tensor, ids, *rest):
    c.ids = torch.tensor(ids)
    return c.load((x[ids], *rest))


def test_a_batch_partly_stored_runs_the_prefix_on_its_missing_rows_only():
    """Samples 0-3 stored; a batch of 2-5 runs the prefix on 4 and 5 (and once on the whole
    batch, the prefix's check), later ones on their missing rows alone."""
    prefix = _Prefix()
    c = _cache(prefix)
    x = torch.randn(10, 3)
    _load(c, x, [0, 1, 2, 3])
    out = _load(c, x, [2, 3, 4, 5])
    torch.testing.assert_close(out[0], x[[2, 3, 4, 5]] * 2 + 1, rtol=0, atol=0)
    assert prefix.sizes == [4, 2, 4] and c.partial is True
    out = _load(c, x, [6, 0, 7])
    torch.testing.assert_close(out[0], x[[6, 0, 7]] * 2 + 1, rtol=0, atol=0)
    assert prefix.sizes == [4, 2, 4, 2]  # no check again under the same prefix
    assert c.stats["hits"] == 3 and c.stats["misses"] == 8 and c.stats["partial_batches"] == 2
    out = _load(c, x, [7, 5, 6, 0])  # every sample stored: a full read runs nothing
    torch.testing.assert_close(out[0], x[[7, 5, 6, 0]] * 2 + 1, rtol=0, atol=0)
    assert prefix.sizes == [4, 2, 4, 2] and c.stats["hits"] == 7
    c.close()


def test_inputs_without_a_row_per_sample_pass_to_the_sub_batch_whole():
    """A mask broadcast over the batch and a number go to the sub-batch as they are."""
    seen = []

    def fn(x, mask, k):
        seen.append((tuple(x.shape), tuple(mask.shape), k))
        return (x * mask + k,)

    c = _cache(_Prefix(fn))
    x, mask = torch.randn(6, 3), torch.tensor([[1.0, 0.0, 2.0]])
    _load(c, x, [0, 1], mask, 5)
    out = _load(c, x, [1, 2, 3], mask, 5)
    torch.testing.assert_close(out[0], x[[1, 2, 3]] * mask + 5, rtol=0, atol=0)
    assert seen[1] == ((2, 3), (1, 3), 5)
    c.close()


@pytest.mark.parametrize("how", ["batch-dependent", "raises", "other-rows"])
def test_a_prefix_that_cannot_take_a_smaller_batch_runs_whole_batches(how, caplog):
    """A prefix whose output for a sample depends on its batch (statistics over the batch), one
    that fails on another batch size (a graph specialised to it), one that drops the batch
    dimension of a batch of one: each batch is still right, later ones run whole, one INFO
    line says why."""
    fns = {
        "batch-dependent": lambda x: (x - x.mean(0),),
        "raises": lambda x: (x.reshape(4, 3) * 2,),
        "other-rows": lambda x: ((x * 2).squeeze(0),),
    }
    fn = fns[how]
    prefix = _Prefix(fn)
    c = _cache(prefix)
    x = torch.randn(10, 3)
    _load(c, x, [0, 1, 2, 3])
    with caplog.at_level(logging.INFO, logger="fxfreeze"):
        out = _load(c, x, [1, 2, 3, 4])
    torch.testing.assert_close(out[0], fn(x[[1, 2, 3, 4]])[0], rtol=0, atol=0)
    assert c.partial is False and c.stats["partial_batches"] == 0
    assert caplog.text.count("not only on the missing ones") == 1
    n = len(prefix.sizes)
    _load(c, x, [5, 6, 7, 0])
    assert prefix.sizes[n:] == [4]  # whole from then on
    c.close()


def test_a_deeper_prefix_refills_the_missing_rows_from_the_shallower_entries():
    """Samples 0-5 stored under 1 block; under 2 blocks a batch of 0-3 refills from them,
    and a batch of 2-5 reads 2 and 3 and refills 4 and 5 alone (after the check)."""
    one, two = _Prefix(lambda x: (x + 1,)), _Prefix(lambda x: ((x + 1) * 3,))
    c = ActivationCache(prefetch=False)
    c.set_prefix(1, one)
    x = torch.randn(8, 3)
    _load(c, x, [0, 1, 2, 3, 4, 5])
    runs = []

    def refill(inputs, old):
        runs.append(old[0].shape[0])
        return (old[0] * 3,)

    c.set_prefix(2, two, refill)
    _load(c, x, [0, 1, 2, 3])
    out = _load(c, x, [2, 3, 4, 5])
    torch.testing.assert_close(out[0], (x[[2, 3, 4, 5]] + 1) * 3)
    assert runs == [4, 2] and two.sizes == [4]  # the check ran the prefix whole once
    assert c.stats["refills"] == 6 and c.stats["partial_batches"] == 1
    c.close()


def test_sub_batches_off_runs_the_whole_batch():
    prefix = _Prefix()
    c = _cache(prefix, sub_batches=False)
    x = torch.randn(6, 3)
    _load(c, x, [0, 1])
    _load(c, x, [1, 2, 3])
    assert prefix.sizes == [2, 3] and c.stats["partial_batches"] == 0
    c.close()


@pytest.mark.parametrize("sub_batches", [True, False])
def test_a_mid_epoch_freeze_reads_the_stored_rows_in_the_epoch_after(sub_batches):
    """A ResNet frozen at step 3 of 6 under a shuffling loader: in epoch 2 every batch mixes
    stored and new samples. With sub-batches they read the stored rows and run the prefix
    on the others; the losses equal the uncached run's within rounding (convolutions over
    fewer rows may round otherwise), and bitwise with whole batches."""
    ref, ref_losses = _run(None, schedule={3: 2}, epochs=3)
    fm, losses = _run({"sub_batches": sub_batches}, schedule={3: 2}, epochs=3)
    st = fm.activation_cache.stats
    assert st["misses"] == 96 and st["refills"] == 0  # steps 4-6 store 48 samples, epoch 2 the other 48
    if sub_batches:  # every sample of steps 4-18 is stored or read once
        assert st["partial_batches"] >= 4 and st["hits"] + st["misses"] == 15 * 16
        torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    else:
        assert st["partial_batches"] == 0 and st["hits"] == 96 and losses == ref_losses  # epoch 3 only


def test_row_helpers():
    x = torch.arange(12.0).reshape(4, 3)
    assert take_rows((x, torch.ones(4)), [0, 2], 4)[1].shape == (2,)
    assert not fits((x[:2],), (x[:2].double().int(),), 2)  # a float part for integer rows
    assert not fits((x[:2], x[:2]), (x,), 2)
    merged = merge_rows(4, [0, 3], (x[[0, 3]],), [1, 2], (x[[1, 2]].double(),))
    assert merged[0].dtype == torch.float32 and torch.equal(merged[0], x)
    assert disagreement((x,), (x[[1, 2]] + 1e-6,), [1, 2]) is None
    assert disagreement((x.long(),), (x[[1]].long() + 1,), [1]) == float("inf")
    assert disagreement((x,), (x[:1],), [1, 2]) == float("inf")


class _Mixer(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, h: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.lin(h * table))


class _Rotary(nn.Module):
    """A table of positions computed once and handed to every block, as Llama-style models
    hand their rotary cos and sin: shape ``(1, T, d)``, no row per sample."""

    def __init__(self, d: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.emb = nn.Linear(d, d)
        self.blocks = nn.ModuleList(_Mixer(d) for _ in range(depth))
        self.head = nn.Linear(d, 2)
        self.register_buffer("freq", torch.linspace(0.1, 1.0, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = torch.cos(torch.arange(x.shape[1], dtype=x.dtype)[None, :, None] * self.freq)
        h = self.emb(x)
        for b in self.blocks:
            h = b(h, table)
        return self.head(h.mean(1))


def _rotary_run(cache: bool):
    torch.manual_seed(0)
    net = _Rotary()
    x, y = torch.randn(48, 5, 8), torch.randint(0, 2, (48,))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    cfg: dict = {"policy": "manual", "manual": {"schedule": {2: 2}, "unit": "step"}, "cache": {"enabled": cache}}
    fm = fxfreeze.compile(net, (x[:4],), optimizer=opt, config=cfg)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(3):
        for xb, yb in fm.wrap_loader(loader):
            loss = nn.functional.cross_entropy(fm(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return fm, losses


def test_a_table_the_whole_batch_shares_is_computed_at_every_step_and_the_rest_cached(caplog):
    """The frozen prefix hands on the hidden states (a row per sample) and a position table
    (``(1, T, d)``). Before, the table turned caching off at the first store ("a value without
    one row per sample id"): no Llama-style model (rotary cos and sin) was ever cached. Now
    the table is computed at every call from the positions alone, and the hidden states are
    cached; the run equals the uncached one."""
    _, ref = _rotary_run(False)
    with caplog.at_level(logging.INFO, logger="fxfreeze"):
        fm, losses = _rotary_run(True)
    c = fm.activation_cache
    assert c.enabled and c.stats["hits"] > 0 and "1 of the 2 values the frozen prefix hands on" in caplog.text
    assert "caching is now off" not in caplog.text
    assert [tuple(t.shape) for t in c.get(0)] == [(5, 8)]  # only the hidden states are stored per sample
    torch.testing.assert_close(losses, ref, rtol=1e-5, atol=1e-6)
    gm = fm.cached_graph_module
    gm.graph.lint()
    assert any(n.op == "call_function" and n.target is cache_load for n in gm.graph.nodes)


def test_shared_values_are_put_back_in_their_places_and_a_deeper_prefix_does_not_refill_from_them():
    x = torch.randn(6, 2, 3)
    table = torch.arange(3.0)[None, None]
    full = _Prefix(lambda x: (x * 2, table + x.shape[1], x + 1))
    c = ActivationCache(prefetch=False)
    built = []

    def shared(idx):
        built.append(idx)
        return lambda inputs: (table + inputs[0].shape[1],)

    c.set_prefix(1, full, shared=shared)
    _load(c, x, [0, 1, 2])
    out = _load(c, x, [2, 1, 0])
    assert built == [[1]] and c.stats["hits"] == 3
    for got, want in zip(out, (x[[2, 1, 0]] * 2, table + 2, x[[2, 1, 0]] + 1)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    c.set_prefix(2, full, refill=lambda inputs, old: (old[0] * 5,), shared=shared)
    assert c._old is None  # the shallower entries lack the table: the deeper prefix runs
    c.close()


def test_without_a_runner_for_them_values_without_rows_turn_caching_off(caplog):
    c = _cache(_Prefix(lambda x: (x * 2, torch.ones(1, 3))))
    x = torch.randn(4, 3)
    with caplog.at_level(logging.WARNING, logger="fxfreeze"):
        out = _load(c, x, [0, 1, 2, 3])
    assert not c.enabled and "caching is now off" in caplog.text
    torch.testing.assert_close(out[0], x * 2)
