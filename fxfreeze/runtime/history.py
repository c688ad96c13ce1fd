"""Weight histories for SmartFRZ: a fixed random sample of each block's parameters over time.

SmartFRZ (Li et al., ICLR 2023) judges whether a block has converged from how its weights
have moved. Recording every weight would cost memory proportional to the model; instead each
block gets ``sample_size`` fixed positions in the concatenation of its parameters, drawn
once from a generator seeded by ``seed`` and the block's name (so the same block samples the
same positions in every run and after a resume, whatever its size; a block with fewer
values than ``sample_size`` samples with replacement). A snapshot copies those values; the
last ``window`` snapshots live in a ring buffer per block. Memory is
``blocks x window x sample_size`` floats (30 x 1024 x 4 B = 120 KiB per block) and a
snapshot is one gather per parameter.

The ring buffer lives on the device of the block's parameters, and so do the sampled
positions: recording a snapshot is a gather and a copy on that device, with no copy to the
host and no synchronisation, so that on a GPU the training stream never waits for it. The
history comes to the CPU only when it is read (:meth:`WeightHistory.history`, at a
freezing stage, or a checkpoint).
"""

from __future__ import annotations

import zlib
from typing import Iterable, Mapping, Sequence

import torch

from ..errors import FreezeError

__all__ = ["WeightHistory", "sample_positions"]


def sample_positions(sizes: Sequence[int], sample_size: int, seed: int, key: str) -> list[torch.Tensor]:
    """For parameters of ``sizes`` values, ``sample_size`` positions split per parameter
    (a list of index tensors, one per parameter, in parameter order)."""
    total = int(sum(sizes))
    if total <= 0:
        return [torch.empty(0, dtype=torch.long) for _ in sizes]
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(key.encode("utf-8"))) % (2**63))
    if total >= sample_size:
        flat = torch.randperm(total, generator=g)[:sample_size]
    else:
        flat = torch.randint(total, (sample_size,), generator=g)
    flat, _ = torch.sort(flat)
    out, lo = [], 0
    for n in sizes:
        sel = flat[(flat >= lo) & (flat < lo + n)] - lo
        out.append(sel)
        lo += n
    return out


class WeightHistory:
    """Ring buffers of sampled weights, one per block, keyed by block name."""

    def __init__(self, blocks: Mapping[str, Sequence[torch.nn.Parameter]], sample_size: int = 1024,
                 window: int = 30, seed: int = 0) -> None:
        if sample_size < 1 or window < 2:
            raise FreezeError(f"weight history needs sample_size >= 1 and window >= 2, got {sample_size}, {window}")
        self.sample_size = int(sample_size)
        self.window = int(window)
        self.seed = int(seed)
        self._params = {name: list(ps) for name, ps in blocks.items()}
        # positions and buffers go to the parameters' device (snapshot(): once, and again
        # if the model moves), so that a record never leaves it
        self._positions = {
            name: sample_positions([p.numel() for p in ps], self.sample_size, self.seed, name)
            for name, ps in self._params.items()
        }
        self._buffer = {name: torch.zeros(self.window, self.sample_size, device=_device(ps))
                        for name, ps in self._params.items()}
        self._count = {name: 0 for name in self._params}

    @property
    def names(self) -> list[str]:
        return list(self._params)

    def count(self, name: str) -> int:
        """Snapshots recorded for block ``name`` (may exceed the window)."""
        return self._count[name]

    @torch.no_grad()
    def snapshot(self, name: str) -> torch.Tensor:
        """The sampled values of block ``name`` now (float32, on the block's device)."""
        ps, pos = self._params[name], self._positions[name]
        dev = _device(ps)
        if self._buffer[name].device != dev:  # the model moved: the history follows it (once)
            self._buffer[name] = self._buffer[name].to(dev)
        for i, (p, idx) in enumerate(zip(ps, pos)):
            if idx.device != p.device:
                pos[i] = idx.to(p.device)
        parts = [p.detach().reshape(-1).index_select(0, idx).float().to(dev, non_blocking=True)
                 for p, idx in zip(ps, pos) if idx.numel()]
        if not parts:
            return torch.zeros(self.sample_size, device=dev)
        return torch.cat(parts)

    def record(self, names: Iterable[str] | None = None) -> None:
        """Append a snapshot for ``names`` (default: every block)."""
        for name in self.names if names is None else names:
            c = self._count[name]
            self._buffer[name][c % self.window] = self.snapshot(name)
            self._count[name] = c + 1

    def history(self, name: str) -> torch.Tensor:
        """The recorded snapshots of block ``name``, oldest first: ``[min(count, window),
        sample_size]``, on the CPU (the one host copy: a read, not a record)."""
        c = self._count[name]
        buf = self._buffer[name]
        if c <= self.window:
            return buf[:c].to("cpu", copy=True)
        start = c % self.window
        return torch.cat([buf[start:], buf[:start]]).cpu()

    def clear(self, names: Iterable[str] | None = None) -> None:
        for name in self.names if names is None else names:
            self._buffer[name].zero_()
            self._count[name] = 0

    # -- resume -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, object]:
        """Histories by block name, oldest first (plain tensors and ints: loads with
        ``torch.load(..., weights_only=True)``)."""
        return {
            "sample_size": self.sample_size,
            "window": self.window,
            "seed": self.seed,
            "history": {n: self.history(n) for n in self.names},
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        if not isinstance(state, Mapping):
            raise FreezeError("weight-history state must be a dict")
        for key in ("sample_size", "window", "seed"):
            if key in state and int(state[key]) != getattr(self, key):  # type: ignore[call-overload]
                raise FreezeError(
                    f"weight-history state has {key}={state[key]}, this run uses {getattr(self, key)}; "
                    f"resume with the same smartfrz settings and predictor weights"
                )
        hist = state.get("history", {})
        if not isinstance(hist, Mapping):
            raise FreezeError("weight-history state: 'history' must be a dict keyed by block name")
        for name, h in hist.items():
            if name not in self._params:
                raise FreezeError(f"weight-history state names block {name!r}, which this model's plan does not have")
            if not isinstance(h, torch.Tensor) or h.dim() != 2 or h.shape[1] != self.sample_size or h.shape[0] > self.window:
                raise FreezeError(f"weight-history state for block {name!r} has the wrong shape")
            self._buffer[name].zero_()
            self._buffer[name][: h.shape[0]] = h.to(self._buffer[name].device)
            # re-based so that history() returns h in order (the ring restarts at position 0)
            self._count[name] = h.shape[0]


def _device(params: Sequence[torch.nn.Parameter]) -> torch.device:
    """Where a block's history lives: its first parameter's device (the CPU for a block
    without parameters)."""
    return params[0].device if params else torch.device("cpu")
