"""Copies to and from host memory that never block training (runtime/host_tier.py): snapshots
for Egeria's worker and the activation cache's host tier. On the CPU, and on CUDA where one is
visible (pinned memory, a side stream, events)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from fxfreeze.runtime.host_tier import HostCopy, HostTier, to_host

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")]),
]


@pytest.mark.parametrize("device", DEVICES)
def test_a_snapshot_is_the_value_when_taken_not_after_an_in_place_update(device):
    w = torch.arange(12.0, device=device).reshape(3, 4)
    tree = {"w": w, "b": [w[0], 3], "name": "block"}
    host, ready = to_host(tree)
    w.add_(100.0)  # the optimizer's next step, queued after the snapshot
    ready.wait()
    assert host["name"] == "block" and host["b"][1] == 3
    assert host["w"].device.type == "cpu" and host["w"].is_pinned() == (device == "cuda")
    torch.testing.assert_close(host["w"], torch.arange(12.0).reshape(3, 4), rtol=0, atol=0)
    torch.testing.assert_close(host["b"][0], torch.arange(4.0), rtol=0, atol=0)
    assert ready.done()


@pytest.mark.parametrize("copy", [True, False])
@pytest.mark.parametrize("device", DEVICES)
def test_many_tensors_of_several_dtypes_shapes_and_layouts_come_back_equal(device, copy):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    ref = {
        "transposed": base.t(),  # not contiguous
        "scalar": torch.tensor(2.5),
        "ints": torch.arange(5),
        "empty": torch.empty(0, 3),
        "channels_last": torch.randn(2, 3, 4, 4, generator=g).to(memory_format=torch.channels_last),
        "half": base.half(),
        "mask": base > 0,
    }
    src = {k: v.to(device, copy=True) for k, v in ref.items()}
    host, ready = to_host(src, copy=copy)
    if copy:
        for v in src.values():
            if v.is_floating_point():
                v.mul_(-1)  # the next optimizer step: must not reach a copy taken before it
    ready.wait()
    for k, v in ref.items():
        assert host[k].device.type == "cpu" and host[k].dtype == v.dtype and host[k].shape == v.shape, k
        torch.testing.assert_close(host[k], v, rtol=0, atol=0)
    if device == "cuda":
        # one pinned buffer per dtype: the float32 tensors are views of one allocation
        ptrs = {host[k].untyped_storage().data_ptr() for k in ("transposed", "scalar", "empty", "channels_last")}
        assert len(ptrs) == 1 and host["scalar"].is_pinned()


@pytest.mark.parametrize("device", DEVICES)
def test_a_later_copy_is_every_tensor_on_the_host_as_it_was_when_taken(device):
    """to_host_later: the calling thread only gathers on the device; a helper thread allocates
    and copies. What comes back is host tensors (never the device's), with the values they had
    when taken, from any thread."""
    from fxfreeze.runtime.host_tier import to_host_later

    w = torch.arange(12.0, device=device).reshape(3, 4)
    ids = torch.arange(5, device=device)
    pending = to_host_later({"w": w, "rows": [w[0], w.t()], "ids": ids, "name": "block"})
    w.add_(100.0)  # the optimizer's next step
    got = {}
    reader = threading.Thread(target=lambda: got.update(pending.result(timeout=60)))
    reader.start()
    reader.join(60)
    assert got["name"] == "block" and pending.done()
    for t in (got["w"], *got["rows"], got["ids"]):
        assert t.device.type == "cpu" and t.is_pinned() == (device == "cuda")
    torch.testing.assert_close(got["w"], torch.arange(12.0).reshape(3, 4), rtol=0, atol=0)
    torch.testing.assert_close(got["rows"][1], torch.arange(12.0).reshape(3, 4).t(), rtol=0, atol=0)
    torch.testing.assert_close(got["ids"], torch.arange(5), rtol=0, atol=0)
    assert pending.result() is not None  # the result stays readable


def test_cpu_values_without_copy_are_handed_on_as_they_are():
    t = torch.ones(3)
    out, ready = to_host((t,), copy=False)
    assert out[0] is not None and out[0].data_ptr() == t.data_ptr() and ready.done()
    out, _ = to_host((t,), copy=True)
    assert out[0].data_ptr() != t.data_ptr()


@pytest.mark.parametrize("device", DEVICES)
def test_host_tier_round_trip_with_a_prefetched_batch(device):
    pool = ThreadPoolExecutor(1)
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(6, 2, 3, generator=g).to(device)
        b = torch.randint(0, 9, (6, 4), generator=g).to(device)
        row = a[0].numel() * a.element_size() + b[0].numel() * b.element_size()
        tier = HostTier(4 * row, pool)
        assert tier.room(row) == 4 and tier.room(0) == 0
        tier.put([10, 11, 12, 13], (a[:4], b[:4]))
        assert tier.room(row) == 0 and tier.bytes == 4 * row and len(tier) == 4 and 12 in tier
        devs = [torch.device(device)] * 2
        tier.prefetch([13, 10], devs)
        if device == "cuda":
            assert tier.stats["prefetched"] == 2  # CPU frontiers are gathered when read, not ahead
        x, y = tier.gather([13, 10], devs)  # the prefetched copy
        torch.testing.assert_close(x, a[[3, 0]], rtol=0, atol=0)
        torch.testing.assert_close(y, b[[3, 0]], rtol=0, atol=0)
        x, y = tier.gather([12], devs)  # not prefetched: copied now
        torch.testing.assert_close(x, a[2:3], rtol=0, atol=0)
        assert x.device == a.device and tier.stats["served"] == 3
        tier.clear()
        assert len(tier) == 0 and tier.bytes == 0
    finally:
        pool.shutdown()


def test_a_failed_prefetch_falls_back_to_a_copy_when_read(monkeypatch):
    pool = ThreadPoolExecutor(1)
    try:
        tier = HostTier(1 << 20, pool)
        t = torch.arange(8.0).reshape(4, 2)
        tier.put([0, 1, 2, 3], (t,))
        dev = [torch.device("cpu")]
        key = (1, 2)
        fut = pool.submit(lambda: (_ for _ in ()).throw(RuntimeError("no pinned memory left")))
        tier._staged[key] = fut
        (x,) = tier.gather(list(key), dev)
        torch.testing.assert_close(x, t[1:3], rtol=0, atol=0)
    finally:
        pool.shutdown()


def test_host_copy_without_an_event_is_done():
    c = HostCopy()
    assert c.done()
    c.wait()
