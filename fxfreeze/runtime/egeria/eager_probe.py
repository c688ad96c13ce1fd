"""Egeria's probe on a model that runs eagerly (``FreezableModule.eager_only``).

Such a model has no graph to cut blocks out of: neither fx nor ``torch.export`` captured its
forward (data-dependent control flow at the root: DeBERTa-v2's loss code, wav2vec2's
masking). Its blocks usually can be captured one by one: an encoder layer has none of that
control flow. So :class:`EagerProbe` measures a block that is one module by itself:

- **Values.** The model's own forward runs on the probe batch in eval mode under
  ``no_grad``, with forward hooks on the tracked blocks' modules that record each block's
  call (its tensors, and the structure of its arguments) and its output tensors, and stop
  the forward once the last of them has run. Names: ``b{j}.in{i}`` for the ``i``-th tensor
  block ``j`` was called with, ``b{j}.out{i}`` for the ``i``-th tensor it returned.
- **A block's graph.** The module, called with the recorded structure and its tensors as
  the only inputs (:class:`_BlockCall`), is captured like any model (fx, else export) and
  every compute node is labelled as one block; :func:`~fxfreeze.passes.subgraph.extract`
  then gives the same kind of standalone graph as for a captured model, which the
  reference builders copy and quantize as they do every other block.

A block of several modules (a stem whose modules are glued by code at the root) cannot be
isolated this way, nor can a block whose module does not capture or is called more than
once: it is recorded as unmeasurable, with a warning, and Egeria never freezes it or
anything after it. The values and graphs are otherwise what :class:`ActivationProbe` gives,
so the policy runs unchanged.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ...graph_utils import COMPUTE_OPS
from ...plan import META_BLOCK
from ...passes.subgraph import Subgraph, extract
from ...trace import capture_call
from .probe import ActivationProbe

__all__ = ["EagerProbe"]

logger = logging.getLogger("fxfreeze")


class _Enough(BaseException):
    """Raised by the last tracked block's hook: the rest of the forward is not needed (a
    BaseException, so that a forward catching ``Exception`` lets it through)."""


class _BlockCall(nn.Module):
    """``block(*args, **kwargs)`` of one recorded call as a function of that call's tensors
    alone (the other arguments are constants), returning the output's tensors as a tuple."""

    def __init__(self, block: nn.Module, leaves: list[Any], spec: Any) -> None:
        super().__init__()
        self.block = block
        self._leaves = [None if isinstance(x, torch.Tensor) else x for x in leaves]
        self._slots = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        self._spec = spec

    def call(self, tensors: list[Any]) -> tuple[Any, ...]:
        leaves = list(self._leaves)
        for i, t in zip(self._slots, tensors):
            leaves[i] = t
        args, kwargs = tree_unflatten(leaves, self._spec)
        out = self.block(*args, **kwargs)
        return tuple(t for t in tree_flatten(out)[0] if isinstance(t, (torch.Tensor, fx.Proxy)))


def _block_call(block: nn.Module, leaves: list[Any], spec: Any) -> nn.Module:
    """A :class:`_BlockCall` whose ``forward`` names one parameter per tensor (``x0``, ``x1``,
    ...): fx and export both take a fixed signature, not ``*args``."""
    n = sum(isinstance(x, torch.Tensor) for x in leaves)
    names = ", ".join(f"x{i}" for i in range(n))
    namespace: dict[str, Any] = {}
    exec(f"def forward(self, {names}):\n    return self.call([{names}])\n", namespace)  # noqa: S102 - generated signature
    cls = type("BlockCall", (_BlockCall,), {"forward": namespace["forward"]})
    return cls(block, leaves, spec)


class EagerProbe(ActivationProbe):
    """:class:`ActivationProbe` for a model without a graph (see the module docstring).
    ``unmeasurable`` is the policy's dict of blocks it never judges (with why): a block this
    probe cannot isolate is added there, with a warning."""

    def __init__(self, module: Any, size: int, hi: int, unmeasurable: dict[int, str], timeout: float | None = None) -> None:
        super().__init__(module, size, hi)
        self.unmeasurable = unmeasurable
        self.timeout = timeout
        blocks = module.plan.blocks[:hi]
        self._paths = [b.modules[0] if len(b.modules) == 1 else None for b in blocks]
        self._names = [b.name for b in blocks]
        self._subs: dict[int, Subgraph] = {}

    # -- values ------------------------------------------------------------------------------------
    def _record(self, args: tuple[Any, ...], kwargs: dict[str, Any], hi: int) -> dict[int, tuple[list[Any], Any, list[Any]]]:
        """The model's own forward on a call, in eval mode under no_grad, up to the last
        measurable block before ``hi``: per block, its call's leaves and structure and its
        output tensors (the first call of its module)."""
        model = self.module.model
        mods = {j: model.get_submodule(p) for j, p in enumerate(self._paths[:hi]) if p is not None and j not in self.unmeasurable}
        if not mods:
            return {}
        last = max(mods)
        rec: dict[int, tuple[list[Any], Any, list[Any]]] = {}
        calls: dict[int, int] = {}

        def hook_for(j: int) -> Callable[..., None]:
            def hook(m: nn.Module, a: tuple[Any, ...], kw: dict[str, Any], out: Any) -> None:
                calls[j] = calls.get(j, 0) + 1
                if j not in rec:
                    leaves, spec = tree_flatten((a, kw))
                    rec[j] = (leaves, spec, [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)])
                if j == last:
                    raise _Enough

            return hook

        handles = [m.register_forward_hook(hook_for(j), with_kwargs=True) for j, m in mods.items()]
        training = [m for m in model.modules() if m.training]
        devices = sorted({t.device.index or 0 for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.is_cuda})
        try:
            for m in training:
                m.training = False
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                try:
                    self.module._run_eager(args, kwargs)
                except _Enough:
                    pass
        finally:
            for m in training:
                m.training = True
            for h in handles:
                h.remove()
        for j, n in calls.items():
            if n > 1 and j != last:  # which call would a reference compare with?
                self._unmeasurable(j, f"its module {self._paths[j]!r} runs {n} times in one forward")
                rec.pop(j, None)
        return rec

    def _values(self, entry: Any, args: tuple[Any, ...], kwargs: dict[str, Any], hi: int) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for j, (leaves, spec, outs) in self._record(args, kwargs, hi).items():
            tensors = [x.detach() for x in leaves if isinstance(x, torch.Tensor)]
            values.update({f"b{j}.in{i}": t for i, t in enumerate(tensors)})
            values.update({f"b{j}.out{i}": t.detach() for i, t in enumerate(outs)})
            if j not in self._subs and j not in self.unmeasurable:
                self._isolate(j, leaves, spec, outs)
        return values

    def _run(self, hi: int) -> dict[str, Any]:
        return self._values(None, self.args or (), self.kwargs, hi)

    def example_values(self) -> dict[str, Any]:
        args, kwargs = self.module.graphs.primary_inputs()
        return self._values(None, args, kwargs, self.hi)

    # -- graphs ------------------------------------------------------------------------------------
    def _unmeasurable(self, j: int, why: str) -> None:
        if j not in self.unmeasurable:
            self.unmeasurable[j] = why
            logger.warning(
                "egeria: block %d (%s) has no reference on this eagerly run model (%s): it is never judged "
                "converged, so the policy will not freeze it or anything after it; training goes on",
                j, self._names[j], why,
            )

    def _glued(self, j: int) -> None:
        self._unmeasurable(j, f"it is {len(self.module.plan.blocks[j].modules)} modules joined by the model's own code")

    def _isolate(self, j: int, leaves: list[Any], spec: Any, recorded: list[Any]) -> None:
        """Block ``j``'s module captured on its recorded call, as a one-block graph."""
        call = _block_call(self.module.model.get_submodule(self._paths[j]), leaves, spec)
        tensors = tuple(x for x in leaves if isinstance(x, torch.Tensor))
        training = [m for m in call.modules() if m.training]  # the eval-mode graph, as the probe runs
        try:
            for m in training:
                m.training = False
            cap = capture_call(call, tensors, {}, strategy="auto", timeout=self.timeout)
            if not cap.executable:
                raise RuntimeError("; ".join(cap.reasons[-2:]))
            for n in cap.graph.nodes:
                if n.op in COMPUTE_OPS or n.op == "get_attr":
                    n.meta[META_BLOCK] = 0
            sub = extract(cap.graph, cap.attributes(call), 0, 1, class_name=f"Block{j}")
            placeholders = [n.name for n in cap.graph.nodes if n.op == "placeholder"]
            returned = [a.name for a in _flat(_output_args(cap.graph)) if isinstance(a, fx.Node)]
            ins = [f"b{j}.in{placeholders.index(n)}" for n in sub.inputs]
            outs = [f"b{j}.out{returned.index(n)}" for n in sub.outputs]
            if len(placeholders) != len(tensors) or not outs or not _reproduces(sub, ins, outs, tensors, recorded):
                raise RuntimeError("its captured graph does not reproduce the recorded call")
        except Exception as e:  # noqa: BLE001 - any failure: this block is never judged
            self._unmeasurable(j, f"its module could not be captured alone: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            return
        finally:
            for m in training:
                m.training = True
        self._subs[j] = Subgraph(sub.graph_module, j, j + 1, ins, outs, {j: outs})

    def block(self, j: int) -> Subgraph:
        """Block ``j`` alone (made from the last probe values); KeyError for a block this
        probe could not isolate (the policy skips those: they are in ``unmeasurable``)."""
        if j not in self._subs and j not in self.unmeasurable and self.args is not None:
            self.run(hi=j + 1)
        return self._subs[j]

    def depth(self, stop: int) -> int:
        return min(self.hi, stop)  # the forward stops after the last tracked block anyway

    def prepare(self, lo: int, hi: int) -> None:
        """Isolate the blocks ``[lo, hi)`` not yet isolated (a forward on the probe batch)."""
        if self.args is not None and any(j not in self._subs and j not in self.unmeasurable for j in range(lo, hi)):
            self.run(hi=hi)
        for j in range(lo, hi):
            if j not in self._subs and self._paths[j] is None:
                self._glued(j)

    def set_up(self, prepare: Callable[[int, Subgraph, list[Any]], Any], stops: Iterable[int]) -> None:
        """The one-time set-up on the example call: every block isolated and its reference
        builder prepared (``prepare(j, block_graph, block_inputs)``)."""
        for j, p in enumerate(self._paths):
            if p is None:
                self._glued(j)
        values = self.example_values()
        for j, sub in sorted(self._subs.items()):
            prepare(j, sub, [values[n] for n in sub.inputs])


@torch.no_grad()
def _reproduces(sub: Subgraph, ins: list[str], outs: list[str], tensors: tuple[Any, ...], recorded: list[Any]) -> bool:
    """Does the block's graph, run on the recorded call's tensors, return what the module
    returned (same shapes, values within 1e-4)? A leaf module that fx keeps whole (an
    ``nn.LSTM``) returns one opaque value for a tuple, which would map outputs wrongly."""
    got = sub.graph_module(*[tensors[int(n.rsplit("in", 1)[1])] for n in ins])
    got = got if isinstance(got, (tuple, list)) else (got,)
    if len(got) != len(outs):
        return False
    for g, n in zip(got, outs):
        r = recorded[int(n.rsplit("out", 1)[1])]
        if not isinstance(g, torch.Tensor) or g.shape != r.shape or not torch.allclose(g.float(), r.float(), rtol=1e-4, atol=1e-5):
            return False
    return True


def _output_args(graph: fx.Graph) -> Any:
    return next(n for n in graph.nodes if n.op == "output").args[0]


def _flat(x: Any) -> list[Any]:
    """The leaves of nested tuples, lists and dicts (a graph's output argument), in order."""
    if isinstance(x, (tuple, list)):
        return [y for v in x for y in _flat(v)]
    if isinstance(x, dict):
        return [y for v in x.values() for y in _flat(v)]
    return [x]
