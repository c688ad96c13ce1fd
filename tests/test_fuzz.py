"""Property-based: any config dict and any plan file either loads or raises an
FxFreezeError subclass, never anything else (hypothesis)."""

from __future__ import annotations

import math

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fxfreeze  # noqa: E402
from fxfreeze import FreezeConfig, FreezePlan  # noqa: E402

_SECTIONS = {
    "manual": ["schedule", "unit"],
    "freezeout": ["t0", "scaling", "total_steps"],
    "egeria": ["eval_interval", "probe_size", "window", "threshold", "noise_limit", "patience", "reference_precision",
               "lookahead", "freeze_run", "refresh_every", "worker_threads", "overhead_budget", "unfreeze_on_lr_change",
               "asynchronous", "freeze", "reference_timeout"],
    "autofreeze": ["interval", "percentile"],
    "smartfrz": ["weights", "record_interval", "stage_interval", "min_history", "threshold", "patience", "seed", "contiguous"],
    "cache": ["enabled", "memory_budget_mb", "directory", "dtype", "prefetch", "verify_fraction", "random_augmentation",
              "sub_batches"],
}
_TOP = ["policy", "lr_change_factor", "release_optimizer_state", "steps_per_epoch", "total_steps"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["egeria", "manual", "step", "epoch", "int8", "float16", "all", "cubic", "no", "yes"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.one_of(st.text(max_size=6), st.integers()), inner, max_size=3)), max_leaves=6)


@st.composite
def config_dicts(draw):
    d = {}
    for key in draw(st.lists(st.sampled_from(_TOP + list(_SECTIONS) + ["bogus"]), max_size=5, unique=True)):
        if key in _SECTIONS and draw(st.booleans()):
            d[key] = {k: draw(values) for k in draw(st.lists(st.sampled_from(_SECTIONS[key] + ["bogus"]), max_size=4, unique=True))}
        else:
            d[key] = draw(values)
    return d


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config_dicts())
def test_any_config_dict_loads_or_raises_a_config_error(data):
    try:
        cfg = FreezeConfig.from_dict(data)
    except fxfreeze.FxFreezeError:
        return
    assert isinstance(cfg.lr_change_factor, (int, float)) and math.isfinite(cfg.lr_change_factor)
    assert isinstance(cfg.release_optimizer_state, bool)
    FreezeConfig.from_dict(cfg.to_dict())  # what loaded round-trips


_BLOCK_KEYS = ["index", "name", "start", "modules", "num_params", "flops", "frontier_bytes", "frontier", "params", "buffers", "bogus"]


@st.composite
def plan_dicts(draw):
    d = {"fxfreeze_plan": draw(st.one_of(st.just(1), values))}
    for key in draw(st.lists(st.sampled_from(["model", "strategy", "blocks", "head", "notes", "inputs", "total_params",
                                              "batch_size", "shared_params", "bogus"]), max_size=8, unique=True)):
        if key == "blocks" and draw(st.booleans()):
            d[key] = [{k: draw(values) for k in draw(st.lists(st.sampled_from(_BLOCK_KEYS), max_size=5, unique=True))}
                      for _ in range(draw(st.integers(0, 3)))]
        elif key == "head" and draw(st.booleans()):
            d[key] = {k: draw(values) for k in draw(st.lists(st.sampled_from(["start", "modules", "num_params", "params"]), max_size=3, unique=True))}
        else:
            d[key] = draw(values)
    return d


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan_dicts())
def test_any_plan_dict_loads_or_raises_a_plan_error(data):
    try:
        p = FreezePlan.from_dict(data)
    except fxfreeze.FxFreezeError:
        return
    FreezePlan.from_yaml(p.to_yaml())
    FreezePlan.from_json(p.to_json())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_plan_file_loads_or_raises_a_plan_error(tmp_path, raw):
    path = tmp_path / "p.yaml"
    path.write_bytes(raw)
    try:
        FreezePlan.load(path)
    except fxfreeze.FxFreezeError:
        pass
