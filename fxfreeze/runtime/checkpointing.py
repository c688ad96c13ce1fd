"""Activation checkpointing kept: a model that checkpoints trains through its own forward.

A captured graph inlines what ``torch.utils.checkpoint`` wraps: the graph saves every
activation the model meant to recompute, so a model that needed checkpointing to fit in
memory would run out of it under fxfreeze (BERT with ``gradient_checkpointing_enable()``
saved 25x the bytes for its backward at MiniLM's shape: ``benchmarks/checkpoint_memory.py``). Until the graphs checkpoint blocks themselves,
training calls of such a model run the model's own forward, which checkpoints as the user
asked; the frozen prefix is still cut from autograd there (no gradient, eval mode, nothing
recomputed in it). Evaluation keeps the graphs.

Checkpointing is seen two ways: the capture watched the example call reach
``torch.utils.checkpoint`` (:func:`~fxfreeze.trace_state.watch_checkpoints`), or a module
carries a switch that is on now (Hugging Face's ``gradient_checkpointing``, which the
Trainer turns on after compile, at the start of ``train()``; timm's ``grad_checkpointing``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..trace_state import checkpoint_flags

__all__ = ["CheckpointWatch", "leaf_outputs"]

logger = logging.getLogger("fxfreeze")


class CheckpointWatch:
    """Says whether a training call must run eagerly to keep the model's checkpointing."""

    def __init__(self, model: nn.Module) -> None:
        self.name = type(model).__name__
        self.switches = checkpoint_flags(model)
        self.told = False

    def on(self, capture: Any) -> bool:
        """Checkpointing for a training call whose graph came from ``capture``; the first
        time it is, one INFO line says what runs instead."""
        on = bool(getattr(capture, "checkpoints", False)) or any(getattr(m, f) is True for m, f in self.switches)
        if on and not self.told:
            self.told = True
            logger.info(
                "fxfreeze: %s checkpoints activations, which a captured graph would not (it keeps every activation): "
                "its training calls run its own forward, checkpointing as asked, with the frozen prefix cut from "
                "autograd (and no activation cache); evaluation runs the graphs", self.name,
            )
        return on


def leaf_outputs(module: nn.Module, inputs: Any, output: Any) -> Any:
    """Forward hook on a frozen module of a model that checkpoints: every floating-point
    tensor of ``output`` as a new leaf that requires a gradient. Reentrant checkpointing
    computes no gradient for a block whose inputs need none, so without it the first
    trainable block after the frozen prefix would not train."""
    return tree_map(lambda t: t.detach().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
                    output)
