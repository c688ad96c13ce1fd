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
    a = p.parse_args(argv)
    res = trace(a.data, a.schedule, a.steps)
    lo, hi = (int(x) for x in a.range.split(","))
    res["windows"] = classify(res["timeline"], lo, hi)
    Path(a.out).write_text(json.dumps(res, indent=1, default=str))
    print(f"{a.schedule}: windows in steps {lo}-{hi}: {res['windows']}; wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
