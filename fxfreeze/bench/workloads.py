"""Workloads on real data: a data set split once, deterministic batches, a model factory.

``mnist_resnet`` is the vision workload of the benchmarks and of the Egeria/SmartFRZ
real-task tests: a CIFAR-style ResNet (3 stages, BasicBlocks) adapted to 1x28x28 inputs,
trained from scratch on MNIST idx files split into a fixed train/test partition.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..data import load_mnist_idx, split_indices

__all__ = ["Workload", "mnist_resnet"]


@dataclass
class Workload:
    name: str
    model_fn: Callable[[], nn.Module]
    train_batches: Callable[[int], Iterator[tuple[Any, ...]]]  # (inputs, targets, sample ids)
    test_batches: Callable[[], Iterator[tuple[Any, ...]]]
    example_inputs: Any
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    steps_per_epoch: int
    make_scheduler: Callable[[torch.optim.Optimizer, int], Any] | None = None
    description: str = ""


def _batches(x: torch.Tensor, y: torch.Tensor, bs: int, seed: int | None) -> Iterator[tuple[Any, ...]]:
    n = x.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if seed is not None else torch.arange(n)
    for i in range(0, n - (bs - 1 if seed is not None else 0), bs):  # drop the ragged last training batch
        idx = order[i : i + bs]
        if idx.numel() == 0:
            break
        yield x[idx], y[idx], idx


def mnist_resnet(
    data_dir: str | Path,
    *,
    depth: int = 20,
    width: int = 16,
    train_size: int = 8000,
    batch_size: int = 128,
    lr: float = 0.02,
    seed: int = 0,
) -> Workload:
    """ResNet-``depth`` (width ``width``) on MNIST idx files: a fixed split of
    ``train_size`` training images, the rest for testing; SGD with momentum."""
    from ..zoo import resnet_cifar

    x, y = load_mnist_idx(data_dir)
    x = (x - 0.1307) / 0.3081
    tr, te = split_indices(x.shape[0], train_size, seed=1234)  # the split never varies with the run seed
    xtr, ytr, xte, yte = x[tr], y[tr], x[te], y[te]

    def model_fn() -> nn.Module:
        return resnet_cifar(depth=depth, num_classes=10, in_channels=1, width=width)

    return Workload(
        name=f"resnet{depth}-mnist",
        model_fn=model_fn,
        train_batches=lambda epoch: _batches(xtr, ytr, batch_size, seed * 1000 + epoch),
        test_batches=lambda: _batches(xte, yte, 500, None),
        example_inputs=(xtr[:2],),
        make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4),
        steps_per_epoch=xtr.shape[0] // batch_size,
        make_scheduler=lambda opt, total: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total),
        description=f"ResNet-{depth} (width {width}) from scratch on MNIST ({train_size}/{x.shape[0] - train_size} split), batch {batch_size}, SGD lr {lr} with per-step cosine decay",
    )
