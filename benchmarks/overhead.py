"""Egeria's overhead: training time with evaluation on and freezing off, against plain PyTorch.

Two copies of the same model train side by side in one process, alternating in chunks of
steps (so that drifts in machine speed hit both alike): plain PyTorch, and fxfreeze with
``policy="egeria"`` at its default settings (or those ``--set`` gives) except
``freeze=False`` (plasticity measured, nothing frozen). Reports the ratio of their training
times, the number of evaluations, the policy's own time on the training thread and the
reference worker's busy time.

    python benchmarks/overhead.py [--model resnet20] [--steps 400] [--batch 128]
    python benchmarks/overhead.py --mnist ../shared/data/mnist10k --steps 600 --chunk 50
    python benchmarks/overhead.py --text ../shared/data/movie-review-polarity --steps 240 --chunk 30
    python benchmarks/overhead.py --device cuda --mnist ../shared/data/mnist10k --steps 2000 --chunk 100
    python benchmarks/overhead.py --mnist ../shared/data/mnist10k --steps 1600 --chunk 50 --against control
    python benchmarks/overhead.py --mnist ../shared/data/mnist10k --steps 1600 --chunk 50 --null

``--device cuda`` trains both copies on the GPU (the batches are put there once, before
timing) while Egeria's reference runs on the CPU, as in its design; each chunk is timed
between synchronisations of the device.

``--mnist DIR`` runs the realistic from-scratch workload of ``fxfreeze bench --long`` instead
(ResNet-20 width 16 on MNIST-10k, batch 64, SGD 0.05 with momentum, real batches in the
bench's order) with its planned length (``total_steps=2000``), so that Egeria evaluates at
the spacing it uses on that run. Before each plain chunk the script waits, untimed, for the
reference worker to go idle: a job still running would otherwise slow the plain chunk and
be charged to the wrong side.

Egeria's one-time set-up (the eval-mode capture, the block graphs and the reference
builders) happens in ``fxfreeze.compile``, before the timed steps, and is printed on a line
of its own; set-up that could not happen there (a model compiled without example inputs) is
counted in the timed steps. ``--profile`` adds the training thread's profile (cProfile) of
every evaluation, to find what an evaluation costs there.

``--text DIR`` runs the full-size fine-tuning workload of ``fxfreeze bench --long``
(all-MiniLM-L6-v2 on the whole movie-review training split, batch 32, AdamW 2e-5 with a
10% warm-up then linear decay, ``total_steps=897``). There the "plain" side is the compiled
control (``fxfreeze.compile`` with a policy that never freezes), not eager code: the
exported graph alone runs about 1.3x faster than eager Hugging Face code, which would
otherwise hide the policy's cost.

``--against control`` makes the plain side the compiled control on any workload (the default
for ``--text``; ``--against eager`` is the default elsewhere). Against eager code the figure
is what a user pays over their own loop: the compiled graph, the controller's per-step work
and the evaluations. Against the control it is Egeria's own work: its per-step bookkeeping,
the evaluations on the training thread, and the reference worker's contention for the cores
(what its 1% budget accounts for).

``--null`` replaces Egeria's side by a second compiled control, the same model and graph as
the plain side: the figure is then what the method reads when there is nothing to find (its
bias and its noise at these settings). Two copies of one model can differ in speed by where
their tensors lie in memory, and a 2-core machine's speed moves from second to second; an
Egeria figure is resolved only where it stands clear of the null's.

Besides the wall times, the report gives the reference worker's CPU seconds (the time its
thread ran, measured in the thread): the core time it took from training. Training slows by
at most about that much (a core it takes is a core training waits for), so Egeria's own
cost is bounded by the training thread's seconds in the policy plus the worker's CPU
seconds, a bound that does not depend on the machine's drift.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn

import fxfreeze
from fxfreeze import zoo
from fxfreeze.bench.command import parse_overrides
from fxfreeze.bench.runner import call_model, logits_of, synchronize, to_device
from fxfreeze.bench.suite import merge_config
from fxfreeze.errors import CliError


def _real_batches(w: Any, steps: int) -> list[tuple[Any, Any]]:
    """A bench workload's batches in the bench's order (without sample ids), enough for
    ``steps`` steps."""
    return [b[:2] for e in range(-(-steps // w.steps_per_epoch) + 1) for b in w.train_batches(e)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20", choices=["resnet20", "resnet56"])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--chunk", type=int, default=25)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--mnist", default=None, help="MNIST idx folder: the realistic from-scratch workload instead")
    p.add_argument("--text", default=None, help="movie-review polarity folder: the full-size fine-tuning workload instead")
    p.add_argument("--device", default="cpu", help="where training runs (the reference stays on the CPU)")
    p.add_argument("--profile", action="store_true", help="print a cProfile of the evaluations on the training thread")
    p.add_argument("--against", choices=["eager", "control"], default=None,
                   help="the plain side: eager PyTorch (default, except --text) or the compiled control "
                        "(fxfreeze.compile with a policy that never freezes or evaluates)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="a config key for Egeria's side, as in fxfreeze bench (repeatable), e.g. "
                        "--set egeria.lookahead=9; freezing stays off")
    p.add_argument("--null", action="store_true",
                   help="measure a second compiled control instead of Egeria: the method's own bias and noise")
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    if a.mnist and a.text:
        p.error("give --mnist or --text, not both")
    torch.manual_seed(0)
    config: dict = {"egeria": {}}  # freeze=False is set after any --set keys

    def make_opt(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)

    if a.null and a.against == "eager":
        p.error("--null compares two compiled controls: leave out --against eager")
    if a.null and a.profile:
        p.error("--null evaluates nothing to profile: leave out --profile")
    if a.null and a.overrides:
        p.error("--null trains two compiled controls: leave out --set")
    try:
        overrides = parse_overrides(a.overrides)
    except CliError as e:
        p.error(str(e))
    against = "control" if a.null else (a.against or ("control" if a.text else "eager"))
    if a.text:
        from fxfreeze.bench.workloads import minilm_text

        w = minilm_text(a.text, seed=0, schedule="warmup_linear")
        batches, factory, example = _real_batches(w, a.steps), w.model_fn, w.example_inputs
        make_opt = w.make_optimizer  # type: ignore[assignment]
        config["total_steps"] = 3 * w.steps_per_epoch  # the bench's 3 epochs: Egeria's spacing on that run
        label = f"all-MiniLM-L6-v2 fine-tuning, batch 32, total_steps {config['total_steps']}"
    elif a.mnist:
        from fxfreeze.bench.workloads import mnist_resnet

        w = mnist_resnet(a.mnist, width=16, train_size=8000, batch_size=64, lr=0.05, seed=0, schedule="cosine")
        batches, factory, example = _real_batches(w, a.steps), w.model_fn, w.example_inputs
        config["total_steps"] = 2000  # the bench's planned length: Egeria's spacing on that run
        label = f"resnet20 (width 16) on MNIST, batch 64, total_steps {config['total_steps']}"
    else:
        x = torch.randn(a.batch * 4, 3, 32, 32)
        y = torch.randint(0, 10, (a.batch * 4,))
        batches = [(x[j * a.batch : (j + 1) * a.batch], y[j * a.batch : (j + 1) * a.batch]) for j in range(4)]
        factory = getattr(zoo, a.model)
        example = (x[:2],)
        label = f"{a.model} on random CIFAR-shaped data, batch {a.batch}"
    batches = [to_device(b, dev) for b in batches]
    example = to_device(example, dev)
    plain = factory().to(dev)
    comp = factory().to(dev)
    comp.load_state_dict(plain.state_dict())
    opt_p = make_opt(plain)
    opt_c = make_opt(comp)
    plain_side = "plain PyTorch"
    if against == "control":  # the same graph on both sides, one of them never evaluating
        plain = fxfreeze.compile(plain, example, optimizer=opt_p, config={"policy": "manual"})
        plain_side = "compiled control"
    config = merge_config(config, overrides)
    if not isinstance(config.get("egeria"), dict):
        p.error("--set egeria=...: give the section's keys one by one, e.g. --set egeria.lookahead=9")
    config["egeria"]["freeze"] = False  # Egeria's cost alone: nothing may freeze
    if a.null:
        config = {"policy": "manual"}
    fm = fxfreeze.compile(comp, example, optimizer=opt_c, config=config)
    lossf = nn.CrossEntropyLoss()
    times = {"plain": 0.0, "egeria": 0.0}
    pol = fm.freezer.policy
    worker = getattr(pol, "worker", None)

    def run(net: nn.Module, opt: torch.optim.Optimizer, start: int, n: int) -> float:
        if net is plain and worker is not None:
            worker.wait(60)  # untimed: the worker's job belongs to egeria's side
        synchronize(dev)
        t = time.perf_counter()
        for i in range(start, start + n):
            xb, yb = batches[i % len(batches)]
            loss = lossf(logits_of(call_model(net, xb)), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        synchronize(dev)
        return time.perf_counter() - t

    prof = None
    if a.profile:
        import cProfile

        prof = cProfile.Profile()
    eval_seconds: list[float] = []

    def timed(sig: Any) -> None:
        """An evaluation, timed on the training thread (and profiled with --profile)."""
        t = time.perf_counter()
        if prof is not None:
            prof.enable()
        try:
            evaluate(sig)
        finally:
            if prof is not None:
                prof.disable()
            eval_seconds.append(time.perf_counter() - t)

    if not a.null:
        evaluate = pol._evaluate
        pol._evaluate = timed
    run(plain, opt_p, 0, 2)  # warm-up both
    run(fm, opt_c, 0, 2)
    done = 0
    ratios = []
    while done < a.steps:
        n = min(a.chunk, a.steps - done)
        # the order alternates from pair to pair, so that a drift in speed favours neither side
        first, second = ("plain", "egeria") if len(ratios) % 2 == 0 else ("egeria", "plain")
        pair = {}
        for side in (first, second):
            net, opt = (plain, opt_p) if side == "plain" else (fm, opt_c)
            pair[side] = run(net, opt, done, n)
            times[side] += pair[side]
        ratios.append(pair["egeria"] / pair["plain"])
        done += n
    if worker is not None:
        worker.wait(60)
    ratio = times["egeria"] / times["plain"]
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"{label}, {a.steps} steps in chunks of {a.chunk}, on {where}, {torch.get_num_threads()} threads")
    print(f"{plain_side + ':':22} {times['plain']:.1f} s ({1000 * times['plain'] / a.steps:.0f} ms/step)")
    if a.null:
        print(f"{'second control (null):':22} {times['egeria']:.1f} s ({1000 * times['egeria'] / a.steps:.0f} ms/step)")
        print(f"null difference: {100 * (ratio - 1):+.2f}%  (the same model and graph on both sides: the method's bias)")
    else:
        print(f"egeria (freeze=False): {times['egeria']:.1f} s ({1000 * times['egeria'] / a.steps:.0f} ms/step)")
        print(f"overhead: {100 * (ratio - 1):+.2f}%  ({pol.evaluations} evaluations; policy on the training thread "
              f"{pol.main_seconds:.2f} s, of which one-time set-up left to evaluations {pol.setup_seconds:.2f} s; "
              f"reference worker busy {worker.busy_seconds:.2f} s, of which {worker.cpu_seconds:.2f} s on a core)")
        bound = pol.main_seconds + worker.cpu_seconds
        print(f"bound on Egeria's own cost (training thread in the policy + the worker's CPU seconds): "
              f"{bound:.2f} s, {100 * bound / times['egeria']:.2f}% of its training time")
    print(f"per pair of chunks ({len(ratios)} pairs): median {100 * (q[1] - 1):+.2f}%, quartiles "
          f"{100 * (q[0] - 1):+.2f}% to {100 * (q[2] - 1):+.2f}% (the spread is the measurement's noise)")
    if eval_seconds:
        print(f"evaluations on the training thread: {len(eval_seconds)}, {1000 * sum(eval_seconds):.1f} ms in all, "
              f"{1000 * sum(eval_seconds) / len(eval_seconds):.2f} ms each on average, {1000 * max(eval_seconds):.2f} ms at most")
    if not a.null:
        print(f"one-time set-up in fxfreeze.compile, before the timed steps (eval-mode capture, block graphs, "
              f"reference builders): {pol.compile_seconds:.2f} s")
    if prof is not None:
        import pstats

        # (from Python 3.12, cProfile sees every thread while enabled: the copy helper's and the
        # worker's calls during an evaluation are in it; the timing line above is the training thread's)
        print("\nthe evaluations (cProfile, by cumulative time; from Python 3.12 other threads' calls too):")
        pstats.Stats(prof, stream=sys.stdout).sort_stats("cumulative").print_stats(30)
    fm.freezer.detach()
    if against == "control":
        plain.freezer.detach()
    return 0


if __name__ == "__main__":
    sys.exit(main())
