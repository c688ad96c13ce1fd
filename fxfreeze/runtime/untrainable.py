"""Blocks the user froze: an adaptive policy has nothing to decide about them.

Fine-tuning scripts often freeze part of a model before training (the embeddings,
``requires_grad_(False)`` on the first layers, a distillation teacher inside the model).
Such a block trains nothing, so freezing it saves no backward of its own and risks no
accuracy; yet an adaptive policy judged it like any other and spent its evaluation windows
on it (Egeria took 351 of 400 steps to "settle" a stem the user had frozen, and would have
spent as long on each further frozen block) before it reached a block that trains.

So the controller shows an adaptive policy the frozen prefix *widened* over the blocks right
after it whose parameters all have ``requires_grad=False`` (:meth:`UntrainableBlocks.seen`):
the policy's first candidate is the first block that trains. A decision to freeze past them
freezes them too (:meth:`UntrainableBlocks.widen`), and only then do they run in eval mode:
until a decision reaches them they stay as the user left them (dropout on, BatchNorm
statistics updating), so training is what it would be without fxfreeze. Blocks without
parameters are not counted as frozen by the user. Schedules the user wrote (``manual``,
``freezeout``) see the prefix as it is.

The test is made at each step from ``requires_grad`` itself, so a block the user unfreezes
later (Lightning's ``BaseFinetuning``) is a candidate again from that step.

The other way round, a parameter the user froze, which a freeze then took along, and which
the user's code makes trainable again (``requires_grad_(True)``: ``BaseFinetuning``
unfreezing a backbone, ULMFiT's gradual unfreezing, an "unfreeze everything" epoch after
training the head) would otherwise get no gradient, silently: the graphs cut the backward
pass into the frozen prefix whatever the flag says. :meth:`UntrainableBlocks.regranted` sees
it at the next optimizer step and cuts the prefix back to the first block holding such a
parameter; the user's word is kept (fxfreeze no longer restores the flag it saved). Only a
change of the user's own choice counts: a parameter that was trainable when fxfreeze froze
it and is set ``requires_grad=True`` again is no signal, since GAN loops set it on the whole
discriminator before each of its steps (``set_requires_grad(netD, True)``) and would undo
every freeze.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from .policies import Decision

__all__ = ["UntrainableBlocks"]

logger = logging.getLogger("fxfreeze")


class UntrainableBlocks:
    """The blocks of a compiled module whose parameters the user froze."""

    def __init__(self, module: Any) -> None:
        names = [b.name for b in module.plan.blocks]
        self._names = names
        #: per block, the parameters it owns (their last use lies in it)
        self._params: list[list[nn.Parameter]] = [[] for _ in names]
        self._head: list[nn.Parameter] = []  # the parameters the head owns
        for name, last in module._param_last_block.items():
            (self._params[last] if last < len(names) else self._head).append(module.params_by_name[name])
        self._capped: int | None = None
        self._told: tuple[int, int] | None = None
        self._module = module
        #: the saved flags last read, and the parameters among them the user had frozen
        self._saved: dict[str, bool] | None = None
        self._user_frozen: list[str] = []

    def untrainable(self, i: int) -> bool:
        """Block ``i`` has parameters and none of them requires a gradient."""
        params = self._params[i]
        return bool(params) and not any(p.requires_grad for p in params)

    def seen(self, k: int, max_frozen: int) -> int:
        """The frozen prefix ``k`` widened over the untrainable blocks right after it."""
        widened = k
        while widened < max_frozen and self.untrainable(widened):
            widened += 1
        if widened != k and self._told != (k, widened):
            self._told = (k, widened)
            logger.info(
                "fxfreeze: no parameter of %s requires a gradient (frozen by the user): the policy judges from %s "
                "on, and freezes them with the next freeze that reaches past them",
                ", ".join(self._names[k:widened]),
                self._names[widened] if widened < len(self._names) else "the head",
            )
        return widened

    def top(self, max_frozen: int) -> int:
        """The deepest prefix that leaves a parameter to train: ``max_frozen`` when the head
        has one that requires a gradient, else the index of the last block that has one.

        Prompt and prefix tuning (PEFT) train a prompt encoder before a model the user froze
        whole: the head then trains nothing, and freezing the prompt encoder left the loss
        without a gradient, so the user's ``loss.backward()`` raised "element 0 of tensors
        does not require grad" at the first step after the freeze."""
        if any(p.requires_grad for p in self._head):
            return max_frozen
        last = next((i for i in range(len(self._params) - 1, -1, -1) if any(p.requires_grad for p in self._params[i])), 0)
        return min(max_frozen, last)

    def cap(self, decision: Decision | None, k: int, max_frozen: int) -> Decision | None:
        """A freeze no deeper than :meth:`top` (said once per capped depth)."""
        if decision is None or decision.num_frozen <= k:
            return decision
        top = self.top(max_frozen)
        if decision.num_frozen <= top:
            return decision
        if self._capped != top:
            self._capped = top
            logger.info(
                "fxfreeze: %s holds the last parameters that train (the user froze those after it): it stays "
                "trainable, since freezing it would leave the loss without a gradient", self._names[top])
        return Decision(top, decision.reason) if top > k else None

    def widen(self, decision: Decision | None, k: int, seen: int, max_frozen: int) -> Decision | None:
        """A policy's decision on the widened prefix ``seen`` as one on the real prefix ``k``:
        a freeze past ``seen`` also takes the untrainable blocks after its end; a freeze
        that stays within ``seen`` changes nothing (those blocks train nothing already)."""
        if decision is None:
            return None
        if decision.num_frozen > seen:
            return Decision(self.seen(decision.num_frozen, max_frozen), decision.reason)
        if k < decision.num_frozen <= seen:
            return None
        return decision

    def regranted(self, k: int) -> tuple[int, str] | None:
        """``(b, reason)``: the frozen prefix ``k`` cut back to block ``b``, the first that
        holds a parameter the user had frozen and has made trainable again since a freeze
        took it; None when there is none (a scan of the frozen parameters' flags, once per
        optimizer step)."""
        module = self._module
        saved = module._saved_requires_grad  # the flags set aside at the last prefix change (a new dict each time)
        if saved is not self._saved:  # read once per prefix: most steps then scan nothing
            self._saved, self._user_frozen = saved, [n for n, was in saved.items() if not was]
        if not k or not self._user_frozen:
            return None
        params = module.params_by_name
        hits = [n for n in self._user_frozen if params[n].requires_grad]
        if not hits:
            return None
        for n in hits:
            saved[n] = True  # the user's word: kept when the prefix is unfrozen
        gone = set(hits)
        self._user_frozen = [n for n in self._user_frozen if n not in gone]
        b = min(module._param_last_block[n] for n in hits)
        more = f" and {len(hits) - 1} more" if len(hits) > 1 else ""
        return b, f"the training code made {hits[0]}{more} trainable again (requires_grad=True)"
