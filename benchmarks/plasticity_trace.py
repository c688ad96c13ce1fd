"""Egeria's evidence on a realistic run, without freezing: every block's plasticity trend.

Trains the ``fxfreeze bench --long`` from-scratch workload (ResNet-20 on MNIST-10k, batch 64,
SGD 0.05, 2,000 steps, ``step`` or ``cosine`` schedule) with ``egeria`` in measure-only mode
(``freeze=False``), synchronous, every block tracked, an evaluation every 33 steps, and writes
each evaluation's per-block plasticity, elasticity and noise. It then counts, over a step
range, how the windows fall: too noisy, shrinking (elasticity below -0.5), level (within
±0.5), growing (above +0.5). docs/egeria.md ("Why one-sided") quotes its counts.

    python benchmarks/plasticity_trace.py --data ../shared/data/mnist10k --schedule step \
        --out /tmp/plasticity-step.json

About 7 minutes on a 2-core CPU (2026-12-06; every block's int8 reference at every evaluation).

``--text DIR`` traces the fine-tuning workload instead (all-MiniLM-L6-v2 on the movie-review
split, batch 32, AdamW 2e-5, warm-up then linear decay planned over 3 epochs, stopped after
``--steps``) and also prints, per block, how far it moved since its first anchor in units of
the reference's own error (the plasticity at the anchor): docs/egeria.md ("Moved less than
the reference's error") quotes it.

    HF_HUB_OFFLINE=1 python benchmarks/plasticity_trace.py --text ../shared/data/movie-review-polarity \
        --steps 450 --out /tmp/plasticity-ft.json      # about 7 minutes
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fxfreeze.bench.runner import train_run
from fxfreeze.bench.workloads import mnist_resnet


def trace(data: str | Path, schedule: str, steps: int = 2000) -> dict[str, Any]:
    w = mnist_resnet(data, width=16, train_size=8000, batch_size=64, lr=0.05, seed=0, schedule=schedule)
    epochs = -(-steps // w.steps_per_epoch)
    cfg = {"total_steps": epochs * w.steps_per_epoch, "safety_net": {"enabled": False},
           "egeria": {"freeze": False, "asynchronous": False, "overhead_budget": 0, "lookahead": 64,
                      "unfreeze_on_lr_change": "none"}}
    r = train_run("trace", w.model_fn, w.train_batches, w.test_batches, epochs=epochs,
                  make_optimizer=w.make_optimizer, make_scheduler=w.make_scheduler,
                  steps_per_epoch=w.steps_per_epoch, policy="egeria", config=cfg,
                  example_inputs=w.example_inputs, seed=0)
    return {"schedule": schedule, "timeline": r.timeline, "epochs": r.epochs, "events": r.events}


def trace_text(data: str | Path, steps: int) -> dict[str, Any]:
    from fxfreeze.bench.workloads import minilm_text

    w = minilm_text(data, schedule="warmup_linear")
    epochs = 3
    cfg = {"total_steps": epochs * w.steps_per_epoch, "safety_net": {"enabled": False},
           "egeria": {"freeze": False, "asynchronous": False, "overhead_budget": 0, "lookahead": 64}}
    r = train_run("trace", w.model_fn, w.train_batches, w.test_batches, epochs=epochs,
                  make_optimizer=w.make_optimizer, make_scheduler=w.make_scheduler,
                  steps_per_epoch=w.steps_per_epoch, policy="egeria", config=cfg,
                  example_inputs=w.example_inputs, seed=0, max_steps=steps)
    return {"workload": "minilm-finetune", "timeline": r.timeline, "events": r.events}


def floor_multiples(timeline: list[dict[str, Any]]) -> dict[Any, list[tuple[int, float]]]:
    """Per block, ``(step, excess / floor)`` over its first anchor's span: the floor is the
    plasticity at the block's first evaluation (the anchor's own: the reference's error
    alone); the span ends where a block that had a trend has none again (a new anchor)."""
    out: dict[Any, list[tuple[int, float]]] = {}  # keyed by block as the timeline keys it
    floor: dict[Any, float] = {}
    trended: set[Any] = set()
    done: set[Any] = set()
    for rec in timeline:
        for j, v in (rec.get("plasticity") or {}).items():
            if j in done or v is None:
                continue
            t = (rec.get("trend") or {}).get(j)
            if j not in floor:
                floor[j], out[j] = float(v), []
            elif t is None and j in trended:
                done.add(j)
            elif floor[j] > 0:
                out[j].append((int(rec["step"]), (float(v) - floor[j]) / floor[j]))
                if t is not None:
                    trended.add(j)
    return out


def classify(timeline: list[dict[str, Any]], lo: int, hi: int, noise_limit: float = 1.0) -> dict[str, int]:
    """How the windows of evaluations in ``(lo, hi)`` fall."""
    out = {"windows": 0, "noisy": 0, "shrinking": 0, "level": 0, "growing": 0}
    for rec in timeline:
        if "trend" not in rec or not lo < rec["step"] < hi:
            continue
        for t in rec["trend"].values():
            if t is None:
                continue
            e, n = t
            out["windows"] += 1
            key = "noisy" if n >= noise_limit else "shrinking" if e < -0.5 else "level" if e < 0.5 else "growing"
            out[key] += 1
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/mnist10k")
    p.add_argument("--schedule", choices=("step", "cosine"), default="step")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--range", default="150,1000", help="step range for the window counts")
    p.add_argument("--out", default="plasticity-trace.json")
    p.add_argument("--text", metavar="DIR", default=None, help="trace the MiniLM fine-tuning workload on this folder instead")
    a = p.parse_args(argv)
    if a.text is not None:
        res = trace_text(a.text, a.steps)
        res["floor_multiples"] = floor_multiples(res["timeline"])
        Path(a.out).write_text(json.dumps(res, indent=1, default=str))
        for j, series in res["floor_multiples"].items():
            top = max((m for _, m in series), default=float("nan"))
            print(f"block {j}: moved up to {top:.2f}x the reference's error over steps "
                  f"{series[0][0] if series else '-'}-{series[-1][0] if series else '-'}: "
                  + " ".join(f"{s}:{m:.2f}" for s, m in series))
        print(f"wrote {a.out}")
        return 0
    res = trace(a.data, a.schedule, a.steps)
    lo, hi = (int(x) for x in a.range.split(","))
    res["windows"] = classify(res["timeline"], lo, hi)
    Path(a.out).write_text(json.dumps(res, indent=1, default=str))
    print(f"{a.schedule}: windows in steps {lo}-{hi}: {res['windows']}; wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
