"""Every rank applies rank 0's freezing decisions: the :class:`Agreement` a controller routes
its decisions through under data parallelism (:class:`fxfreeze.distributed.FreezeDDP`, the
Trainer and Lightning callbacks under the trainers' DDP, a plain DDP around the compiled
module: :mod:`fxfreeze.runtime.ddp_watch`). Each rank's policy measures its own batches, so
without it the ranks would freeze apart and diverge. Re-exported by :mod:`fxfreeze.distributed`.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..errors import DistributedError

__all__ = ["Agreement", "agree_on_rank_0"]


def agree_on_rank_0(fm: Any, process_group: Any = None, agree_lag: int | None = None) -> "Agreement":
    """Make every rank apply rank 0's freezing decisions (an :class:`Agreement` set on the
    compiled module's controller), ``agree_lag`` steps after it made them (None: 2 when the
    process group broadcasts CUDA tensors, as NCCL does, else 0). Used by :class:`FreezeDDP`
    and by the Trainer and Lightning callbacks under the trainers' own DDP.

    Example::

        >>> # init_process_group("gloo", ...); fm = fxfreeze.compile(model, x, optimizer=opt)
        >>> # agree_on_rank_0(fm)   # every rank now freezes when rank 0 decides to
    """
    device = _collective_device(process_group)
    if agree_lag is None:
        agree_lag = 2 if device.type == "cuda" else 0
    if isinstance(agree_lag, bool) or not isinstance(agree_lag, int) or agree_lag < 0:
        raise DistributedError(f"agree_lag must be a non-negative int (steps), got {agree_lag!r}")
    agreement = Agreement(process_group, device, agree_lag, lambda: fm.num_frozen)
    fm.freezer.set_agreement(agreement)
    return agreement


def _collective_device(group: Any) -> torch.device:
    """Where the process group's collectives want their tensors: CUDA for NCCL (without a CPU
    backend beside it), the CPU otherwise."""
    backend = str(dist.get_backend(group))
    if "nccl" in backend and "cpu:" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _failed(e: Exception) -> DistributedError:
    return DistributedError(
        f"rank {dist.get_rank()}: agreeing on the frozen prefix failed ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}); another rank has probably crashed or left"
    )


class Agreement:
    """Rank 0's prefix decisions, broadcast to every rank and applied ``lag`` steps later.

    The controller calls it after every optimizer step with the prefix its policy proposes;
    it returns the prefix to apply now, or None for no change. A proposal equal to the
    current prefix travels as "no change" (-1), so that a decision still in flight is not
    undone by the proposals that follow it. With ``lag`` 0 the broadcast is read at once."""

    NO_CHANGE = -1

    def __init__(self, group: Any, device: torch.device, lag: int, current: Callable[[], int]) -> None:
        self.group, self.device, self.lag, self.current = group, device, int(lag), current
        self._pending: deque[Callable[[], int]] = deque()

    def __call__(self, proposed: int) -> int | None:
        value = int(proposed) if int(proposed) != self.current() else self.NO_CHANGE
        self._pending.append(self._launch(value))
        agreed = None
        while len(self._pending) > self.lag:
            v = self._pending.popleft()()
            if v != self.NO_CHANGE:
                agreed = v
        return agreed

    def _launch(self, value: int) -> Callable[[], int]:
        """Start the broadcast of ``value`` from rank 0; the function returned reads its result
        (then waiting, if it must, for that broadcast only)."""
        t = torch.full((1,), value, dtype=torch.int64, device=self.device)  # a fill: no copy from the host
        try:
            work = dist.broadcast(t, src=0, group=self.group, async_op=True)
        except (RuntimeError, ValueError) as e:
            raise _failed(e) from e
        if self.device.type != "cuda":
            def read() -> int:
                try:
                    work.wait()
                except (RuntimeError, ValueError) as e:
                    raise _failed(e) from e
                return int(t[0])
            return read
        work.wait()  # NCCL: the current stream waits for the broadcast, the host does not
        host = torch.empty(1, dtype=torch.int64, pin_memory=True)
        host.copy_(t, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()

        def read_cuda() -> int:
            ev.synchronize()  # `lag` steps later: long done
            return int(host[0])
        return read_cuda

    def state_dict(self) -> dict[str, Any]:
        """The decisions still in flight, read (a checkpoint may wait for them)."""
        values = [read() for read in self._pending]
        self._pending = deque(_constant(v) for v in values)
        return {"pending": values, "lag": self.lag}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pending = state.get("pending", []) if isinstance(state, dict) else []
        if not isinstance(pending, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in pending):
            raise DistributedError(f"the agreement state's 'pending' must be a list of ints, got {pending!r}")
        self._pending = deque(_constant(v) for v in pending)


def _constant(v: int) -> Callable[[], int]:
    return lambda: v
