"""fxfreeze for the Hugging Face ``Trainer``: add one callback, change nothing else.

Example::

    from fxfreeze.integrations.transformers import FxFreezeCallback

    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=test,
                      callbacks=[FxFreezeCallback()])            # or FxFreezeCallback(policy="smartfrz")
    trainer.train()                                               # resume_from_checkpoint=... works too

What the callback does, and why there:

- ``on_init_end``: routes the model's ``forward`` to fxfreeze (:class:`LazyCompile`) *before*
  the Trainer prepares the model, so that accelerate's autocast (``bf16=True``) wraps the
  route; the route keeps the model's signature, so the Trainer keeps the dataset columns
  it would keep for the model. The model is compiled on its first call, with that call
  (the collator's batch, ``labels`` included) as the example inputs.
- ``on_train_begin``: attaches the optimizer the Trainer built (the real one inside
  accelerate's wrapper, whose ``step`` runs once per optimizer step: gradient accumulation
  gives one decision per optimizer step), tells the controller the planned number of
  steps, and on a resume restores the freezer state saved in the checkpoint.
- checkpoints: the freezer state travels in ``trainer_state.json`` (``stateful_callbacks``,
  as plain data encoded with :func:`encode_state`), read back on resume whether or not
  ``restore_callback_states_from_checkpoint`` is set.
- logs: each freeze and unfreeze is appended to ``trainer.state.log_history`` (and logged
  on the ``fxfreeze`` logger); every log line carries ``fxfreeze/num_frozen``.
- several processes (``torchrun``): the Trainer's DDP finds unused parameters by default,
  which freezing needs (refused before the first step when it does not); every rank then
  applies rank 0's decisions (:func:`fxfreeze.distributed.agree_on_rank_0`).
- ``on_train_end``: gives the model back as plain training leaves it (every block unfrozen,
  its own forward, the controller and reference worker stopped): a later stage of training
  on the same model, with a Trainer of its own or a loop, trains every parameter.
  ``callback.module.freezer.history`` keeps the record; another ``trainer.train()`` with
  the callback compiles the model again.

``trainer.save_model()`` writes the model's own state dict (same keys), which
``from_pretrained`` loads into the plain model.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..config import FreezeConfig
from ..plan import FreezePlan
from ._lazy import LazyCompile, data_parallel, decode_state, encode_state

__all__ = ["FxFreezeCallback"]

logger = logging.getLogger("fxfreeze")


def _json_safe(value: Any) -> Any:
    if isinstance(value, FreezeConfig):
        return value.to_dict()
    if isinstance(value, FreezePlan):
        return value.to_dict()
    return value


def _finds_unused(args: Any, model: Any) -> bool:
    """The ``find_unused_parameters`` the Trainer gives DDP: ``ddp_find_unused_parameters``
    when set, else on unless a ``PreTrainedModel`` checkpoints its activations (the Trainer's
    own rule)."""
    set_ = getattr(args, "ddp_find_unused_parameters", None)
    if set_ is not None:
        return bool(set_)
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return True
    new = hasattr(type(model), "is_activation_checkpointing")  # transformers 5.x; 4.x: is_gradient_checkpointing
    flag = "is_activation_checkpointing" if new else "is_gradient_checkpointing"
    asked = any(bool(getattr(args, a, False)) for a in ("activation_checkpointing", "gradient_checkpointing"))
    return not (bool(getattr(model, flag, False)) or asked)


class FxFreezeCallback(TrainerCallback, ExportableState):
    """Freeze converged blocks of the Trainer's model. Takes :func:`fxfreeze.compile`'s
    keyword arguments (``policy=``, ``config=``, ``plan=``, ``strategy=``,
    ``max_graphs=``, ``capture_timeout=``). After training starts, ``callback.module`` is
    the :class:`~fxfreeze.runtime.module.FreezableModule` (its ``freezer.history`` lists
    every event)."""

    def __init__(self, **compile_kwargs: Any) -> None:
        if isinstance(compile_kwargs.get("plan"), dict):  # as restored from trainer_state.json
            compile_kwargs["plan"] = FreezePlan.from_dict(compile_kwargs["plan"])
        self.compile_kwargs = compile_kwargs
        self.lazy: LazyCompile | None = None
        self.freezer_state: str | None = None  # set when Trainer restores callback attributes
        self._logged = 0

    # -- ExportableState: the Trainer writes this into trainer_state.json ----------------------
    def state(self) -> dict[str, Any]:
        current = self.lazy.state() if self.lazy is not None else None
        return {
            "args": {k: _json_safe(v) for k, v in self.compile_kwargs.items()},
            "attributes": {"freezer_state": encode_state(current) if current is not None else self.freezer_state},
        }

    @property
    def module(self) -> Any:
        """The compiled module (None before the model's first call)."""
        return self.lazy.module if self.lazy is not None else None

    def _install(self, model: Any) -> None:
        if self.lazy is None or self.lazy.model is not model or not self.lazy.installed:
            self.lazy = LazyCompile.for_model(model, self.compile_kwargs)
        self.lazy.reopen(self.compile_kwargs)  # after an earlier run's end: a new run

    # -- events ----------------------------------------------------------------------------------
    def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None:
            self._install(model)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any) -> None:
        world = getattr(args, "world_size", 1)
        ddp = isinstance(world, int) and world > 1 and data_parallel(
            world, _finds_unused(args, model), bool(getattr(args, "ddp_static_graph", None)),
            "the Trainer", "Pass ddp_find_unused_parameters=True (and no ddp_static_graph) to TrainingArguments.",
        )
        if model is not None and (self.lazy is None or self.lazy.model is not model or self.lazy.released):
            # added after the Trainer was built: route now. Mixed precision has already
            # wrapped model.forward; the route replaces the wrapper and the compiled module
            # applies its autocast (fxfreeze.amp)
            self._install(model)
        if self.lazy is None:
            return
        self.lazy.data_parallel = ddp
        if optimizer is not None:
            self.lazy.set_optimizer(optimizer)
        if getattr(state, "max_steps", 0) and state.max_steps > 0:
            self.lazy.total_steps = int(state.max_steps)
        loader = kwargs.get("train_dataloader")
        try:
            self.lazy.epoch_steps = len(loader) / max(1, int(getattr(args, "gradient_accumulation_steps", 1) or 1))
        except TypeError:  # no loader, or one without a length
            pass
        saved = self._saved_state(state)
        if saved is not None and state.global_step > 0:
            self.lazy.load_state(decode_state(saved))
            logger.info("fxfreeze: resumed the freezer state saved at step %d", state.global_step)
        self._logged = len(self.module.freezer.history) if self.module is not None else 0

    def _saved_state(self, state: Any) -> str | None:
        """The freezer state in the checkpoint being resumed (the TrainerState read from
        its trainer_state.json keeps our entry whether or not callbacks are restored)."""
        if self.freezer_state is not None:
            return self.freezer_state
        entry = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        if isinstance(entry, list):
            entry = entry[0] if entry else None
        if isinstance(entry, dict):
            return (entry.get("attributes") or {}).get("freezer_state")
        return None

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.module is not None and state.epoch is not None:
            self.module.freezer.set_epoch(int(state.epoch))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.module is None:
            return
        history = self.module.freezer.history
        for event in history[self._logged :]:
            if event["action"] in ("freeze", "unfreeze"):
                state.log_history.append(
                    {
                        "fxfreeze/event": event["action"],
                        "fxfreeze/num_frozen": event["num_frozen"],
                        "fxfreeze/blocks": ", ".join(event["blocks"]),
                        "fxfreeze/reason": event["reason"],
                        "step": state.global_step,
                    }
                )
        self._logged = len(history)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.lazy is not None:
            self.on_step_end(args, state, control)  # events of the last step into the log history
            self.lazy.release()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs is not None and self.module is not None:
            logs["fxfreeze/num_frozen"] = self.module.num_frozen
