"""Each block's regime (pretrained or trained from scratch) and the elasticity threshold it
is held to.

Egeria's rule asks a block trained from scratch whether it only diffuses (``threshold``) and a
pretrained one whether its distance from the anchor has levelled off
(``pretrained_threshold``): ``docs/egeria.md``, "Two regimes". The verdicts are read once from
the weights as compiled (:mod:`fxfreeze.pretrained`) and kept in the policy's state, so that a
resume restores them instead of judging weights that training has shaped since.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from ...pretrained import pretrained_blocks

__all__ = ["Regimes"]


class Regimes:
    """Per block of the tracked range: pretrained or not, and its threshold."""

    #: the ``egeria`` config keys the constructor takes, in order
    KEYS = ("threshold", "pretrained_threshold", "pretrained_floor_ratio")

    def __init__(self, num_blocks: int, threshold: float, pretrained_threshold: float,
                 pretrained_floor_ratio: float = 0.0) -> None:
        self.threshold = float(threshold)
        self.pretrained_threshold = float(pretrained_threshold)
        self.pretrained_floor_ratio = float(pretrained_floor_ratio)
        #: per block: are its weights pretrained?
        self.pretrained: list[bool] = [False] * int(num_blocks)

    def judge(self, blocks: Sequence[Iterable[torch.Tensor]], detect: bool = True) -> None:
        """Read each block's regime from its parameters; ``detect=False``: all from scratch."""
        self.pretrained = pretrained_blocks(blocks) if detect else [False] * len(self.pretrained)

    def threshold_of(self, j: int) -> float:
        return self.pretrained_threshold if self.pretrained[j] else self.threshold

    def label(self, j: int) -> str:
        return "pretrained" if self.pretrained[j] else "from scratch"

    def overrides(self) -> dict[int, float]:
        """The thresholds that differ from the tracker's default (``threshold``)."""
        return {j: self.pretrained_threshold for j, p in enumerate(self.pretrained) if p}

    def apply_to(self, tracker: Any) -> None:
        """Hold ``tracker``'s blocks to their regime: thresholds and floor ratios."""
        tracker.thresholds, tracker.floor_ratios = self.overrides(), self.floor_ratios()

    def floor_ratios(self) -> dict[int, float]:
        """The blocks held to a floor ratio (pretrained ones, when it is on)."""
        r = self.pretrained_floor_ratio
        return {j: r for j, p in enumerate(self.pretrained) if p} if r > 0 else {}

    def describe(self) -> str:
        """One line for the log: which blocks look pretrained, and the thresholds in use."""
        n, hi = sum(self.pretrained), len(self.pretrained)
        what = ("every block looks freshly initialised (training from scratch)" if n == 0
                else "every block looks pretrained (fine-tuning)" if n == hi
                else f"{n} of {hi} blocks look pretrained ({', '.join(str(j) for j, p in enumerate(self.pretrained) if p)})")
        return f"{what}; elasticity thresholds {', '.join(sorted({f'{self.threshold_of(j):g}' for j in range(hi)}))}"

    def state_dict(self) -> list[bool]:
        return list(self.pretrained)

    def load_state_dict(self, state: Any) -> bool:
        """Restore verdicts saved for the same number of blocks; False (nothing changed) else."""
        if not isinstance(state, list) or len(state) != len(self.pretrained):
            return False
        self.pretrained = [bool(x) for x in state]
        return True
