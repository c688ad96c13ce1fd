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

from .bench.command import add_bench_arguments, parse_overrides, parse_variant, run_bench
from .errors import CliError

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


def _import_module(mod_name: str) -> Any:
    cwd = os.getcwd()  # a model file in the current folder imports; installed modules win
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    try:
        return importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001 - any import failure is a bad argument
        raise CliError(f"cannot import module {mod_name!r}: {type(e).__name__}: {e}") from e


def _import_file(path: str) -> Any:
    """A model file named by its path (``models/net.py:make``), run as a module; its folder
    is importable, so its sibling modules import (after installed modules of the same name)."""
    import importlib.util

    file = os.path.abspath(path)
    if not os.path.isfile(file):
        raise CliError(f"model file {path!r} does not exist")
    folder = os.path.dirname(file)
    if folder not in sys.path:  # after the installed modules, which win (as for the working directory)
        sys.path.append(folder)
    # its own module name: a file called torch.py or yaml.py must not replace those modules
    name = "_fxfreeze_file_" + os.path.splitext(os.path.basename(file))[0]
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise CliError(f"cannot load {path!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure is a bad argument
        sys.modules.pop(name, None)
        raise CliError(f"cannot import {path!r}: {type(e).__name__}: {e}") from e
    return module


def load_target(target: str, kwargs_json: str | None) -> Any:
    """Import ``MODULE:CALLABLE`` (or ``path/to/file.py:CALLABLE``) and call it (with
    ``--kwargs``) to get a model."""
    if ":" not in target:
        raise CliError(f"model {target!r} must be given as MODULE:CALLABLE, e.g. fxfreeze.zoo:resnet56")
    mod_name, _, attr = target.rpartition(":")
    kwargs: dict[str, Any] = {}
    if kwargs_json:
        try:
            kwargs = json.loads(kwargs_json)
        except json.JSONDecodeError as e:
            raise CliError(f"--kwargs is not valid JSON: {e.msg} at column {e.colno}") from e
        if not isinstance(kwargs, dict):
            raise CliError("--kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'")
    module = _import_file(mod_name) if mod_name.endswith(".py") else _import_module(mod_name)
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
    p.add_argument("model", metavar="MODULE:CALLABLE", help="factory returning an nn.Module (or the module itself), e.g. fxfreeze.zoo:resnet56 "
                   "or models/net.py:make")
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
    add_bench_arguments(b)
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


def _run(ns: argparse.Namespace) -> int:
    from .api import analyze
    from .trace import DEFAULT_TIMEOUT

    if ns.command == "bench":
        return run_bench(ns)
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
