"""Offline training of the SmartFRZ predictor (``fxfreeze train-predictor``).

One call, :func:`train_predictor`, regenerates the weights file the package ships:

1. record the training runs of :func:`~fxfreeze.smartfrz.jobs.default_jobs` (weight
   histories and CKA to the final model per block; :mod:`fxfreeze.smartfrz.jobs`),
   reusing runs already recorded in ``records_dir``;
2. label every (run, block, snapshot) with the :class:`~fxfreeze.smartfrz.labels.LabelRule`;
3. evaluate leave-one-architecture-out (:func:`~fxfreeze.smartfrz.train.leave_one_out`);
4. train on every run and write the weights with a header that records the label rule,
   the settings, the runs and the evaluation.

The runtime side (recorder, predictor, policy) lives in :mod:`fxfreeze.runtime`; this
package is only needed to retrain.
"""

from __future__ import annotations

import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import DataError
from ..runtime.predictor import default_weights_path, save_predictor
from .cka import cka_from_grams, centered_gram, linear_cka
from .jobs import JobRecord, JobSpec, default_jobs, load_dataset, run_job
from .labels import LabelRule
from .train import TrainSettings, evaluate, examples, fit, leave_one_out

__all__ = ["train_predictor", "record_jobs", "LabelRule", "TrainSettings", "JobSpec", "JobRecord", "linear_cka",
           "centered_gram", "cka_from_grams", "default_jobs", "run_job", "fit", "evaluate", "leave_one_out"]


def record_jobs(jobs: list[JobSpec], paths: dict[str, Path | None], *, records_dir: Path | None = None,
                record_interval: int = 10, sample_size: int = 1024, seed: int = 0,
                log: Callable[[str], None] = print) -> list[JobRecord]:
    """Run (or reload from ``records_dir``) every job whose data is available; jobs whose
    data set is missing are skipped with a message."""
    out: list[JobRecord] = []
    cache: dict[tuple[str, str], Any] = {}
    for spec in jobs:
        path = records_dir / f"{spec.name}.fxtf" if records_dir is not None else None
        if path is not None and path.is_file():
            rec = JobRecord.load(path)
            if rec.record_interval == record_interval and rec.history.shape[-1] == sample_size:
                log(f"{spec.name}: reusing {path}")
                out.append(rec)
                continue
        key = (spec.dataset, spec.tokens_as)
        try:
            if key not in cache:
                cache[key] = load_dataset(spec.dataset, paths, tokens_as=spec.tokens_as, limit=spec.limit)
        except DataError as e:
            log(f"{spec.name}: skipped ({e})")
            continue
        log(f"{spec.name}: training ({spec.family}, {spec.dataset}, {spec.epochs} epochs)")
        rec = run_job(spec, cache[key], record_interval=record_interval, sample_size=sample_size, seed=seed, log=log)
        log(f"{spec.name}: {rec.steps} steps, {rec.cka.shape[0]} snapshots, test accuracy {rec.accuracy:.1f}% "
            f"({rec.seconds:.0f}s)")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            rec.save(path)
        out.append(rec)
    return out


def train_predictor(
    out: str | Path | None = None,
    *,
    mnist: str | Path | None = None,
    polarity: str | Path | None = None,
    records_dir: str | Path | None = None,
    quick: bool = False,
    rule: LabelRule | None = None,
    settings: TrainSettings | None = None,
    record_interval: int = 10,
    steps: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Regenerate the predictor weights (default: the file the package ships) and return
    the report (runs, label statistics, leave-one-architecture-out metrics). ``steps``
    overrides the fit's optimizer steps of ``settings`` (default: short with ``quick``)."""
    rule = rule or LabelRule()
    s = settings or (TrainSettings(steps=60, min_history=3) if quick else TrainSettings())
    if steps is not None:
        s = replace(s, steps=steps)
    target = Path(out) if out is not None else default_weights_path()
    paths = {"mnist": Path(mnist) if mnist else None, "polarity": Path(polarity) if polarity else None}
    t0 = time.perf_counter()
    records = record_jobs(default_jobs(quick), paths, records_dir=Path(records_dir) if records_dir else None,
                          record_interval=record_interval, log=log)
    families = sorted({r.family for r in records})
    if len(families) < 2:
        raise DataError(
            f"train-predictor needs runs of at least two architecture families for its leave-one-out evaluation, "
            f"got {families or 'none'}; pass --mnist and --polarity data folders"
        )
    exs = examples(records, rule, s.min_history)
    pos = sum(e[3] for e in exs)
    log(f"{len(exs)} examples from {len(records)} runs, {pos} labelled freezable ({100 * pos / max(len(exs), 1):.0f}%)")
    loao = leave_one_out(records, rule, s, log)
    log("final predictor: all runs")
    model = fit(records, exs, s, log)
    train_metrics = evaluate(model, records, exs, s.threshold)
    report: dict[str, Any] = {
        "record_interval": record_interval,
        "label_rule": rule.to_dict(),
        "settings": s.to_dict(),
        "quick": quick,
        "runs": [{"name": r.name, "family": r.family, "blocks": len(r.blocks), "snapshots": int(r.cka.shape[0]),
                  "steps": r.steps, "accuracy": round(r.accuracy, 2), "seconds": round(r.seconds, 1),
                  "freezable_share": round(float(rule.labels(r.cka).float().mean()), 3),
                  **{k: r.meta[k] for k in ("dataset", "optimizer", "lr", "schedule", "epochs") if k in r.meta}}
                 for r in records],
        "examples": len(exs),
        "positives": pos,
        "leave_one_out": loao,
        "train_fit": train_metrics,
        "machine": f"{platform.machine()} {platform.system()}, torch {torch.__version__}",
        "seconds": round(time.perf_counter() - t0, 1),
    }
    save_predictor(model, target, report)
    report["weights"] = str(target)
    log(f"wrote {target} ({target.stat().st_size / 1024:.0f} KiB) in {report['seconds']:.0f}s")
    return report
