"""Reference-model precision: int8 against fp32 on the CPU, speed and agreement.

For a ResNet-56 (CIFAR shape) and a 6-layer transformer encoder (BERT-style, d=384 like
all-MiniLM-L6-v2), builds the reference of the freezable blocks the way the Egeria policy
does (per block: int8 static for convolutional blocks, int8 dynamic for Linear ones, bf16
and fp32 for comparison) and reports, per precision, the forward time of all blocks on one
worker thread, the build time per snapshot, and the agreement with fp32: the worst relative
error of any block's output and, for the whole model (blocks + head), top-1 agreement.

    python benchmarks/reference.py [--batch 64] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch

import fxfreeze
from fxfreeze import zoo
from fxfreeze.runtime.egeria.builder import ReferenceBuilder, relative_error, snapshot
from fxfreeze.runtime.egeria.probe import ActivationProbe


def _time(fn: Any, repeat: int) -> float:
    fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def measure(name: str, model: torch.nn.Module, inputs: Any, repeat: int) -> list[dict[str, Any]]:
    fm = fxfreeze.compile(model, inputs, policy="manual")
    model.eval()
    probe = ActivationProbe(fm, 10**9, fm.plan.max_frozen)
    if isinstance(inputs, dict):
        probe.set(**inputs)
    else:
        probe.set(*inputs)
    values = probe.values()
    blocks = [probe.block(j) for j in range(fm.plan.max_frozen)]
    ins = [[values[n] for n in b.inputs] for b in blocks]
    torch.set_num_threads(1)  # the reference worker's setting
    whole = snapshot(fm.graph_module(False))
    with torch.no_grad():
        fp_logits = whole(*(list(inputs.values()) if isinstance(inputs, dict) else inputs))
        fp_logits = fp_logits["logits"] if isinstance(fp_logits, dict) else fp_logits
    rows = []
    fp_out = None
    for precision in ("fp32", "bf16", "int8"):
        builders = [ReferenceBuilder(b.graph_module, x, precision) for b, x in zip(blocks, ins)]
        t0 = time.perf_counter()
        refs = [bd.build(None, x) for bd, x in zip(builders, ins)]
        build = time.perf_counter() - t0
        run = _time(lambda: [r(x) for r, x in zip(refs, ins)], repeat)
        outs = [r(x) for r, x in zip(refs, ins)]
        if fp_out is None:
            fp_out = outs
        err = max(relative_error(o, f) for o, f in zip(outs, fp_out))
        backends = sorted({r.backend for r in refs})
        # whole model: blocks in this precision, chained, then the fp32 head
        wb = ReferenceBuilder(fm.graph_module(False), [v for v in (inputs.values() if isinstance(inputs, dict) else inputs)], precision)
        wref = wb.build(None, list(inputs.values()) if isinstance(inputs, dict) else list(inputs))
        q = wref(list(inputs.values()) if isinstance(inputs, dict) else list(inputs))
        q = q["logits"] if isinstance(q, dict) else q
        agree = float((q.float().argmax(-1) == fp_logits.argmax(-1)).float().mean())
        rows.append({"model": name, "precision": precision, "backends": backends, "blocks": len(blocks),
                     "run_s": run, "build_s": build, "block_rel_err": err, "top1_agree": agree})
    torch.set_num_threads(torch.get_num_threads())
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    cases = [
        ("ResNet-56 (3x32x32)", zoo.resnet56(), (torch.randn(a.batch, 3, 32, 32),)),
        ("BERT-style 6x384", zoo.bert_style(layers=6, d=384),
         {"input_ids": torch.randint(0, 1000, (a.batch, 64)), "attention_mask": torch.ones(a.batch, 64, dtype=torch.long)}),
    ]
    rows = []
    for name, model, inputs in cases:
        rows += measure(name, model, inputs, a.repeat)
        torch.set_num_threads(threads)
    print("| model | precision | backend | run, all blocks (s) | speed-up vs fp32 | build per snapshot (s) | worst block rel. error | top-1 agreement |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        fp = next(x for x in rows if x["model"] == r["model"] and x["precision"] == "fp32")
        print(f"| {r['model']} | {r['precision']} | {', '.join(r['backends'])} | {r['run_s']:.3f} | {fp['run_s'] / r['run_s']:.2f}x | "
              f"{r['build_s']:.2f} | {r['block_rel_err']:.4f} | {100 * r['top1_agree']:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
