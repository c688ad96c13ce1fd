"""Every policy resumes exactly: a run checkpointed inside a policy's interval and resumed
into fresh objects (through ``torch.save``/``torch.load(weights_only=True)``) ends with the
same parameters, bitwise, and the same freeze history as the uninterrupted run. Egeria in
its synchronous mode (its asynchronous default consumes results whenever they are ready,
which no run reproduces)."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

import fxfreeze
from fxfreeze import zoo

TOTAL, SPLIT = 24, 11  # 11: inside AutoFreeze's and SmartFRZ's intervals, between Egeria's evaluations

CONFIGS = {
    "manual": {"manual": {"schedule": {5: 2, 15: 4}}},
    "freezeout": {"freezeout": {"t0": 0.3, "scaling": "linear", "total_steps": TOTAL}},
    "autofreeze": {"autofreeze": {"interval": 4, "percentile": 60}},
    "smartfrz": {"smartfrz": {"record_interval": 1, "stage_interval": 2, "min_history": 3, "threshold": 0.01, "patience": 1}},
    "egeria": {"egeria": {"eval_interval": 2, "window": 3, "patience": 1, "threshold": 50.0, "noise_limit": 500.0,
                          "asynchronous": False, "overhead_budget": 0.0, "probe_size": 4, "refresh_every": 4}},
}


def _batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)


def _build(policy: str):
    torch.manual_seed(0)
    model = zoo.resnet20()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    fm = fxfreeze.compile(model, (_batch(0)[0],), optimizer=opt, config={"policy": policy, **CONFIGS[policy]})
    return fm, opt


def _train(fm, opt, start: int, stop: int) -> None:
    for step in range(start, stop):
        x, y = _batch(step)
        opt.zero_grad()
        F.cross_entropy(fm(x), y).backward()
        opt.step()


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("policy", list(CONFIGS))
def test_resume_inside_an_interval_is_exact(policy):
    full, opt = _build(policy)
    _train(full, opt, 0, TOTAL)
    events = [(e["step"], e["action"], e["num_frozen"]) for e in full.freezer.history]
    assert any(a == "freeze" for _, a, _ in events), f"{policy} froze nothing: the test would prove little"

    first, opt1 = _build(policy)
    _train(first, opt1, 0, SPLIT)
    ckpt = _roundtrip({"model": first.state_dict(), "opt": opt1.state_dict(), "freezer": first.freezer.state_dict()})
    first.detach()

    second, opt2 = _build(policy)
    second.load_state_dict(ckpt["model"])
    second.freezer.load_state_dict(ckpt["freezer"])
    opt2.load_state_dict(ckpt["opt"])
    _train(second, opt2, SPLIT, TOTAL)
    assert [(e["step"], e["action"], e["num_frozen"]) for e in second.freezer.history] == events
    for (n, a), (_, b) in zip(full.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), f"{policy}: {n} differs after the resume"
