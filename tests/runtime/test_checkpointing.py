"""Activation checkpointing is kept: a model whose forward calls ``torch.utils.checkpoint``
(or has Hugging Face's ``gradient_checkpointing`` on) saves no more for its backward under
fxfreeze than without it, trains to the same gradients, and still freezes."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint  # bound by name, as model code does

import fxfreeze
from fxfreeze.bench.memory import saved_bytes


class _Net(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.inp = nn.Linear(8, 32)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 32)) for _ in range(4))
        self.out = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = h + (checkpoint(b, h, use_reentrant=self.reentrant) if self.training else b(h))
        return self.out(h)


class _Branchy(_Net):
    """The same with control flow on a tensor's value: no graph at all (``fm.eager_only``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() > -1e9):
            return super().forward(x)
        return x


def test_a_model_without_a_graph_that_checkpoints_reentrantly_still_trains_after_the_prefix():
    torch.manual_seed(0)
    model = _Branchy(reentrant=True)
    x = torch.randn(16, 8, requires_grad=True)
    fm = fxfreeze.compile(model, (x,), config={"policy": "manual"})
    assert fm.eager_only
    fm.train()
    fm.freeze_prefix(2)
    fm(x).sum().backward()
    assert model.blocks[0][0].weight.grad is None and model.blocks[1][0].weight.grad is not None


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_forward_that_checkpoints_keeps_its_memory_and_gradients_and_freezes(reentrant, caplog):
    torch.manual_seed(0)
    model = _Net(reentrant)
    ref = copy.deepcopy(model)
    x = torch.randn(16, 8, requires_grad=reentrant)  # reentrant checkpointing needs an input with grad
    with caplog.at_level(logging.INFO, logger="fxfreeze"):
        fm = fxfreeze.compile(model, (x,), config={"policy": "manual"})
        assert fm._analysis.capture.checkpoints
        fm.train()
        got, out = saved_bytes(lambda: fm(x))
    want, ref_out = saved_bytes(lambda: ref(x))
    assert got == want  # without the fix the graph saved every block's activations
    out.sum().backward()
    ref_out.sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert sum("checkpoints activations" in r.getMessage() for r in caplog.records) == 1
    model.zero_grad(set_to_none=True)
    fm.freeze_prefix(3)
    fm(x).sum().backward()
    assert model.inp.weight.grad is None and model.blocks[1][0].weight.grad is None
    assert model.blocks[2][0].weight.grad is not None
    model.eval()
    n = len(fm.graphs)
    with torch.no_grad():  # evaluation: a graph (with gradients on, x, which requires one, would get it eagerly)
        torch.testing.assert_close(fm(x), ref.eval()(x), rtol=1e-5, atol=1e-6)
    assert len(fm.graphs) == n + 1


def test_hugging_face_gradient_checkpointing_switched_on_after_compile_is_kept():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                  intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForSequenceClassification(cfg).train()
    batch = {"input_ids": torch.randint(0, 100, (4, 16)), "labels": torch.randint(0, 2, (4,))}
    fm = fxfreeze.compile(model, batch, config={"policy": "manual"})
    plain, _ = saved_bytes(lambda: fm(**batch).loss)
    # what the HF Trainer does at the start of train(), after the callback compiled the model
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref = copy.deepcopy(model)
    got, out = saved_bytes(lambda: fm(**batch).loss)
    want, ref_out = saved_bytes(lambda: ref(**batch).loss)
    assert got == want and got < plain / 4
    out.backward()
    ref_out.backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
