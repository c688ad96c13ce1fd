"""Fingerprints of each sample's input to the frozen prefix, so that the activation cache
serves a sample's stored frontier only for the input it was computed from.

The cache keys entries by sample id and assumes a sample's input is the same every epoch.
The most common way that fails is a training set with random augmentation (a random crop
or flip in the dataset's transform) that the config did not declare: the cache then served
the activations of the first epoch's crop for every later epoch, silently, and inputs whose
shape changes from epoch to epoch (multi-scale training) made its read raise a shape error
out of the forward. A fingerprint per sample catches both at the first read:

- per input tensor with one row per sample, the row's shape (kept on the host, compared
  without touching the device) and two numbers in float64: the row's dot product with a
  fixed pseudo-random vector ``w`` and its Euclidean norm. A crop, a flip, a colour jitter
  of a thousandth or a different token all move the dot product far beyond the rounding of
  float64, which the comparison allows for (``RTOL * |x| * |w|``: the same row in batches of
  other sizes is summed in another order);
- kept in one table per graph input (by placeholder name, so that a deeper prefix reading
  more inputs compares the ones it shares), indexed by sample id;
- compared on the host at once on the CPU; on an accelerator the verdict is copied back
  without blocking and read at a later call (one batch may be served stale before caching
  turns off), so a cached step adds no synchronisation.

Costs one read of the inputs in float64 per batch (in chunks), small beside the prefix's
forward pass it stands next to.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

__all__ = ["InputPrints", "Prints"]

#: relative tolerance of the comparison: float64 rounding of a dot product of length d is
#: about sqrt(d) * 1e-16 of ``|x| * |w|`` (at most d * 1e-16), far below it for any input size
RTOL = 1e-11
#: elements converted to float64 at a time
_CHUNK = 1 << 22
#: sample ids beyond this are not fingerprinted (a table indexed by id would be too large)
MAX_ID = 1 << 26


class Prints:
    """One batch's fingerprints: per input name its row shape and a (rows, 2) float64 tensor."""

    def __init__(self) -> None:
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.values: dict[str, torch.Tensor] = {}

    def __bool__(self) -> bool:
        return bool(self.values)

    def take(self, rows: list[int]) -> "Prints":
        """The fingerprints of these rows of the batch."""
        p = Prints()
        p.shapes = self.shapes
        idx = torch.tensor(rows)
        p.values = {name: v[idx.to(v.device)] for name, v in self.values.items()}
        return p


class InputPrints:
    """Per-sample fingerprints of the prefix's inputs, by graph input name and sample id."""

    def __init__(self) -> None:
        self._weights: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._values: dict[str, torch.Tensor] = {}  # name -> (capacity, 2) float64, on the inputs' device
        self._known: dict[str, torch.Tensor] = {}  # name -> (capacity,) bool, host
        self._shapes: dict[str, list[tuple[int, ...] | None]] = {}  # name -> shape per id, host
        self._pending: list[tuple[Any, torch.Tensor]] = []  # (event, pinned verdict) on accelerators

    def of(self, inputs: Sequence[Any], names: Sequence[str], n: int) -> Prints:
        """The fingerprints of a batch of ``n`` samples (inputs without one row per sample,
        and complex ones, are left out)."""
        p = Prints()
        for name, t in zip(names, inputs):
            if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != n or t.is_complex():
                continue
            flat = t.detach().reshape(n, -1)
            d = flat.shape[1]
            w = self._weight(d, t.device)
            step = max(1, _CHUNK // max(d, 1))
            parts = []
            for s in range(0, n, step):
                c = flat[s:s + step].to(torch.float64)
                parts.append(torch.stack([c @ w, torch.linalg.vector_norm(c, dim=1)], 1))
            p.values[name] = torch.cat(parts) if len(parts) > 1 else parts[0]
            p.shapes[name] = tuple(t.shape[1:])
        return p

    def record(self, ids: list[int], p: Prints) -> None:
        """Keep the fingerprints of these samples (their entries were just stored)."""
        if not p or not ids or max(ids) >= MAX_ID or min(ids) < 0:
            return
        idx = torch.tensor(ids)
        for name, v in p.values.items():
            self._grow(name, max(ids) + 1, v.device)
            self._values[name][idx.to(v.device, non_blocking=True)] = v
            self._known[name][idx] = True
            shapes = self._shapes[name]
            for i in ids:
                shapes[i] = p.shapes[name]

    def differ(self, ids: list[int], p: Prints, *, strict: bool) -> str | None:
        """How these samples' inputs differ from those recorded with their entries, or None.

        ``strict``: an input with no fingerprint for a sample counts as a difference (for
        entries stored under the same prefix, which read the same inputs); otherwise that
        input is not compared (a shallower prefix's entries, which did not read it).
        On an accelerator a difference in values is reported by :meth:`poll` at a later call."""
        if not p or not ids or max(ids) >= MAX_ID or min(ids) < 0:
            return None
        idx = torch.tensor(ids)
        flags = []
        for name, v in p.values.items():
            known = self._known.get(name)
            if known is None or known.numel() <= max(ids) or not bool(known[idx].all()):
                if strict:
                    return f"input {name!r} of sample {ids[0]} was not recorded with its entry"
                continue
            shapes = self._shapes[name]
            for i in ids:
                if shapes[i] != p.shapes[name]:
                    return f"input {name!r} of sample {i} has shape {list(p.shapes[name])}, cached from {list(shapes[i] or ())}"
            if self._values[name].device != v.device:
                self._values[name] = self._values[name].to(v.device)
            old = self._values[name][idx.to(v.device, non_blocking=True)]
            tol = RTOL * (old[:, 1] + v[:, 1]) * math.sqrt(math.prod(p.shapes[name]))  # |w| is about sqrt(d)
            flags.append(((old[:, 0] - v[:, 0]).abs() > tol) | ((old[:, 1] - v[:, 1]).abs() > tol))
        if not flags:
            return None
        flag = torch.cat(flags).any()
        if flag.device.type == "cuda":
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((event, host))
            return None
        return "values of their inputs changed" if bool(flag) else None

    def poll(self) -> str | None:
        """A difference found by an earlier call's comparison on an accelerator, if any has come back."""
        found = None
        keep = []
        for event, host in self._pending:
            if not event.query():
                keep.append((event, host))
            elif bool(host):
                found = "values of their inputs changed"
        self._pending = keep
        return found

    def clear(self) -> None:
        self._values, self._known, self._shapes, self._pending = {}, {}, {}, []

    def _weight(self, d: int, device: torch.device) -> torch.Tensor:
        w = self._weights.get((d, device))
        if w is None:
            g = torch.Generator().manual_seed(d)
            w = torch.randn(d, generator=g, dtype=torch.float64).to(device)
            self._weights[(d, device)] = w
        return w

    def _grow(self, name: str, size: int, device: torch.device) -> None:
        known = self._known.get(name)
        have = 0 if known is None else known.numel()
        if size <= have and self._values[name].device == device:
            return
        cap = max(size, 2 * have, 1024)
        values = torch.zeros(cap, 2, dtype=torch.float64, device=device)
        k = torch.zeros(cap, dtype=torch.bool)
        if known is not None:
            values[:have] = self._values[name].to(device)
            k[:have] = known
        self._values[name], self._known[name] = values, k
        self._shapes[name] = self._shapes.get(name, []) + [None] * (cap - have)
