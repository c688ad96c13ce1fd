"""A mixed-precision wrapper of ``model.forward`` (accelerate's, or ``torch.autocast`` used as
a decorator): the plan sees the model's blocks, not one autocast region, and the compiled
module runs under the wrapper's autocast, whichever way the loop calls it."""

from __future__ import annotations

import copy
import functools
import logging
import types

import pytest
import torch
from torch import nn

import fxfreeze
from fxfreeze.amp import wrapper_autocast
from _nets import ResidualMLP

SCHEDULE = {"policy": "manual", "manual": {"schedule": {2: 2}}}


def _net() -> ResidualMLP:
    torch.manual_seed(0)
    return ResidualMLP()


def _decorated(model: nn.Module, dtype: torch.dtype = torch.bfloat16, enabled: bool = True) -> nn.Module:
    """``model.forward`` wrapped the way ``torch.autocast`` as a decorator wraps it."""
    model.forward = types.MethodType(torch.autocast("cpu", dtype=dtype, enabled=enabled)(type(model).forward), model)
    return model


def test_the_autocast_of_a_wrapper_is_read_from_it_without_calling_it():
    assert wrapper_autocast(_net(), None) is None
    amp = wrapper_autocast(m := _decorated(_net(), torch.float16), m.__dict__["forward"])
    assert amp is not None and (amp.device_type, amp.dtype) == ("cpu", torch.float16)
    assert amp.plain == (False, None) and amp.convert_outputs is None
    m = _decorated(_net(), enabled=False)
    assert wrapper_autocast(m, m.__dict__["forward"]) is None  # a disabled autocast changes nothing

    def in_body(self, x):  # the autocast is made inside the body: nothing to read
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return type(self).forward(self, x)

    m = _net()
    m.forward = types.MethodType(in_body, m)
    assert wrapper_autocast(m, m.__dict__["forward"]) is None

    def outer(fn):
        @functools.wraps(fn)
        def run(*a, **k):
            return fn(*a, **k)
        return run

    m = _net()  # an autocast two wrappers deep, its inner forward the class's
    m.forward = types.MethodType(outer(torch.autocast("cpu", dtype=torch.bfloat16)(ResidualMLP.forward)), m)
    amp = wrapper_autocast(m, m.__dict__["forward"])
    assert amp is not None and amp.dtype == torch.bfloat16 and amp.plain == (False, None)


def test_an_exported_capture_sees_the_blocks_under_the_wrapper_and_runs_under_its_autocast():
    x = torch.randn(4, 8)
    plain_names = fxfreeze.plan(_net(), (x,), strategy="export").names
    model = _decorated(_net())
    ref = copy.deepcopy(model)  # the wrapper (a bound method) is copied with the model
    fm = fxfreeze.compile(model, (x,), strategy="export", config=SCHEDULE)
    assert fm.plan.names == plain_names and len(plain_names) == 5  # stem and four blocks, not one region
    entry = next(iter(fm.graphs.entries()))
    entry_graph = fm.graph_module_of(entry).graph
    entry_graph.lint()
    assert not [n for n in entry_graph.nodes if "autocast" in str(n.target)]
    assert entry.key[1] == (("cpu", torch.bfloat16),)
    out, expected = fm(x), ref(x)
    assert out.dtype == torch.bfloat16  # no conversion of outputs: the wrapper has none
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # the same bf16 ops on the CPU
    out.float().sum().backward()
    expected.float().sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)
    assert model.forward.__func__ is not type(model).forward  # the user's wrapper is left in place


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps its mixed-precision setting in process-wide state, which an earlier
    test (the HF Trainer's) may have set otherwise: start and leave it fresh."""
    state = pytest.importorskip("accelerate.state")
    state.AcceleratorState._reset_state(reset_partial_state=True)
    yield
    state.AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.usefixtures("fresh_accelerate")
@pytest.mark.parametrize("call", ["fm", "install", "model"])
def test_accelerate_mixed_precision_is_kept_whichever_way_the_loop_calls(call, caplog):
    """``accelerator.prepare`` with bf16 before compile: the plan has the embeddings and
    every layer, the losses equal the prepared model's own until the freeze, outputs are
    float32 as accelerate makes them; a loop calling ``model(...)`` is routed at its first
    step (the wrapper's autocast is understood, so the route can replace it)."""
    transformers = pytest.importorskip("transformers")
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    base = transformers.BertForSequenceClassification(cfg)

    def prepared():
        m = copy.deepcopy(base)
        acc = accelerate.Accelerator(mixed_precision="bf16", cpu=True)
        m, opt = acc.prepare(m, torch.optim.SGD(m.parameters(), lr=0.1))
        return m, opt, acc

    (model, opt, acc), (ref, ref_opt, ref_acc) = prepared(), prepared()
    batch = {"input_ids": torch.randint(0, 100, (4, 12)), "labels": torch.randint(0, 2, (4,))}
    fm = fxfreeze.compile(model, batch, optimizer=opt, config=SCHEDULE)
    assert fm.plan.names == ["stem", "bert.encoder.layer.0", "bert.encoder.layer.1", "bert.encoder.layer.2"]
    if call == "install":
        fm.install()
    with caplog.at_level(logging.WARNING, logger="fxfreeze"):
        for step in range(4):
            out = fm(**batch) if call == "fm" else model(**batch)
            expected = ref(**batch)
            assert out.logits.dtype == torch.float32
            if step <= 2:  # two blocks freeze after the optimizer step of step 2
                torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=0)
            acc.backward(out.loss)
            opt.step()
            opt.zero_grad()
            ref_acc.backward(expected.loss)
            ref_opt.step()
            ref_opt.zero_grad()
    assert fm.num_frozen == 2 and fm.installed == (call != "fm")
    assert [e.key[1] for e in fm.graphs.entries()] == [(("cpu", torch.bfloat16),)]
    routed = [r for r in caplog.records if "without a call of the compiled module" in r.getMessage()]
    assert len(routed) == (call == "model") and "wrapper" not in "".join(r.getMessage() for r in routed)
    fm.uninstall()
    assert wrapper_autocast(model, model.__dict__.get("forward")) is not None  # accelerate's wrapper is back


def test_a_wrapper_added_after_compile_applies_to_the_compiled_module():
    x = torch.randn(4, 8)
    model = _net()
    fm = fxfreeze.compile(model, (x,), config=SCHEDULE)
    assert fm(x).dtype == torch.float32
    _decorated(model)
    assert fm(x).dtype == torch.bfloat16
    assert {e.key[1] for e in fm.graphs.entries()} == {(), (("cpu", torch.bfloat16),)}
    del model.forward
    assert fm(x).dtype == torch.float32


@pytest.mark.usefixtures("fresh_accelerate")
def test_accelerate_unwrap_model_after_a_route_gives_a_plain_model():
    """``accelerator.unwrap_model(model, keep_fp32_wrapper=False)`` follows ``__wrapped__``
    from ``model.forward``: through an installed route it reaches the model's own forward
    (before, it bound the route to the model twice: "too many positional arguments")."""
    accelerate = pytest.importorskip("accelerate")
    acc = accelerate.Accelerator(mixed_precision="bf16", cpu=True)
    model = acc.prepare(_net())
    fm = fxfreeze.compile(model, (torch.randn(4, 8),), config=SCHEDULE)
    fm.install()
    plain = acc.unwrap_model(model, keep_fp32_wrapper=False)
    x = torch.randn(4, 8)
    assert plain is model and model.forward.__func__ is ResidualMLP.forward
    torch.testing.assert_close(plain(x), ResidualMLP.forward(model, x), rtol=0, atol=0)
