"""Bad input to the foundation API: one clear error each."""

from __future__ import annotations

import pytest
import torch

import fxfreeze
from fxfreeze import zoo


def test_non_module():
    with pytest.raises(fxfreeze.ModelError, match="expected a torch.nn.Module"):
        fxfreeze.plan(lambda x: x)


def test_model_without_parameters():
    with pytest.raises(fxfreeze.ModelError, match="no parameters"):
        fxfreeze.plan(torch.nn.ReLU(), (torch.randn(2),))


def test_wrong_input_shape():
    with pytest.raises(fxfreeze.ExampleInputError, match=r"float32\[2, 5\]"):
        fxfreeze.plan(zoo.dict_output_net(), (torch.randn(2, 5),))


def test_wrong_input_container():
    with pytest.raises(fxfreeze.ExampleInputError, match="example_inputs must be"):
        fxfreeze.plan(zoo.resnet20(), 3.0)


def test_a_whole_batch_as_example_inputs_names_the_forward_and_the_fix():
    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 10, (2,))
    with pytest.raises(fxfreeze.ExampleInputError) as e:
        fxfreeze.compile(zoo.resnet20(), (x, y))  # next(iter(loader)) as it comes
    msg = str(e.value)
    assert "ResNetCifar.forward(x)" in msg and "too many positional" in msg and "(batch[0],)" in msg


def test_errors_share_a_base():
    for cls in (fxfreeze.ModelError, fxfreeze.PlanError, fxfreeze.TraceError, fxfreeze.ConfigError):
        assert issubclass(cls, fxfreeze.FxFreezeError)
