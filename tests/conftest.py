"""Shared fixtures and markers."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def pytest_configure(config):
    # Under pytest-xdist (``make test`` runs ``-n auto``) each worker gets its share of the
    # cores, so that the workers do not oversubscribe them with torch's intra-op threads.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // workers))


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
