"""Plasticity: how far a block's function has moved, and when it has stopped moving.

Egeria (Wang et al., EuroSys 2023) measures a block's training progress by comparing its
activations with those of a reference copy of the model, using the similarity-preserving
(SP) distillation loss of Tung and Mori (ICCV 2019). In fxfreeze the reference of a block is
an *anchor*: a low-precision snapshot of the block taken at one evaluation and kept for
``refresh_every`` evaluations. At each evaluation the anchor runs on the block's *training*
inputs ("teacher forcing": each block is judged on its own change, not on drift inherited
from the blocks before it), and the SP loss against the training outputs is the block's
plasticity: the distance its function has travelled since the anchor.

While a block learns, that distance keeps growing; once it has converged it levels off (SGD
noise around the optimum plus the reference's quantization error, both bounded). The
decision statistic :func:`flat_trend` fits a line through the last ``window`` values against
the optimizer step and turns its slope into an *elasticity*, ``d log p / d log age`` (age:
steps since the anchor): positive (about 1 to 2: the SP loss is quadratic in a small change)
for a block still moving away from its anchor, however long ago the anchor was taken, about
0 once the distance has levelled off, and negative when it shrinks (a converged block
fluctuating back towards where it was). A window passes when the elasticity is under
``threshold`` (one-sided: only moving *away* counts as learning) and the slope's two
standard errors, as a change across the window relative to its mean, are under
``noise_limit``: a series too noisy to tell does not pass. The value measured at the anchor's own evaluation (same weights: the reference's
quantization error alone) is the block's *floor*; the trend is taken on the excess over it,
and an excess within the noise of zero counts as settled (nothing the reference resolves).
(Per-interval drift, the increments of this series, was tried first and measured too noisy
to decide on: docs/egeria.md.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

__all__ = ["sp_loss", "block_sp_loss", "flat_trend", "Trend", "PlasticityTracker"]


#: at most this many of a packed sequence's positions are compared: a Gram matrix over a
#: 4,096-token row would cost the reference worker T² times the width per block
MAX_POSITIONS = 256


def sp_loss(a: torch.Tensor, b: torch.Tensor) -> float:
    """Similarity-preserving loss between two activations of the same ``b`` samples.

    Each is flattened to ``(b, d)``; ``G = A Aᵀ`` with each row L2-normalised; the loss is
    ``‖G_a − G_b‖²_F / b²``. It is 0 for identical activations and unchanged when either
    activation is multiplied by a positive constant (the row normalisation removes it). A
    single sample of a sequence, ``(1, t, ...)`` (a probe of packed sequences:
    :attr:`ActivationProbe.positions`), compares its ``t`` positions instead (at most
    :data:`MAX_POSITIONS` of them, evenly spaced).

    Example::

        >>> a = torch.randn(8, 16)
        >>> sp_loss(a, a), abs(sp_loss(a, 3 * a)) < 1e-12, sp_loss(a, torch.randn(8, 16)) > 0
        (0.0, True, True)
        >>> b = torch.randn(8, 16)
        >>> sp_loss(a[None], b[None]) == sp_loss(a, b)  # one sequence of 8 positions
        True
    """
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"sp_loss needs the same number of samples, got {a.shape[0]} and {b.shape[0]}")
    ga = _gram(a)
    gb = _gram(b)
    n = ga.shape[0]
    return float(((ga - gb) ** 2).sum() / (n * n))


def block_sp_loss(train: list[Any], ref: Any) -> float:
    """Mean SP loss over a block's floating-point outputs that have a batch dimension.

    A block may return several values (a tensor and a mask, a tuple of states): only the
    floating-point tensors with a batch dimension carry the activations the reference is
    compared on; a quantized reference output is dequantized first. ``nan`` when no output
    qualifies, so that the caller can tell "nothing to compare" from "identical".

    Args:
        train: the block's outputs in the training model.
        ref: the same block's outputs in the reference, in the same order.

    Example::

        >>> a = torch.randn(8, 4)
        >>> block_sp_loss([a, torch.ones(8, dtype=torch.long)], [a, torch.ones(8, dtype=torch.long)])
        0.0
        >>> import math; math.isnan(block_sp_loss([torch.ones(3, dtype=torch.long)], [None]))
        True
    """
    losses = []
    for a, b in zip(train, ref):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.is_floating_point() and a.dim() > 0:
            if b.is_quantized:
                b = b.dequantize()
            losses.append(sp_loss(a.float(), b.float()))
    return sum(losses) / len(losses) if losses else float("nan")


def _gram(x: torch.Tensor) -> torch.Tensor:
    # float32, not float64: on real activations (ResNet-20 blocks, 32 samples) the SP loss
    # moves by 1e-5 to 6e-5 of itself, far below the noise of a window, and the Gram
    # matrices, about a quarter of a reference job's CPU time in float64, take a third of that
    if x.shape[0] == 1 and x.dim() >= 3:  # one (packed) sequence: its positions are the rows
        x = x[0]
        if x.shape[0] > MAX_POSITIONS:  # evenly spaced, the same ones at every evaluation
            x = x[torch.linspace(0, x.shape[0] - 1, MAX_POSITIONS).round().long()]
    x = x.detach().reshape(x.shape[0], -1).float()
    g = x @ x.t()
    return torch.nn.functional.normalize(g, p=2, dim=1)


@dataclass(frozen=True)
class Trend:
    """The fitted trend of a window.

    ``elasticity`` is ``d log p / d log age`` at the window's centre, ``age`` the steps since
    the anchor: about 1 while the distance from the anchor grows linearly (the block moves
    at a steady pace), about 0 once it has levelled off. ``noise`` is two standard errors of
    the slope, expressed as a change across the window relative to its mean."""

    elasticity: float
    noise: float
    mean: float
    #: False: the window's excess over the anchor's floor is not distinguishable from zero
    #: (no motion the reference can resolve), which counts as flat
    resolved: bool = True
    #: True: the block moved less than ``floor_ratio`` times the reference's own
    #: quantization error (the floor) over the whole window, which counts as flat
    small: bool = False

    def flat(self, threshold: float, noise_limit: float) -> bool:
        if not self.resolved or self.small:
            return True
        # one-sided: the question is whether the block is still moving *away* from its
        # anchor. A distance that shrinks (negative elasticity) is a block fluctuating around
        # where it was, which is what a converged block under SGD noise does
        return self.elasticity < threshold and self.noise < noise_limit


def flat_trend(
    values: Sequence[float],
    threshold: float,
    xs: Sequence[float] | None = None,
    origin: float | None = None,
    noise_limit: float = 1.0,
    floor: float | None = None,
    floor_ratio: float = 0.0,
) -> tuple[bool, Trend | None]:
    """Has the series levelled off? ``values`` is the window (oldest first), ``xs`` the
    steps it was measured at (default 0, 1, ...) and ``origin`` the anchor's step (default:
    one spacing before the window). Needs 3 or more finite values.

    ``floor``: the plasticity measured at the anchor itself (age 0: the same weights, so only
    the reference's quantization error). The trend is then taken on the *excess* over it,
    the block's own motion, which a large floor would otherwise flatten out; and a window
    whose excess and slope are both within two standard errors of zero passes as settled
    (``Trend.resolved`` False): no motion the reference can resolve.

    ``floor_ratio`` (with ``floor``; 0: off): a window whose excess stays under this multiple
    of the floor at every value passes as settled whatever its trend (``Trend.small``): the
    block's function has moved less since the anchor than an int8 copy of it differs from it.
    Egeria offers it for pretrained blocks (``egeria.pretrained_floor_ratio``, off by
    default), whose front layers move that little in fine-tuning while their distance still
    grows with the learning rate; small as they are, those moves were measured to matter for
    accuracy when frozen early (docs/egeria.md, "Moved less than the reference's error").

    Example::

        >>> flat_trend([1.0, 2.0, 3.0, 4.0], threshold=0.5)[0]  # still moving away: not flat
        False
        >>> ok, t = flat_trend([4.0, 4.01, 3.99, 4.0], threshold=0.5, xs=[100, 110, 120, 130], origin=0)
        >>> ok, abs(t.elasticity) < 0.5
        (True, True)
    """
    v = [float(x) for x in values]
    n = len(v)
    if n < 3 or not all(math.isfinite(x) for x in v):
        return False, None
    if floor is not None:
        v = [x - float(floor) for x in v]
    mean = sum(v) / n
    xs = [float(x) for x in xs] if xs is not None else [float(i) for i in range(n)]
    if len(xs) != n:
        raise ValueError("flat_trend needs one x per value")
    xm = sum(xs) / n
    sxx = sum((x - xm) ** 2 for x in xs)
    if sxx <= 0:
        return False, None
    if origin is None:
        origin = xs[0] - (xs[-1] - xs[0]) / (n - 1)
    slope = sum((x - xm) * (y - mean) for x, y in zip(xs, v)) / sxx
    resid = [y - (mean + slope * (x - xm)) for x, y in zip(xs, v)]
    rss = sum(r * r for r in resid) / (n - 2)
    se = math.sqrt(rss / sxx)
    if floor is not None and mean <= 2.0 * math.sqrt(rss / n) and slope <= 2.0 * se:
        t = Trend(elasticity=0.0, noise=0.0, mean=mean, resolved=False)
        return True, t
    small = floor is not None and floor > 0 and floor_ratio > 0 and max(v) <= floor_ratio * float(floor)
    if mean <= 0:
        return (True, Trend(elasticity=0.0, noise=0.0, mean=mean, small=True)) if small else (False, None)
    age = max(xm - float(origin), 1e-12)
    t = Trend(elasticity=slope * age / mean, noise=2.0 * se * (xs[-1] - xs[0]) / mean, mean=mean, small=small)
    return t.flat(threshold, noise_limit), t


@dataclass
class PlasticityTracker:
    """Per-block plasticity series and the count of consecutive flat evaluations."""

    window: int
    threshold: float
    noise_limit: float = 1.0
    series: dict[int, list[float]] = field(default_factory=dict)
    origin: dict[int, float] = field(default_factory=dict)
    steps: dict[int, list[float]] = field(default_factory=dict)
    first: dict[int, float] = field(default_factory=dict)
    #: block -> its plasticity at its anchor's own evaluation (the reference's floor)
    floor: dict[int, float] = field(default_factory=dict)
    flat_count: dict[int, int] = field(default_factory=dict)
    last_trend: dict[int, Trend | None] = field(default_factory=dict)
    #: block -> its own threshold (a pretrained block's), instead of ``threshold``
    thresholds: dict[int, float] = field(default_factory=dict)
    #: block -> its ``floor_ratio`` (:func:`flat_trend`; a pretrained block's); absent: off
    floor_ratios: dict[int, float] = field(default_factory=dict)

    def threshold_of(self, block: int) -> float:
        return self.thresholds.get(block, self.threshold)

    def add(self, block: int, value: float, step: float | None = None, origin: float | None = None) -> None:
        """Record one plasticity value measured at ``step`` against an anchor taken at step
        ``origin``; a non-finite value resets the block's evidence."""
        if not math.isfinite(value) or value < 0:
            self.reset([block])
            return
        if step is not None and origin is not None and float(step) == float(origin):
            # measured at the anchor itself: the floor the block's motion is judged above
            self.reset([block])
            self.floor[block] = value
            self.origin[block] = float(origin)
            if value > 0:
                self.first[block] = value
            self.last_trend[block] = None
            return
        s = self.series.setdefault(block, [])
        xs = self.steps.setdefault(block, [])
        s.append(value)
        xs.append(float(step) if step is not None else float(xs[-1] + 1 if xs else 0))
        if len(s) > self.window:
            del s[: len(s) - self.window]
            del xs[: len(xs) - self.window]
        if block not in self.first and value > 0:
            self.first[block] = value
        if origin is not None:
            self.origin[block] = float(origin)
        ok, trend = (
            flat_trend(s, self.threshold_of(block), xs, self.origin.get(block), self.noise_limit, self.floor.get(block),
                       self.floor_ratios.get(block, 0.0))
            if len(s) == self.window
            else (False, None)
        )
        self.last_trend[block] = trend
        self.flat_count[block] = self.flat_count.get(block, 0) + 1 if ok else 0

    def describe(self, block: int) -> str:
        """The block's latest trend in words, for a decision's reason."""
        t = self.last_trend.get(block)
        if t is None:
            return "flat"
        if not t.resolved:
            return "no motion above the reference's floor"
        if t.small:
            return f"moved less than {self.floor_ratios.get(block, 0.0):g}x the reference's own error since the anchor"
        return f"elasticity {t.elasticity:+.3f} < {self.threshold_of(block):g}, noise {t.noise:.3f}"

    def normalized(self, block: int) -> float | None:
        """The latest value relative to the block's first (1.0 = as plastic as at start)."""
        s = self.series.get(block)
        f = self.first.get(block)
        if not s or not f:
            return None
        return s[-1] / f

    def reset(self, blocks: Sequence[int] | None = None) -> None:
        """Forget the evidence (after an unfreeze or a learning-rate step)."""
        keys = list(self.series) if blocks is None else list(blocks)
        for b in keys:
            self.series.pop(b, None)
            self.steps.pop(b, None)
            self.origin.pop(b, None)
            self.flat_count.pop(b, None)
            self.last_trend.pop(b, None)
            self.first.pop(b, None)
            self.floor.pop(b, None)

    def state_dict(self) -> dict[str, Any]:
        return {
            "series": {int(k): list(v) for k, v in self.series.items()},
            "steps": {int(k): list(v) for k, v in self.steps.items()},
            "origin": {int(k): float(v) for k, v in self.origin.items()},
            "first": {int(k): float(v) for k, v in self.first.items()},
            "floor": {int(k): float(v) for k, v in self.floor.items()},
            "flat_count": {int(k): int(v) for k, v in self.flat_count.items()},
            "last_trend": {
                int(k): None if t is None else [t.elasticity, t.noise, t.mean, t.resolved, t.small]
                for k, t in self.last_trend.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.series = {int(k): [float(x) for x in v] for k, v in state.get("series", {}).items()}
        self.steps = {int(k): [float(x) for x in v] for k, v in state.get("steps", {}).items()}
        self.origin = {int(k): float(v) for k, v in state.get("origin", {}).items()}
        self.first = {int(k): float(v) for k, v in state.get("first", {}).items()}
        self.floor = {int(k): float(v) for k, v in state.get("floor", {}).items()}
        self.flat_count = {int(k): int(v) for k, v in state.get("flat_count", {}).items()}
        self.last_trend = {
            int(k): None if t is None else Trend(float(t[0]), float(t[1]), float(t[2]), bool(t[3]), len(t) > 4 and bool(t[4]))
            for k, t in state.get("last_trend", {}).items()
        }
