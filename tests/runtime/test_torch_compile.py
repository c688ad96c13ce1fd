"""``torch.compile`` with fxfreeze: ``torch.compile(fm)`` traces the graphs' run and
recompiles once per freeze, not once per call; ``fxfreeze.compile(torch.compile(model))``
compiles the model inside the wrapper. The ``aot_eager`` backend keeps these tests free of
a C++ toolchain; what they check (guards, recompiles, the frozen prefix) is the backend's
input, the same for inductor."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import fxfreeze

CONFIG = {"policy": "manual", "manual": {"schedule": {3: 2}}}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class _Res(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.bn = nn.BatchNorm1d(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.bn(self.lin(x)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), *[_Res(16) for _ in range(4)], nn.Linear(16, 3))


def _train(model: nn.Module, compiled: bool, steps: int):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    fm = fxfreeze.compile(model, (torch.randn(4, 8),), optimizer=opt, strategy="export", config=CONFIG)
    run = torch.compile(fm, backend="aot_eager") if compiled else fm
    g = torch.Generator().manual_seed(1)
    losses, stats_moved = [], []
    for _ in range(steps):
        x, y = torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
        before = model[1].bn.running_mean.clone()
        loss = nn.functional.cross_entropy(run(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        stats_moved.append(not torch.equal(before, model[1].bn.running_mean))
    return fm, torch.stack(losses), stats_moved


def test_torch_compile_of_the_compiled_module_trains_as_it_does_and_recompiles_only_at_the_freeze(caplog):
    base = _model()
    plain_fm, plain_losses, _ = _train(copy.deepcopy(base), False, 12)
    model = copy.deepcopy(base)
    with caplog.at_level(logging.WARNING, logger="torch._dynamo"):
        fm, losses, stats_moved = _train(model, True, 12)
    torch.testing.assert_close(losses, plain_losses, rtol=1e-5, atol=1e-6)
    assert fm.num_frozen == plain_fm.num_frozen == 2 and fm.training_calls == 12
    # the frozen prefix's BatchNorm stops updating after the freeze (step 3): the graph that
    # dynamo traced was rewritten by the freeze and traced again
    assert stats_moved == [True] * 3 + [False] * 9
    assert all(p.grad is None for p in model[1].parameters())
    assert not [r for r in caplog.records if "recompile_limit" in r.getMessage()]  # was hit at call 8


def test_compiling_a_torch_compiled_model_compiles_the_model_inside(caplog):
    model = _model()
    wrapped = torch.compile(model, backend="aot_eager")
    with caplog.at_level(logging.WARNING, logger="fxfreeze"):
        fm = fxfreeze.compile(wrapped, (torch.randn(4, 8),), config=CONFIG)
    assert fm.plan.names == fxfreeze.plan(model, (torch.randn(4, 8),)).names
    assert not any(n.startswith("_orig_mod") for n in fm.plan.names)
    assert fxfreeze.plan(wrapped, (torch.randn(4, 8),)).names == fm.plan.names
    assert set(fm.state_dict()) == set(model.state_dict())
    assert any("torch.compile(fm)" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("ids", ["wrap_loader", "in-the-call"])
def test_torch_compile_with_the_activation_cache_reads_it_without_recompiling(ids, caplog):
    """``torch.compile(fm)`` with the activation cache: dynamo traced into the cache's load
    (the graph's ``cache_load`` node) and guarded on each batch's sample ids and timings, so
    it recompiled at every batch until ``recompile_limit``. The load is now a graph break:
    the run equals the uncached, uncompiled one and nothing recompiles past the limit."""
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(torch.randn(48, 8, generator=torch.Generator().manual_seed(1)), torch.randint(0, 3, (48,)))
    with_ids = fxfreeze.with_sample_ids([{"x": x, "y": y} for x, y in data])

    def train(cache: bool, compiled: bool):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        cfg = {**CONFIG, "cache": {"enabled": cache}}
        fm = fxfreeze.compile(model, (torch.randn(4, 8),), optimizer=opt, strategy="export", config=cfg)
        run = torch.compile(fm, backend="aot_eager") if compiled else fm
        loader = DataLoader(data if ids == "wrap_loader" else with_ids, batch_size=8, shuffle=True,
                            generator=torch.Generator().manual_seed(3))
        losses = []
        for _ in range(3):
            if ids == "wrap_loader":
                batches = ((x, y, {}) for x, y in fm.wrap_loader(loader))
            else:
                batches = ((b["x"], b["y"], {"fxfreeze_sample_id": b["fxfreeze_sample_id"]}) for b in loader)
            for x, y, kw in batches:
                loss = nn.functional.cross_entropy(run(x, **kw), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.detach())
        return fm, torch.stack(losses)

    _, plain = train(False, False)
    with caplog.at_level(logging.WARNING, logger="torch._dynamo"):
        fm, losses = train(True, True)
    torch.testing.assert_close(losses, plain, rtol=1e-5, atol=1e-6)
    assert fm.activation_cache.stats["hits"] >= 48 and fm.activation_cache.stats["uncached_batches"] == 0
    assert not [r for r in caplog.records if "recompile_limit" in r.getMessage()]
