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


def test_a_model_in_data_parallel_over_several_devices_is_refused_with_the_fix():
    """``nn.DataParallel`` splits each batch among replicas at every call, which the graphs
    cannot keep: refused with the fix. One device (or none, as here) is a plain wrapper."""
    net = zoo.resnet_cifar(depth=8, width=8, in_channels=1)
    x = torch.randn(2, 1, 16, 16)
    dp = torch.nn.DataParallel(net)
    assert dp.device_ids == [] and fxfreeze.compile(dp, (x,)).plan  # no GPU: a plain wrapper, compiled
    dp = torch.nn.DataParallel(zoo.resnet_cifar(depth=8, width=8, in_channels=1))
    dp.device_ids = [0, 1]  # as on a machine with two GPUs
    with pytest.raises(fxfreeze.ModelError, match="over 2 devices.*Compile model.module.*FreezeDDP"):
        fxfreeze.compile(dp, (x,))


def test_errors_share_a_base():
    for cls in (fxfreeze.ModelError, fxfreeze.PlanError, fxfreeze.TraceError, fxfreeze.ConfigError):
        assert issubclass(cls, fxfreeze.FxFreezeError)
