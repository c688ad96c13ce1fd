"""Real task for the adaptive policies: ResNet-20 from scratch on MNIST-10k, baseline vs egeria, autofreeze, smartfrz.

Same seed, data order, epochs and cosine schedule for every run, each configuration warmed
up by one untimed step first; writes a JSON record
(accuracy and wall time per epoch, freeze events, each policy's timeline) and, with
matplotlib installed, Egeria's plasticity PNG.

    python benchmarks/egeria_mnist.py --data ../shared/data/mnist10k --out /tmp/egeria-mnist \
        --policies egeria,autofreeze,smartfrz
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fxfreeze.bench.runner import RunResult, train_run
from fxfreeze.bench.suite import merge_config
from fxfreeze.bench.workloads import mnist_resnet
from fxfreeze.cli import parse_overrides

#: the short-run settings (the defaults target runs of thousands of steps; docs/egeria.md)
SHORT_RUN = {"egeria": {"eval_interval": 10, "overhead_budget": 0, "asynchronous": False},
             "autofreeze": {"interval": 62}}  # one epoch of the 8k-image split at batch 128


def run(data: str | Path, *, epochs: int = 8, width: int = 8, config: dict[str, Any] | None = None,
        seed: int = 0, progress: bool = False, policies: tuple[str, ...] = ("egeria",)) -> dict[str, RunResult]:
    w = mnist_resnet(data, width=width, seed=seed)
    runs = [("baseline", None)] + [(p, p) for p in policies]
    common = dict(epochs=epochs, make_optimizer=w.make_optimizer, make_scheduler=w.make_scheduler,
                  steps_per_epoch=w.steps_per_epoch, config=config or SHORT_RUN, example_inputs=w.example_inputs,
                  seed=seed)
    # one untimed step of every configuration first, in this process: the first steps of a
    # process pay for allocations and kernel selection (on this machine the baseline's cold
    # first run took 3x as long as the same run warm), which no run must be charged for
    for name, policy in runs:
        train_run(name, w.model_fn, w.train_batches, w.test_batches, policy=policy, max_steps=1, **common)  # type: ignore[arg-type]
    out = {}
    for name, policy in runs:
        out[name] = train_run(name, w.model_fn, w.train_batches, w.test_batches, policy=policy, progress=progress,
                              **common)  # type: ignore[arg-type]
    return out


def plot(results: dict[str, RunResult], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    r = results.get("egeria") or next(v for k, v in results.items() if k != "baseline")
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    steps = [0] + [s for s, _ in r.frozen] + [r.steps]
    ks = [0] + [k for _, k in r.frozen] + [r.frozen[-1][1] if r.frozen else 0]
    ax1.step(steps, ks, where="post", label="frozen blocks")
    ax1.set_ylabel("frozen blocks")
    for j in sorted({j for rec in r.timeline for j in rec.get("normalized", {})}):
        pts = [(rec["step"], rec["normalized"][j]) for rec in r.timeline if rec.get("normalized", {}).get(j) is not None]
        if pts:
            ax2.plot(*zip(*pts), label=f"block {j}", lw=0.8)
    ax2.set_yscale("log")
    ax2.set_ylabel("plasticity / first")
    ax2.set_xlabel("step")
    ax2.legend(fontsize=6, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/mnist10k")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--out", default="egeria-mnist")
    p.add_argument("--policies", default="egeria", help="comma-separated: egeria, autofreeze, freezeout, ...")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override merged into the short-run settings, e.g. --set egeria.eval_interval=5")
    a = p.parse_args(argv)
    config = merge_config(SHORT_RUN, parse_overrides(a.set))
    res = run(a.data, epochs=a.epochs, width=a.width, config=config, progress=sys.stderr.isatty(),
              policies=tuple(a.policies.split(",")))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({k: v.to_dict() for k, v in res.items()}, indent=1))
    plotted = plot(res, out / "timeline.png")
    b = res["baseline"]
    print(f"baseline: {b.final_accuracy:.2f}% in {b.wall_seconds:.1f}s")
    for name, e in res.items():
        if name != "baseline":
            print(f"{name}: {e.final_accuracy:.2f}% in {e.wall_seconds:.1f}s ({b.wall_seconds / e.wall_seconds:.2f}x), "
                  f"freezes {[(s, k) for s, k in e.frozen]}")
    print(f"wrote {out / 'results.json'}" + (f" and {out / 'timeline.png'}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
