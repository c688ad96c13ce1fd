"""The label rule: when is a block "freezable" in a recorded training run?

For block ``b`` at snapshot ``t``, ``cka[t, b]`` is the linear CKA between the block's
activations on a fixed probe batch at ``t`` and at the end of the run. The block is
freezable at ``t`` when, over the last ``window`` snapshots up to ``t``:

- every CKA is at least ``level`` (its representation is already close to the final one),
- their standard deviation is at most ``max_std`` (and has stopped moving), and
- every earlier block is freezable at ``t`` too (fxfreeze freezes prefixes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = ["LabelRule"]


@dataclass(frozen=True)
class LabelRule:
    level: float = 0.98
    window: int = 5
    max_std: float = 0.005

    def __post_init__(self) -> None:
        if not 0 < self.level <= 1 or self.window < 1 or self.max_std < 0:
            raise ValueError(f"invalid label rule {self}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def labels(self, cka: torch.Tensor) -> torch.Tensor:
        """``cka [T, B]`` (snapshots x blocks, in block order) -> freezable ``[T, B]`` (bool)."""
        t, b = cka.shape
        out = torch.zeros(t, b, dtype=torch.bool)
        w = self.window
        for i in range(w - 1, t):
            win = cka[i - w + 1 : i + 1].double()
            ok = (win.min(0).values >= self.level) & (win.std(0, unbiased=False) <= self.max_std)
            out[i] = torch.cummin(ok.int(), 0).values.bool()  # and every earlier block
        return out
