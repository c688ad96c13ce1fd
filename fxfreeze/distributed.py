"""Data-parallel training with freezing: one prefix for all ranks, a DDP wrapper that follows it.

Plain ``DistributedDataParallel`` around a model whose parameters stop requiring gradients
mid-run breaks: DDP registered its reducer on the parameters that required gradients when it
was built, the frozen ones never produce gradients, ranks silently diverge and the next step
raises "Expected to have finished reduction in the prior iteration". (Measured here with
torch 2.13, gloo, 2 processes; ``static_graph=True`` fails the same way;
``find_unused_parameters=True`` works but traverses the graph every step.)

:class:`FreezeDDP` owns the DDP wrapper of a compiled module:

- **one decision for all ranks**: after every optimizer step each rank's controller asks its
  policy, then the ranks agree on rank 0's answer (a broadcast of one integer), so every
  rank changes the same prefix at the same step, whatever each rank's policy saw locally
  (Egeria's plasticity is measured on each rank's own probe batch). With NCCL the integer is
  a CUDA tensor, and reading it at once would make the host wait for the device every step:
  there the broadcast is asynchronous, its result is copied to pinned memory behind an
  event, and every rank applies it ``agree_lag`` steps later (2 by default; 0, at once, with
  gloo, whose broadcast is on the CPU). Decisions still in flight are part of the
  controller's checkpoint, so a resume applies them at the same steps;
- **a DDP rebuilt on every prefix change**, over the parameters that still train: frozen
  parameters drop out of the gradient all-reduce, which is the communication half of the
  saving (the bytes all-reduced per step fall with the frozen share; a communication hook
  given to :meth:`FreezeDDP.register_comm_hook` is re-registered on every rebuild). A rebuild
  costs one broadcast of the module's state, only when the prefix changes;
- stale gradients of newly frozen parameters are cleared by the runtime.

The activation cache works per rank with global dataset indices (``fm.wrap_loader`` around a
loader with a ``DistributedSampler``), and each rank runs its own Egeria reference worker.

:func:`init_process_group` wraps ``torch.distributed.init_process_group`` with a timeout and
turns a rendezvous that does not complete (a rank that never started, a wrong world size)
into an :class:`~fxfreeze.errors.DistributedError` that says so; a collective that fails
because a peer crashed raises one as well, instead of hanging.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any, Callable

import torch.distributed as dist
from torch import nn

from .errors import DistributedError
from .runtime.agreement import Agreement, agree_on_rank_0

__all__ = ["Agreement", "FreezeDDP", "agree_on_rank_0", "init_process_group", "DistributedError"]

logger = logging.getLogger("fxfreeze")


def init_process_group(backend: str = "gloo", *, timeout_s: float = 60.0, **kwargs: Any) -> None:
    """``torch.distributed.init_process_group`` with a timeout and a clear error.

    Args:
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (CUDA).
        timeout_s: seconds to wait for every rank before giving up with ``DistributedError``.
        kwargs: what ``torchrun`` does not set (``init_method``, ``rank``, ``world_size``);
            under ``torchrun`` the environment carries them.

    Example::

        >>> # init_process_group("gloo", init_method="file:///tmp/rdzv", rank=0, world_size=2)
        >>> # ddp = FreezeDDP(fxfreeze.compile(model, x, optimizer=opt))
    """
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    except (RuntimeError, ValueError, TimeoutError) as e:
        ws = kwargs.get("world_size", "the launcher's")
        raise DistributedError(
            f"the process group did not form within {timeout_s:g}s ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"check that all {ws} ranks started, that --nproc-per-node / --nnodes match the world size, "
            "and that the rendezvous address is reachable"
        ) from e


class FreezeDDP(nn.Module):
    """DDP around a :class:`~fxfreeze.runtime.module.FreezableModule` that follows its frozen
    prefix. Use it as the DDP module: ``out = ddp(x)``; the optimizer is the one given to
    ``fxfreeze.compile``. ``ddp_kwargs`` go to ``DistributedDataParallel`` on every rebuild.
    ``agree_lag``: steps between rank 0's decision and its application on every rank (None:
    2 when the process group broadcasts CUDA tensors, as NCCL does, else 0)."""

    def __init__(self, module: Any, process_group: Any = None, agree_lag: int | None = None, **ddp_kwargs: Any) -> None:
        super().__init__()
        from .runtime.module import FreezableModule

        if not isinstance(module, FreezableModule):
            raise DistributedError("FreezeDDP wraps the module fxfreeze.compile returned")
        if not dist.is_available() or not dist.is_initialized():
            raise DistributedError(
                "torch.distributed is not initialised: call fxfreeze.distributed.init_process_group() "
                "(or torch.distributed.init_process_group) first, under torchrun or with rank/world_size"
            )
        self.fm = module
        self.process_group = process_group
        self.ddp_kwargs = ddp_kwargs
        self._comm_hooks: list[tuple[Any, Callable[..., Any]]] = []
        self.rebuilds = 0
        # not a registered submodule: checkpoints go through the compiled module (fm), whose
        # keys are the original model's
        object.__setattr__(self, "ddp", None)
        self._k_built = -1
        self.agreement = agree_on_rank_0(module, process_group, agree_lag)
        self._rebuild()

    # -- the DDP wrapper ------------------------------------------------------------------------
    def _rebuild(self) -> None:
        k = self.fm.num_frozen
        if self.ddp is not None and k == self._k_built:
            return
        if not any(p.requires_grad for p in self.fm.parameters()):
            raise DistributedError("every parameter is frozen: nothing left for DDP to synchronise")
        object.__setattr__(
            self, "ddp", nn.parallel.DistributedDataParallel(self.fm, process_group=self.process_group, **self.ddp_kwargs)
        )
        self.ddp._fxfreeze_follows = True  # rebuilt at each freeze: runtime/ddp_watch.py leaves it alone
        for state, hook in self._comm_hooks:
            self.ddp.register_comm_hook(state, hook)
        self._k_built = k
        self.rebuilds += 1
        logger.debug("fxfreeze: DDP rebuilt over %d trainable parameters (prefix %d)",
                     sum(1 for p in self.fm.parameters() if p.requires_grad), k)

    def register_comm_hook(self, state: Any, hook: Callable[..., Any]) -> None:
        """Like ``DistributedDataParallel.register_comm_hook``, kept across rebuilds."""
        self._comm_hooks.append((state, hook))
        assert self.ddp is not None
        self.ddp.register_comm_hook(state, hook)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._rebuild()  # after a prefix change at the previous optimizer step
        assert self.ddp is not None
        return self.ddp(*args, **kwargs)

    @property
    def module(self) -> Any:  # like DDP: .module is the wrapped model
        return self.fm
