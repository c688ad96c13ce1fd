"""Small models that several test modules build (imported as ``_nets``: pytest puts
``tests/`` on ``sys.path`` for the modules in it)."""

from __future__ import annotations

import torch
from torch import nn


class Res(nn.Module):
    """``x + relu(linear(x))``: one residual block."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.lin(x))


class ResidualMLP(nn.Module):
    """A stem, ``depth`` residual blocks and a head: a plan of ``1 + depth`` blocks."""

    def __init__(self, depth: int = 4) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.blocks = nn.Sequential(*[Res(16) for _ in range(depth)])
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class AutocastBody(ResidualMLP):
    """The same, its stem and blocks under ``torch.autocast`` inside the forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.blocks(self.stem(x))
        return self.head(h.float())
