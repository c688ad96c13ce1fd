"""Reading the training loss to the host without stalling an accelerator's stream.

The controller gives every step's loss to the safety net and the policies (a non-finite loss
clears a policy's evidence). ``float(loss)`` on a CUDA tensor waits for the whole step to
finish: one host synchronisation per step, which takes away the overlap of the host's next
launches with the device's work. :class:`LossReader` reads a loss without it:

- a loss on the CPU (or a plain number) is read at once, as before;
- a loss on CUDA is copied to pinned host memory with ``non_blocking=True`` behind a CUDA
  event, and read on a later step, once the event reports the copy done (``query()`` never
  blocks);
- on any other device, losses are kept on the device and read together every ``every``
  steps: one synchronisation per ``every`` steps instead of one per step.

A loss therefore reaches the safety net a few steps late on an accelerator, in order and with
the step it belongs to. :meth:`LossReader.flush` reads everything still pending (a
checkpoint, the end of training).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

import torch

__all__ = ["LossReader"]


class LossReader:
    """Turns each step's loss into ``(step, value)`` pairs for the host, in step order.

    Example::

        >>> r = LossReader()
        >>> r.push(1, torch.tensor(0.5)), r.push(2, None), r.push(3, 0.25)
        ([(1, 0.5)], [], [(3, 0.25)])
    """

    def __init__(self, every: int = 16, immediate: Callable[[torch.Tensor], bool] | None = None) -> None:
        """``every``: steps between reads of losses on a device without events; ``immediate``:
        which tensors are read at once (default: those on the CPU); tests pass
        ``lambda t: False`` to exercise the batched path on the CPU."""
        if int(every) < 1:
            raise ValueError(f"LossReader needs every >= 1, got {every!r}")
        self.every = int(every)
        self._immediate = immediate or (lambda t: t.device.type == "cpu")
        self._events: deque[tuple[int, torch.Tensor, Any]] = deque()  # (step, host copy, cuda event)
        self._batch: list[tuple[int, torch.Tensor]] = []

    @property
    def pending(self) -> int:
        """Losses pushed but not yet read."""
        return len(self._events) + len(self._batch)

    def push(self, step: int, loss: float | torch.Tensor | None) -> list[tuple[int, float]]:
        """Hand over step ``step``'s loss (None: none observed); returns the pairs that are
        readable now, oldest first."""
        out: list[tuple[int, float]] = []
        if loss is not None and not isinstance(loss, torch.Tensor):
            out.append((int(step), float(loss)))
        elif isinstance(loss, torch.Tensor):
            t = loss.detach()
            if t.numel() != 1:
                t = t.float().mean()
            if self._immediate(t):
                out.append((int(step), float(t)))
            elif t.device.type == "cuda":
                host = torch.empty((), dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(torch.cuda.current_stream(t.device))
                self._events.append((int(step), host, ev))
            else:
                self._batch.append((int(step), t.reshape(())))
        out.extend(self._ready(force=False))
        out.sort(key=lambda sv: sv[0])
        return out

    def flush(self) -> list[tuple[int, float]]:
        """Read every pending loss now (synchronises once if any is on a device)."""
        return sorted(self._ready(force=True), key=lambda sv: sv[0])

    def _ready(self, force: bool) -> list[tuple[int, float]]:
        out: list[tuple[int, float]] = []
        while self._events and (force or self._events[0][2].query()):
            step, host, ev = self._events.popleft()
            if force:
                ev.synchronize()
            out.append((step, float(host)))
        if self._batch and (force or len(self._batch) >= self.every):
            steps = [s for s, _ in self._batch]
            values = torch.stack([t.float() for _, t in self._batch]).tolist()  # one synchronisation
            self._batch = []
            out.extend(zip(steps, values))
        return out

