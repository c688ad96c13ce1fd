"""Helper process for the resume test: train, checkpoint, restore in a fresh process."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import fxfreeze
from fxfreeze import zoo

TOTAL, SPLIT = 12, 6
CONFIG = {"policy": "manual", "manual": {"schedule": {4: 3, 9: 6}}}


def batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)


def build():
    torch.manual_seed(0)
    model = zoo.resnet20()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    fm = fxfreeze.compile(model, (batch(0)[0],), optimizer=opt, config=CONFIG)
    return fm, opt


def train(fm, opt, start: int, stop: int) -> None:
    fm.train()
    for step in range(start, stop):
        x, y = batch(step)
        opt.zero_grad()
        F.cross_entropy(fm(x), y).backward()
        opt.step()


def main(mode: str, folder: str) -> None:
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    fm, opt = build()
    if mode == "full":
        train(fm, opt, 0, TOTAL)
        torch.save({"model": fm.state_dict(), "num_frozen": fm.num_frozen}, f"{folder}/full.pt")
    elif mode == "first":
        train(fm, opt, 0, SPLIT)
        torch.save({"model": fm.state_dict(), "optimizer": opt.state_dict(), "freezer": fm.freezer.state_dict()}, f"{folder}/ckpt.pt")
    else:
        ckpt = torch.load(f"{folder}/ckpt.pt", weights_only=True)
        fm.load_state_dict(ckpt["model"])
        fm.freezer.load_state_dict(ckpt["freezer"])
        opt.load_state_dict(ckpt["optimizer"])
        train(fm, opt, SPLIT, TOTAL)
        torch.save({"model": fm.state_dict(), "num_frozen": fm.num_frozen, "history": fm.freezer.history}, f"{folder}/resumed.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
