"""What a captured graph would lose: such a model trains through its own forward.

Four things a graph does not keep:

- **Activation checkpointing.** A captured graph inlines what ``torch.utils.checkpoint``
  wraps: the graph saves every activation the model meant to recompute, so a model that
  needed checkpointing to fit in memory would run out of it under fxfreeze (BERT with
  ``gradient_checkpointing_enable()`` saved 25x the bytes for its backward at MiniLM's
  shape: ``benchmarks/checkpoint_memory.py``). Checkpointing is seen two ways: the capture
  watched the example call reach ``torch.utils.checkpoint``
  (:func:`~fxfreeze.trace_state.watch_checkpoints`), or a module carries a switch that is
  on now (Hugging Face's ``gradient_checkpointing``, which the Trainer turns on after
  compile, at the start of ``train()``; timm's ``grad_checkpointing``).
- **Custom autograd Functions.** fx and ``torch.export`` trace into a
  ``torch.autograd.Function``'s ``forward`` and drop its ``backward``: a gradient reversal
  layer (domain-adversarial training) would stop reversing, a straight-through estimator
  (quantization-aware or binary networks) would pass no gradient through its rounding, a
  reversible layer (Reformer) would not train at all. The capture watches the example call
  apply them (:func:`~fxfreeze.trace_state.watch_functions`).
- **Gradient hooks on tensors** registered in the forward (``h.register_hook(fn)``: a
  branch's gradient scaled or clipped). ``torch.export`` drops them; the capture watches
  the example call register them (:func:`~fxfreeze.trace_state.watch_tensor_hooks`), with
  autograd on as in a training call.
- **Forward hooks export cannot take** (NEFTune's noise, bounded by a tensor): the graph is
  exported without the submodules' forward hooks (``Capture.hooks_left_out``), and
  every call, evaluation included, runs the model's own forward with them.

Training calls of such a model run the model's own forward; the frozen prefix is still cut
from autograd there (no gradient, eval mode, nothing recomputed in it), and the frozen
modules' outputs become leaves that require a gradient: reentrant checkpointing, and a
function that takes the layers' inputs but not their parameters (a reversible layer),
compute no gradient when their inputs need none. Evaluation keeps the graphs, whose
forward is the model's (except where hooks were left out).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..trace_state import checkpoint_flags

__all__ = ["OwnForwardWatch", "leaf_outputs"]

logger = logging.getLogger("fxfreeze")


class OwnForwardWatch:
    """Says whether a training call must run the model's own forward to keep what its graph
    would lose (checkpointing, custom autograd Functions, gradient hooks on tensors)."""

    def __init__(self, model: nn.Module) -> None:
        self.name = type(model).__name__
        self.switches = checkpoint_flags(model)
        self.told: set[str] = set()

    def on(self, capture: Any, training: bool = True) -> bool:
        """Must a call (a training one, by default) whose graph came from ``capture`` run
        the model's own forward? The first time for each reason, one INFO line says what
        runs instead."""
        left_out = tuple(getattr(capture, "hooks_left_out", ()))
        if not training and not left_out:  # evaluation: only hooks left out of the graph matter
            return False
        functions = tuple(getattr(capture, "functions", ()))
        reasons = {
            "checkpoints": training and (bool(getattr(capture, "checkpoints", False))
                                         or any(getattr(m, f) is True for m, f in self.switches)),
            "hooks": training and bool(getattr(capture, "tensor_hooks", 0)),
            "functions": training and bool(functions),
            "left_out": bool(left_out),
        }
        for key, now in reasons.items():
            if now and key not in self.told:
                self.told.add(key)
                what = _SAYS[key].format(names=", ".join(f.rsplit(".", 1)[-1] for f in functions or left_out))
                logger.info("fxfreeze: %s %s, with the frozen prefix cut from autograd (and no activation cache)%s",
                            self.name, what, "" if key == "left_out" else "; evaluation runs the graphs")
        return any(reasons.values())


#: what the INFO line says for each reason a training call runs the model's own forward
_SAYS = {
    "checkpoints": "checkpoints activations, which a captured graph would not (it keeps every activation): its "
                   "training calls run its own forward, checkpointing as asked",
    "hooks": "registers gradient hooks on its tensors in its forward (Tensor.register_hook), which a captured graph "
             "would not keep: its training calls run its own forward",
    "functions": "applies custom autograd Functions ({names}), whose backward a captured graph would not run (it "
                 "keeps their forward only): its training calls run its own forward",
    "left_out": "has forward hooks that torch.export could not take (on {names}): its graph, made without them, serves "
                "the plan and the policies' measurements, and every call runs its own forward, hooks included",
}


def leaf_outputs(module: nn.Module, inputs: Any, output: Any) -> Any:
    """Forward hook on a frozen module of a model that trains through its own forward: every
    floating-point tensor of ``output`` as a new leaf that requires a gradient. Reentrant
    checkpointing (and a reversible layer's function) computes no gradient for a block
    whose inputs need none, so without it the first trainable block after the frozen prefix
    would not train. Each is handed on as a copy of that leaf: the model's code may write
    the output in place (``out += identity`` after a residual branch, as torchvision's
    MobileNetV3 blocks do), which autograd refuses on a leaf that requires a gradient."""
    return tree_map(lambda t: t.detach().requires_grad_().clone() if isinstance(t, torch.Tensor) and t.is_floating_point()
                    else t, output)
