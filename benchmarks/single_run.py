"""One configuration on one realistic workload, no baseline: for experiments.

``fxfreeze bench`` always trains the eager baseline first (25 minutes on the fine-tuning
workload on this machine). An experiment (another threshold, a manual freeze at a given step)
needs only its own run and one control run to compare with, step by step: their accuracy
curves are deterministic for a given seed until the first freeze, so runs from different
processes compare by steps. Their times do not: compare those side by side, with the bench.

    python benchmarks/single_run.py text compiled -o /tmp/ctrl.json
    python benchmarks/single_run.py text compiled --set 'manual.schedule={120: 3}' -o /tmp/m3.json
    python benchmarks/single_run.py step egeria --set egeria.threshold=1.5 -o /tmp/e.json
    python benchmarks/single_run.py --compare /tmp/ctrl.json /tmp/m3.json
    python benchmarks/single_run.py step egeria --device cuda -o /tmp/e-gpu.json

``text`` is the full-size fine-tuning workload, ``step`` and ``cosine`` the from-scratch
MNIST runs of ``fxfreeze bench --long`` (same data paths as the README's); the run is warmed
up with one untimed step, measures accuracy four times per epoch, and writes
``RunResult.to_dict()`` with its config.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fxfreeze.bench.runner import train_run
from fxfreeze.bench.suite import POLICIES, TTA_MARGIN, _workloads, merge_config
from fxfreeze.cli import parse_overrides

TEXT = "../shared/data/movie-review-polarity"
MNIST = "../shared/data/mnist10k"


def run(work: str, policy: str, overrides: dict[str, Any], seed: int, data: str | None = None,
        device: str = "cpu") -> dict[str, Any]:
    if work == "text":
        ws = _workloads(None, None, data or TEXT, None, None, 8, False, seed, True, 2000)
    else:
        ws = _workloads(data or MNIST, None, None, None, None, 8, False, seed, True, 2000, (work,))
    w, epochs = ws[0]
    steps = epochs * w.steps_per_epoch
    pr = POLICIES[policy]
    cfg = pr.config(w, steps, 0)
    if pr.policy is not None:
        cfg = merge_config({"total_steps": steps, **cfg}, overrides)
    common = dict(epochs=epochs, make_optimizer=w.make_optimizer, make_scheduler=w.make_scheduler,
                  steps_per_epoch=w.steps_per_epoch, policy=pr.policy, config=cfg, example_inputs=w.example_inputs,
                  seed=seed, evals_per_epoch=4, device=device)
    train_run("warm-up", w.model_fn, w.train_batches, w.test_batches, max_steps=1, **common)  # type: ignore[arg-type]
    r = train_run(policy, w.model_fn, w.train_batches, w.test_batches, **common)  # type: ignore[arg-type]
    return {**r.to_dict(), "config": cfg, "work": work, "device": device}


def compare(control: dict[str, Any], others: list[dict[str, Any]]) -> str:
    """Per run: final accuracy and its difference from the control's, the step at which it
    first reaches the control's final accuracy minus the bench's margin, the freezes."""
    target = control["final_accuracy"] - TTA_MARGIN

    def first(d: dict[str, Any]) -> Any:
        return next((e["step"] for e in d["epochs"] if e["accuracy"] >= target), None)

    lines = [f"control: final {control['final_accuracy']:.2f}%, {target:.2f}% first at step {first(control)}"]
    for d in others:
        lines.append(f"{d['name']} {json.dumps(d.get('config', {}).get(d.get('policy') or '', {}))}: final "
                     f"{d['final_accuracy']:.2f}% ({d['final_accuracy'] - control['final_accuracy']:+.2f}), target at step "
                     f"{first(d)}, backward skipped {100 * d['backward_flops_skipped']:.1f}%, freezes {d['frozen']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work", nargs="?", choices=("text", "step", "cosine"))
    p.add_argument("policy", nargs="?", choices=tuple(n for n in POLICIES if n != "baseline"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (as for bench)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="the workload's data (default: the shared folder)")
    p.add_argument("--device", default="cpu", help="where the run trains (cuda: the reference stays on the CPU)")
    p.add_argument("-o", "--out", default=None)
    p.add_argument("--compare", nargs="+", metavar="JSON", help="a control run's file, then others")
    a = p.parse_args(argv)
    if a.compare:
        runs = [json.loads(Path(f).read_text()) for f in a.compare]
        print(compare(runs[0], runs[1:]))
        return 0
    if not a.work or not a.policy or not a.out:
        p.error("give a workload, a policy and -o FILE (or --compare FILES)")
    d = run(a.work, a.policy, parse_overrides(a.set), a.seed, a.data, a.device)
    Path(a.out).write_text(json.dumps(d, default=str))
    print(f"{a.policy} {a.set}: final {d['final_accuracy']:.2f}%, {d['wall_seconds']:.1f} s, freezes {d['frozen']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
