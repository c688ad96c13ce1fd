"""``fxfreeze bench``: every policy against plain PyTorch, same machine, same run.

For each workload the baseline (plain PyTorch) and each policy train with the same seed,
data order, schedule and epochs (:func:`fxfreeze.bench.runner.train_steps`), in turns of a
few steps in one process (or one after another with ``interleave=0``). The
report gives, per run: final accuracy, time to reach the baseline's final accuracy minus 0.3
point (TTA) and its speed-up, total training time, the share of backward FLOPs skipped, the
growth of peak RSS, and the policy's own overhead. It is written as JSON, a markdown table
and, with matplotlib, a freeze-timeline PNG per workload.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..api import plan
from ..config import FreezeConfig
from ..errors import ConfigError, DataError
from .report import TTA_MARGIN, markdown, plot_timeline
from .runner import RunResult, run_interleaved, train_run, train_steps
from .workloads import Workload, cifar_resnet, minilm_text, mnist_resnet

__all__ = ["POLICIES", "run_suite", "markdown", "merge_config", "TTA_MARGIN"]

@dataclass(frozen=True)
class PolicyRun:
    name: str
    policy: str | None
    #: the run's config from (workload, total steps, the plan's max_frozen)
    config: Callable[[Workload, int, int], dict[str, Any]]
    #: a variant's config keys, merged last (after ``run_suite``'s ``overrides``)
    overrides: Mapping[str, Any] = field(default_factory=dict)


#: Egeria's short-run settings (docs/egeria.md) for the standard workloads (hundreds of
#: steps); the realistic ones (``long``) run its defaults with the planned run length
_EGERIA_SHORT = {"eval_interval": 10, "overhead_budget": 0, "asynchronous": False}


def _egeria(w: Workload) -> dict[str, Any]:
    return {} if w.realistic else {"egeria": _EGERIA_SHORT}

#: the runs, in order
POLICIES: dict[str, PolicyRun] = {p.name: p for p in (
    PolicyRun("baseline", None, lambda w, steps, n: {}),
    # the control: fxfreeze.compile with a policy that never freezes, so the graph's own
    # speed (a torch.export graph can run faster or slower than eager) is not read as a
    # freezing gain
    PolicyRun("compiled", "manual", lambda w, steps, n: {}),
    PolicyRun("egeria", "egeria", lambda w, steps, n: _egeria(w)),
    PolicyRun("egeria+cache", "egeria", lambda w, steps, n: {**_egeria(w), "cache": {"enabled": True}}),
    PolicyRun("freezeout", "freezeout",
              lambda w, steps, n: {"freezeout": {"total_steps": steps, "t0": 0.5, "scaling": "cubic"}}),
    PolicyRun("autofreeze", "autofreeze",
              lambda w, steps, n: {"autofreeze": {"interval": max(5, w.steps_per_epoch)}}),  # one epoch
    PolicyRun("smartfrz", "smartfrz", lambda w, steps, n: {}),  # the shipped predictor, its defaults
    PolicyRun("manual", "manual", lambda w, steps, n: {"manual": {"schedule": {steps // 2: n // 2}}}),  # half at mid-run
)}


def _variant_runs(variants: Mapping[str, tuple[str, Mapping[str, Any]]],
                  overrides: Mapping[str, Any]) -> dict[str, PolicyRun]:
    """The runs of ``run_suite``'s ``variants``, checked before anything trains: a name of
    its own, a bench policy that uses fxfreeze, and config keys fxfreeze knows."""
    out: dict[str, PolicyRun] = {}
    for name, (base, extra) in variants.items():
        if not name or any(c.isspace() or c == "," for c in name) or name in POLICIES:
            raise DataError(f"bench variant {name!r}: give it a name of its own, without spaces or commas, that is "
                            f"not a bench policy ({', '.join(POLICIES)})")
        pr = POLICIES.get(base)
        if pr is None or pr.policy is None:
            raise DataError(f"bench variant {name!r}: {base!r} is not a bench policy that uses fxfreeze; choose from "
                            f"{', '.join(p for p, r in POLICIES.items() if r.policy is not None)}")
        try:
            FreezeConfig.from_dict(merge_config(overrides, extra))
        except ConfigError as e:  # it names the key; say which variant it came from
            raise ConfigError(f"bench variant {name!r}: {e}") from None
        out[name] = PolicyRun(name, pr.policy, pr.config, dict(extra))
    return out


def _needs_plan(policies: list[str], variants: Mapping[str, tuple[str, Mapping[str, Any]]]) -> bool:
    """Only the manual schedule needs the plan's ``max_frozen`` (one more trace of the
    model): the ``manual`` run, or a variant of it (which would otherwise unfreeze to 0 at
    mid-run on top of its own schedule).

    Example::

        >>> _needs_plan(["egeria"], {}), _needs_plan(["egeria"], {"early": ("manual", {})}), _needs_plan(["manual"], {})
        (False, True, True)
    """
    return "manual" in policies or any(base == "manual" for base, _ in variants.values())


def _device_name(device: str) -> str:
    """The training device in words: the GPU's name on CUDA."""
    try:
        d = torch.device(device)
    except RuntimeError as e:
        raise DataError(f"bench --device {device!r} is not a device torch knows ({e}); use cpu, cuda or cuda:N") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise DataError(f"bench --device {device}: no CUDA device is visible to torch {torch.__version__}; "
                            "train on the CPU (--device cpu) or check the driver and CUDA_VISIBLE_DEVICES")
        return torch.cuda.get_device_name(d)
    return d.type


def run_suite(
    out_dir: str | Path,
    *,
    mnist: str | Path | None,
    policies: list[str],
    text: str | Path | None = None,
    cifar: str | Path | None = None,
    text_samples: int | None = None,
    text_epochs: int | None = None,
    epochs: int = 8,
    quick: bool = False,
    seed: int = 0,
    progress: bool = False,
    evals_per_epoch: int = 1,
    log: Callable[[str], None] = print,
    long: bool = False,
    default_seeds: int = 1,
    mnist_steps: int = 2000,
    warmup: bool = True,
    mnist_schedules: tuple[str, ...] = ("step", "cosine"),
    overrides: Mapping[str, Any] | None = None,
    device: str = "cpu",
    interleave: int = 25,
    variants: Mapping[str, tuple[str, Mapping[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Run the workloads that have data, write ``results.json``, ``results.md`` and plots.

    ``mnist``: a folder of MNIST idx files (workload 1); ``text``: sentence polarity files or
    a TSV (workload 2, MiniLM fine-tuning, ``text_epochs`` epochs, default ``epochs``);
    ``cifar``: CIFAR-10 python batches (the vision workload on CIFAR instead of MNIST);
    ``evals_per_epoch``: test-accuracy measurements per epoch (time-to-accuracy resolution).
    ``long``: the realistic workloads (module docstring; ``mnist_steps`` at least, and
    ``text_epochs`` (default 3) over the whole training split). ``default_seeds > 1`` also
    runs the baseline and the default policy with the next seeds, each compared with the
    baseline of its own seed. ``warmup``: one untimed step of each configuration first.
    ``overrides``: fxfreeze config merged, key by key, into the config of every fxfreeze run
    (an experiment such as ``{"egeria": {"threshold": 1.0}}``); validated before anything
    runs, and recorded in the report, whose runs then no longer show the defaults.
    ``device``: where every run trains (``"cuda"``: the model on the GPU, Egeria's reference
    on the CPU beside it); the report names the device. ``interleave > 0``: the runs of a
    workload train in turns of that many steps in one process
    (:func:`fxfreeze.bench.runner.run_interleaved`), so that a machine whose speed drifts
    slows all of them alike; 0: one after another.
    ``variants``: experiments run beside the default, ``{name: (policy, overrides)}``: the
    bench policy ``policy`` (e.g. ``"egeria"``) with ``overrides`` merged into its config
    after ``overrides`` above. Each trains after ``policies``, in the same turns, and with
    each of the ``default_seeds`` seeds, so that a change is measured against the default in one
    process instead of across runs on a machine whose speed drifts."""
    overrides = dict(overrides or {})
    if overrides:
        FreezeConfig.from_dict(overrides)  # a typo fails now, not after the first hour of runs
    device_name = _device_name(device)  # likewise a missing GPU
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise DataError(f"unknown policy {unknown[0]!r} for bench; choose from {', '.join(POLICIES)}")
    table = {**POLICIES, **_variant_runs(variants or {}, overrides)}
    if "baseline" not in policies:
        policies = ["baseline"] + policies
    policies = policies + [v for v in (variants or {}) if v not in policies]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    workloads = _workloads(mnist, cifar, text, text_samples, text_epochs, epochs, quick, seed, long, mnist_steps,
                           mnist_schedules)
    report: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "device": device_name},
        "quick": quick, "epochs": epochs, "seed": seed, "evals_per_epoch": evals_per_epoch, "long": long,
        "warmup": warmup, "overrides": overrides, "interleave": interleave,
        "variants": {k: {"policy": b, "overrides": dict(o)} for k, (b, o) in (variants or {}).items()},
        "workloads": {},
    }
    default = FreezeConfig().policy
    for w, epochs in workloads:
        steps = epochs * w.steps_per_epoch
        max_frozen = plan(w.model_fn(), w.example_inputs).max_frozen if _needs_plan(policies, variants or {}) else 0
        jobs = [(name, name, seed) for name in policies]
        for extra in range(1, default_seeds):
            jobs += [(f"{name} (seed {seed + extra})", name, seed + extra)
                     for name in ("baseline", default, *(variants or {})) if name in policies]

        def run(name: str, seed_: int, max_steps: int | None = None, switch_every: int | None = None) -> Any:
            """One run's record; with ``switch_every``, its generator (train_steps)."""
            pr = table[name]
            cfg = pr.config(w, steps, max_frozen)
            if w.realistic and pr.policy is not None:
                cfg = {"total_steps": steps, **cfg}
            if pr.policy is not None:
                cfg = merge_config(merge_config(cfg, overrides), pr.overrides)
            kw: dict[str, Any] = dict(
                epochs=epochs, make_optimizer=w.make_optimizer, make_scheduler=w.make_scheduler,
                steps_per_epoch=w.steps_per_epoch, policy=pr.policy, config=cfg, example_inputs=w.example_inputs,
                seed=seed_, evals_per_epoch=evals_per_epoch, max_steps=max_steps, device=device,
            )
            if switch_every:
                return train_steps(name, w.model_fn, w.train_batches, w.test_batches, switch_every=switch_every, **kw)
            return train_run(name, w.model_fn, w.train_batches, w.test_batches,
                             progress=progress and max_steps is None, **kw)

        if warmup:
            t0 = time.perf_counter()
            for name in policies:
                run(name, seed, max_steps=1)
            log(f"{w.name}: warm-up (one untimed step of each configuration): {time.perf_counter() - t0:.0f}s")
        runs: dict[str, RunResult] = {}
        if interleave:
            log(f"{w.name}: {', '.join(label for label, _, _ in jobs)}, in turns of {interleave} steps ...")
            t0 = time.perf_counter()
            at: dict[str, int] = {}
            shown = [t0]

            def progress_(label: str, step_: int) -> None:
                # a line every few minutes: a suite in turns says nothing else until a run ends
                at[label] = step_
                if time.perf_counter() - shown[0] >= 300:
                    shown[0] = time.perf_counter()
                    log(f"{w.name}: {time.perf_counter() - t0:.0f}s, steps so far: "
                        + ", ".join(f"{k} {v}" for k, v in at.items()) + f" of {steps}")

            runs = run_interleaved(
                {label: run(name, seed_, switch_every=interleave) for label, name, seed_ in jobs},
                on_done=lambda label, r: log(f"{w.name}: {label}: {r.final_accuracy:.2f}% in {r.wall_seconds:.1f}s "
                                             f"(all runs {time.perf_counter() - t0:.0f}s so far)"),
                on_pause=progress_)
        else:
            for label, name, seed_ in jobs:
                log(f"{w.name}: {label} ...")
                t0 = time.perf_counter()
                runs[label] = run(name, seed_)
                log(f"{w.name}: {label}: {runs[label].final_accuracy:.2f}% in {runs[label].wall_seconds:.1f}s "
                    f"({time.perf_counter() - t0:.0f}s with evaluation)")
        for label, _, seed_ in jobs:
            runs[label].extra["seed"] = seed_
        report["workloads"][w.name] = {**_summarise(w, runs), "epochs": epochs, "steps": steps}
        plot_timeline(w.name, runs, out / f"timeline-{w.name}.png")
        # written after every workload: a long suite that stops half-way keeps what it measured
        (out / "results.json").write_text(json.dumps(report, indent=1, default=str))
        (out / "results.md").write_text(markdown(report))
    return report


def _workloads(mnist: Any, cifar: Any, text: Any, text_samples: int | None, text_epochs: int | None, epochs: int,
               quick: bool, seed: int, long: bool, mnist_steps: int,
               mnist_schedules: tuple[str, ...] = ("step", "cosine")) -> list[tuple[Workload, int]]:
    out: list[tuple[Workload, int]] = []
    if long:
        if mnist is not None:
            for sched in mnist_schedules:
                w = mnist_resnet(mnist, width=16, train_size=8000, batch_size=64, lr=0.05, seed=seed, schedule=sched,
                                 name=f"resnet20-mnist-{sched}")
                w.realistic = True
                out.append((w, -(-mnist_steps // w.steps_per_epoch)))
        if cifar is not None:
            w = cifar_resnet(cifar, width=16, seed=seed, schedule="step")
            w.realistic = True
            out.append((w, text_epochs or epochs))
        if text is not None:
            w = minilm_text(text, samples=text_samples, seed=seed, schedule="warmup_linear", name="minilm-finetune-full")
            w.realistic = True
            out.append((w, text_epochs or 3))
    else:
        if mnist is not None:
            # quick: a smoke run (a narrow net on a quarter of the split, 16 batches of 128, tested on 2,000
            # images), not a measurement
            out.append((mnist_resnet(mnist, width=8 if quick else 16, train_size=2048 if quick else 8000, seed=seed,
                                     test_size=2000 if quick else None), epochs))
        if cifar is not None:
            out.append((cifar_resnet(cifar, width=8 if quick else 16, train_size=2048 if quick else None, seed=seed), epochs))
        if text is not None:
            out.append((minilm_text(text, samples=text_samples if text_samples else (512 if quick else None), seed=seed),
                        text_epochs or epochs))
    if not out:
        raise DataError("no workload has data: pass --mnist DIR (MNIST idx files), --cifar DIR or --text DIR/FILE")
    return out


def merge_config(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in: a config section (``egeria``, ``cache``, ...)
    key by key, anything else replaced, a mapping-valued key of a section included (a
    variant's ``manual.schedule`` is its schedule, not an addition to the base run's).

    Args:
        base: a run's fxfreeze config as a dict.
        overrides: the keys to set, nested as in a config file.

    Example::

        >>> merge_config({"cache": {"enabled": True}, "total_steps": 10}, {"cache": {"memory_budget_mb": 64}})
        {'cache': {'enabled': True, 'memory_budget_mb': 64}, 'total_steps': 10}
        >>> merge_config({"manual": {"schedule": {448: 3}}}, {"manual": {"schedule": {90: 1}}})
        {'manual': {'schedule': {90: 1}}}
    """
    out = dict(base)
    for k, v in overrides.items():
        out[k] = {**out[k], **v} if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def _summarise(w: Workload, runs: dict[str, RunResult]) -> dict[str, Any]:
    """Every run against the baseline of its own seed, and against the compiled control of
    its seed when there is one (the captured graph alone can run faster or slower than
    eager code: over the control, a speed-up is the freezing's)."""
    bases = {r.extra.get("seed"): r for r in runs.values() if r.name == "baseline"}
    controls = {r.extra.get("seed"): r for r in runs.values() if r.name == "compiled"}
    first = runs["baseline"]
    target = first.final_accuracy - TTA_MARGIN
    rows = {}
    for name, r in runs.items():
        base = bases.get(r.extra.get("seed"), first)
        t = base.final_accuracy - TTA_MARGIN
        base_tta = base.time_to_accuracy(t)
        tta = r.time_to_accuracy(t)
        ctrl = controls.get(r.extra.get("seed"))
        ctrl_tta = ctrl.time_to_accuracy(t) if ctrl is not None else None
        rows[name] = {
            "seed": r.extra.get("seed"),
            "final_accuracy": r.final_accuracy,
            "accuracy_delta": r.final_accuracy - base.final_accuracy,
            "target_accuracy": t,
            "tta_seconds": tta,
            "tta_step": r.step_to_accuracy(t),
            "tta_speedup": (base_tta / tta) if (tta and base_tta) else None,
            "tta_vs_control": (ctrl_tta / tta) if (tta and ctrl_tta) else None,
            "total_vs_control": (ctrl.wall_seconds / r.wall_seconds) if (ctrl is not None and r.wall_seconds) else None,
            "wall_seconds": r.wall_seconds,
            "wall_after_first_epoch": r.extra.get("wall_after_first_epoch"),
            "backward_flops_skipped": r.backward_flops_skipped,
            "peak_rss_mb": r.peak_rss_mb,
            # the policy's cost: its seconds on the training thread and the CPU seconds of the
            # reference worker's thread, the core time it can take from training (a bound on
            # what it costs: benchmarks/overhead.py); until stop 35 the worker's busy wall time,
            # which at its lower priority is mostly waiting for a core
            "controller_seconds": r.controller_seconds + float(r.extra.get("worker_cpu_seconds", 0.0)),
            "policy_main_seconds": r.controller_seconds,
            "worker_busy_seconds": r.extra.get("worker_seconds"),
            "worker_cpu_seconds": r.extra.get("worker_cpu_seconds"),
            "compile_seconds": r.compile_seconds,
            "final_num_frozen": r.epochs[-1]["num_frozen"] if r.epochs else 0,
            "num_blocks": r.num_blocks,
            "freezes": r.frozen,
            "events": r.events,
            "timeline": r.timeline,
            "epochs": r.epochs,
            "losses": r.losses,
        }
    return {"description": w.description, "target_accuracy": target, "runs": rows}
