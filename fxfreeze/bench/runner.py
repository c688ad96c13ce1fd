"""One training run, plain or compiled, with everything a comparison needs recorded.

The baseline and every policy run go through :func:`train_run`: the same model factory and
seed (same initial weights), the same batch order (a batch factory seeded per epoch), the
same optimizer and schedule. Wall time counts training only; test accuracy is measured after
each epoch outside the clock. The result records per-epoch accuracy and time, the loss
curve, the frozen prefix after every step and the controller's events, which is what the
time-to-accuracy table and the freeze-timeline plot are made from.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Generator, Iterable, ParamSpec

import torch
from torch import nn

__all__ = ["RunResult", "train_run", "train_steps", "run_interleaved", "accuracy", "call_model", "logits_of",
           "synchronize", "to_device"]

P = ParamSpec("P")
Batch = tuple[Any, torch.Tensor]  # (inputs: tensor, tuple of args or dict of kwargs; targets)


@dataclass
class RunResult:
    name: str
    policy: str | None
    epochs: list[dict[str, float]] = field(default_factory=list)
    final_accuracy: float = 0.0
    wall_seconds: float = 0.0
    steps: int = 0
    frozen: list[tuple[int, int]] = field(default_factory=list)  # (step, num_frozen) at changes
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) every few steps
    events: list[dict[str, Any]] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)  # policy's own records (Egeria)
    num_blocks: int = 0
    controller_seconds: float = 0.0
    #: ``fxfreeze.compile`` (capture, plan and the policy's one-time set-up), off the clock
    #: like the model's construction: reported here so that no set-up hides in it
    compile_seconds: float = 0.0
    backward_flops_skipped: float = 0.0
    peak_rss_mb: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def time_to_accuracy(self, target: float) -> float | None:
        """Training seconds until the first evaluation (epoch end, or a point inside an epoch
        with ``evals_per_epoch``) reaching ``target``."""
        hit = self._first_reaching(target)
        return None if hit is None else hit["wall"]

    def step_to_accuracy(self, target: float) -> int | None:
        """The optimizer step of that evaluation: whether a policy reached the target with
        cheaper steps or at another point of the run (a run whose target comes right after a
        learning-rate drop reaches it there, whatever freezes before)."""
        hit = self._first_reaching(target)
        return None if hit is None else int(hit["step"])

    def _first_reaching(self, target: float) -> dict[str, Any] | None:
        return next((e for e in self.epochs if e["accuracy"] >= target), None)


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)``, ``model(*inputs)`` or ``model(inputs)``, by the type of ``inputs``."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` (a tensor, or a tuple, list or dict of them) on ``device``; a copy from pinned
    host memory does not block the host (``non_blocking``); anything else passes through."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock reading counts it (a CUDA
    step returns to the host long before its kernels finish)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def logits_of(out: Any) -> torch.Tensor:
    """The logits in a model's output: a tensor, a dict's ``logits``, a tuple's first item."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        for key in ("logits", "out", "output"):
            if key in out:
                return out[key]
        return next(v for v in out.values() if isinstance(v, torch.Tensor))
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.logits


def _rss_mb() -> float | None:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except (ImportError, OSError):
        return None


@torch.no_grad()
def accuracy(model: nn.Module, batches: Iterable[Batch], device: torch.device | str | None = None) -> float:
    """Test accuracy in percent; ``device``: where the batches go first (default: where they
    are). The counts add up on the device and are read once, at the end."""
    was = model.training
    model.eval()
    dev = None if device is None else torch.device(device)
    correct: Any = 0
    total = 0
    for batch in batches:
        inputs, y = batch[0], batch[1]
        if dev is not None:
            inputs, y = to_device(inputs, dev), to_device(y, dev)
        pred = logits_of(call_model(model, inputs)).argmax(-1)
        correct = correct + (pred == y).sum()
        total += int(y.numel())
    model.train(was)
    return 100.0 * int(correct) / max(total, 1)


def train_steps(
    name: str,
    model_fn: Callable[[], nn.Module],
    train_batches: Callable[[int], Iterable[Batch]],
    test_batches: Callable[[], Iterable[Batch]],
    *,
    epochs: int,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    make_scheduler: Callable[[torch.optim.Optimizer, int], Any] | None = None,
    steps_per_epoch: int | None = None,
    policy: str | None = None,
    config: dict[str, Any] | None = None,
    example_inputs: Any = None,
    seed: int = 0,
    progress: bool = False,
    loss_every: int = 5,
    evals_per_epoch: int = 1,
    max_steps: int | None = None,
    device: torch.device | str = "cpu",
    switch_every: int | None = None,
) -> Generator[int, None, RunResult]:
    """Train ``model_fn()`` for ``epochs``; ``policy=None`` is plain PyTorch.

    ``train_batches(epoch)`` yields ``(inputs, targets)`` or ``(inputs, targets,
    sample_ids)`` (the ids let the activation cache work); it must be deterministic in
    ``epoch`` so that every run sees the same order. ``make_scheduler(opt, total_steps)``
    (needs ``steps_per_epoch``) builds a learning-rate scheduler stepped after every
    optimizer step, so that a smooth decay never looks like an LR step to a policy.
    ``evals_per_epoch > 1`` (needs ``steps_per_epoch``) also measures test accuracy at evenly
    spaced points inside each epoch (off the clock), so that time-to-accuracy is resolved
    finer than an epoch; ``RunResult.epochs`` then has one entry per evaluation, with a
    fractional ``epoch``. ``max_steps`` stops early without evaluating: the untimed warm-up
    run of a configuration (the first steps of a process pay for allocations, kernel
    selection and lazy imports; a comparison must not charge them to whichever run is
    first). ``device``: where the model trains; batches are copied there step by step, the
    clock waits for the device's queued work at each reading, and the recorded losses are
    read from the device once, at the end (no host synchronisation per step of ours).

    A generator: it trains the whole run and returns its :class:`RunResult` (``StopIteration
    .value``; :func:`train_run` drives it). ``switch_every``: also pause (yield the step) every
    that many steps, with the clock stopped and the global random state kept aside, so that
    :func:`run_interleaved` can train several runs in turns in one process. A pause waits for
    the policy's reference worker to go idle first (training goes on meanwhile, on the
    clock): the worker's work then overlaps only its own run's training, as it would alone,
    never the time of the run that trains next. (Egeria's schedule takes a gap of more than
    a few steps' time as a pause, as it does a validation loop, so the other runs' turns do
    not change its evaluation spacing.)"""
    dev = torch.device(device)
    torch.manual_seed(seed)
    model = model_fn().to(dev)
    opt = make_optimizer(model)
    sched = None
    if make_scheduler is not None:
        if not steps_per_epoch:
            raise ValueError("make_scheduler needs steps_per_epoch")
        sched = make_scheduler(opt, epochs * steps_per_epoch)
    net: nn.Module = model
    fm = None
    if policy is not None:
        import fxfreeze

        cfg = dict(config or {})
        cfg["policy"] = policy
        tc = time.perf_counter()
        fm = fxfreeze.compile(model, to_device(example_inputs, dev), optimizer=opt, config=cfg)
        compile_seconds = time.perf_counter() - tc
        net = fm
    res = RunResult(name=name, policy=policy)
    if fm is not None:
        res.compile_seconds = compile_seconds
    if fm is not None:
        res.num_blocks = len(fm.plan.blocks)
        flops = [b.flops or 0 for b in fm.plan.blocks]
        head = fm.plan.head.flops or 0
        total = sum(flops) + head
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=epochs, desc=name, unit="epoch", leave=False)
        except ImportError:
            bar = None
    lossf = nn.CrossEntropyLoss()
    wall = 0.0
    step = 0
    skipped = 0.0
    last_k = 0
    torch.manual_seed(seed + 1)  # dropout etc. draw the same numbers in every run
    marks: set[int] = set()
    if evals_per_epoch > 1:
        if not steps_per_epoch:
            raise ValueError("evals_per_epoch > 1 needs steps_per_epoch")
        marks = {round(steps_per_epoch * j / evals_per_epoch) for j in range(1, evals_per_epoch)}

    losses: list[tuple[int, torch.Tensor]] = []
    paused_at = 0

    def evaluate(epoch_pos: float) -> float:
        acc = accuracy(net, test_batches(), dev)
        res.epochs.append({"epoch": epoch_pos, "wall": wall, "accuracy": acc, "step": step,
                           "num_frozen": fm.num_frozen if fm is not None else 0})
        return acc

    for epoch in range(epochs):
        net.train()
        synchronize(dev)
        t0 = time.perf_counter()
        for i, batch in enumerate(train_batches(epoch)):
            if max_steps is not None and step >= max_steps:
                break
            inputs, y = to_device(batch[0], dev), to_device(batch[1], dev)
            ids = batch[2] if len(batch) > 2 else None  # dataset indices, for the activation cache
            ctx = fm.sample_ids(ids) if (fm is not None and ids is not None) else contextlib.nullcontext()
            with ctx:
                out = logits_of(call_model(net, inputs))
            loss = lossf(out, y)
            if fm is not None:
                fm.freezer.observe_loss(loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            step += 1
            if fm is not None:
                k = fm.num_frozen
                if k != last_k:
                    res.frozen.append((step, k))
                    last_k = k
                if total:
                    skipped += sum(flops[:k]) / total
            if step % loss_every == 0:
                losses.append((step, loss.detach()))
            if i + 1 in marks and steps_per_epoch:
                synchronize(dev)
                wall += time.perf_counter() - t0
                evaluate(epoch + (i + 1) / steps_per_epoch)
                net.train()
                synchronize(dev)
                t0 = time.perf_counter()
            if switch_every and step - paused_at >= switch_every and not _reference_busy(fm):
                synchronize(dev)
                wall += time.perf_counter() - t0
                # the other runs draw from the global random state meanwhile: this run's comes back
                with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                    yield step
                paused_at = step
                synchronize(dev)
                t0 = time.perf_counter()
        synchronize(dev)
        wall += time.perf_counter() - t0
        if max_steps is not None and step >= max_steps:
            break
        acc = evaluate(float(epoch + 1))
        if bar is not None:
            bar.set_postfix(acc=f"{acc:.2f}", frozen=fm.num_frozen if fm is not None else 0)
            bar.update(1)
    if bar is not None:
        bar.close()
    if losses:
        values = torch.stack([v.float() for _, v in losses]).cpu().tolist()
        res.losses = [(s_, v) for (s_, _), v in zip(losses, values)]
    res.steps = step
    res.wall_seconds = wall
    res.final_accuracy = res.epochs[-1]["accuracy"] if res.epochs else 0.0
    first = next((e["wall"] for e in res.epochs if e["epoch"] >= 1.0), None)
    res.extra["wall_after_first_epoch"] = wall - first if first is not None and len(res.epochs) > 1 else None
    res.backward_flops_skipped = skipped / step if step else 0.0
    res.peak_rss_mb = _rss_mb()
    if fm is not None:
        pol = fm.freezer.policy
        res.events = [dict(e) for e in fm.freezer.history]
        res.timeline = [dict(r) for r in getattr(pol, "timeline", [])]
        res.controller_seconds = float(getattr(pol, "main_seconds", 0.0))
        worker = getattr(pol, "worker", None)
        if worker is not None:
            res.extra["worker_seconds"] = worker.busy_seconds
            res.extra["worker_cpu_seconds"] = worker.cpu_seconds
            res.extra["backends"] = dict(getattr(pol, "backends", {}))
        fm.freezer.detach()
    return res


def _reference_busy(fm: Any) -> bool:
    """Whether the policy's reference worker (Egeria's) still has a job queued or running."""
    worker = getattr(fm.freezer.policy, "worker", None) if fm is not None else None
    return worker is not None and not worker.disabled and worker.pending > 0


def _to_the_end(steps: Callable[P, Generator[int, None, RunResult]], name: str, doc: str) -> Callable[P, RunResult]:
    """``steps`` (a run as a generator) as a function that trains the run to its end."""
    def run(*args: P.args, **kwargs: P.kwargs) -> RunResult:
        gen = steps(*args, **kwargs)
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                return stop.value

    run.__name__ = run.__qualname__ = name
    run.__doc__ = doc
    return run


train_run = _to_the_end(train_steps, "train_run", """Train one run start to finish and return its record
    (:func:`train_steps`, with the same arguments, says what each does).""")


def run_interleaved(runs: dict[str, Generator[int, None, RunResult]],
                    on_done: Callable[[str, RunResult], None] | None = None,
                    on_pause: Callable[[str, int], None] | None = None) -> dict[str, RunResult]:
    """Train the generators of :func:`train_steps` (made with ``switch_every``) in turns,
    one stretch of steps each, until all are done; the results in the order given.

    Why: on a shared or thermally throttled machine the speed drifts by 10% and more over minutes,
    and runs trained one after the other each meet a different machine. Trained in turns of
    a few seconds, every run meets the same machine, so their ratios (time to accuracy, total
    time) measure the policies, not the drift. ``on_done(label, result)``: called as each run
    finishes; ``on_pause(label, step)``: at each pause (progress)."""
    done: dict[str, RunResult] = {}
    active = list(runs)
    while active:
        for label in list(active):
            try:
                step = next(runs[label])
            except StopIteration as stop:
                done[label] = stop.value
                active.remove(label)
                if on_done is not None:
                    on_done(label, stop.value)
            else:
                if on_pause is not None:
                    on_pause(label, step)
    return {label: done[label] for label in runs}
