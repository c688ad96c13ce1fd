"""Activation checkpointing under fxfreeze: bytes saved for the backward pass of one training
step, counted exactly with ``torch.autograd.graph.saved_tensors_hooks`` (no timing, so the
figures are the same on every machine).

Rows: the model's own forward without and with Hugging Face's gradient checkpointing; the
fxfreeze graph of the model (what every training call ran before checkpointing was kept:
a captured graph inlines the checkpointed regions); fxfreeze with checkpointing switched on
after compile, as the HF Trainer does (the training calls run the model's own forward).

    .venv/bin/python benchmarks/checkpoint_memory.py [--layers 6 --hidden 384 --batch 16 --seq 128]

The default shape is all-MiniLM-L6-v2's (random weights: the bytes depend on shapes only).
"""

from __future__ import annotations

import argparse
import copy
import logging
from typing import Any, Callable

import torch

import fxfreeze
from fxfreeze.bench.memory import saved_bytes


def saved_mb(f: Callable[[], Any]) -> float:
    total, out = saved_bytes(f)
    out.backward()
    return total / 2**20


def main() -> None:
    import transformers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(num_hidden_layers=args.layers, hidden_size=args.hidden,
                                  num_attention_heads=max(1, args.hidden // 32), intermediate_size=4 * args.hidden)
    model = transformers.BertForSequenceClassification(cfg).train()
    batch = {"input_ids": torch.randint(0, cfg.vocab_size, (args.batch, args.seq)), "labels": torch.randint(0, 2, (args.batch,))}

    plain = copy.deepcopy(model)
    ckpt = copy.deepcopy(model)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fm = fxfreeze.compile(model, batch, config={"policy": "manual"})
    rows = [
        ("the model's own forward", saved_mb(lambda: plain(**batch).loss)),
        ("the model's own forward, gradient checkpointing on", saved_mb(lambda: ckpt(**batch).loss)),
        ("fxfreeze graph (checkpointing off)", saved_mb(lambda: fm(**batch).loss)),
    ]
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # after compile
    rows.append(("fxfreeze, gradient checkpointing on (switched on after compile)", saved_mb(lambda: fm(**batch).loss)))
    print(f"BERT {args.layers}x{args.hidden}, batch {args.batch}x{args.seq}: MiB saved for backward in one training step\n")
    print("| run | MiB saved for backward |\n|---|---|")
    for name, mb in rows:
        print(f"| {name} | {mb:.1f} |")


if __name__ == "__main__":
    main()
