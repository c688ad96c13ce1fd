"""``fxfreeze.compile``: capture, plan and wrap a model, and attach its controller."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..amp import plain_capture
from ..api import analyze
from ..config import FreezeConfig, load_config
from ..errors import ModelError
from ..plan import FreezePlan
from ..trace import DEFAULT_TIMEOUT, unwrap_compiled
from .cached_graph import CachedGraph
from .graphs import DEFAULT_MAX_GRAPHS
from .module import FreezableModule
from .ownership import owner_of, register_owner

__all__ = ["compile"]

logger = logging.getLogger("fxfreeze")


def compile(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer] | None = None,
    policy: str | None = None,
    config: FreezeConfig | dict[str, Any] | str | None = None,
    plan: FreezePlan | str | None = None,
    strategy: str = "auto",
    max_graphs: int = DEFAULT_MAX_GRAPHS,
    capture_timeout: float | None = DEFAULT_TIMEOUT,
    total_steps: int | None = None,
    scheduler: Any = None,
    strict: bool = False,
) -> FreezableModule:
    """Compile ``model`` into a :class:`FreezableModule` driven by a freezing controller.

    - ``example_inputs``: as for :func:`fxfreeze.plan`; needed for models ``torch.fx``
      cannot trace (captured with ``torch.export``) and for FLOP/byte figures. Later calls
      may differ (other keyword arguments, shapes, the other training mode).
    - ``optimizer``: when given, the controller runs after every ``optimizer.step()``
      (``register_step_post_hook``) and releases optimizer state of frozen parameters; a
      list of optimizers: the first one's steps are the clock, all are watched and released;
      one that holds none of the model's parameters is refused (ConfigError). Without
      one, the controller follows the first optimizer that steps the model's parameters
      (built after ``compile``; logged), unless the loop calls ``fm.freezer.step()`` itself.
    - ``policy`` / ``config``: a policy name, and a :class:`FreezeConfig` (object, dict or
      YAML path). The default policy is ``egeria``, whose one-time set-up (the eval-mode
      graph and a reference builder per block structure: about 0.3-3 s) happens here when
      ``example_inputs`` are given, not in the middle of training.
    - ``plan``: an edited plan to use instead of the proposed one (``strict=True``: refuse
      one that merges blocks of this model's structure, instead of warning).
    - ``max_graphs``: graphs kept for different kinds of call before the rest run eagerly;
      ``capture_timeout``: seconds one capture attempt may take (None: no bound).
    - ``total_steps``: the planned number of optimizer steps (sets the config's
      ``total_steps``), for policies that schedule by the length of training.
    - ``scheduler``: the learning-rate scheduler, whose horizon gives the planned length
      when ``total_steps`` is not stated (a cosine's ``T_max``, a one-cycle's
      ``total_steps``, a linear decay's end; stepped per step or per epoch). Without it, a
      scheduler of ``optimizer`` is looked for at the first step
      (:mod:`fxfreeze.runtime.horizon`).

    A model that neither fx nor ``torch.export`` can capture (data-dependent control flow)
    is compiled from its module order and runs its own forward (``fm.eager_only``, with a
    warning that says why): freezing and every policy work (Egeria captures each block that
    is one module alone), the activation cache does not.

    Compiling a model that is already compiled detaches the earlier module (its
    controller stops; see :meth:`FreezableModule.detach`).

    Example::

        fm = fxfreeze.compile(model, {"input_ids": ids, "attention_mask": mask}, optimizer=opt)
        loss = fm(**batch, labels=labels).loss   # another keyword set: captured once more
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"expected a torch.nn.Module, got {type(model).__module__}.{type(model).__name__}")
    if unwrap_compiled(model) is not model:
        logger.warning(
            "fxfreeze: compiling the model inside torch.compile's wrapper (%s): fxfreeze's graphs would replace "
            "torch.compile's; to compile them, call torch.compile(fm) on the module this returns",
            type(model._orig_mod).__name__,
        )
        model = unwrap_compiled(model)
    if isinstance(model, FreezableModule):
        raise ModelError("this model is already compiled by fxfreeze; compile the original model once")
    _refuse_data_parallel(model)
    for o in optimizer if isinstance(optimizer, (list, tuple)) else [optimizer]:
        if o is not None and not isinstance(o, torch.optim.Optimizer):
            raise ModelError(f"optimizer must be a torch.optim.Optimizer (or a list of them), got {type(o).__name__}")
    if scheduler is not None and not isinstance(getattr(scheduler, "last_epoch", None), int):
        raise ModelError(f"scheduler must be a learning-rate scheduler (with last_epoch), got {type(scheduler).__name__}")
    if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
        raise ModelError(f"max_graphs must be a positive int, got {max_graphs!r}")
    cfg = load_config(config, policy)
    if total_steps is not None:
        d = cfg.to_dict()
        d["total_steps"] = total_steps
        cfg = FreezeConfig.from_dict(d)
    previous = owner_of(model)
    if previous is not None:
        logger.warning(
            "fxfreeze: %s was already compiled; the earlier compiled module is detached (its blocks unfrozen, "
            "its controller stopped) and this one takes over", type(model).__name__,
        )
        previous.detach()
    with plain_capture(model):  # a mixed-precision wrapper (accelerate's): its autocast keys the first graphs
        return _compile(model, example_inputs, cfg, optimizer, scheduler, plan, strategy, max_graphs, capture_timeout, strict)


def _compile(
    model: nn.Module, example_inputs: Any, cfg: FreezeConfig, optimizer: Any, scheduler: Any,
    plan: FreezePlan | str | None, strategy: str, max_graphs: int, capture_timeout: float | None, strict: bool,
) -> FreezableModule:
    from .controller import Freezer

    analysis = analyze(model, example_inputs, plan=plan, strategy=strategy, capture_timeout=capture_timeout, strict=strict)
    fm = FreezableModule(model, analysis, max_graphs=max_graphs, capture_timeout=capture_timeout)
    if cfg.cache.enabled and fm.eager_only:
        logger.warning("fxfreeze cache: caching stays off because %s has no graph to read it from", type(model).__name__)
    elif cfg.cache.enabled:
        if cfg.cache.random_augmentation:
            logger.warning(
                "fxfreeze cache: caching stays off because the config declares random augmentation "
                "(a sample's frozen-prefix output changes every epoch)"
            )
        else:
            from .cache import ActivationCache

            c = cfg.cache
            fm._cache = ActivationCache(c.memory_budget_mb, c.directory, c.dtype, c.verify_fraction, c.prefetch,
                                       host_budget_mb=c.host_budget_mb, sub_batches=c.sub_batches)
            fm._cached = CachedGraph(fm._cache, [b.name for b in fm.plan.blocks])
    fm.freezer = Freezer(fm, cfg, optimizer, scheduler=scheduler)
    if fm.eager_only:
        logger.warning(
            "fxfreeze: %s could not be captured as a graph (%s). It runs its own forward, with the plan made "
            "from its module order (%d blocks): frozen blocks get no gradient and run in eval mode, but "
            "there is no activation cache, and egeria judges only blocks that are one module each (captured alone)",
            type(model).__name__, "; ".join(analysis.capture.reasons), len(analysis.plan.blocks),
        )
    register_owner(model, fm)
    return fm


def _refuse_data_parallel(model: nn.Module) -> None:
    """A model already wrapped for data-parallel training cannot be compiled: DDP's reducer
    was built on the parameters that required gradients then, so the first freeze makes the
    ranks diverge and the next step raise ("Expected to have finished reduction"); and its
    forward cannot be captured, so everything would run eagerly. FSDP shards the parameters
    a freeze would take."""
    name = type(model).__name__
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise ModelError(
            f"the model is wrapped in {name}: compile the model inside it and wrap the compiled module "
            "instead, fm = fxfreeze.compile(model.module, ...); ddp = fxfreeze.distributed.FreezeDDP(fm) "
            "(it rebuilds the wrapper at each freeze; docs/distributed.md)"
        )
    if isinstance(model, nn.DataParallel) and len(model.device_ids or []) > 1:
        raise ModelError(
            f"the model is wrapped in {name} over {len(model.device_ids)} devices, which splits every batch among "
            "replicas at each call, and fxfreeze's graphs cannot keep that. Compile model.module and train "
            "with one process per device: fxfreeze.distributed.FreezeDDP (docs/distributed.md)"
        )
    # FSDP1's wrapper class, or FSDP2's (``fully_shard`` gives the module a class deriving FSDPModule)
    if any(c.__module__.startswith("torch.distributed.fsdp") for c in type(model).__mro__):
        raise ModelError(
            f"the model is sharded by FSDP ({name}), which fxfreeze does not support: compile the unsharded "
            "model and train it with fxfreeze.distributed.FreezeDDP (docs/distributed.md)"
        )
