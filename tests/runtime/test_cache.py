"""The activation cache: bitwise identity with an uncached frozen run, spilling, integrity,
refill on a deeper prefix, sample ids, verification, and configuration errors."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fxfreeze
from fxfreeze import zoo
from fxfreeze.config import FreezeConfig
from fxfreeze.passes.cache_load import CacheLoad, cache_frontier, cache_load
from fxfreeze.runtime.cache import ActivationCache
from fxfreeze.tensorfile import decode_tensors as _decode
from fxfreeze.tensorfile import encode_tensors as _encode


def _data(n=96):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 16, 16, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return TensorDataset(x, y)


def _run(cache: dict | None, schedule=None, epochs=4, model_fn=None, bs=16, wrap=True, total_steps=None):
    torch.manual_seed(0)
    model = (model_fn or (lambda: zoo.resnet_cifar(depth=8, width=8, in_channels=1)))()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    cfg = {"policy": "manual", "manual": {"schedule": schedule or {6: 2, 18: 3}, "unit": "step"}, "total_steps": total_steps}
    if cache is not None:
        cfg["cache"] = {"enabled": True, **cache}
    ds = _data()
    fm = fxfreeze.compile(model, (ds.tensors[0][:2],), optimizer=opt, config=cfg)
    loader = DataLoader(ds, batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(3))
    it = fm.wrap_loader(loader) if (cache is not None and wrap) else loader
    losses: list[float] = []
    for _ in range(epochs):
        _epoch(fm, opt, it, losses)
    return fm, losses


def _epoch(fm, opt, batches, losses: list[float]) -> None:
    """One pass over ``batches``, the loss of each step appended to ``losses``."""
    for x, y in batches:
        loss = nn.functional.cross_entropy(fm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())


def test_cached_run_is_bitwise_identical_to_uncached():
    ref, ref_losses = _run(None)
    fm, losses = _run({})
    assert losses == ref_losses  # bitwise, over 4 shuffled epochs with two freezes
    for (n, a), (_, b) in zip(ref.state_dict().items(), fm.state_dict().items()):
        assert torch.equal(a, b), n
    st = fm.activation_cache.stats
    assert st["hits"] > 0 and st["misses"] > 0 and st["refills"] > 0  # 2 -> 3 refilled from the old frontier


def test_a_prefix_that_cannot_pay_back_its_fill_is_not_cached(caplog):
    """24 steps of 6 per epoch: the prefix frozen at step 6 has 12 reading steps after its
    filling epoch and is cached; the one frozen at step 18 has none left and runs uncached
    (it would only fill). The losses stay those of the uncached run."""
    ref, ref_losses = _run(None, total_steps=24)
    with caplog.at_level(logging.INFO, logger="fxfreeze"):
        fm, losses = _run({}, total_steps=24)
    assert losses == ref_losses
    st = fm.activation_cache.stats
    assert st["hits"] > 0 and st["refills"] == 0  # 2 blocks cached; 3 never
    assert "prefix of 3 blocks is not cached: 6 steps left, 6 per epoch" in caplog.text
    c = fm.activation_cache
    assert c.per_row("run") > 0 and c.per_row("store") > 0 and c.per_row("load") > 0
    fm.freezer.detach()
    ref.freezer.detach()


def test_cache_graph_structure_and_lint():
    fm, _ = _run({}, epochs=2)
    gm = fm.cached_graph_module
    gm.graph.lint()
    loads = [n for n in gm.graph.nodes if n.target is cache_load]
    assert len(loads) == 1
    blocks = {n.meta.get("fxfreeze.block") for n in gm.graph.nodes if n.op.startswith("call") and n.target is not cache_load}
    assert not any(isinstance(b, int) and 0 <= b < fm.num_frozen for b in blocks)  # the prefix is gone
    with pytest.raises(ValueError):
        CacheLoad(0)


def test_tiny_budget_spills_to_disk_and_stays_identical(tmp_path):
    ref, ref_losses = _run(None)
    fm, losses = _run({"memory_budget_mb": 0.01, "directory": str(tmp_path)})
    assert losses == ref_losses
    assert fm.activation_cache.stats["spilled"] > 0 and fm.activation_cache.memory_bytes <= 0.01 * 2**20
    assert list(Path(tmp_path).rglob("*.fxfc"))


def test_three_tiers_device_host_disk_stay_identical(tmp_path):
    """The device budget holds a few samples, the host tier some more, the rest spills: every
    tier serves rows, a batch mixes them, and the run stays bitwise that of no cache. (On the
    CPU the host tier is plain memory; on a GPU it is pinned and copied on a side stream:
    tests/test_devices.py runs this on CUDA where one is visible.)"""
    ref, ref_losses = _run(None)
    row = 8 * 16 * 16 * 4  # one sample's frontier after 2 or 3 blocks: 8 x 16 x 16 float32
    fm, losses = _run({"memory_budget_mb": 10 * row / 2**20, "host_budget_mb": 30 * row / 2**20,
                       "directory": str(tmp_path)})
    assert losses == ref_losses
    c = fm.activation_cache
    assert c._host is not None and c._host.stats["stored"] > 0 and c._host.stats["served"] > 0
    assert c.stats["spilled"] > 0 and len(c._mem) > 0
    assert 0 < c.host_bytes <= 30 * row and c.memory_bytes <= 10 * row
    i = next(iter(c._host._rows))
    assert all(isinstance(t, torch.Tensor) for t in c.get(i))


def test_host_tier_is_off_on_the_cpu_by_default(tmp_path):
    """Without host_budget_mb, a CPU frontier has no host tier: its memory budget is host memory
    already, so beyond it entries spill as before."""
    fm, _ = _run({"memory_budget_mb": 0.01, "directory": str(tmp_path)}, epochs=2)
    c = fm.activation_cache
    assert c.host_bytes == 0 and c.stats["spilled"] > 0


def test_corrupted_cache_file_is_detected_and_recomputed(tmp_path, caplog):
    cache = ActivationCache(memory_budget_mb=0, directory=tmp_path, prefetch=False)
    calls = []

    def runner(inputs):
        calls.append(1)
        return (inputs[0] * 2,)

    cache.set_prefix(1, runner)
    x = torch.arange(12.0).reshape(4, 3)
    cache.ids = torch.arange(4)
    first = cache.load((x,))
    assert len(calls) == 1 and cache.stats["spilled"] == 4
    victim = next(Path(tmp_path).rglob("2.fxfc"))
    data = bytearray(victim.read_bytes())
    data[-6] ^= 0xFF  # flip payload bits
    victim.write_bytes(bytes(data))
    trunc = next(Path(tmp_path).rglob("3.fxfc"))
    trunc.write_bytes(trunc.read_bytes()[:10])
    with caplog.at_level(logging.WARNING, logger="fxfreeze"):
        again = cache.load((x,))
    # recomputed, not used: rows 2 and 3 run alone (and the batch whole once, the check of a prefix's first sub-batch)
    assert cache.stats["corrupt"] == 2 and len(calls) == 3 and cache.stats["partial_batches"] == 1
    assert torch.equal(again[0], first[0])
    assert "unreadable" in caplog.text
    cache.close()


def test_encode_decode_round_trip_and_rejects_garbage():
    ts = [torch.randn(3, 4), torch.arange(5), torch.randn(2).to(torch.bfloat16)]
    back = _decode(_encode(ts, None))
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(ts, back))
    half = _decode(_encode(ts, torch.float16))
    assert half[0].dtype == torch.float32 and torch.allclose(half[0], ts[0], atol=1e-2)
    for bad in (b"", b"NOPE" * 10, _encode(ts, None)[:-1]):
        with pytest.raises(ValueError):
            _decode(bad)


def test_unwritable_directory_is_a_clear_error_at_compile(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):  # running as root: permissions do not bind; use a file as the folder
        ro = tmp_path / "file"
        ro.write_text("x")
    with pytest.raises(fxfreeze.ConfigError, match="not writable"):
        fxfreeze.compile(zoo.resnet20(), config={"policy": "manual", "cache": {"enabled": True, "directory": str(ro)}})


def test_random_augmentation_keeps_caching_off(caplog):
    with caplog.at_level(logging.WARNING, logger="fxfreeze"):
        fm = fxfreeze.compile(zoo.resnet20(), config={"policy": "manual", "cache": {"enabled": True, "random_augmentation": True}})
    assert fm.activation_cache is None and "random augmentation" in caplog.text


def test_batches_without_ids_run_uncached_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="fxfreeze"):
        ref, ref_losses = _run(None, epochs=2)
        fm, losses = _run({}, epochs=2, wrap=False)
    assert losses == ref_losses
    assert caplog.text.count("without sample ids") == 1 and fm.activation_cache.stats["uncached_batches"] > 0


def test_verification_catches_a_prefix_that_computes_otherwise_for_the_same_input(caplog):
    """A frozen weight written through ``.data`` keeps its version counter, so the cache's
    watch does not see it; verification recomputes the hit and does."""
    torch.manual_seed(0)
    model = zoo.resnet_cifar(depth=8, width=8, in_channels=1)
    fm = fxfreeze.compile(model, (torch.randn(2, 1, 16, 16),), config={"policy": "manual", "cache": {"enabled": True, "verify_fraction": 1.0}})
    fm.freeze_prefix(2)
    fm.train()
    x = torch.randn(4, 1, 16, 16)
    with caplog.at_level(logging.WARNING, logger="fxfreeze"):
        for _ in range(2):
            with fm.sample_ids(torch.arange(4)):
                fm(x)
            next(model.parameters()).data.mul_(1.5)
    assert not fm.activation_cache.enabled and "not deterministic for a given input" in caplog.text


class _Augmented(torch.utils.data.Dataset):
    """Each epoch's samples differ from the last one's, as a random augmentation in a
    dataset's transform makes them (set ``epoch`` before each): a flip on odd epochs, or
    images of another size on odd epochs (multi-scale training)."""

    def __init__(self, how: str) -> None:
        self.data, self.how, self.epoch = _data(), how, 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        x, y = self.data[i]
        if self.epoch % 2:
            x = x.flip(-1) if self.how == "flip" else nn.functional.interpolate(x[None], size=(20, 20))[0]
        return x, y


@pytest.mark.parametrize("how", ["flip", "size"])
@pytest.mark.parametrize("schedule", [{6: 2}, {6: 2, 12: 3}], ids=["read", "refill"])
def test_inputs_that_change_from_epoch_to_epoch_turn_caching_off_at_the_first_read(how, schedule, caplog):
    """A random augmentation the config does not declare (``cache.random_augmentation``) or
    multi-scale inputs: a sample's input differs from the one its cached activations came
    from. Before, the cache served the stored epoch's activations (a flipped image's for the
    unflipped one, a 20x20 image's for a 16x16 one) and the run trained on them, silently;
    inputs of two sizes in one cached batch raised a shape error out of the forward. Now the
    first read (or refill of a deeper prefix from the old entries) compares each sample's
    input fingerprint, turns caching off with a warning, and the run is the uncached run."""
    def run(cache: bool):
        torch.manual_seed(0)
        model = zoo.resnet_cifar(depth=8, width=8, in_channels=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        cfg = {"policy": "manual", "manual": {"schedule": schedule, "unit": "step"}, "cache": {"enabled": cache}}
        ds = _Augmented(how)
        fm = fxfreeze.compile(model, (ds.data.tensors[0][:2],), optimizer=opt, config=cfg)
        loader = DataLoader(ds, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(3))
        losses: list[float] = []
        for epoch in range(4):
            ds.epoch = epoch
            _epoch(fm, opt, fm.wrap_loader(loader) if cache else loader, losses)
        return fm, losses

    _, ref_losses = run(False)
    with caplog.at_level(logging.WARNING, logger="fxfreeze"):
        fm, losses = run(True)
    assert losses == ref_losses
    assert caplog.text.count("is not the one its cached activations were computed from") == 1
    assert ("has shape [1, 16, 16], cached from [1, 20, 20]" in caplog.text) == (how == "size")
    c = fm.activation_cache
    assert not c.enabled and c.stats["hits"] == 0 and c.stats["refills"] == 0 and len(c) == 0


def test_a_batch_that_finds_some_of_its_entries_checks_their_inputs(caplog):
    """Samples 0-3 stored, then a batch of samples 2-5 in which sample 2 changed: its entry
    is found, 4 and 5 are not. Recording the batch's fingerprints over sample 2's would
    have made its stale entry look current to every later read."""
    torch.manual_seed(0)
    fm = fxfreeze.compile(zoo.resnet_cifar(depth=8, width=8, in_channels=1), (torch.randn(2, 1, 16, 16),),
                          config={"policy": "manual", "cache": {"enabled": True}})
    fm.freeze_prefix(2)
    fm.train()
    x = torch.randn(6, 1, 16, 16)
    with fm.sample_ids(torch.arange(4)):
        fm(x[:4])
    y = x[2:].clone()
    y[0] = y[0].flip(-1)
    with caplog.at_level(logging.WARNING, logger="fxfreeze"), fm.sample_ids(torch.arange(2, 6)):
        fm(y)
    assert not fm.activation_cache.enabled and "values of their inputs changed" in caplog.text


def test_input_fingerprints_tell_a_changed_input_from_the_same_one_in_another_batch():
    """The same rows in other batches, of other sizes, match (float64 rounding differs with
    the batch's blocking; the tolerance is far above it); a change of 10^-4 to one pixel of
    a 3x64x64 image, a colour jitter of 10^-6, a flip, and a changed token do not."""
    from fxfreeze.runtime.input_prints import InputPrints

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, 64, 64, generator=g)
    tok = torch.randint(0, 1000, (40, 12), generator=g)
    p = InputPrints()
    for s in range(0, 40, 16):
        ids = list(range(s, min(s + 16, 40)))
        p.record(ids, p.of((x[ids], tok[ids], torch.tensor(3.0)), ("x", "tok", "scale"), len(ids)))
    perm = torch.randperm(40, generator=g).tolist()
    for s in range(0, 40, 7):
        ids = perm[s:s + 7]
        assert p.differ(ids, p.of((x[ids], tok[ids]), ("x", "tok"), len(ids)), strict=True) is None
    y = x.clone()
    y[5, 1, 30, 30] += 1e-4
    assert p.differ([5, 6], p.of((y[[5, 6]], tok[[5, 6]]), ("x", "tok"), 2), strict=True) is not None
    assert p.differ([6], p.of((x[[6]] * (1 + 1e-6), tok[[6]]), ("x", "tok"), 1), strict=True) is not None
    assert p.differ([7], p.of((x[[7]].flip(-1), tok[[7]]), ("x", "tok"), 1), strict=True) is not None
    t2 = tok.clone()
    t2[9, 3] += 1
    assert p.differ([9], p.of((x[[9]], t2[[9]]), ("x", "tok"), 1), strict=True) is not None
    # an input not recorded with the entries: a difference when strict, not compared otherwise
    mask = torch.ones(2, 12)
    assert p.differ([1, 2], p.of((x[[1, 2]], mask), ("x", "mask"), 2), strict=True) is not None
    assert p.differ([1, 2], p.of((x[[1, 2]], mask), ("x", "mask"), 2), strict=False) is None


def test_cache_with_bert_style_kwargs_model():
    """Keyword inputs and a mask handed to every layer: both cross the cut and are cached."""
    torch.manual_seed(0)
    model = zoo.bert_style()
    inputs = zoo.example_inputs("bert_style", 8)
    fm = fxfreeze.compile(model, inputs, config={"policy": "manual", "cache": {"enabled": True}})
    fm.freeze_prefix(2)
    fm.train()
    with torch.no_grad():
        plain = fm.graph_module(True)
        from fxfreeze.analysis import placeholder_values

        torch.manual_seed(5)  # the same dropout masks in the trainable layers
        ref = plain(*placeholder_values(plain, model, (), inputs))
        with fm.sample_ids(torch.arange(8)):
            torch.manual_seed(5)
            miss = fm(**inputs)
            torch.manual_seed(5)
            hit = fm(**inputs)
    key = "logits" if isinstance(ref, dict) else None
    r = ref[key] if key else ref
    torch.testing.assert_close(miss[key] if key else miss, r, rtol=0, atol=0)
    torch.testing.assert_close(hit[key] if key else hit, r, rtol=0, atol=0)
    c = fm.activation_cache
    assert c.enabled and c.stats["hits"] == 8  # the same ids and mask: their fingerprints match
    cached, _ = cache_frontier(fm.graph_module(True).graph, 2)
    assert len(cached) >= 1


def test_cache_config_validation():
    for bad, match in (({"dtype": "int8"}, "cache.dtype"), ({"memory_budget_mb": -1}, "memory_budget_mb"),
                       ({"verify_fraction": 2}, "verify_fraction"), ({"enabled": "yes"}, "cache.enabled"),
                       ({"host_budget_mb": -1}, "host_budget_mb"), ({"host_budget_mb": "4G"}, "host_budget_mb")):
        with pytest.raises(fxfreeze.ConfigError, match=match):
            FreezeConfig.from_dict({"cache": bad})
    with pytest.raises(fxfreeze.FreezeError, match="DataLoader"):
        fxfreeze.compile(zoo.resnet20(), config={"policy": "manual"}).wrap_loader([1, 2, 3])


def test_wrap_loader_with_distributed_sampler_records_global_indices():
    from torch.utils.data.distributed import DistributedSampler

    ds = _data(40)
    fm = fxfreeze.compile(zoo.resnet_cifar(depth=8, width=8, in_channels=1), (ds.tensors[0][:2],),
                          config={"policy": "manual", "cache": {"enabled": True}})
    sampler = DistributedSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=0)
    loader = DataLoader(ds, batch_size=8, sampler=sampler)
    seen = []
    for x, y in fm.wrap_loader(loader):
        ids = fm.activation_cache.ids
        assert torch.equal(ds.tensors[0][ids], x)  # the ids are the batch's dataset indices
        seen += ids.tolist()
    assert sorted(seen) == sorted(list(sampler))
    assert fm.activation_cache.ids is None


def test_cache_on_an_export_captured_model_with_functional_dropout():
    """torch.export graphs bake dropout as ATen calls whose training flag CutBackward
    rewrites; the cache graph must carry those rewrites over correctly."""
    torch.manual_seed(0)
    model = zoo.transformer_classifier()
    (tokens,) = zoo.example_inputs("transformer_classifier", 8)
    fm = fxfreeze.compile(model, (tokens,), config={"policy": "manual", "cache": {"enabled": True}})
    assert fm.strategy == "export"
    fm.freeze_prefix(2)
    fm.train()
    with torch.no_grad():
        plain = fm.graph_module(True)
        torch.manual_seed(5)
        ref = plain(tokens)
        with fm.sample_ids(torch.arange(8)):
            torch.manual_seed(5)
            miss = fm(tokens)
            torch.manual_seed(5)
            hit = fm(tokens)
    torch.testing.assert_close(miss, ref, rtol=0, atol=0)
    torch.testing.assert_close(hit, ref, rtol=0, atol=0)
    fm.cached_graph_module.graph.lint()


def test_ids_that_do_not_match_the_batch_turn_caching_off_without_losing_the_step(caplog):
    torch.manual_seed(0)
    model = zoo.resnet_cifar(depth=8, width=8, in_channels=1)
    fm = fxfreeze.compile(model, (torch.randn(2, 1, 16, 16),), config={"policy": "manual", "cache": {"enabled": True}})
    fm.freeze_prefix(2)
    fm.train()
    x = torch.randn(4, 1, 16, 16)
    with caplog.at_level(logging.WARNING, logger="fxfreeze"), fm.sample_ids(torch.arange(3)):
        out = fm(x)
    assert out.shape[0] == 4 and not fm.activation_cache.enabled and "one row per sample id" in caplog.text


def _pair(cache: dict | None, epochs: int = 3):
    """Two models of one architecture (different weights) trained in turn, epoch by epoch,
    each freezing 2 blocks at step 6: their losses."""
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = zoo.resnet_cifar(depth=8, width=8, in_channels=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        cfg = {"policy": "manual", "manual": {"schedule": {6: 2}}}
        if cache is not None:
            cfg["cache"] = {"enabled": True, **cache}
        fm = fxfreeze.compile(model, (_data().tensors[0][:2],), optimizer=opt, config=cfg)
        loader = DataLoader(_data(), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(3))
        runs.append((fm, opt, fm.wrap_loader(loader) if cache is not None else loader, []))
    for _ in range(epochs):
        for fm, opt, it, losses in runs:  # in turn: the second overwrites what the first spilled
            _epoch(fm, opt, it, losses)
    return [r[0] for r in runs], [r[3] for r in runs]


def test_runs_sharing_a_cache_directory_never_read_each_others_entries(tmp_path):
    """Two runs spill into one folder and train in turn: each stays bitwise equal to its
    own uncached run (a file of the other run, or of stale weights, is never served)."""
    _, ref = _pair(None)
    fms, got = _pair({"memory_budget_mb": 0.0, "directory": str(tmp_path)})
    assert got == ref
    assert len({p.name for p in tmp_path.iterdir() if p.is_dir()}) == 2  # one folder per cache
    cache = fms[1].activation_cache
    path = cache.spilled()[0]
    victim = int(path.stem)
    path.write_bytes(b"\x01" * 32 + path.read_bytes()[32:])  # another key, an intact checksum
    assert cache.get(victim) is None and cache.stats["foreign"] == 1 and path not in cache.spilled()


def test_an_unwritable_spill_folder_mid_run_degrades_and_training_goes_on(tmp_path, caplog, monkeypatch):
    """Spilling fails from the second spill on: one warning, the run continues and its
    parameters equal an undisturbed run's (the cache is not math)."""
    ref, ref_losses = _run(None)
    real = Path.write_bytes
    calls = {"n": 0}

    def flaky(self, data):
        if self.suffix == ".tmp":
            calls["n"] += 1
            if calls["n"] > 1:
                raise PermissionError(13, "Permission denied")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", flaky)
    with caplog.at_level(logging.WARNING, logger="fxfreeze"):
        fm, losses = _run({"memory_budget_mb": 0.0, "directory": str(tmp_path)})
    assert losses == ref_losses
    for (n, a), (_, b) in zip(ref.state_dict().items(), fm.state_dict().items()):
        assert torch.equal(a, b), n
    assert caplog.text.count("cannot spill") == 1 and fm.activation_cache.stats["spill_failures"] == 1


def _frozen_cached(strategy: str = "auto", model=None):
    torch.manual_seed(0)
    model = model if model is not None else zoo.resnet_cifar(depth=8, width=8, in_channels=1)
    fm = fxfreeze.compile(model, (torch.randn(2, 1, 16, 16),), strategy=strategy,
                          config={"policy": "manual", "manual": {"schedule": {}}, "cache": {"enabled": True}})
    fm.freeze_prefix(2)
    return model, fm


def _cached_epoch(fm, x: torch.Tensor) -> torch.Tensor:
    outs = []
    for i in range(0, len(x), 4):
        with fm.sample_ids(torch.arange(i, i + 4)):
            outs.append(fm(x[i:i + 4]))
    return torch.cat(outs)


def test_weights_of_the_frozen_prefix_changed_after_caching_empty_the_cache(caplog):
    """Before, the cache went on serving what the old weights computed: restoring a
    checkpoint into the running model (``load_state_dict``), swapping in EMA weights or an
    in-place update of a frozen weight gave outputs off by about 1.0, silently."""
    model, fm = _frozen_cached()
    x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    for _ in range(2):  # fill, then read
        _cached_epoch(fm, x)
    assert len(fm.activation_cache) == 8
    torch.manual_seed(5)
    other = zoo.resnet_cifar(depth=8, width=8, in_channels=1)
    def ema_update() -> None:  # a frozen weight updated in place
        with torch.no_grad():
            next(model.parameters()).mul_(0.5)

    for edit in (lambda: model.load_state_dict(other.state_dict()), ema_update):
        edit()
        with caplog.at_level(logging.INFO, logger="fxfreeze"):
            got = _cached_epoch(fm, x)
        assert "weights changed" in caplog.text
        caplog.clear()
        with torch.no_grad():  # eager, batch by batch (BatchNorm), the frozen blocks held in eval mode
            want = torch.cat([type(model).forward(model, x[i:i + 4]) for i in range(0, len(x), 4)])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_cached_epoch(fm, x), want, rtol=1e-5, atol=1e-5)  # served again
    assert len(fm.activation_cache) == 8


def test_an_exported_batchnorm_prefix_is_cached_once(caplog):
    """A frozen BatchNorm counts no batch: export records its counter apart (an in-place
    ``add_``), and the cut makes it an add that writes nothing, so the cache's watch of the
    frozen weights sees no change and keeps its entries."""
    model, fm = _frozen_cached("export")
    counters = {n: b.clone() for n, b in model.named_buffers() if n.endswith("num_batches_tracked")}
    x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    with caplog.at_level(logging.INFO, logger="fxfreeze"):
        first = _cached_epoch(fm, x)
        second = _cached_epoch(fm, x)
    assert "weights changed" not in caplog.text and len(fm.activation_cache) == 8
    assert fm.activation_cache.per_row("load") is not None  # the second epoch read the cache
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    frozen = [n for n in counters if n.startswith(tuple(m for b in fm.plan.blocks[:2] for m in b.modules))]
    assert frozen and all(torch.equal(model.get_buffer(n), counters[n]) for n in frozen)


def test_a_dropout_the_frozen_prefix_shares_with_later_blocks_caches_what_the_uncached_run_computes():
    """One ``nn.Dropout`` called after the stem and by every later block: the frozen prefix
    went on dropping out (no block owns the module, so a freeze held it in eval mode in
    none), the cache kept one draw per sample, and the cached run's losses left the
    uncached run's (by 0.14) at the first read."""
    from _nets import SharedDropout

    def run(cache: bool) -> tuple[list[float], dict[str, int]]:
        torch.manual_seed(0)
        net, x, y = SharedDropout().train(), torch.randn(64, 8), torch.randint(0, 2, (64,))
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        config: dict = {"policy": "manual", "manual": {"schedule": {3: 3}}}
        if cache:
            config["cache"] = {"enabled": True}
        fm = fxfreeze.compile(net, (x[:16],), optimizer=opt, config=config)
        loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
        losses = []
        for _ in range(4):
            for xb, yb in fm.wrap_loader(loader):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(fm(xb), yb)
                loss.backward()
                opt.step()
                losses.append(loss.item())
        return losses, (fm.activation_cache.stats if cache else {})

    plain, _ = run(False)
    cached, stats = run(True)
    # 13 batches of 16 from step 4 on: step 4 stores 16 samples, epoch 2 the other 48 (running the prefix on the
    # missing rows only of a batch that finds some stored), the rest is read
    assert stats["misses"] == 64 and stats["hits"] + stats["misses"] == 13 * 16 and stats["partial_batches"] >= 1
    assert cached == plain  # bitwise: the prefix draws nothing, cached or not


def _token_run(cache: bool, tie: bool, epochs: int = 4):
    """A token model trained 4 epochs with 2 blocks (the embedding's among them) frozen at
    step 2: its losses."""
    from _nets import TokenStack

    torch.manual_seed(0)
    model = TokenStack(layers=3, tie=tie)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    cfg = {"policy": "manual", "manual": {"schedule": {2: 2}}, "cache": {"enabled": cache}}
    ids = torch.randint(0, 50, (32, 6), generator=torch.Generator().manual_seed(1))
    fm = fxfreeze.compile(model, (ids[:2],), optimizer=opt, config=cfg)
    loader = DataLoader(TensorDataset(ids), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3))
    losses: list[float] = []
    for _ in range(epochs):
        for (x,) in fm.wrap_loader(loader):
            loss = nn.functional.cross_entropy(fm(x).flatten(0, 1), x.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return fm, losses


@pytest.mark.parametrize("tie", [False, True])
def test_a_prefix_using_a_parameter_that_still_trains_is_never_cached(tie, caplog):
    """An output layer tied to the embedding: the frozen prefix's embedding keeps training
    from the head's use, so the prefix's outputs change at every step and stored ones would
    be stale (the cached run's losses drifted from the uncached run's). Such a prefix runs
    uncached, and says so; untied, the same run reads the cache. Losses equal bitwise."""
    _, ref = _token_run(cache=False, tie=tie)
    with caplog.at_level(logging.INFO, logger="fxfreeze"):
        fm, got = _token_run(cache=True, tie=tie)
    assert got == ref
    hits = fm.activation_cache.stats["hits"]
    if tie:
        assert hits == 0 and "it uses emb.weight, which still train" in caplog.text
        assert fm.prefix_trains(2) == ["emb.weight"] and fm.prefix_trains(1) == ["emb.weight"]
    else:
        assert hits > 0 and "still train" not in caplog.text and fm.prefix_trains(2) == []
