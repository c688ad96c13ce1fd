"""Training-step time with k frozen blocks against the baseline and the ideal.

For each k: the measured step time of the compiled model with the first k blocks frozen,
the ideal step time (baseline minus the measured backward time of those k blocks), and
achieved/ideal saving. The backward time of a prefix is measured on the unfrozen model:
a gradient hook on each block's frontier tensor records when backward reaches that cut;
from then to the end of backward is the prefix's backward time.

    .venv/bin/python benchmarks/step_time.py [--quick] [--only resnet,transformer,lora] [--device cuda]

On CUDA every step is timed between synchronisations (a step returns to the host long before
its kernels finish), the frontier marks are CUDA events recorded on the backward stream, and
the batches are larger (a GPU step of the CPU sizes is all launch overhead).

The LoRA section (needs transformers and peft) fine-tunes adapters on a small Llama
configuration: the base weights are frozen from the start, so a frozen prefix saves the
backward pass through its layers (the adapters' activation gradients), not weight
gradients.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

import fxfreeze
from fxfreeze import zoo
from fxfreeze.bench.runner import synchronize
from fxfreeze.plan import HEAD, META_BLOCK

_marks: list[tuple[int, Any]] = []  # (k, perf_counter time or a CUDA event)


def _now(device: torch.device) -> Any:
    """A point in time on ``device``'s stream: a recorded CUDA event there, else the clock."""
    if device.type == "cuda":
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev
    return time.perf_counter()


def _since(start: Any, end: Any) -> float:
    """Seconds from ``start`` to ``end`` (both from :func:`_now`; ``end`` already reached)."""
    if isinstance(start, float):
        return end - start
    return start.elapsed_time(end) / 1000.0


def _mark(t: Any, k: int) -> Any:
    if isinstance(t, torch.Tensor) and t.requires_grad:
        t.register_hook(lambda g: _marks.append((k, _now(g.device))) or None)
    return t


def instrument(fm: fxfreeze.runtime.FreezableModule) -> None:
    """Insert a grad-time mark on the frontier tensors after each block (k = 1..n)."""
    gm = fm.graph_module(True)
    g = gm.graph
    names = {n.name: n for n in g.nodes}
    for k, blk in enumerate(fm.plan.blocks, start=1):
        for fname in blk.frontier:
            node = names[fname]
            users = [u for u in node.users if u.meta.get(META_BLOCK) not in (None,) and (u.meta[META_BLOCK] == HEAD or u.meta[META_BLOCK] >= k)]
            with g.inserting_after(node):
                m = g.call_function(_mark, (node, k))
            for u in users:
                u.replace_input_with(node, m)
    g.lint()
    gm.recompile()


def step_fn(fm, opt, loss_of: Callable[[Any], torch.Tensor], device: torch.device) -> Callable[[], float]:
    def run() -> float:
        synchronize(device)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_of(fm).backward()
        opt.step()
        synchronize(device)
        return time.perf_counter() - t

    return run


def measure(run: Callable[[], float], warmup: int, reps: int) -> float:
    for _ in range(warmup):
        run()
    return statistics.median(run() for _ in range(reps))


def prefix_backward_times(fm, loss_of: Callable[[Any], torch.Tensor], reps: int, device: torch.device) -> dict[int, float]:
    instrument(fm)
    samples: dict[int, list[float]] = {}
    for i in range(reps + 1):
        _marks.clear()
        loss = loss_of(fm)
        loss.backward()
        end = _now(device)
        synchronize(device)
        fm.zero_grad(set_to_none=True)
        if i == 0:
            continue
        for k, t in _marks:
            samples.setdefault(k, []).append(_since(t, end))
    return {k: statistics.median(v) for k, v in samples.items()}


def bench(name: str, model, example: Any, loss_of: Callable[[Any], torch.Tensor], ks, warmup: int, reps: int,
          device: torch.device = torch.device("cpu")) -> list[dict]:
    """``example``: the training call's inputs (compile captures that call); ``loss_of(m)``:
    one training step's loss computed with module ``m``; all on ``device``."""
    model = model.to(device)
    fm = fxfreeze.compile(model, example, policy="manual")
    opt = torch.optim.SGD([p for p in fm.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    fm.train()
    base = measure(step_fn(fm, opt, loss_of, device), warmup, reps)
    rows = []
    for k in ks:
        fm.freeze_prefix(k)
        opt = torch.optim.SGD([p for p in fm.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        t = measure(step_fn(fm, opt, loss_of, device), warmup, reps)
        rows.append({"k": k, "step": t})
    fm.freeze_prefix(0)
    opt = torch.optim.SGD([p for p in fm.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    again = measure(step_fn(fm, opt, loss_of, device), warmup, reps)  # the baseline once more: warm-up drift
    first, base = base, min(base, again)
    bwd = prefix_backward_times(fxfreeze.compile(model, example, policy="manual"), loss_of, reps, device)
    print(f"\n### {name} ({len(fm.plan.blocks)} blocks, captured with {fm.strategy}); baseline step {base * 1000:.0f} ms "
          f"(the lower of {first * 1000:.0f} ms measured first and {again * 1000:.0f} ms measured last)\n")
    print("| k frozen | step (ms) | ideal (ms) | saving (ms) | ideal saving (ms) | achieved/ideal |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ideal_saving = bwd.get(r["k"], 0.0)
        saving = base - r["step"]
        ratio = saving / ideal_saving if ideal_saving > 0 else float("nan")
        print(f"| {r['k']} | {r['step'] * 1000:.0f} | {(base - ideal_saving) * 1000:.0f} | {saving * 1000:.0f} | {ideal_saving * 1000:.0f} | {ratio:.2f} |", flush=True)
    return rows


def lora_llama(layers: int, hidden: int, vocab: int) -> Any:
    """A small Llama configuration with LoRA adapters (r=8) on every projection."""
    import peft
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64), max_position_embeddings=512,
    )
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return peft.get_peft_model(transformers.LlamaForCausalLM(cfg), peft.LoraConfig(r=8, target_modules=targets, lora_dropout=0.0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small batches, few repetitions")
    ap.add_argument("--only", default="resnet,transformer,lora", help="comma-separated sections to run")
    ap.add_argument("--device", default="cpu", help="where the models train (cuda: larger batches, CUDA-event timing)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    torch.manual_seed(0)
    warmup, reps = (1, 3) if args.quick else ((5, 20) if gpu else (2, 7))
    where = torch.cuda.get_device_name(dev) if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}; median of {reps} steps after {warmup} warm-up")
    if "resnet" in only:
        b = 32 if args.quick else (1024 if gpu else 128)
        x = torch.randn(b, 3, 32, 32, device=dev)
        y = torch.randint(0, 10, (b,), device=dev)
        bench(f"ResNet-56, batch {b}, 32x32", zoo.resnet56(), (x,), lambda m: F.cross_entropy(m(x), y), [7, 14, 21, 28],
              warmup, reps, dev)
    if "transformer" in only:
        bt, tt = (16, 64) if args.quick else ((256, 128) if gpu else (64, 64))
        toks = torch.randint(0, 1000, (bt, tt), device=dev)
        yt = torch.randint(0, 2, (bt,), device=dev)
        model = zoo.TransformerClassifier(d_model=256, nhead=8, layers=6, max_len=tt)
        bench(f"6-layer transformer encoder (d=256), batch {bt}, {tt} tokens", model, (toks,),
              lambda m: F.cross_entropy(m(toks), yt), [2, 4, 6, 7], warmup, reps, dev)
    if "lora" in only:
        layers, hidden, bl, tl = (4, 128, 4, 64) if args.quick else ((8, 1024, 16, 512) if gpu else (8, 256, 8, 128))
        ids = torch.randint(0, 2000, (bl, tl), device=dev)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        model = lora_llama(layers, hidden, 2000)
        ks = [1 + layers // 4, 1 + layers // 2, 1 + 3 * layers // 4, layers]  # the stem, then layers
        bench(f"LoRA (r=8, all projections) on a {layers}-layer Llama (d={hidden}), batch {bl}, {tl} tokens", model, batch,
              lambda m: m(**batch).loss, ks, warmup, reps, dev)


if __name__ == "__main__":
    main()
