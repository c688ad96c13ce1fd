"""A compiled module called inside a plain ``DistributedDataParallel``.

``FreezeDDP`` (:mod:`fxfreeze.distributed`) rebuilds its DDP at every freeze and makes the
ranks agree. A loop can also put the compiled model under a DDP of its own: ``DDP(fm)``,
``accelerator.prepare(model)`` after ``fxfreeze.compile``, a trainer's DDP. Such a DDP was
built while every block trained; the parameters a freeze takes stop producing gradients, so
unless it finds unused parameters (``find_unused_parameters=True``, no static graph) the step
after the first freeze raises "Expected to have finished reduction in the prior iteration",
hours into a run. And each rank's policy decides on its own batches, so the ranks would
freeze apart and diverge.

:func:`check_ddp` runs at the first call inside each such DDP (DDP's own record of the one
running, ``DistributedDataParallel._get_active_ddp_module``, which torch.compile reads too):
without unused-parameter search it raises a :class:`~fxfreeze.errors.DistributedError` that
says what to do, before any training step; with it, every rank is made to apply rank 0's
decisions (:func:`~fxfreeze.runtime.agreement.agree_on_rank_0`) unless something already agrees.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from ..errors import DistributedError
from .agreement import agree_on_rank_0

__all__ = ["active_ddp", "check_ddp"]

logger = logging.getLogger("fxfreeze")

_DDP = nn.parallel.DistributedDataParallel


def active_ddp() -> Any:
    """The DistributedDataParallel whose forward is running now, or None."""
    get = getattr(_DDP, "_get_active_ddp_module", None)
    return get() if get is not None else None


def check_ddp(fm: Any, ddp: Any) -> None:
    """``fm`` is called inside ``ddp``: refuse a DDP that would break at the first freeze,
    make the ranks agree under one that would not (see the module docstring)."""
    if getattr(ddp, "_fxfreeze_follows", False) or fm.freezer is None:
        return  # FreezeDDP's own: rebuilt at each freeze, the ranks agree already
    if not getattr(ddp, "find_unused_parameters", False) or getattr(ddp, "static_graph", False):
        why = "a static graph" if getattr(ddp, "static_graph", False) else "find_unused_parameters=False"
        raise DistributedError(
            f"{type(fm.model).__name__} runs inside a DistributedDataParallel built with {why}: the parameters a "
            "freeze takes stop producing gradients, and DDP would raise at the step after the first freeze. Wrap "
            "the compiled module in fxfreeze.distributed.FreezeDDP instead (it rebuilds DDP at each freeze and "
            "leaves frozen parameters out of the all-reduce), or build the DDP with find_unused_parameters=True "
            "(accelerate: DistributedDataParallelKwargs(find_unused_parameters=True))"
        )
    if getattr(fm.freezer, "_agree", None) is None:
        agree_on_rank_0(fm)
        logger.info("fxfreeze: %s runs inside a DistributedDataParallel: every rank applies rank 0's freezing "
                    "decisions", type(fm.model).__name__)
