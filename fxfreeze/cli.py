"""The ``fxfreeze`` command line: ``fxfreeze plan``, ``viz``, ``bench`` and ``train-predictor``.

Errors are printed as one line (``fxfreeze: error: ...``) with exit status 2 and no
traceback; set ``FXFREEZE_DEBUG=1`` to see the traceback as well.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "parse_input_shape", "load_target", "parse_overrides", "parse_variant"]

_DTYPES = {
    "float32": "float32", "float": "float32", "f32": "float32",
    "float16": "float16", "half": "float16", "f16": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float64": "float64", "double": "float64",
    "int64": "int64", "long": "int64", "int32": "int32", "int": "int32",
    "bool": "bool", "uint8": "uint8",
}


#: an example input holds at most this many elements (a typo like 10000000 must not allocate GBs)
_MAX_EXAMPLE_ELEMENTS = 1 << 28


class CliError(Exception):
    """A bad command-line argument."""


def parse_input_shape(spec: str) -> tuple[str | None, tuple[int, ...], str]:
    """Parse ``[name=]d0,d1,...[:dtype]``, e.g. ``1,3,224,224`` or ``input_ids=2,128:int64``."""
    name: str | None = None
    body = spec.strip()
    if "=" in body:
        name, body = body.split("=", 1)
        name = name.strip()
        if not name.isidentifier():
            raise CliError(f"--input-shape {spec!r}: {name!r} is not a valid argument name")
    dtype = "float32"
    if ":" in body:
        body, dt = body.rsplit(":", 1)
        if dt.strip().lower() not in _DTYPES:
            raise CliError(f"--input-shape {spec!r}: unknown dtype {dt!r}; use one of {', '.join(sorted(set(_DTYPES.values())))}")
        dtype = _DTYPES[dt.strip().lower()]
    parts = [p.strip() for p in re.split(r"[,x]", body)]  # 1,3,224,224 or 1x3x224x224
    if not body.strip():
        raise CliError(f"--input-shape {spec!r}: expected comma-separated sizes such as 1,3,224,224")
    dims = []
    for p in parts:
        if not p.isdigit() or int(p) <= 0:
            raise CliError(f"--input-shape {spec!r}: {p!r} is not a positive integer size")
        dims.append(int(p))
    numel = math.prod(dims)
    if numel > _MAX_EXAMPLE_ELEMENTS:
        raise CliError(
            f"--input-shape {spec!r}: {numel:,} elements is too large for an example input "
            f"(at most {_MAX_EXAMPLE_ELEMENTS:,}); a batch of 2 is enough to plan"
        )
    return name, tuple(dims), dtype


def load_target(target: str, kwargs_json: str | None) -> Any:
    """Import ``MODULE:CALLABLE`` and call it (with ``--kwargs``) to get a model."""
    if ":" not in target:
        raise CliError(f"model {target!r} must be given as MODULE:CALLABLE, e.g. fxfreeze.zoo:resnet56")
    mod_name, attr = target.split(":", 1)
    kwargs: dict[str, Any] = {}
    if kwargs_json:
        try:
            kwargs = json.loads(kwargs_json)
        except json.JSONDecodeError as e:
            raise CliError(f"--kwargs is not valid JSON: {e.msg} at column {e.colno}") from e
        if not isinstance(kwargs, dict):
            raise CliError("--kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'")
    cwd = os.getcwd()  # a model file in the current folder imports; installed modules win
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    try:
        module = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001 - any import failure is a bad argument
        raise CliError(f"cannot import module {mod_name!r}: {type(e).__name__}: {e}") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CliError(f"module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    import torch.nn as nn

    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise CliError(f"{target!r} is neither an nn.Module nor callable")
    try:
        return obj(**kwargs)
    except Exception as e:  # noqa: BLE001
        raise CliError(f"calling {target}(**{kwargs}) failed: {type(e).__name__}: {e}") from e


def _example_inputs(args: argparse.Namespace) -> Any:
    import torch

    if args.example_inputs and args.input_shape:
        raise CliError("give either --input-shape or --example-inputs, not both")
    if args.example_inputs:
        path = Path(args.example_inputs)
        if not path.is_file():
            raise CliError(f"--example-inputs {str(path)!r}: no such file")
        try:
            data = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as e:  # noqa: BLE001
            raise CliError(f"--example-inputs {str(path)!r} is not a tensor file torch.load can read safely: {e}") from e
        if isinstance(data, list):
            data = tuple(data)
        return data
    if not args.input_shape:
        return None
    positional, named = [], {}
    for spec in args.input_shape:
        name, shape, dtype = parse_input_shape(spec)
        dt = getattr(torch, dtype)
        g = torch.Generator().manual_seed(0)
        if dt.is_floating_point:
            t = torch.randn(shape, generator=g).to(dt)
        elif dt == torch.bool:
            t = torch.ones(shape, dtype=dt)
        else:
            t = torch.randint(0, 2, shape, generator=g, dtype=dt)
        if name is None:
            if named:
                raise CliError("positional --input-shape values must come before named ones")
            positional.append(t)
        else:
            named[name] = t
    if positional and named:
        raise CliError("mix of positional and named --input-shape values is not supported; name them all")
    return named if named else tuple(positional)


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive, finite number of seconds")
    return v


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODULE:CALLABLE", help="factory returning an nn.Module, e.g. fxfreeze.zoo:resnet56")
    p.add_argument(
        "--input-shape",
        action="append",
        metavar="[NAME=]D0,D1,...[:DTYPE]",
        help="an example input of this shape (random values); repeat for several inputs; "
        "NAME= makes it a keyword argument, :int64 etc. sets the dtype",
    )
    p.add_argument("--example-inputs", metavar="FILE.pt", help="example inputs saved with torch.save (a tensor, tuple or dict)")
    p.add_argument("--kwargs", metavar="JSON", help="keyword arguments for the model factory, as a JSON object")
    p.add_argument("--strategy", default="auto", choices=("auto", "fx", "export", "hooks"), help="capture strategy (default: auto)")
    p.add_argument("--capture-timeout", type=_seconds, default=None, metavar="SECONDS",
                   help="bound on each capture attempt, past which the next strategy is tried (default 180)")
    p.add_argument("--plan", metavar="FILE", help="an edited plan (YAML/JSON) to apply instead of proposing one")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxfreeze", description="Inspect fxfreeze freeze plans.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="print the freeze plan of a model")
    _common(p)
    p.add_argument("--format", default="table", choices=("table", "yaml", "json"))
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of standard output")
    v = sub.add_parser("viz", help="export the block-clustered graph as DOT, SVG, HTML or JSON")
    _common(v)
    v.add_argument("-o", "--output", required=True, metavar="OUT.{dot,svg,html,json}")
    b = sub.add_parser("bench", help="train the baseline and every policy on real data; report time-to-accuracy")
    b.add_argument("--mnist", metavar="DIR", default=None,
                   help="folder with MNIST idx files: the ResNet workload (give at least one workload)")
    b.add_argument("--text", metavar="DIR|FILE", default=None,
                   help="sentence polarity folder (rt-polarity.pos/.neg) or a text<TAB>label file: MiniLM fine-tuning")
    b.add_argument("--text-samples", type=int, default=None,
                   help="train on a random subset of this many training sentences (the test split stays whole)")
    b.add_argument("--text-epochs", type=int, default=None, help="epochs of the text workload (default: --epochs)")
    b.add_argument("--cifar", metavar="DIR", default=None, help="CIFAR-10 python batches: the ResNet on CIFAR-10")
    b.add_argument("--policies", default="compiled,egeria,egeria+cache,freezeout,autofreeze,smartfrz,manual",
                   help="comma-separated runs besides the baseline")
    b.add_argument("--epochs", type=int, default=None, help="epochs per run (default 8, quick 2)")
    b.add_argument("--quick", action="store_true", help="a smoke run, not a measurement: 2 epochs, a narrow ResNet-20 on 2,048 training images")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--evals-per-epoch", type=int, default=1,
                   help="test-accuracy measurements per epoch: time-to-accuracy is resolved to these points (default 1)")
    b.add_argument("--long", action="store_true",
                   help="the realistic workloads: ResNet-20 on MNIST for --mnist-steps steps (step schedule and cosine), "
                        "MiniLM on the whole training split for 3 epochs (warm-up + linear decay); policies run their defaults")
    b.add_argument("--mnist-steps", type=int, default=2000, help="optimizer steps of the long MNIST runs (at least; default 2000)")
    b.add_argument("--mnist-schedules", default="step,cosine",
                   help="learning-rate schedules of the long MNIST runs, comma-separated (step: /10 at 50%% and 75%%; cosine)")
    b.add_argument("--default-seeds", type=int, default=1,
                   help="also run the baseline, the default policy and each --variant with this many seeds in all (default 1)")
    b.add_argument("--device", default="cpu", metavar="DEVICE",
                   help="where the runs train, e.g. cuda (Egeria's reference stays on the CPU); default cpu")
    b.add_argument("--no-warmup", action="store_true", help="skip the untimed step of each configuration before timing")
    b.add_argument("--interleave", type=int, default=25, metavar="STEPS",
                   help="train a workload's runs in turns of STEPS steps in one process, so that a machine whose speed "
                        "drifts slows every run alike (default 25; every run's model and optimizer are in memory at "
                        "once); 0: one run after another")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="an fxfreeze config key for every fxfreeze run, dotted, the value read as YAML "
                        "(e.g. --set egeria.threshold=1.0); repeatable. For experiments: the runs no longer show the defaults")
    b.add_argument("--variant", action="append", default=[], metavar="'NAME=POLICY KEY=VALUE ...'", dest="variants",
                   help="an experiment run beside the default, in the same turns and with --default-seeds seeds: the bench policy "
                        "POLICY with the config keys set as in --set, e.g. --variant 'egeria-run=egeria "
                        "egeria.freeze_run=true'; repeatable")
    b.add_argument("-o", "--output", default="fxfreeze-bench", metavar="DIR", help="where results.json/.md and plots go")
    t = sub.add_parser("train-predictor", help="record training runs, train the SmartFRZ predictor, write its weights")
    t.add_argument("--mnist", metavar="DIR", default=None,
                   help="MNIST idx files: adds the MNIST runs (without it: digits, synthetic and the others)")
    t.add_argument("--polarity", metavar="DIR", default=None,
                   help="rt-polarity.pos/.neg folder: adds the text runs")
    t.add_argument("--out", metavar="FILE", default=None, help="weights file to write (default: the one the package ships)")
    t.add_argument("--records", metavar="DIR", default=None,
                   help="keep the recorded runs here and reuse those already there (retraining without re-recording)")
    t.add_argument("--report", metavar="FILE.json", default=None, help="also write the report (runs, evaluation) as JSON")
    t.add_argument("--quick", action="store_true", help="tiny runs and a short fit: a smoke test, not a usable predictor")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps of each predictor fit (default 600)")
    t.add_argument("--label-level", type=float, default=None, help="CKA to the final model a freezable block reaches (0.98)")
    t.add_argument("--label-window", type=int, default=None, help="snapshots the CKA must hold over (5)")
    t.add_argument("--label-max-std", type=float, default=None, help="largest CKA standard deviation over the window (0.005)")
    return parser


def _data_path(given: str | None) -> str | None:
    """A data path the user gave, checked; no default (a data path is the user's)."""
    if given is not None and not Path(given).exists():
        raise CliError(f"no such file or folder: {given!r}")
    return given


def _train_predictor(ns: argparse.Namespace) -> int:
    from .smartfrz import LabelRule, train_predictor

    if ns.steps is not None and ns.steps <= 0:
        raise CliError(f"--steps must be positive, got {ns.steps}")
    rule_args = {k: v for k, v in (("level", ns.label_level), ("window", ns.label_window), ("max_std", ns.label_max_std))
                 if v is not None}
    try:
        rule = LabelRule(**rule_args)
    except ValueError as e:
        raise CliError(f"--label-*: {e}") from e
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    report = train_predictor(ns.out, mnist=_data_path(ns.mnist), polarity=_data_path(ns.polarity),
                             records_dir=ns.records, quick=ns.quick, rule=rule, steps=ns.steps, log=log)
    if ns.report:
        Path(ns.report).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print("| held-out family | examples | freezable | precision | recall | F1 |")
    print("|---|---:|---:|---:|---:|---:|")
    for fam, m in report["leave_one_out"].items():
        print(f"| {fam} | {m['examples']} | {m['positives']} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} |")
    print(f"\nwrote {report['weights']}" + (f" and {ns.report}" if ns.report else ""))
    return 0


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` arguments as a nested config dict: ``KEY`` dotted
    (``egeria.threshold``), ``VALUE`` read with ``yaml.safe_load`` (numbers, booleans, lists).

    Args:
        items: the ``KEY=VALUE`` strings in the order given; a later one wins.

    Raises :class:`CliError` naming the argument that is malformed. Whether
    the config knows the keys is checked by :func:`fxfreeze.bench.suite.run_suite`, before
    anything trains.

    Example::

        >>> parse_overrides(["egeria.threshold=1.0", "cache.enabled=true", "total_steps=900"])
        {'egeria': {'threshold': 1.0}, 'cache': {'enabled': True}, 'total_steps': 900}
    """
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise CliError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. --set egeria.threshold=1.0")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise CliError(f"--set {item!r}: the value is not valid YAML: {e}") from e
        node = out
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise CliError(f"--set {item!r}: {part!r} was set to a value before, it cannot also be a section")
            node = nxt
        node[parts[-1]] = value
    return out


def parse_variant(item: str) -> tuple[str, str, dict[str, Any]]:
    """One ``--variant`` argument as ``(name, policy, overrides)``: ``NAME=POLICY`` and then
    ``KEY=VALUE`` words as in ``--set`` (split as a shell splits, so a value may be quoted).

    Raises :class:`CliError` naming the argument that is malformed; whether the policy and
    the keys exist is checked by :func:`fxfreeze.bench.suite.run_suite`.

    Example::

        >>> parse_variant("egeria-run=egeria egeria.freeze_run=true egeria.patience=3")
        ('egeria-run', 'egeria', {'egeria': {'freeze_run': True, 'patience': 3}})
    """
    import shlex

    try:
        words = shlex.split(item)
    except ValueError as e:
        raise CliError(f"--variant {item!r}: {e}") from None
    name, sep, base = (words[0] if words else "").partition("=")
    if not sep or not name.strip() or not base.strip():
        raise CliError(f"--variant {item!r}: expected 'NAME=POLICY KEY=VALUE ...', "
                       "e.g. --variant 'egeria-run=egeria egeria.freeze_run=true'")
    try:
        extra = parse_overrides(words[1:])
    except CliError as e:
        raise CliError(f"--variant {item!r}: {e}") from None
    return name.strip(), base.strip(), extra


def _bench(ns: argparse.Namespace) -> int:
    from .bench.suite import run_suite

    mnist = ns.mnist
    if mnist is None and ns.text is None and ns.cifar is None:
        raise CliError(
            "fxfreeze bench needs data to train on: --mnist DIR (MNIST idx files), --text DIR|FILE (rt-polarity "
            "files or a text<TAB>label file) and/or --cifar DIR (CIFAR-10 python batches), "
            "e.g. fxfreeze bench --mnist path/to/mnist --quick"
        )
    if ns.epochs is not None and ns.epochs <= 0:
        raise CliError(f"--epochs must be positive, got {ns.epochs}")
    epochs = ns.epochs or (2 if ns.quick else 8)
    policies = [p.strip() for p in ns.policies.split(",") if p.strip()]
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    for flag, v in (("--text-samples", ns.text_samples), ("--text-epochs", ns.text_epochs),
                    ("--evals-per-epoch", ns.evals_per_epoch), ("--mnist-steps", ns.mnist_steps),
                    ("--default-seeds", ns.default_seeds)):
        if v is not None and v <= 0:
            raise CliError(f"{flag} must be positive, got {v}")
    from .bench.workloads import SCHEDULES

    schedules = tuple(x.strip() for x in ns.mnist_schedules.split(",") if x.strip())
    bad = [x for x in schedules if x not in SCHEDULES]
    if bad or not schedules:
        raise CliError(f"--mnist-schedules: unknown schedule {bad[0] if bad else ns.mnist_schedules!r}; choose from {', '.join(SCHEDULES)}")
    if ns.interleave < 0:
        raise CliError(f"--interleave must be 0 (one run after another) or a number of steps, got {ns.interleave}")
    overrides = parse_overrides(ns.overrides)
    variants: dict[str, tuple[str, dict[str, Any]]] = {}
    for item in ns.variants:
        name, base, extra = parse_variant(item)
        if name in variants:
            raise CliError(f"--variant {item!r}: a variant named {name!r} was given before; give each its own name")
        variants[name] = (base, extra)
    run_suite(ns.output, mnist=mnist, text=ns.text, cifar=ns.cifar, text_samples=ns.text_samples,
              text_epochs=ns.text_epochs, policies=policies, epochs=epochs, quick=ns.quick, seed=ns.seed,
              progress=sys.stderr.isatty(), evals_per_epoch=ns.evals_per_epoch, log=log, long=ns.long,
              default_seeds=ns.default_seeds, mnist_steps=ns.mnist_steps, warmup=not ns.no_warmup,
              mnist_schedules=schedules, overrides=overrides, device=ns.device,
              interleave=ns.interleave, variants=variants)
    print((Path(ns.output) / "results.md").read_text().rstrip())
    print(f"\nwrote {Path(ns.output) / 'results.json'}")
    return 0


def _run(ns: argparse.Namespace) -> int:
    from .api import analyze
    from .trace import DEFAULT_TIMEOUT

    if ns.command == "bench":
        return _bench(ns)
    if ns.command == "train-predictor":
        return _train_predictor(ns)
    if ns.command == "viz":
        from .viz import FORMATS

        fmt = Path(ns.output).suffix.lstrip(".").lower()
        if fmt not in FORMATS:
            raise CliError(f"-o {ns.output!r}: unknown format {fmt!r}; use .dot, .svg, .html or .json")
    model = load_target(ns.model, ns.kwargs)
    inputs = _example_inputs(ns)
    timeout = DEFAULT_TIMEOUT if ns.capture_timeout is None else ns.capture_timeout
    result = analyze(model, inputs, plan=ns.plan, strategy=ns.strategy, capture_timeout=timeout)
    if ns.command == "plan":
        fp = result.plan
        text = {"table": fp.table, "yaml": fp.to_yaml, "json": fp.to_json}[ns.format]()
        if ns.output:
            try:
                Path(ns.output).write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
            except OSError as e:
                raise CliError(f"cannot write -o {ns.output!r}: {e.strerror or e}") from e
        else:
            print(text.rstrip("\n"))
        return 0
    from .viz import export

    out = export(result.capture.graph, result.plan, ns.output)
    print(f"wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from .errors import FxFreezeError

    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return _run(ns)
    except (CliError, FxFreezeError) as e:
        if os.environ.get("FXFREEZE_DEBUG"):
            raise
        msg = " ".join(str(e).split())
        print(f"fxfreeze: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
