"""The optimizers the controller follows: one given is checked to hold the model's
parameters (:func:`check_holds`); without one, the first that steps them is adopted.

A common loop compiles first and builds the optimizer afterwards
(``fm = fxfreeze.compile(model, x)`` then ``opt = AdamW(fm.parameters())``). Without the
optimizer the controller has no clock: nothing would ever freeze, and nothing would say so.
:class:`OptimizerWatch` therefore registers a global optimizer post-step hook
(``torch.optim.optimizer.register_optimizer_step_post_hook``) and adopts the first optimizer
that steps any of the model's parameters: from that step on it is the controller's clock,
as if it had been passed to ``compile``. Optimizers that step the model's parameters later
(one per parameter group, say) are watched too, for learning-rate steps and for releasing
the state of frozen parameters; only the first one counts steps.

A loop that drives the controller by hand (``fm.freezer.step()``) ends the watch at its
first such call; an optimizer attached explicitly (``attach_optimizer``, the integrations)
ends it too.

The global hook is only ever removed outside the loop in which torch runs the global hooks
(removing an entry there raises "mutated during iteration"): it is marked finished inside
it and removed at the next safe point. It holds the controller by a weak reference, so a
controller that is dropped without :meth:`close` leaves only an inert closure behind.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Callable

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..errors import ConfigError

__all__ = ["OptimizerWatch", "check_holds"]

logger = logging.getLogger("fxfreeze")


def check_holds(module: Any, opts: list[torch.optim.Optimizer]) -> None:
    """An optimizer that holds none of the model's trainable parameters would leave the
    model untrained: refuse it; one that holds only some is named in a warning."""
    held = {id(p) for o in opts for g in o.param_groups for p in g["params"]}
    frozen = set(module.frozen_parameter_names())
    trainable = [n for n, p in module.params_by_name.items() if p.requires_grad or n in frozen]
    missing = [n for n in trainable if id(module.params_by_name[n]) not in held]
    model = module.plan.model
    if trainable and len(missing) == len(trainable):
        raise ConfigError(
            f"the optimizer holds none of {model}'s {len(trainable)} trainable parameters "
            f"(e.g. {', '.join(missing[:3])}): build it from the model being compiled, "
            "e.g. torch.optim.AdamW(model.parameters())"
        )
    if missing:
        logger.warning(
            "fxfreeze: the optimizer does not hold %d of %s's trainable parameters (%s%s); they will not train",
            len(missing), model, ", ".join(missing[:5]), ", ..." if len(missing) > 5 else "",
        )


class OptimizerWatch:
    """The global hook of one controller without an optimizer (see the module docstring).

    ``params``: the model's parameters; ``adopt(optimizer, first)``: called once for each
    optimizer found stepping them (``first``: it becomes the clock), inside the optimizer's
    ``step`` after its update."""

    def __init__(self, params: list[torch.nn.Parameter], adopt: Callable[[torch.optim.Optimizer, bool], None]) -> None:
        self._ids = {id(p) for p in params}
        self._adopt = adopt
        self._seen: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()
        self.adopted: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()
        self._handle: Any = None
        self._finished = False
        self._in_hook = 0
        me = weakref.ref(self)

        def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            watch = me()
            if watch is not None:
                watch._on_step(optimizer)

        self._handle = register_optimizer_step_post_hook(hook)

    def _on_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._finished or optimizer in self._seen:
            return
        self._seen.add(optimizer)
        if not any(id(p) in self._ids for g in optimizer.param_groups for p in g["params"]):
            return
        first = not self.adopted
        self.adopted.add(optimizer)
        self._in_hook += 1
        try:
            self._adopt(optimizer, first)
        finally:
            self._in_hook -= 1

    def close(self) -> None:
        """Stop watching; the hook is removed now, or at the next safe point when called
        from inside an optimizer's global hooks."""
        self._finished = True
        self.tidy()

    def tidy(self) -> None:
        """Remove a finished watch's hook (outside torch's loop over the global hooks)."""
        if self._finished and self._handle is not None and not self._in_hook:
            self._handle.remove()
            self._handle = None
