"""Shared fixtures and markers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    have_tv = importlib.util.find_spec("torchvision") is not None
    skip_tv = pytest.mark.skip(reason="torchvision is not importable (make torchvision-test installs it)")
    for item in items:
        if "torchvision" in item.keywords and not have_tv:
            item.add_marker(skip_tv)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def shared_data() -> Path:
    path = SHARED.resolve()
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} is absent")
    return path
