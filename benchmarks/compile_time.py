"""Trace + partition time (``fxfreeze.plan``) of a ResNet-50 at 224x224 and a 12-layer
BERT-base configuration. A benchmark, not a test: prints a markdown table.

    .venv/bin/python benchmarks/compile_time.py
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import time

import torch

import fxfreeze
from fxfreeze import zoo


def timed(fn, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), sorted(times)[len(times) // 2]


def cases():
    if importlib.util.find_spec("torchvision") is not None:
        import torchvision

        yield "torchvision resnet50, 1x3x224x224", torchvision.models.resnet50(weights=None), (torch.randn(1, 3, 224, 224),)
    else:
        yield "in-repo ResNet-50 shape, 1x3x224x224", zoo.resnet50_like(), (torch.randn(1, 3, 224, 224),)
    ids = {"input_ids": torch.randint(0, 30522, (1, 128)), "attention_mask": torch.ones(1, 128, dtype=torch.long)}
    yield "in-repo BERT-base (12x768), 1x128 tokens", zoo.bert_base_style(), ids
    if importlib.util.find_spec("transformers") is not None:
        import transformers

        cfg = transformers.BertConfig()  # bert-base-uncased dimensions, random weights
        yield "HF transformers BertModel (bert-base config), 1x128", transformers.BertModel(cfg), ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads\n")
    print("| model | strategy | blocks | first call (s) | best of rest (s) | median (s) |")
    print("|---|---|---|---|---|---|")
    for name, model, inputs in cases():
        t0 = time.perf_counter()
        p = fxfreeze.plan(model, inputs)
        first = time.perf_counter() - t0
        best, med = timed(lambda: fxfreeze.plan(model, inputs), args.repeats)
        print(f"| {name} | {p.strategy} | {len(p.blocks)} | {first:.2f} | {best:.2f} | {med:.2f} |", flush=True)


if __name__ == "__main__":
    main()
