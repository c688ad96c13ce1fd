"""Are a block's weights pretrained or freshly initialised? Read from the weights themselves.

Freezing has two regimes. Trained from scratch, a network converges front first (Raghu et al.
2017, Egeria): a front block whose representation only diffuses under SGD noise has found its
place, and freezing it costs nothing. Fine-tuned from pretrained weights, every layer adapts
to the new task at once, by small moves, until the task's accuracy levels off: freezing the
front early stops an adaptation that later layers do not make up for (``docs/egeria.md``,
"Two regimes"). A policy therefore wants to know which regime a block is in, and the model
already says it.

A weight matrix drawn at random (any of PyTorch's initialisers: i.i.d. entries) has its
largest singular value at the edge of the Marchenko-Pastur bulk, ``sigma * (sqrt(m) + sqrt(n))``
for an ``m x n`` matrix of entries with standard deviation ``sigma``. Training puts structure
in it: a few directions carry far more than that edge (the "spikes" of heavy-tailed
self-regularisation, Martin and Mahoney 2021). The *edge ratio* ``s_max / (sigma (sqrt(m) +
sqrt(n)))`` is therefore about 1 (0.95-1.01 measured) at initialisation and well above it once
trained (all-MiniLM-L6-v2: median 1.76 over its matrices). A block is *pretrained* when the
median edge ratio of its matrices is above :data:`PRETRAINED_EDGE` (1.3).

The largest singular value comes from a few power iterations (a lower bound that converges
from below; the decision is made far from the threshold, so a few iterations are enough). A
block with no matrix large enough to judge (a LayerNorm, pooling, an embedding of a handful of
rows) takes the verdict of the model's other blocks.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

__all__ = ["edge_ratio", "block_is_pretrained", "pretrained_blocks", "PRETRAINED_EDGE"]

#: a block whose matrices' median edge ratio exceeds this is pretrained
PRETRAINED_EDGE = 1.3
#: the smaller side a matrix needs to be judged: below it the bulk edge is not sharp
_MIN_SIDE = 16


def edge_ratio(weight: torch.Tensor, iterations: int = 12, seed: int = 0) -> float | None:
    """The largest singular value of ``weight`` (reshaped to ``out x in``) over the edge of the
    random-matrix bulk for its shape and spread; None when the matrix is too small to judge
    (a side under 16) or constant.

    Args:
        weight: a parameter of 2 or more dimensions (a convolution's kernel is flattened).
        iterations: power iterations for the largest singular value.
        seed: the power iteration's start vector.

    Example::

        >>> w = torch.randn(256, 128)
        >>> 0.9 < edge_ratio(w) < 1.1                   # random: at the edge
        True
        >>> u, v = torch.randn(256, 1), torch.randn(1, 128)
        >>> edge_ratio(w + 0.5 * u @ v) > 2             # a learned direction: a spike
        True
    """
    if weight.dim() < 2:
        return None
    w = weight.detach().reshape(weight.shape[0], -1).float()
    m, n = w.shape
    if min(m, n) < _MIN_SIDE:
        return None
    sd = float(w.std())
    if not math.isfinite(sd) or sd <= 1e-6 * float(w.abs().mean()) or sd == 0:
        return None  # constant (up to rounding): no spread to compare with
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(n, 1, generator=g).to(w.device)
    s = 0.0
    for _ in range(int(iterations)):
        u = w @ v
        v = w.t() @ u
        nv = float(v.norm())
        if not math.isfinite(nv) or nv == 0:
            return None
        v = v / nv
        s = float((w @ v).norm())
    return s / (sd * (math.sqrt(m) + math.sqrt(n)))


def block_is_pretrained(weights: Iterable[torch.Tensor]) -> bool | None:
    """True when the median edge ratio of ``weights`` (a block's parameters) is above
    :data:`PRETRAINED_EDGE`, False when below, None when no matrix could be judged.

    Example::

        >>> block_is_pretrained([torch.randn(64, 64), torch.randn(64)])
        False
        >>> block_is_pretrained([torch.randn(64)]) is None
        True
    """
    ratios = sorted(r for r in (edge_ratio(w) for w in weights) if r is not None)
    if not ratios:
        return None
    return ratios[len(ratios) // 2] > PRETRAINED_EDGE


def pretrained_blocks(blocks: Sequence[Iterable[torch.Tensor]]) -> list[bool]:
    """Per block (its parameters), whether it is pretrained; a block that cannot be judged
    takes the majority verdict of those that can (none can: False, from scratch).

    Example::

        >>> torch.manual_seed(0) is not None
        True
        >>> spiky = torch.randn(64, 64) + 0.5 * torch.randn(64, 1) @ torch.randn(1, 64)
        >>> pretrained_blocks([[spiky], [torch.randn(8)], [spiky.t().contiguous()]])
        [True, True, True]
    """
    verdicts = [block_is_pretrained(list(ws)) for ws in blocks]
    known = [v for v in verdicts if v is not None]
    default = bool(known) and sum(known) * 2 > len(known)
    return [default if v is None else v for v in verdicts]
