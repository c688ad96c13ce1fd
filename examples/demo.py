"""fxfreeze demo: train a small ResNet on scikit-learn's bundled digits (offline), plainly
and compiled with fxfreeze (the Egeria policy, and a FreezeOut schedule), and compare.

Every configuration first trains one untimed step in this process (the first steps of a
process pay for allocations, kernel choice and lazy imports; charged to whichever run came
first they would read as a speed-up), and the table gives the time with and without the
first epoch.

    make demo            # or: .venv/bin/python examples/demo.py [--epochs N]
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time

import torch
import torch.nn.functional as F

import fxfreeze
from fxfreeze import zoo


def load_digits_split(seed: int = 0):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    n_test = len(x) // 5
    te, tr = perm[:n_test], perm[n_test:]
    return (x[tr], y[tr]), (x[te], y[te])


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return 100.0 * acc


def train(name: str, model, opt, data, epochs: int, batch: int, seed: int) -> tuple[float, list[float]]:
    """A plain loop; the learning rate decays per step on a cosine (smooth: no LR step for a
    policy to react to)."""
    from tqdm import tqdm

    (xtr, ytr), (xte, yte) = data
    g = torch.Generator().manual_seed(seed)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * -(-len(xtr) // batch))
    times = []
    for epoch in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        t0 = time.perf_counter()
        bar = tqdm(range(0, len(xtr), batch), desc=f"{name:>9} epoch {epoch + 1}/{epochs}", leave=False, file=sys.stdout, disable=not sys.stdout.isatty())
        for i in bar:
            idx = perm[i : i + batch]
            opt.zero_grad()
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            if hasattr(model, "freezer"):
                model.freezer.observe_loss(loss)  # the safety net's input: the model returns logits
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        times.append(time.perf_counter() - t0)
        frozen = f", {model.num_frozen} blocks frozen" if hasattr(model, "num_frozen") else ""
        print(f"{name:>9} epoch {epoch + 1}: {times[-1]:.2f} s, test accuracy {accuracy(model, xte, yte):.1f}%{frozen}")
    return accuracy(model, xte, yte), times


def warm_up(base_model, runs: dict, data, batch: int) -> None:
    """One untimed training step of every configuration, on copies (the timed runs start
    from the same untouched weights)."""
    (xtr, ytr), _ = data
    x, y = xtr[:batch], ytr[:batch]
    nets = [(copy.deepcopy(base_model), None)]
    for config in runs.values():
        m = copy.deepcopy(base_model)
        nets.append((m, config))
    for model, config in nets:
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        net = fxfreeze.compile(model, (x[:2],), optimizer=opt, config=config) if config else model
        F.cross_entropy(net(x), y).backward()
        opt.step()
        if config:
            net.freezer.detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("  [fxfreeze] %(message)s"))
    log = logging.getLogger("fxfreeze")
    log.addHandler(handler)
    log.setLevel(logging.INFO)  # this script is the application: it chooses to show events

    data = load_digits_split()
    base_model = zoo.resnet_cifar(depth=20, in_channels=1, width=16)
    steps = args.epochs * -(-len(data[0][0]) // args.batch)
    runs = {
        # Egeria's defaults target runs of thousands of steps; this one has ~180: evaluate every
        # 10 steps, synchronously (reproducible), without the overhead budget (docs/egeria.md)
        "egeria": {"policy": "egeria", "egeria": {"eval_interval": 10, "overhead_budget": 0, "asynchronous": False}},
        "freezeout": {"policy": "freezeout", "freezeout": {"t0": 0.5, "scaling": "linear", "total_steps": steps}},
    }
    models = {name: copy.deepcopy(base_model) for name in runs}
    base_opt = torch.optim.SGD(base_model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    compiled = {}
    for name, config in runs.items():
        opt = torch.optim.SGD(models[name].parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        compiled[name] = (fxfreeze.compile(models[name], (data[0][0][:2],), optimizer=opt, config=config), opt)
    print(compiled["egeria"][0].plan.table())
    print(f"\nDigits (scikit-learn): {len(data[0][0])} train / {len(data[1][0])} test images, 8x8; {args.epochs} epochs.\n")

    warm_up(base_model, runs, data, args.batch)
    acc_b, t_b = train("baseline", base_model, base_opt, data, args.epochs, args.batch, seed=1)
    results = {}
    for name, (fm, opt) in compiled.items():
        results[name] = train(name, fm, opt, data, args.epochs, args.batch, seed=1)
    print("\n| run | final test accuracy | train time | speed-up | without 1st epoch | speed-up | frozen blocks at the end |")
    print("|---|---|---|---|---|---|---|")
    print(f"| baseline | {acc_b:.1f}% | {sum(t_b):.2f} s | 1.00x | {sum(t_b[1:]):.2f} s | 1.00x | - |")
    for name, (acc, t) in results.items():
        fm = compiled[name][0]
        print(f"| fxfreeze ({name}) | {acc:.1f}% | {sum(t):.2f} s | {sum(t_b) / sum(t):.2f}x | {sum(t[1:]):.2f} s | "
              f"{sum(t_b[1:]) / max(sum(t[1:]), 1e-9):.2f}x | {fm.num_frozen}/{len(fm.plan.blocks)} |")
        fm.freezer.detach()
    print("\nEach configuration was warmed up by one untimed step first; evaluation is not timed.")


if __name__ == "__main__":
    main()
