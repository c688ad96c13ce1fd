"""Host synchronisations per training step, with and without fxfreeze, from the profiler.

For plain PyTorch and for ``fxfreeze.compile`` with each built-in policy (and a frozen prefix
served from the activation cache), the same loop runs a few warm-up steps, then ``--steps``
steps under ``torch.profiler``; the script prints, per step, the calls that make the host wait
for the device (``aten::_local_scalar_dense`` behind ``.item()``; on CUDA also
``cudaDeviceSynchronize``, ``cudaStreamSynchronize``, ``cudaEventSynchronize``, synchronous
``cudaMemcpy`` and copies to pageable host memory), the asynchronous copies to pinned memory,
and the step time of each configuration measured side by side after the warm-up. Steps in
which a policy takes a decision are excluded by construction (no decision is due in the
profiled window; the script checks it).

    python benchmarks/sync_profile.py                  # on CUDA when one is visible, else the CPU
    python benchmarks/sync_profile.py --device cpu --batch 64

The loop reports its loss with ``fm.freezer.observe_loss(loss)`` (the safety net's input), as
the integrations do; the loop itself reads nothing. On the CPU nothing is a wait for a device,
so the figure there stands for the code path: the loss reader is set to its accelerator path
(a CPU loss is otherwise read at once), and the eager row's reads are the DataLoader's sampler
seeding itself (CPU tensors). On CUDA a scalar read that calls no CUDA function (a loss the
loss reader copied to pinned memory, the DataLoader's seed) is a read of a host tensor, not a
wait, and has its own column. Events of the reference worker's thread are counted too (its
waits for copies do not hold up training). The step time is the median of the timed steps.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fxfreeze
from fxfreeze import zoo
from fxfreeze.bench.syncs import ASYNC_COPY, HOST_READ, SYNC_EVENTS, count_syncs
from fxfreeze.registry import policy_names


def _setup(name: str, device: torch.device, batch: int, total: int) -> tuple[Any, Callable[[], None]]:
    torch.manual_seed(0)
    n = batch * 4
    ds = TensorDataset(torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,)))
    model = zoo.resnet20().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    f: Any = model
    cached = name == "frozen+cache"
    if name != "eager":
        cfg: dict[str, Any] = {"policy": "manual" if cached else name, "total_steps": total,
                               "manual": {"schedule": {1 if cached else total: 3}, "unit": "step"}}
        if cached:
            cfg["cache"] = {"enabled": True}
        f = fxfreeze.compile(model, (ds.tensors[0][:2].to(device),), optimizer=opt, config=cfg)
        if device.type == "cpu":  # a CPU loss is read at once; read it as an accelerator's would be
            f.freezer._loss_reader._immediate = lambda t: False
            f.freezer._loss_reader.every = 10**6
    loader = DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True)
    source = f.wrap_loader(loader) if cached else loader
    it = iter(())

    def step() -> None:
        nonlocal it
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(source)
            x, y = next(it)
        loss = nn.functional.cross_entropy(f(x.to(device, non_blocking=True)), y.to(device, non_blocking=True))
        if name != "eager":
            f.freezer.observe_loss(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return f, step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="profiled steps per configuration")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (the cache fills in these)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    names = ["eager", *sorted(policy_names()), "frozen+cache"]
    total = 100_000  # no policy decides in the window; the plan's length is far away
    runs = {}
    for name in names:
        f, step = _setup(name, device, a.batch, total)
        for _ in range(a.warmup):
            step()
        runs[name] = (f, step)
    # step time side by side, after every configuration's warm-up: the median step, so that a
    # policy's occasional evaluation step does not count as its per-step cost; round robin, so
    # that a drift in the machine's speed hits every configuration alike
    per: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(a.steps):
        for name, (_, step) in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            per[name].append(time.perf_counter() - t0)
    times = {name: sorted(v)[len(v) // 2] for name, v in per.items()}
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {dev_name}; ResNet-20, batch {a.batch}, {a.steps} profiled steps per configuration")
    print("| configuration | host waits per step | which | async copies to pinned memory per step "
          "| reads of host tensors per step | evaluations in the window | step (ms) |")
    print("|---|---|---|---|---|---|---|")
    for name, (f, step) in runs.items():
        before = len(f.freezer.history) if name != "eager" else 0
        pol = f.freezer.policy if name != "eager" else None
        evals = getattr(pol, "evaluations", None)
        counts = count_syncs(step, a.steps)
        if name != "eager" and len(f.freezer.history) != before:
            print(f"warning: {name} took a decision in the profiled steps")
        waits = {k: v for k, v in counts.items() if k in SYNC_EVENTS}
        which = ", ".join(f"{k} {v / a.steps:g}" for k, v in sorted(waits.items())) or "-"
        n_evals = "-" if evals is None else getattr(pol, "evaluations") - evals
        print(f"| {name} | {sum(waits.values()) / a.steps:g} | {which} | {counts.get(ASYNC_COPY, 0) / a.steps:g} "
              f"| {counts.get(HOST_READ, 0) / a.steps:g} | {n_evals} | {1000 * times[name]:.1f} |")
    for f, _ in runs.values():
        if hasattr(f, "freezer"):
            f.freezer.detach()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
