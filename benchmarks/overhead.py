"""Egeria's overhead: training time with evaluation on and freezing off, against plain PyTorch.

Two copies of the same model train side by side in one process, alternating in chunks of
steps (so that drifts in machine speed hit both alike): plain PyTorch, and fxfreeze with
``policy="egeria"`` at its default settings except ``freeze=False`` (plasticity measured,
nothing frozen). Reports the ratio of their training times, the number of evaluations, and
the policy's own time on the training thread and the reference worker's busy time.

    python benchmarks/overhead.py [--model resnet20] [--steps 400] [--batch 128]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn

import fxfreeze
from fxfreeze import zoo


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20", choices=["resnet20", "resnet56"])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--chunk", type=int, default=25)
    p.add_argument("--batch", type=int, default=128)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    factory = getattr(zoo, a.model)
    x = torch.randn(a.batch * 4, 3, 32, 32)
    y = torch.randint(0, 10, (a.batch * 4,))
    plain = factory()
    comp = factory()
    comp.load_state_dict(plain.state_dict())
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)
    opt_c = torch.optim.SGD(comp.parameters(), lr=0.05, momentum=0.9)
    fm = fxfreeze.compile(comp, (x[:2],), optimizer=opt_c, config={"egeria": {"freeze": False}})
    lossf = nn.CrossEntropyLoss()
    times = {"plain": 0.0, "egeria": 0.0}

    def run(net: nn.Module, opt: torch.optim.Optimizer, start: int, n: int) -> float:
        t = time.perf_counter()
        for i in range(start, start + n):
            j = (i % 4) * a.batch
            loss = lossf(net(x[j : j + a.batch]), y[j : j + a.batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return time.perf_counter() - t

    run(plain, opt_p, 0, 2)  # warm-up both
    run(fm, opt_c, 0, 2)
    done = 0
    while done < a.steps:
        n = min(a.chunk, a.steps - done)
        times["plain"] += run(plain, opt_p, done, n)
        times["egeria"] += run(fm, opt_c, done, n)
        done += n
    pol = fm.freezer.policy
    pol.worker.wait(60)
    ratio = times["egeria"] / times["plain"]
    print(f"model {a.model}, batch {a.batch}, {a.steps} steps, {torch.get_num_threads()} threads")
    print(f"plain PyTorch:         {times['plain']:.1f} s ({1000 * times['plain'] / a.steps:.0f} ms/step)")
    print(f"egeria (freeze=False): {times['egeria']:.1f} s ({1000 * times['egeria'] / a.steps:.0f} ms/step)")
    print(f"overhead: {100 * (ratio - 1):+.2f}%  ({pol.evaluations} evaluations; policy on the training thread "
          f"{pol.main_seconds:.2f} s, reference worker busy {pol.worker.busy_seconds:.2f} s)")
    fm.freezer.detach()
    return 0


if __name__ == "__main__":
    sys.exit(main())
