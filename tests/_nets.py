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


class DropPath(nn.Module):
    """Stochastic depth as timm and Hugging Face write it: in training mode a whole sample's
    branch is dropped at random and the rest rescaled; in eval mode the identity."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class EmaRes(nn.Module):
    """A residual block with stochastic depth that keeps, while training, a moving average
    of its pre-activations in a buffer (as an EMA codebook or a custom normalisation does)."""

    def __init__(self, d: int, p: float = 0.5, no_grad: bool = False) -> None:
        super().__init__()
        self.no_grad = no_grad  # the update under torch.no_grad(), with a step counter (export only)
        self.lin = nn.Linear(d, d)
        self.drop = DropPath(p)
        self.register_buffer("ema", torch.zeros(d))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if self.training and self.no_grad:
            with torch.no_grad():
                self.ema.mul_(0.9).add_(h.mean(0), alpha=0.1)
                self.steps += 1
        elif self.training:  # one in-place op whose operand is traced: what fx can record
            self.ema.lerp_(h.detach().mean(0), 0.1)
        return x + self.drop(torch.relu(h - self.ema))


class StochasticDepthMLP(ResidualMLP):
    """A stem and ``depth`` :class:`EmaRes` blocks: what a frozen block does in training mode
    beyond dropout and batch norm."""

    def __init__(self, depth: int = 4, no_grad: bool = False) -> None:
        super().__init__(depth)
        self.blocks = nn.Sequential(*[EmaRes(16, no_grad=no_grad) for _ in range(depth)])


class TokenStack(nn.Module):
    """Token ids ``[batch, length]`` to per-token logits: an embedding, ``layers`` residual
    MLP layers, an output projection (``tie=True``: whose weight is the embedding's)."""

    def __init__(self, layers: int = 3, vocab: int = 50, d: int = 16, tie: bool = False) -> None:
        super().__init__()
        self.emb, self.out = nn.Embedding(vocab, d), nn.Linear(d, vocab)
        if tie:
            self.out.weight = self.emb.weight
        self.layers = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU()) for _ in range(layers))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        for layer in self.layers:
            h = h + layer(h)
        return self.out(h)


class SharedDropout(nn.Module):
    """One ``nn.Dropout`` applied after the stem, after every block and before the head, as
    hand-written models often reuse ``self.drop``: fx calls the same leaf from every block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.5)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.stem(x))
        for b in self.blocks:
            h = self.drop(b(h))
        return self.out(self.drop(h))

    def by_hand(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """The model with its first ``k`` blocks (stem included) in eval mode. The dropout
        after the last block is the head's (it follows the last block's output)."""
        F = torch.nn.functional
        h = F.dropout(self.stem(x), 0.5, k < 1)
        for i, b in enumerate(self.blocks):
            h = F.dropout(b(h), 0.5, k < i + 2 or i == len(self.blocks) - 1)
        return self.out(F.dropout(h, 0.5, True))
