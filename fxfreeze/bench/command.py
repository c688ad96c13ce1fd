"""``fxfreeze bench``'s command line: its arguments, ``--set`` and ``--variant`` as config,
and the command itself (:func:`fxfreeze.bench.suite.run_suite` does the work)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import CliError

__all__ = ["add_bench_arguments", "parse_overrides", "parse_variant", "run_bench"]


def add_bench_arguments(b: argparse.ArgumentParser) -> None:
    """The arguments of ``fxfreeze bench``."""
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
        # a value with spaces (a mapping, a list) is split into words unless quoted
        hint = ("; a value with spaces must be quoted inside the variant, e.g. --variant \"m=manual "
                "'manual.schedule={90: 1, 180: 3}'\"" if any("=" not in w for w in words[1:])
                or "valid YAML" in str(e) else "")
        raise CliError(f"--variant {item!r}: {e}{hint}") from None
    return name.strip(), base.strip(), extra


def run_bench(ns: argparse.Namespace) -> int:
    """``fxfreeze bench``: check the arguments, run the suite, print its table."""
    from .suite import run_suite

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
    from .workloads import SCHEDULES

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
