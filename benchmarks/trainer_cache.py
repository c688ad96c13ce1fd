"""The activation cache under the Hugging Face Trainer: MiniLM fine-tuned on movie-review
polarity, a fixed freeze (so that both runs freeze the same blocks at the same step), with
and without the cache; the plain Trainer beside them.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/trainer_cache.py --data ../shared/data/movie-review-polarity
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/trainer_cache.py --data ... --samples 2000 --freeze-step 30 --blocks 5

The training set carries its sample ids (``fxfreeze.with_sample_ids``; the plain run and the
run without the cache get the same batches, the Trainer drops the column for them). All
three runs start from the same weights, see the same batches, and run in one process, each
after an untimed warm-up of a few steps; evaluation is off the clock. Prints each run's
training time and test accuracy, and what the cache served.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import logging
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _example() -> object:
    """``examples/hf_trainer.py`` (its data loading and Trainer run)."""
    path = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer.py"
    spec = importlib.util.spec_from_file_location("hf_trainer_example", path)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="rt-polarity folder or text<TAB>label file")
    ap.add_argument("--samples", type=int, default=2000, help="training sentences (0 = all)")
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--freeze-step", type=int, default=30, help="the optimizer step at which the blocks freeze")
    ap.add_argument("--blocks", type=int, default=5, help="how many blocks freeze (the stem counts as one)")
    ap.add_argument("--warmup-steps", type=int, default=3)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")

    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    import fxfreeze
    from fxfreeze.integrations.transformers import FxFreezeCallback

    hf_logging.disable_progress_bar()
    ex = _example()
    _, train, test, path = ex.load(args.data, args.samples or None, args.max_length)  # type: ignore[attr-defined]
    train = fxfreeze.with_sample_ids(train)
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    common = dict(epochs=args.epochs, batch=args.batch_size, lr=5e-5)
    schedule = {"policy": "manual", "manual": {"schedule": {args.freeze_step: args.blocks}}}

    def callback(cache: bool) -> FxFreezeCallback:
        return FxFreezeCallback(config={**schedule, "cache": {"enabled": cache}})

    rows = []
    with tempfile.TemporaryDirectory() as out:
        for cache in (None, False, True):  # untimed warm-up of each configuration
            cbs = [] if cache is None else [callback(cache)]
            ex.run(copy.deepcopy(base), train, test, out, cbs, max_steps=args.warmup_steps, evaluate=False, **common)  # type: ignore[attr-defined]
        for label, cache in (("Trainer", None), ("+ fxfreeze", False), ("+ fxfreeze, cache", True)):
            cb = None if cache is None else callback(cache)
            seconds, acc = ex.run(copy.deepcopy(base), train, test, out, [] if cb is None else [cb], **common)  # type: ignore[attr-defined]
            served = ""
            if cb is not None and cb.module.activation_cache is not None:
                st = cb.module.activation_cache.stats
                served = f"{st['hits']} read, {st['refills']} refilled, {st['misses']} stored, {st['uncached_batches']} batches without ids"
            rows.append((label, seconds, 100 * acc, served))
            print(f"{label:<20}{seconds:>10.1f} s{100 * acc:>9.2f}%  {served}", flush=True)
    plain = rows[0][1]
    print(f"\n{len(train)} sentences, {args.epochs:g} epochs, batch {args.batch_size}; {args.blocks} blocks frozen at step "
          f"{args.freeze_step}; each after {args.warmup_steps} warm-up steps in this process, evaluation not timed")
    for label, seconds, _, _ in rows[1:]:
        print(f"{label}: {plain / seconds:.2f}x the plain Trainer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
