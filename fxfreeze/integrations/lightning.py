"""fxfreeze for Lightning: add one callback, leave the LightningModule as it is.

Example::

    from fxfreeze.integrations.lightning import FxFreezeCallback

    trainer = pl.Trainer(max_epochs=5, callbacks=[FxFreezeCallback(policy="egeria")])
    trainer.fit(lit_module, train_loader, val_loader)             # ckpt_path=... resumes

Which module is compiled: ``module="net"`` names the LightningModule's submodule to
compile; by default the callback routes the LightningModule itself (when it defines
``forward``) and each of its direct submodules that hold parameters, and compiles the
first of them that the training step calls (the outermost call: ``self(x)`` compiles the
LightningModule, ``self.net(x)`` the network). The others are then left alone.

Works with the optimizers Lightning builds from ``configure_optimizers`` (those that hold
the compiled module's parameters drive the controller, the first of them its clock: a GAN's
discriminator compiled with ``module="disc"`` follows its own optimizer), manual
optimization, ``accumulate_grad_batches`` (one decision per optimizer step),
``precision="bf16-mixed"`` (graphs are kept per autocast state), ``gradient_clip_val``,
validation during training, ``ModelCheckpoint`` and ``trainer.fit(..., ckpt_path=...)``:
the freezer state is the callback's checkpoint state. On several devices,
``strategy="ddp_find_unused_parameters_true"`` (DDP must find the parameters a freeze
takes; other strategies are refused): every rank applies rank 0's decisions. When ``fit``
ends the model is given back as plain training leaves it (every block unfrozen, its own
forward, the controller stopped), so that a later stage trains every parameter;
``callback.module`` keeps the record and another ``fit`` with the callback compiles it again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import MutableMapping
from typing import Any

from torch import nn

from ..errors import DistributedError, FreezeError
from ..sample_ids import SAMPLE_ID_KEY
from ._lazy import LazyCompile, data_parallel

try:  # the package named in the issue first, the unified one otherwise
    import pytorch_lightning as pl
except ImportError:  # pragma: no cover - depends on what is installed
    import lightning.pytorch as pl  # type: ignore[no-redef]

__all__ = ["FxFreezeCallback"]

logger = logging.getLogger("fxfreeze")


def _data_parallel(trainer: Any) -> bool:
    """Whether Lightning runs its DDP over several processes (see :func:`data_parallel`);
    another multi-process strategy (FSDP, DeepSpeed) is refused."""
    world = getattr(trainer, "world_size", 1)
    if not (isinstance(world, int) and world > 1):
        return False
    strategy = getattr(trainer, "strategy", None)
    if not isinstance(strategy, pl.strategies.DDPStrategy):
        raise DistributedError(
            f"Lightning's Trainer trains on {world} processes with {type(strategy).__name__}, which FxFreezeCallback "
            "does not support: use strategy='ddp_find_unused_parameters_true'"
        )
    kwargs = getattr(strategy, "_ddp_kwargs", {}) or {}
    unused, static = bool(kwargs.get("find_unused_parameters", False)), bool(kwargs.get("static_graph", False))
    return data_parallel(world, unused, static, "Lightning's Trainer", "Use strategy='ddp_find_unused_parameters_true'.")


class FxFreezeCallback(pl.Callback):
    """Freeze converged blocks of the LightningModule's network. Takes
    :func:`fxfreeze.compile`'s keyword arguments (``policy=``, ``config=``, ``plan=``, ...)
    and ``module=``, the attribute path of the submodule to compile (default: found, see
    the module docstring). ``callback.module`` is the compiled module once training ran."""

    def __init__(self, module: str | None = None, **compile_kwargs: Any) -> None:
        super().__init__()
        self.target = module
        self.compile_kwargs = compile_kwargs
        self._candidates: list[LazyCompile] = []
        self._pending: dict[str, Any] | None = None
        self._ended: LazyCompile | None = None  # the route of the last fit, released at its end
        self._ids_scope = contextlib.ExitStack()  # the running batch's sample ids, declared

    @property
    def state_key(self) -> str:
        return "FxFreezeCallback"

    @property
    def lazy(self) -> LazyCompile | None:
        """The route that compiled (or the only candidate)."""
        done = [c for c in self._candidates if c.module is not None]
        if done:
            return done[0]
        if not self._candidates:
            return self._ended  # after fit: the route it compiled, released
        return self._candidates[0] if len(self._candidates) == 1 else None

    @property
    def module(self) -> Any:
        lazy = self.lazy
        return lazy.module if lazy is not None else None

    # -- choosing and routing the module --------------------------------------------------------
    def _targets(self, pl_module: nn.Module) -> list[nn.Module]:
        if self.target is not None:
            try:
                return [pl_module.get_submodule(self.target)]
            except AttributeError as e:
                raise FreezeError(
                    f"FxFreezeCallback(module={self.target!r}): {type(pl_module).__name__} has no submodule "
                    f"{self.target!r}; name one of: {', '.join(n for n, _ in pl_module.named_children())}"
                ) from e
        out: list[nn.Module] = []
        if type(pl_module).forward is not pl.LightningModule.forward:
            out.append(pl_module)
        out.extend(m for _, m in pl_module.named_children() if any(True for _ in m.parameters()))
        if not out:
            raise FreezeError(f"{type(pl_module).__name__} has no submodule with parameters to compile")
        return out

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        ddp = _data_parallel(trainer)
        self._ended = None
        for lazy in self._candidates:
            lazy.reopen(self.compile_kwargs)  # routes kept under a wrapper after an earlier fit
        if not self._candidates:
            for m in self._targets(pl_module):
                lazy = LazyCompile.for_model(m, self.compile_kwargs)
                lazy.on_compiled = self._compiled  # type: ignore[attr-defined]
                self._candidates.append(lazy)
        optimizer = list(trainer.optimizers) or None  # those holding the compiled module's parameters drive it
        total = getattr(trainer, "estimated_stepping_batches", None)
        for lazy in self._candidates:
            lazy.data_parallel = ddp
            if isinstance(total, (int, float)) and 0 < total < float("inf"):
                lazy.total_steps = int(total)
            batches = getattr(trainer, "num_training_batches", None)  # known once the total was estimated
            if isinstance(batches, (int, float)) and 0 < batches < float("inf"):
                lazy.epoch_steps = batches / max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1))
            if optimizer is not None:
                lazy.set_optimizer(optimizer)
            if self._pending is not None:
                lazy.pending_state = self._pending

    def _compiled(self, lazy: LazyCompile) -> None:
        """The first route called wins; the others step aside."""
        for other in self._candidates:
            if other is not lazy:
                other.uninstall()
        self._candidates = [lazy]
        self._pending = None

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self.module is not None:
            self.module.freezer.set_epoch(int(trainer.current_epoch))

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        """The training loss, for the safety net (the optimizer step that follows reads it)."""
        if self.module is not None and loss is not None:
            self.module.freezer.observe_loss(loss)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """A dict batch carrying sample ids (:func:`fxfreeze.with_sample_ids`): they are taken
        out before the training step sees the batch and declared for its calls (the
        activation cache's keys)."""
        self._ids_scope.close()
        if isinstance(batch, MutableMapping) and SAMPLE_ID_KEY in batch:
            ids = batch.pop(SAMPLE_ID_KEY)
            if self.module is not None:
                self._ids_scope.enter_context(self.module.sample_ids(ids))

    def _drop_ids(self, batch: Any) -> None:
        """Evaluation batches of a dataset with ids: they are not the steps' to see either."""
        if isinstance(batch, MutableMapping):
            batch.pop(SAMPLE_ID_KEY, None)

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._drop_ids(batch)

    def on_test_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._drop_ids(batch)

    def on_predict_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._drop_ids(batch)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._ids_scope.close()
        if self.module is not None:
            pl_module.log("fxfreeze/num_frozen", float(self.module.num_frozen), on_step=True, on_epoch=False)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._ids_scope.close()
        for lazy in self._candidates:
            if lazy.module is None:
                lazy.uninstall()
            else:
                lazy.release()
                self._ended = lazy
        # a route removed is built again by the next fit (a state restored before it waits in _pending)
        self._candidates = [c for c in self._candidates if c.installed]

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        lazy = self.lazy  # after fit: the released route, with the state it ended with
        state = lazy.state() if lazy is not None else self._pending
        return {"freezer": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("freezer") if isinstance(state_dict, dict) else None
        if state is None:
            return
        lazy = self.lazy
        if lazy is not None and lazy.module is not None and not lazy.released:
            lazy.load_state(state)
        else:
            self._pending = state
            for c in self._candidates:
                c.pending_state = state
