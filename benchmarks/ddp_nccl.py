"""FreezeDDP on the NCCL backend: a freeze mid-run, the DDP rebuilt, the all-reduce shrinking.

One process per visible GPU (at least one; NCCL wants a GPU per rank) trains a small ResNet
with a manual freeze schedule under :class:`fxfreeze.distributed.FreezeDDP`. With NCCL the
ranks' agreement on the prefix is a CUDA broadcast read ``agree_lag`` (2) steps later, so the
prefix changes two steps after rank 0's decision. The script checks, and exits non-zero if
any check fails:

- each freeze is applied on every rank at the same step, ``agree_lag`` steps after the one
  the schedule names, and DDP is rebuilt once per change;
- the bytes all-reduced per step fall with the frozen share of the parameters;
- the ranks end with equal parameters;
- up to the first freeze, rank 0's losses equal (within 1e-4) those of the same loop without
  DDP on the same device (with one rank; with more, the averaged gradient differs by design).

    python benchmarks/ddp_nccl.py [--world N] [--steps 16]
    python benchmarks/ddp_nccl.py --backend gloo --world 2     # the same checks on the CPU

On a GPU machine it runs NCCL (docs/benchmarks.md records its output); ``--backend gloo``
runs the same loop on the CPU, where the agreement is read at once (lag 0), so that the
script itself is tested without a GPU (tests/distributed/test_ddp.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fxfreeze
from fxfreeze import zoo
from fxfreeze.distributed import FreezeDDP, init_process_group

SCHEDULE = {4: 2, 8: 4}  # after optimizer step 4: 2 blocks frozen; after step 8: 4


def _data(rank: int, step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(64, 1, 16, 16, generator=g)
    y = (x[:, 0, :8].mean((1, 2)) > 0).long() + 2 * (x[:, 0, :, :8].mean((1, 2)) > 0).long()
    return x.to(device), y.to(device)


def _train(net: Any, fm: Any, opt: torch.optim.Optimizer, rank: int, steps: int, device: torch.device,
           comm: dict[str, int] | None) -> list[dict[str, Any]]:
    log = []
    for step in range(steps):
        x, y = _data(rank, step, device)
        before = comm["bytes"] if comm else 0
        k_during = fm.num_frozen  # the prefix this step's backward and all-reduce ran with
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        log.append({"step": step + 1, "loss": loss.detach(), "k": fm.num_frozen, "k_during": k_during,
                    "bytes": (comm["bytes"] - before) if comm else 0})
    for r in log:
        r["loss"] = float(r["loss"])  # read once, after the loop
    return log


def _model(device: torch.device) -> tuple[Any, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = zoo.resnet_cifar(depth=8, width=16, in_channels=1).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    cfg = {"policy": "manual", "manual": {"schedule": SCHEDULE, "unit": "step"}}
    return fxfreeze.compile(model, (torch.randn(2, 1, 16, 16, device=device),), optimizer=opt, config=cfg), opt


def _device(backend: str, rank: int) -> torch.device:
    return torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def run(rank: int, world: int, steps: int, rendezvous: str, out: str, backend: str) -> None:
    device = _device(backend, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    init_process_group(backend, init_method=f"file://{rendezvous}", rank=rank, world_size=world, timeout_s=120)
    fm, opt = _model(device)
    ddp = FreezeDDP(fm)
    comm = {"bytes": 0}

    def counting(state, bucket):  # type: ignore[no-untyped-def]  # DDP checks a hook's annotations
        state["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
        fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0] / world)

    ddp.register_comm_hook(comm, counting)
    log = _train(ddp, fm, opt, rank, steps, device, comm)
    flat = torch.cat([p.detach().reshape(-1) for p in fm.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    spread = max(float((g - gathered[0]).abs().max()) for g in gathered)
    res = {"log": log, "rebuilds": ddp.rebuilds, "lag": ddp.agreement.lag, "max_rank_diff": spread,
           "backend": str(dist.get_backend()), "device": _device_name(device)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    fm.freezer.detach()
    dist.barrier()  # no rank tears its connections down while another still uses them
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=None, help="ranks (default: one per visible GPU)")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--backend", default="nccl", choices=("nccl", "gloo"))
    a = p.parse_args(argv)
    if a.steps <= max(SCHEDULE) + 2:
        p.error(f"--steps must exceed {max(SCHEDULE) + 2} (the schedule's last change plus the agreement lag)")
    if a.backend == "nccl" and (not torch.cuda.is_available() or not dist.is_nccl_available()):
        print("ddp_nccl: NCCL needs a CUDA device and torch built with NCCL; nothing run (--backend gloo runs on the CPU)",
              file=sys.stderr)
        return 2
    world = a.world or (torch.cuda.device_count() if a.backend == "nccl" else 2)
    if a.backend == "nccl" and world > torch.cuda.device_count():
        print(f"ddp_nccl: --world {world} needs {world} GPUs (NCCL puts one rank on each); "
              f"{torch.cuda.device_count()} visible", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(run, args=(world, a.steps, str(Path(out) / f"rdzv-{uuid.uuid4().hex}"), out, a.backend),
                 nprocs=world, join=True)
        results = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    # the same loop without DDP, on rank 0's device and data
    dev0 = _device(a.backend, 0)
    fm, opt = _model(dev0)
    solo = _train(fm, fm, opt, 0, a.steps, dev0, None)
    fm.freezer.detach()

    r0 = results[0]
    lag = r0["lag"]
    print(f"{r0['device']} x{world}, backend {r0['backend']}, agree_lag {lag}, {a.steps} steps, schedule {SCHEDULE}")
    print("| step | loss (rank 0) | loss without DDP | frozen blocks after the step (each rank) | bytes all-reduced (rank 0) |")
    print("|---|---|---|---|---|")
    for i, row in enumerate(r0["log"]):
        ks = "/".join(str(r["log"][i]["k"]) for r in results)
        print(f"| {row['step']} | {row['loss']:.5f} | {solo[i]['loss']:.5f} | {ks} | {row['bytes']:,} |")
    failures = []
    for step, k in SCHEDULE.items():
        want = step + lag
        for r, res in enumerate(results):
            got = next((row["step"] for row in res["log"] if row["k"] >= k), None)
            if got != want:
                failures.append(f"rank {r}: prefix {k} applied after step {got}, expected {want} ({step} + lag {lag})")
    if r0["rebuilds"] != 1 + len(SCHEDULE):
        failures.append(f"DDP built {r0['rebuilds']} times, expected {1 + len(SCHEDULE)} (once, then once per change)")
    by_k: dict[int, int] = {}
    for row in r0["log"][1:]:  # the first step's buckets are built while it runs
        by_k.setdefault(row["k_during"], row["bytes"])
    ks = sorted(by_k)
    if any(by_k[b] >= by_k[a] for a, b in zip(ks, ks[1:])):
        failures.append(f"bytes all-reduced per step did not fall with the prefix: {by_k}")
    if max(r["max_rank_diff"] for r in results) != 0.0:
        failures.append(f"ranks ended with different parameters (max diff {max(r['max_rank_diff'] for r in results)})")
    # equal up to the first freeze: from then on the loop without DDP, which has no agreement
    # lag, has its frozen blocks' BatchNorm on running statistics ``lag`` steps earlier
    first = min(SCHEDULE)
    if world == 1:
        diff = max(abs(r0["log"][i]["loss"] - solo[i]["loss"]) for i in range(first))
        print(f"largest loss difference from the loop without DDP before the first freeze: {diff:.2e}")
        if diff > 1e-4:  # one rank: DDP averages nothing; cuDNN's kernels may differ by rounding
            failures.append(f"losses differ from the loop without DDP by {diff:.2e} before the first freeze")
    print(f"bytes all-reduced per step by frozen prefix: {by_k}; DDP builds: {r0['rebuilds']}")
    for f in failures:
        print(f"FAIL: {f}")
    print("ok" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
