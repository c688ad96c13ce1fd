"""The eager path of a compiled module: the model's own forward, with the frozen prefix cut.

A call no graph takes (past ``max_graphs``, a capture that failed, a model whose graph would
lose something: :mod:`~fxfreeze.runtime.own_forward`, a model only ``hooks`` could capture)
runs the model's own forward. The frozen prefix must be cut there as
:class:`~fxfreeze.passes.CutBackward` cuts it in a graph: forward hooks on the frozen
blocks' modules detach their outputs (:meth:`EagerCut._cut_eagerly`).

A leaf module that the frozen prefix shares with later code (one ``nn.Dropout`` after the
embedding and before the classifier) is held in eval mode by no block: its calls are counted
in each forward and those the plan's graph puts in the prefix run in eval mode
(:class:`_SharedCalls`), as :func:`~fxfreeze.passes.cut_backward.call_in_eval` does in a graph
(both read :func:`~fxfreeze.passes.cut_backward.shared_module_calls`).

A call whose inputs require a gradient is not cut (:func:`wants_input_grad`): the gradient
must reach them through the frozen blocks, as it does in eager code with those blocks'
parameters frozen. A GAN's generator trains through its discriminator (``D(G(z))``), a
gradient penalty differentiates ``D`` with respect to its input, adversarial training and
saliency maps likewise. Such calls run the model's own forward, uncut: the frozen blocks
are in eval mode and their parameters get no gradient, but their backward runs.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map

from ..passes.cut_backward import enter_eval, restore_modes, shared_module_calls
from ..passes.cut_ops import crashing_layout, cut_tensor
from .own_forward import leaf_outputs
from .dynamo import outside_dynamo

__all__ = ["EagerCut", "wants_input_grad"]


def wants_input_grad(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Does a tensor among the call's arguments require a gradient (with autograd on)?

    Example::

        >>> wants_input_grad((torch.ones(2, requires_grad=True),), {}), wants_input_grad((torch.ones(2),), {"n": 3})
        (True, False)
    """
    if not torch.is_grad_enabled():
        return False
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves((args, kwargs)))


class EagerCut:
    """The eager half of :class:`~fxfreeze.runtime.module.FreezableModule` (which provides
    ``_model``, ``_analysis``, ``_num_frozen``, ``_eval_modules``, ``_installed``, ``_eager_forward``
    and ``_bypass``)."""

    _model: nn.Module
    _analysis: Any
    _num_frozen: int
    _eval_modules: list[nn.Module]
    #: the plan's graph's calls of modules several blocks share (read at the first eager cut)
    _shared_calls: dict[str, list[int | None]] | None = None
    _installed: Any
    _eager_forward: Any
    _bypass: Any

    @outside_dynamo  # hooks registered per call: the model's forward runs as it is
    def _run_eager(self, args: tuple[Any, ...], kwargs: dict[str, Any], leaves: bool = False) -> Any:
        with self._cut_eagerly(leaves) if not wants_input_grad(args, kwargs) else contextlib.nullcontext():
            if self._installed is not None:  # model(...) would route back here: call its forward
                with self._bypass():
                    return self._eager_forward(*args, **kwargs)
            return self._model(*args, **kwargs)

    @contextlib.contextmanager
    def _cut_eagerly(self, leaves: bool = False) -> Iterator[None]:
        """The frozen prefix's cut in the model's own forward: what :class:`CutBackward` does
        in a graph. Frozen parameters already get no gradient; detaching the outputs of the
        frozen blocks' modules also keeps autograd out of the prefix when something in it
        still requires a gradient (a parameter shared with a trainable block, which then
        trains from its trainable uses only, as in the graphs). A
        block lists only modules that run inside it (a module reused elsewhere, such as a
        shared dropout, belongs to no block), so no output that a trainable block makes is
        detached. With ``leaves`` (a model that trains through its own forward: checkpoints,
        custom Functions, tensor hooks) they become leaves that require a gradient: reentrant ``torch.utils.checkpoint`` (or a
        reversible layer's function) computes no gradient for a block whose inputs need none,
        so the first trainable block after the prefix would not train."""
        if not self._eval_modules or not torch.is_grad_enabled():
            yield
            return
        hook = leaf_outputs if leaves else _detach_outputs
        handles = [m.register_forward_hook(hook) for m in self._eval_modules]
        if self._shared_calls is None:  # the plan's graph does not change: read it once
            self._shared_calls = shared_module_calls(self._analysis.graph_module.graph.nodes)
        watches = _SharedCalls.install(self._model, self._shared_calls, self._num_frozen, handles)
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for w in watches:  # a forward that raised inside a shared call left its modes unrestored
                w.restore()


def _detach_outputs(module: nn.Module, inputs: Any, output: Any) -> Any:
    """Forward hook: ``output`` with every tensor that requires a gradient detached (tuples,
    lists, dicts and registered pytree containers such as Hugging Face's ``ModelOutput``), and
    one in a layout that would crash a trainable GroupNorm's backward made contiguous
    (:func:`~fxfreeze.passes.cut_ops.crashing_layout`)."""
    def cut(t: Any) -> bool:
        return isinstance(t, torch.Tensor) and (t.requires_grad or crashing_layout(t))

    if not any(cut(t) for t in tree_flatten(output)[0]):
        return None  # nothing to cut: the module's own output object, untouched
    return tree_map(lambda t: cut_tensor(t) if cut(t) else t, output)


class _SharedCalls:
    """Hooks on one module the plan's graph calls from several blocks: its ``i``-th call of
    a forward runs in eval mode when the graph's ``i``-th call of it lies in the frozen
    prefix (modes put back after the call). Calls beyond those the graph holds follow the
    model's mode."""

    def __init__(self, blocks: list[int | None], k: int) -> None:
        self.frozen = [b is not None and b < k for b in blocks]
        self.calls = 0
        self.saved: list[list[tuple[nn.Module, bool]]] = []

    @staticmethod
    def install(model: nn.Module, calls: dict[str, list[int | None]], k: int, handles: list[Any]) -> list["_SharedCalls"]:
        """Hooks (appended to ``handles``) on the shared modules with a call in the first ``k`` blocks."""
        watches = []
        for target, blocks in calls.items():
            if not any(b is not None and b < k for b in blocks):
                continue
            try:
                module = model.get_submodule(target)
            except AttributeError:
                continue
            watch = _SharedCalls(blocks, k)
            handles += [module.register_forward_pre_hook(watch.before), module.register_forward_hook(watch.after)]
            watches.append(watch)
        return watches

    def restore(self) -> None:
        while self.saved:
            self.after(None, None, None)

    def before(self, module: nn.Module, args: Any) -> None:
        i, self.calls = self.calls, self.calls + 1
        self.saved.append(enter_eval(module) if i < len(self.frozen) and self.frozen[i] and module.training else [])

    def after(self, module: Any, args: Any, output: Any) -> None:
        restore_modes(self.saved.pop())
