"""Hooks on the model's modules, as the graphs were captured with them.

A captured graph holds what the model's modules did when it was captured, their forward
hooks included: ``torch.export`` and fx run a module's hooks while tracing through it, and
record their ops. A module the graph does not call as a module (every module under export,
every module with children under fx) then never runs a hook added later, and keeps running
one removed since; backward hooks it never runs at all (the compiled module runs the
model's own forward while one is registered). These went unnoticed: a forward hook added after ``compile`` (activation
logging, a feature-matching loss, Grad-CAM) saw nothing, and a removed one stayed in the
training graph.

:class:`HookWatch` notices such a change at the next call, and the compiled module captures
again. It is cheap when nothing changed: torch numbers every hook handle it makes
(``RemovableHandle.next_id``), so an added hook shows as a new number, and a removed one as
a shorter hook dict among those that held hooks at the last look; only then are the
modules walked. Hooks the model's own forward installs during a call (Hugging Face's output
recorders) are taken as they are after that call (:meth:`HookWatch.absorb`).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.modules import module as _module
from torch.utils.hooks import RemovableHandle

__all__ = ["HookWatch"]

#: per-module hook dicts that a graph bakes in (or bypasses)
_KINDS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
#: torch's global module hooks (``register_module_forward_hook`` and the like)
_GLOBAL = ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_pre_hooks", "_global_backward_hooks")


def _scan(model: nn.Module) -> tuple[frozenset[tuple[int, str, Any]], list[dict[Any, Any]], dict[int, str]]:
    """(every hook below the root and every global module hook, the dicts holding them,
    module id -> its name)."""
    hooks: set[tuple[int, str, Any]] = set()
    dicts: list[dict[Any, Any]] = []
    names: dict[int, str] = {}
    for name, m in model.named_modules():
        if m is model:
            continue  # the root's own hooks run around the call, as without fxfreeze
        for kind in _KINDS:
            d = getattr(m, kind, None)
            if d:
                dicts.append(d)
                names[id(m)] = name
                hooks.update((id(m), kind, key) for key in d)
    for kind in _GLOBAL:
        d = getattr(_module, kind, None)
        if isinstance(d, dict):
            dicts.append(d)
            hooks.update((0, kind, key) for key in d)
    return frozenset(hooks), dicts, names


class HookWatch:
    """The hooks of ``model``'s submodules since the last look (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._next_id = RemovableHandle.next_id
        self._state, self._dicts, self._names = _scan(model)
        self._sizes = tuple(map(len, self._dicts))
        self._told: str | None = None
        #: the modules with a backward hook ("" if none), which no captured graph runs: a
        #: graph does not call its modules as modules, and tracing leaves the hooks' autograd
        #: functions out (they fired in the model's own forward only)
        self.backward = self._backward()

    def _backward(self) -> str:
        names = {"a global module hook" if i == 0 else self._names.get(i, "?") for i, kind, _ in self._state if "backward" in kind}
        return ", ".join(sorted(names))

    def backward_told(self) -> bool:
        """Whether the current backward hooks were reported already (reported once per set)."""
        now = self.backward
        told, self._told = self._told == now, now
        return told

    def absorb(self) -> None:
        """After a call of the compiled module: hooks the model's own forward added or
        removed meanwhile are part of what that call ran (Hugging Face models install their
        output recorders at the first ``output_hidden_states=True`` call, inert otherwise);
        they become the hooks of the last look, without capturing again."""
        self.changed()

    def changed(self) -> str | None:
        """None when the hooks are as at the last look; else which modules' hooks changed
        (and the new hooks become the ones the graphs are captured with)."""
        if RemovableHandle.next_id == self._next_id and tuple(map(len, self._dicts)) == self._sizes:
            return None
        self._next_id = RemovableHandle.next_id
        state, dicts, names = _scan(self._model)
        self._dicts, self._sizes = dicts, tuple(map(len, dicts))
        if state == self._state:
            return None
        added, removed = state - self._state, self._state - state
        self._state, known = state, {**self._names, **names}
        self._names = names
        self.backward = self._backward()

        def where(hooks: frozenset[tuple[int, str, Any]]) -> str:
            mods = sorted({"a global module hook" if i == 0 else known.get(i, "?") for i, _, _ in hooks})
            return ", ".join(mods[:4]) + (f" and {len(mods) - 4} more" if len(mods) > 4 else "")

        parts = ([f"added on {where(added)}"] if added else []) + ([f"removed from {where(removed)}"] if removed else [])
        return "hooks " + "; ".join(parts)
