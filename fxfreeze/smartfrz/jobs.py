"""Recorded training runs: the SmartFRZ predictor's training data.

A :class:`JobSpec` names an architecture *family* (the unit of the leave-one-architecture-out
evaluation), a model, a data set and an optimisation recipe. :func:`run_job` trains it
without freezing and, every ``record_interval`` optimizer steps, records for every freezable
block of its plan (found by fxfreeze's partitioner, as at run time):

- the block's weight snapshot, exactly as the SmartFRZ policy samples it at run time
  (:class:`~fxfreeze.runtime.history.WeightHistory`, same seed and positions);
- the centred Gram matrix of the block's outputs on a fixed probe batch (eval mode).

At the end, ``cka[t, b]`` is the linear CKA between block ``b``'s activations at snapshot
``t`` and at the last one. A :class:`JobRecord` keeps the histories and the CKA series (not
the Gram matrices) and saves to / loads from fxfreeze's tensor-file format, so that
``fxfreeze train-predictor --records DIR`` can reuse runs.

Data: MNIST idx files, scikit-learn's ``load_digits`` (offline) and sentence polarity
files, tokenised by hashing words into a fixed vocabulary (no download, no tokenizer files).
"""

from __future__ import annotations

import re
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..bench.runner import accuracy, call_model, logits_of
from ..data import load_mnist_idx, load_polarity, split_indices
from ..errors import DataError
from ..tensorfile import read_tensor_file, write_tensor_file
from .cka import centered_gram, cka_from_grams

__all__ = ["JobSpec", "JobRecord", "Dataset", "run_job", "default_jobs", "load_dataset", "hash_tokenize"]


@dataclass
class Dataset:
    """Inputs by index: ``take(idx)`` gives a model's inputs (a tuple or a kwargs dict)."""

    name: str
    take: Callable[[torch.Tensor], Any]
    targets: torch.Tensor
    train: torch.Tensor  # indices
    test: torch.Tensor


def hash_tokenize(texts: list[str], vocab: int = 4096, max_len: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[N, max_len]`` and attention mask: id 1 opens every sentence (a [CLS]
    position), words hash (CRC-32) into ids ``2..vocab-1``, 0 pads."""
    ids = torch.zeros(len(texts), max_len, dtype=torch.long)
    for i, t in enumerate(texts):
        words = re.findall(r"[a-z0-9']+", t.lower())[: max_len - 1]
        ids[i, 0] = 1
        for j, w in enumerate(words):
            ids[i, j + 1] = 2 + zlib.crc32(w.encode("utf-8")) % (vocab - 2)
    return ids, (ids != 0).long()


def load_dataset(name: str, paths: dict[str, Path | None], *, tokens_as: str = "kwargs", limit: int | None = None) -> Dataset:
    """``mnist`` (idx folder), ``digits`` (scikit-learn) or ``polarity`` (folder); ``paths``
    maps the first and last to their folders. Raises DataError when one is missing."""
    if name == "mnist":
        folder = paths.get("mnist")
        if folder is None:
            raise DataError("the mnist jobs need --mnist DIR (MNIST idx files)")
        x, y = load_mnist_idx(folder)
        x = (x - 0.1307) / 0.3081
        n = x.shape[0] if limit is None else min(limit, x.shape[0])
        tr, te = split_indices(n, 0.8, seed=1234)
        return Dataset("mnist", lambda i: (x[i],), y, tr, te)
    if name == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise DataError(f"the digits jobs need scikit-learn (pip install scikit-learn): {e}") from e
        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
        x = (x - x.mean()) / x.std()
        y = torch.tensor(d.target, dtype=torch.long)
        tr, te = split_indices(x.shape[0], 0.8, seed=1234)
        return Dataset("digits", lambda i: (x[i],), y, tr, te)
    if name == "polarity":
        folder = paths.get("polarity")
        if folder is None:
            raise DataError("the polarity jobs need --polarity DIR (rt-polarity.pos/.neg)")
        texts, labels = load_polarity(folder)
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(1234))
        if limit is not None:
            order = order[:limit]
        ids, mask = hash_tokenize([texts[int(i)] for i in order])
        y = torch.tensor([labels[int(i)] for i in order])
        tr, te = split_indices(len(order), 0.9, seed=1234)
        if tokens_as == "kwargs":
            return Dataset("polarity", lambda i: {"input_ids": ids[i], "attention_mask": mask[i]}, y, tr, te)
        return Dataset("polarity", lambda i: (ids[i],), y, tr, te)
    raise DataError(f"unknown data set {name!r}; use mnist, digits or polarity")


@dataclass
class JobSpec:
    """One training run to record."""

    name: str
    family: str
    dataset: str
    model: Callable[[], nn.Module]
    optimizer: str = "sgd"  # sgd (momentum 0.9, weight decay 5e-4) or adam
    lr: float = 0.05
    schedule: str = "cosine"  # cosine (per step) or constant
    epochs: int = 6
    batch_size: int = 64
    seed: int = 0
    limit: int | None = None  # use only the first samples of the data set
    tokens_as: str = "kwargs"  # how text reaches the model: kwargs (input_ids, attention_mask) or args


@dataclass
class JobRecord:
    """What a recorded run leaves: per block, weight snapshots and CKA to the final model."""

    name: str
    family: str
    blocks: list[str]
    history: torch.Tensor  # [B, T, sample_size]
    cka: torch.Tensor  # [T, B]
    record_interval: int
    steps: int
    accuracy: float
    seconds: float
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        write_tensor_file(path, {"history": self.history, "cka": self.cka}, {
            "name": self.name, "family": self.family, "blocks": self.blocks, "record_interval": self.record_interval,
            "steps": self.steps, "accuracy": self.accuracy, "seconds": self.seconds, **self.meta,
        }, store_dtype=torch.float32)

    @classmethod
    def load(cls, path: str | Path) -> "JobRecord":
        try:
            t, m = read_tensor_file(path)
            known = {"name", "family", "blocks", "record_interval", "steps", "accuracy", "seconds"}
            return cls(m["name"], m["family"], list(m["blocks"]), t["history"], t["cka"], int(m["record_interval"]),
                       int(m["steps"]), float(m["accuracy"]), float(m["seconds"]),
                       {k: v for k, v in m.items() if k not in known})
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"recorded job {str(path)!r} cannot be read ({e}); delete it to record the job again") from e


def _optimizer(spec: JobSpec, model: nn.Module) -> torch.optim.Optimizer:
    if spec.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=0.9, weight_decay=5e-4)
    if spec.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=spec.lr)
    raise DataError(f"job {spec.name}: unknown optimizer {spec.optimizer!r} (sgd or adam)")


def _features(values: list[Any], n: int) -> torch.Tensor:
    """A block's floating outputs with a leading probe dimension, flattened and joined."""
    parts = [v.reshape(n, -1).float() for v in values
             if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0 and v.shape[0] == n]
    return torch.cat(parts, 1) if parts else torch.zeros(n, 1)


def run_job(spec: JobSpec, data: Dataset, *, record_interval: int = 10, sample_size: int = 1024,
            probe_size: int = 128, seed: int = 0, log: Callable[[str], None] | None = None) -> JobRecord:
    """Train ``spec`` on ``data`` without freezing and record it (see the module docstring)."""
    import fxfreeze

    from ..runtime.history import WeightHistory
    from ..runtime.egeria.probe import ActivationProbe

    t_start = time.perf_counter()
    torch.manual_seed(spec.seed)
    model = spec.model()
    opt = _optimizer(spec, model)
    train = data.train
    steps_per_epoch = len(train) // spec.batch_size
    total = steps_per_epoch * spec.epochs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total) if spec.schedule == "cosine" else None
    g = torch.Generator().manual_seed(spec.seed)
    example = data.take(train[:2])
    fm = fxfreeze.compile(model, example, optimizer=opt, config={"policy": "manual"})  # never freezes
    blocks = fm.plan.blocks[: fm.plan.max_frozen]
    named = dict(model.named_parameters())
    hist = WeightHistory({b.name: [named[p] for p in b.params if p in named] for b in blocks},
                         sample_size=sample_size, window=2, seed=seed)
    probe_idx = train[torch.randperm(len(train), generator=g)[:probe_size]]
    probe = ActivationProbe(fm, size=len(probe_idx), hi=len(blocks))
    inputs = data.take(probe_idx)
    if isinstance(inputs, dict):
        probe.set(**inputs)
    else:
        probe.set(*inputs)
    outputs = [probe.block(j).outputs for j in range(len(blocks))]
    snaps: list[torch.Tensor] = []  # [B, n] per record
    grams: list[list[torch.Tensor]] = []

    def record() -> None:
        snaps.append(torch.stack([hist.snapshot(b.name) for b in blocks]))
        vals = probe.values()
        grams.append([centered_gram(_features([vals[o] for o in outs], len(probe_idx))).float() for outs in outputs])

    lossf = nn.CrossEntropyLoss()
    step = 0
    record()
    for epoch in range(spec.epochs):
        fm.train()
        order = train[torch.randperm(len(train), generator=g)]
        for i in range(steps_per_epoch):
            idx = order[i * spec.batch_size : (i + 1) * spec.batch_size]
            loss = lossf(logits_of(call_model(fm, data.take(idx))), data.targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            step += 1
            if step % record_interval == 0:
                record()
        if log is not None:
            log(f"  {spec.name}: epoch {epoch + 1}/{spec.epochs}, loss {float(loss.detach()):.3f}")
    acc = accuracy(fm, ((data.take(idx), data.targets[idx]) for idx in data.test.split(500)))
    fm.freezer.detach()
    final = grams[-1]
    cka = torch.tensor([[cka_from_grams(gt[b].double(), final[b].double()) for b in range(len(blocks))] for gt in grams])
    return JobRecord(
        name=spec.name, family=spec.family, blocks=[b.name for b in blocks],
        history=torch.stack(snaps, 1), cka=cka.float(), record_interval=record_interval, steps=step,
        accuracy=acc, seconds=time.perf_counter() - t_start,
        meta={"dataset": data.name, "optimizer": spec.optimizer, "lr": spec.lr, "schedule": spec.schedule,
              "epochs": spec.epochs, "batch_size": spec.batch_size, "seed": spec.seed},
    )


def default_jobs(quick: bool = False) -> list[JobSpec]:
    """The recorded runs behind the shipped predictor: four architecture families (residual
    CNNs, MobileNet-style inverted residuals, plain VGG-style CNNs, transformer encoders), on
    MNIST-10k, scikit-learn digits and movie-review polarity, with SGD and Adam, cosine and
    constant learning rates. ``quick``: two tiny runs per family on digits and a text subset
    (a smoke test of the command, not a usable predictor)."""
    from ..zoo import BertStyleEncoder, MobileNetV2Like, TransformerClassifier, VGGLike, resnet_cifar

    def resnet(depth: int, width: int) -> Callable[[], nn.Module]:
        return lambda: resnet_cifar(depth=depth, num_classes=10, in_channels=1, width=width)

    def mobilenet(width: float) -> Callable[[], nn.Module]:
        return lambda: MobileNetV2Like(10, width, in_channels=1)

    def vgg(widths: tuple[int, ...]) -> Callable[[], nn.Module]:
        return lambda: VGGLike(10, 1, widths)

    def bert(layers: int, d: int) -> Callable[[], nn.Module]:
        return lambda: BertStyleEncoder(vocab=4096, d=d, layers=layers, heads=4, ff=4 * d, max_len=32, num_classes=2)

    def encoder(layers: int, d: int) -> Callable[[], nn.Module]:
        return lambda: TransformerClassifier(vocab=4096, d_model=d, nhead=4, layers=layers, num_classes=2, max_len=32)

    if quick:
        return [
            JobSpec("resnet8-digits", "resnet", "digits", resnet(8, 8), epochs=2, batch_size=64),
            JobSpec("mobilenet-digits", "mobilenet", "digits", mobilenet(0.25), "adam", 2e-3, epochs=2, batch_size=64),
            JobSpec("vgg-digits", "vgg", "digits", vgg((8, 16)), epochs=2, batch_size=64),
            JobSpec("bert2-polarity", "transformer", "polarity", bert(2, 32), "adam", 1e-3, epochs=2, limit=2000),
        ]
    return [
        JobSpec("resnet14-mnist-sgd", "resnet", "mnist", resnet(14, 8), "sgd", 0.05, "cosine", epochs=6),
        JobSpec("resnet20-mnist-adam", "resnet", "mnist", resnet(20, 8), "adam", 1e-3, "constant", epochs=5, seed=1),
        JobSpec("resnet14-digits-sgd", "resnet", "digits", resnet(14, 16), "sgd", 0.05, "constant", epochs=14, batch_size=32),
        JobSpec("mobilenet-mnist-sgd", "mobilenet", "mnist", mobilenet(0.25), "sgd", 0.05, "cosine", epochs=6),
        JobSpec("mobilenet-mnist-adam", "mobilenet", "mnist", mobilenet(0.35), "adam", 2e-3, "constant", epochs=5, seed=1),
        JobSpec("vgg-mnist-sgd", "vgg", "mnist", vgg((16, 32, 64)), "sgd", 0.05, "cosine", epochs=6),
        JobSpec("vgg-digits-adam", "vgg", "digits", vgg((16, 32)), "adam", 2e-3, "constant", epochs=14, batch_size=32, seed=1),
        JobSpec("bert4-polarity-adam", "transformer", "polarity", bert(4, 64), "adam", 5e-4, "cosine", epochs=4),
        JobSpec("encoder4-polarity-adam", "transformer", "polarity", encoder(4, 64), "adam", 3e-4, "constant", epochs=3,
                seed=1, tokens_as="args"),
    ]

