"""A compiled model with nothing frozen computes exactly what the eager model computes.

Tolerance: exact (0.0) is what we observe on CPU, because fx graphs call the same modules
in the same order and export graphs run the same ATen kernels; the assertion allows a
relative error of 1e-6 so that a platform with different kernel selection for the ATen
decomposition does not fail spuriously.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._pytree import tree_leaves

import fxfreeze
from fxfreeze import zoo

NAMES = [n for n in zoo.MODELS if n != "resnet50_like"]


def _call(m, x):
    return m(*x) if isinstance(x, tuple) else m(**x)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("training", [True, False])
def test_outputs_and_gradients_equal_eager(name, training):
    factory, inputs = zoo.MODELS[name]
    torch.manual_seed(0)
    model = factory()
    x = inputs(4)
    ref = copy.deepcopy(model)
    fm = fxfreeze.compile(model, x)
    fm.train(training)
    ref.train(training)
    torch.manual_seed(1)
    out = _call(fm, x)
    torch.manual_seed(1)
    exp = _call(ref, x)
    got_l, exp_l = tree_leaves(out), tree_leaves(exp)
    assert len(got_l) == len(exp_l)
    for a, b in zip(got_l, exp_l):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    sum(t.float().pow(2).mean() for t in got_l if t.is_floating_point()).backward()
    sum(t.float().pow(2).mean() for t in exp_l if t.is_floating_point()).backward()
    ref_params = dict(ref.named_parameters())
    for n, p in fm.named_parameters():
        q = ref_params[n]
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=f"gradient of {n}")


@pytest.mark.parametrize("name", ["resnet20", "bert_style", "transformer_classifier"])
def test_state_dict_interchangeable(name):
    factory, inputs = zoo.MODELS[name]
    model = factory()
    fm = fxfreeze.compile(model, inputs(2))
    assert list(fm.state_dict()) == list(model.state_dict())
    other = factory()
    other.load_state_dict(fm.state_dict())
    fm.load_state_dict(factory().state_dict())
    for a, b in zip(fm.parameters(), model.parameters()):
        assert a is b  # shared, not copied
