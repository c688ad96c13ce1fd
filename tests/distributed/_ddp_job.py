"""A 2-process gloo job for tests/distributed/test_ddp.py (run as a script).

    python _ddp_job.py MODE OUT_DIR [STEPS] [CKPT_AT] [LAG]

MODE: train (STEPS steps), part1 (steps up to CKPT_AT, then checkpoint), part2 (resume from
the checkpoint, run to STEPS), crash (rank 1 dies after 3 steps), alone (one process of a
world of 2: the rendezvous must fail with a clear error). LAG: FreezeDDP's agree_lag (default:
automatic, 0 with gloo).
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fxfreeze
from fxfreeze import zoo
from fxfreeze.distributed import FreezeDDP, init_process_group

WORLD = 2


def _data(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(16, 1, 16, 16, generator=g)
    y = (x[:, 0, :8].mean((1, 2)) > 0).long() + 2 * (x[:, 0, :, :8].mean((1, 2)) > 0).long()
    return x, y


def run(rank: int, mode: str, out: str, steps: int, ckpt_at: int, rendezvous: str, lag: int | None = None) -> None:
    out_dir = Path(out)
    faulthandler.enable(all_threads=True)  # an abort in C++ (at exit, say) shows every thread's Python stack
    # a rendezvous file of this job only: torch's FileStore must start from a missing file, and
    # a file left by an earlier job in the same folder (part1 then part2) sends the new ranks
    # to the old ranks' addresses ("Connection refused")
    init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD,
                       timeout_s=3 if mode == "alone" else 60)
    torch.manual_seed(0)
    model = zoo.resnet_cifar(depth=8, width=8, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # ranks propose different prefixes on purpose: rank 0's decision must win everywhere.
    # Rank 1 runs Egeria (its own reference worker, a loose rule that wants to freeze early).
    if rank == 0:
        cfg = {"policy": "manual", "manual": {"schedule": {4: 2, 8: 4}}}
    else:
        cfg = {"policy": "egeria", "egeria": {"eval_interval": 1, "window": 3, "patience": 1, "threshold": 50.0,
                                              "noise_limit": 50.0, "overhead_budget": 0, "asynchronous": False}}
    fm = fxfreeze.compile(model, (torch.randn(2, 1, 16, 16),), optimizer=opt, config=cfg)
    start = 0
    if mode == "part2":
        ck = torch.load(out_dir / f"ckpt{rank}.pt", weights_only=True)
        fm.load_state_dict(ck["model"])
        fm.freezer.load_state_dict(ck["freezer"])
        opt.load_state_dict(ck["opt"])
        start = ck["step"]
    ddp = FreezeDDP(fm, agree_lag=lag)
    comm = {"bytes": 0}

    def counting(state, bucket):
        state["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
        fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0] / WORLD)

    ddp.register_comm_hook(comm, counting)
    log = []
    end = ckpt_at if mode == "part1" else steps
    try:
        for step in range(start, end):
            if mode == "crash" and rank == 1 and step == 3:
                os._exit(3)
            x, y = _data(rank, step)
            before = comm["bytes"]
            loss = nn.functional.cross_entropy(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            trainable = sum(p.numel() for p in fm.parameters() if p.requires_grad)
            log.append({"step": step, "loss": loss.item(), "bytes": comm["bytes"] - before,
                        "k": fm.num_frozen, "trainable": trainable})
    except (fxfreeze.FxFreezeError, RuntimeError) as e:
        (out_dir / f"error{rank}.txt").write_text(f"{type(e).__name__}: {e}")
        _leave()
    if mode == "part1":
        torch.save({"model": fm.state_dict(), "freezer": fm.freezer.state_dict(), "opt": opt.state_dict(), "step": end},
                   out_dir / f"ckpt{rank}.pt")
    flat = torch.cat([p.detach().reshape(-1) for p in fm.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    res = {"log": log, "max_rank_diff": float((gathered[0] - gathered[1]).abs().max()),
           "total": sum(p.numel() for p in fm.parameters()), "rebuilds": ddp.rebuilds,
           "params": flat.tolist() if rank == 0 else None,
           "history": fm.freezer.history,
           "evaluations": getattr(fm.freezer.policy, "evaluations", None)}
    (out_dir / f"result{rank}.json").write_text(json.dumps(res))
    fm.freezer.detach()  # stops the policy's reference worker before the process exits
    dist.destroy_process_group()
    _leave()


def _leave() -> None:
    """End a rank without the interpreter's shutdown. torch's gloo worker threads outlive
    ``destroy_process_group``, and one that drops the last reference to a finished
    collective (here the all_gather above) once the shutdown has begun must take the GIL to
    free the tensors' Python objects: it is made to exit mid-destructor and the process
    aborts ("terminate called without an active exception"; a core dump of such a rank:
    ``ProcessGroupGloo::AsyncWork::~AsyncWork`` -> ``decref_pyobject`` -> ``take_gil`` ->
    ``pthread_exit`` -> ``std::terminate``). It took a loaded machine to
    see it (1 run of the four tests in 5-8). Everything this job reports is written by now."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 12
    ckpt_at = int(sys.argv[4]) if len(sys.argv) > 4 else 6
    lag = int(sys.argv[5]) if len(sys.argv) > 5 else None
    torch.set_num_threads(1)
    rendezvous = str(Path(out) / f"rendezvous-{mode}-{uuid.uuid4().hex}")
    if mode == "alone":
        try:
            run(0, mode, out, steps, ckpt_at, rendezvous)
        except fxfreeze.DistributedError as e:
            (Path(out) / "error0.txt").write_text(f"{type(e).__name__}: {e}")
        return
    mp.spawn(run, args=(mode, out, steps, ckpt_at, rendezvous, lag), nprocs=WORLD, join=mode != "crash")
    if mode == "crash":
        time.sleep(0)  # the spawn context joins below
        

if __name__ == "__main__":
    main()
