"""The bench report as people read it: a markdown table per workload and a freeze-timeline
plot. :func:`fxfreeze.bench.suite.run_suite` measures; this module only formats."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .runner import RunResult

__all__ = ["TTA_MARGIN", "markdown", "plot_timeline"]

#: how far below the baseline's final accuracy time-to-accuracy is measured (points)
TTA_MARGIN = 0.3


def markdown(report: dict[str, Any]) -> str:
    """The report of :func:`fxfreeze.bench.suite.run_suite` as markdown: a header line on the
    machine and settings, then a table per workload."""
    dev = report["machine"].get("device", "cpu")
    lines = [f"Machine: {report['machine']['processor']}, {report['machine']['threads']} threads, torch "
             f"{report['machine']['torch']}" + (f", training on {dev}" if dev != "cpu" else "")
             + f"; {report['epochs']} epochs, seed {report['seed']}"
             + (" (quick mode)" if report["quick"] else "")
             + ("; each configuration warmed up by one untimed step first" if report.get("warmup") else "")
             + (f"; the runs of a workload trained in turns of {report['interleave']} steps in one process (peak RSS "
                "is then the process's)" if report.get("interleave") else "")
             + (f"; config overrides in every fxfreeze run (not the defaults): {report['overrides']}"
                if report.get("overrides") else "")
             + "".join(f"; variant {k}: {v['policy']} with {v['overrides']}"
                       for k, v in (report.get("variants") or {}).items()) + ".", ""]
    for name, wl in report["workloads"].items():
        lines += [f"### {name}", "", wl["description"] + f"; {wl.get('steps', '?')} steps. TTA target: baseline's "
                  f"final accuracy - {TTA_MARGIN} point ({wl['target_accuracy']:.2f}% for seed {report['seed']}).", "",
                  "| run | final acc. | Δ vs baseline | TTA (s) | TTA step | TTA speed-up | over the control: TTA, total | total (s) | without 1st epoch (s) | backward FLOPs skipped | frozen at end | policy overhead (s) | compile (s) | peak RSS (MB) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

        def ratio(x: Any) -> str:
            return "-" if x is None else f"{x:.2f}x"

        for run, r in wl["runs"].items():
            tta = "not reached" if r["tta_seconds"] is None else f"{r['tta_seconds']:.1f}"
            sp = ratio(r["tta_speedup"])
            step = "-" if r.get("tta_step") is None else str(r["tta_step"])
            rss = "-" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}"
            later = r.get("wall_after_first_epoch")
            vs = f"{ratio(r.get('tta_vs_control'))}, {ratio(r.get('total_vs_control'))}"
            lines.append(f"| {run} | {r['final_accuracy']:.2f}% | {r['accuracy_delta']:+.2f} | {tta} | {step} | {sp} | {vs} | "
                         f"{r['wall_seconds']:.1f} | {'-' if later is None else f'{later:.1f}'} | "
                         f"{100 * r['backward_flops_skipped']:.1f}% | "
                         f"{r['final_num_frozen']}/{r['num_blocks'] or '-'} | {r['controller_seconds']:.2f} | "
                         f"{r.get('compile_seconds', 0.0):.1f} | {rss} |")
        lines.append("")
    return "\n".join(lines)


def plot_timeline(name: str, runs: dict[str, RunResult], path: Path) -> None:
    """Frozen blocks, training loss and test accuracy against the step, one line per run
    (a PNG; nothing without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    for rname, r in runs.items():
        steps = [0] + [s for s, _ in r.frozen] + [r.steps]
        ks = [0] + [k for _, k in r.frozen] + [r.frozen[-1][1] if r.frozen else 0]
        axes[0].step(steps, ks, where="post", label=rname)
        if r.losses:
            axes[1].plot(*zip(*r.losses), lw=0.7, label=rname)
        axes[2].plot([e["step"] for e in r.epochs], [e["accuracy"] for e in r.epochs], marker="o", label=rname)
    axes[0].set_ylabel("frozen blocks")
    axes[1].set_ylabel("training loss")
    axes[1].set_yscale("log")
    axes[2].set_ylabel("test accuracy (%)")
    axes[2].set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.suptitle(name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
