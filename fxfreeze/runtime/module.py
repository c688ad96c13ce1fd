"""``fxfreeze.compile`` and the module it returns.

:class:`FreezableModule` runs captured graphs instead of the model's Python ``forward`` and
shares every parameter, buffer and submodule with the original model: its ``state_dict()``
keys are the original's, so checkpoints move freely between the two. Until a prefix is
frozen it computes exactly what the model computes; with ``k`` blocks frozen the
:class:`~fxfreeze.passes.CutBackward` pass keeps autograd out of those blocks, their
parameters stop requiring gradients and their modules run in ``eval()`` mode (BatchNorm
running statistics stop updating, dropout is off).

- **Any call.** Graphs are kept per kind of call (:mod:`fxfreeze.runtime.graphs`): another
  keyword set, dtype or shape that a graph cannot take is captured again, up to
  ``max_graphs``; beyond, or when a capture fails, the model's own forward runs, with the
  same frozen prefix: its parameters get no gradient, its modules run in eval mode and the
  outputs of its modules are detached, so autograd never enters it (:meth:`_cut_eagerly`).
  ``inspect.signature(fm.forward)`` is the model's, so libraries that inspect it (the HF
  Trainer drops dataset columns the signature does not name) see the model.
- **Any model.** A model that neither fx nor ``torch.export`` can capture (data-dependent
  control flow in its forward) runs its own forward on every call, frozen the same way, from
  a plan made from its module order (:attr:`eager_only`): no activation cache; Egeria
  captures each block that is one module alone (``runtime/egeria/eager_probe.py``).
- **One training mode.** The module and the model share one mode: ``fm.training`` *is*
  ``model.training``, and ``train()``/``eval()`` on either object switch both. Frozen
  modules stay in eval mode whoever calls ``train()``.
- **In place.** :meth:`FreezableModule.install` routes calls of the original model to the
  compiled module, for training loops that hold the model (the HF Trainer and Lightning
  integrations use it).
"""

from __future__ import annotations

import contextlib
import logging
import types
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch import nn

from ..api import Analysis
from ..calls import canonical_call, describe_call, plain_mappings
from ..errors import CallError, FreezeError
from ..forwards import forward_with
from ..passes import CutBackward
from ..plan import HEAD, FreezePlan
from ..plan_build import block_of, param_uses, starts_from_plan
from ..sample_ids import pop_sample_ids
from ..trace import DEFAULT_TIMEOUT
from .own_forward import OwnForwardWatch
from .cached_graph import CachedGraph
from .graphs import DEFAULT_MAX_GRAPHS, GraphCache, GraphEntry
from .hook_watch import HookWatch
from .loader import SampleIdLoader, SampleIds
from .ownership import hold_eval, release_eval, release_owner
from .dynamo import outside_dynamo
from .eager_cut import EagerCut, wants_input_grad
from .routing import Routing

__all__ = ["FreezableModule", "SampleIdLoader"]

logger = logging.getLogger("fxfreeze")
_INF = 1 << 30
class FreezableModule(Routing, EagerCut, SampleIds, nn.Module):
    """The compiled model. Use it exactly like the original; see :func:`compile`."""

    def __init__(
        self,
        model: nn.Module,
        analysis: Analysis,
        *,
        max_graphs: int = DEFAULT_MAX_GRAPHS,
        capture_timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__()
        # Share the original hierarchy under the same names: same state_dict keys, same
        # parameter objects, and .to()/.train() reach the original modules.
        # The root's parameter and buffer dicts are the model's own: a tensor swapped in at the
        # root (torch.func.functional_call on this module) is the model's too.
        for name, child in model._modules.items():
            self._modules[name] = child
        self._parameters, self._buffers = model._parameters, model._buffers
        self._non_persistent_buffers_set = model._non_persistent_buffers_set
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_analysis", analysis)
        self.plan: FreezePlan = analysis.plan
        self._installed: tuple[bool, Any] | None = None  # (had an instance forward, its value)
        self._eager_forward = model.forward
        self.graphs = GraphCache(
            model, analysis.capture, max_graphs=max_graphs, timeout=capture_timeout, bypass=self._capturing
        )
        self._own_forward = OwnForwardWatch(model)
        self._num_frozen = 0
        self._saved_requires_grad: dict[str, bool] = {}
        self._eval_modules: list[nn.Module] = []
        self.freezer: Any = None  # set by compile()
        #: called with the canonical (args, kwargs) of training-mode forwards (Egeria's probe)
        self.probe_hook: Any = None
        self._cache: Any = None  # an ActivationCache when caching is on (set by compile)
        self._cached: CachedGraph | None = None
        #: the hooks the graphs were captured with (a change captures again: hook_watch.py)
        self._hooks = None if self.graphs.eager_only else HookWatch(model)
        ix = analysis.index
        proposal = starts_from_plan(ix, self.plan)
        uses, _ = param_uses(ix)
        self._param_last_block: dict[str, int] = {}
        self._param_first_block: dict[str, int] = {}
        for name, positions in uses.items():
            bs = [_INF if b == HEAD else b for b in (block_of(i, proposal.starts, proposal.head_start) for i in positions)]
            self._param_first_block[name], self._param_last_block[name] = min(bs), max(bs)
        self._named_params = dict(model.named_parameters())
        self.forward = types.MethodType(forward_with(self.graphs.signature, FreezableModule._run), self)

    # -- one training mode with the model ------------------------------------------------------
    @property  # type: ignore[override]
    def training(self) -> bool:
        model = self.__dict__.get("_model")
        return True if model is None else model.training

    @training.setter
    def training(self, mode: bool) -> None:
        model = self.__dict__.get("_model")
        if model is not None:
            model.training = mode

    # -- public state ------------------------------------------------------------------------------
    @property
    def num_frozen(self) -> int:
        """How many leading blocks are frozen now."""
        return self._num_frozen

    @property
    def strategy(self) -> str:
        """How the model was captured: ``fx`` or ``export``."""
        return self._analysis.capture.strategy

    @property
    def eager_only(self) -> bool:
        """True when no graph of the model could be captured: every call runs its own forward
        (frozen blocks still get no gradient and run in eval mode; no activation cache)."""
        return self.graphs.eager_only

    @property
    def model(self) -> nn.Module:
        """The original model (shares every parameter with this module)."""
        return self._model

    @property
    def params_by_name(self) -> dict[str, nn.Parameter]:
        """The model's parameters by name (the names plans and policies use)."""
        return self._named_params

    @property
    def frozen_modules(self) -> list[nn.Module]:
        """The modules of the frozen blocks (held in eval mode)."""
        return list(self._eval_modules)

    @property
    def activation_cache(self) -> Any:
        """The :class:`~fxfreeze.runtime.cache.ActivationCache`, or None when caching is off."""
        return self._cache

    @property
    def cached_graph_module(self) -> fx.GraphModule | None:
        """The training graph whose frozen prefix reads the activation cache (None until a
        cached training step ran)."""
        return self._cached.gm if self._cached is not None else None

    # -- graphs ------------------------------------------------------------------------------------
    def graph_module_of(self, entry: GraphEntry) -> fx.GraphModule:
        """``entry``'s GraphModule on the model's current tensors, with the current cut."""
        gm = entry.graph_module
        if gm is None:
            gm = entry.capture.build(self._model)
            CutBackward(self._num_frozen)(gm)
            entry.graph_module = gm
        return gm

    def graph_module(self, training: bool | None = None) -> fx.GraphModule:
        """The graph module of the example call's structure in the given (default:
        current) training mode."""
        mode = self.training if training is None else training
        return self.graph_module_of(self.graphs.primary(mode))

    def _apply(self, fn: Any, recurse: bool = True) -> "FreezableModule":
        super()._apply(fn, recurse)  # (root-level tensors: the model's dicts, kept in step)
        # graphs may have baked in the old dtype or device: capture again on the next call
        self._reset_graphs()
        self._named_params = dict(self._model.named_parameters())
        return self

    def _reset_graphs(self) -> None:
        """Forget every captured graph (and the cache's rewritten ones): the next calls capture anew."""
        self.graphs.reset()
        if self._cached is not None:
            self._cached.reset()

    # -- forward -------------------------------------------------------------------------------------
    def _run(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        ids = pop_sample_ids(kwargs)  # a batch that carries its sample ids (fxfreeze.with_sample_ids)
        if ids is not None and self._cache is not None:
            with self.sample_ids(ids):
                return self._run(args, kwargs)
        amp = self._begin_call()  # accelerate's mixed precision, which the graphs bypass: apply it
        with amp.region() if amp is not None else contextlib.nullcontext():
            out = self._run_graphs(args, kwargs)
        self._end_call(out)
        return amp.outputs(out) if amp is not None else out

    # torch.compile(fm) traces the graphs' run; the bookkeeping around it stays Python (its
    # counters and lookups would make dynamo guard on them and recompile at every call)
    @outside_dynamo
    def _begin_call(self) -> Any:
        self.count_call()
        return self.wrapper_amp()

    @outside_dynamo
    def _end_call(self, out: Any) -> None:
        if self._hooks is not None:
            self._hooks.absorb()  # hooks the model's own forward installed are no change of the user's
        if self.freezer is not None and self._call_trains:
            loss = _loss_of(out)  # a model that computes its own loss (labels=): the safety net reads it
            if loss is not None:
                self.freezer.observe_loss(loss)

    def _run_graphs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        leaves, entry, gm, args, kwargs = self._pick(args, kwargs)
        if entry is None or gm is None:
            return self._run_eager(args, kwargs, leaves=leaves)
        grad_mode = torch.is_grad_enabled()
        try:
            return entry.run(gm, self._model, args, kwargs, self.graphs.signature)
        finally:
            torch._C._set_grad_enabled(grad_mode)  # an exception inside a frozen prefix

    @outside_dynamo
    def _pick(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bool, Any, Any, Any, Any]:
        """(leaves, entry, graph module, args, kwargs) for this call; entry None: run eagerly (with ``leaves``,
        the frozen outputs as leaves: :mod:`~fxfreeze.runtime.own_forward`)."""
        model = self._model
        changed = self._hooks.changed() if self._hooks is not None else None
        if changed:
            logger.info("fxfreeze: %s since %s's graphs were captured: capturing again", changed, type(model).__name__)
            self._reset_graphs()
        training = model.training
        try:
            args, kwargs = canonical_call(self.graphs.signature, args, kwargs)
        except TypeError as e:
            raise CallError(
                f"{type(model).__name__}.forward does not accept this call ({describe_call(args, kwargs)}): {e}"
            ) from e
        eager_args, eager_kwargs = args, kwargs
        args, kwargs = plain_mappings(args, kwargs)  # a BatchEncoding argument: its dict
        if self._call_trains and self.probe_hook is not None:
            self.probe_hook(args, kwargs)
        if self._own_forward.on(self._analysis.capture, training):  # before a capture it would not use
            return True, None, None, eager_args, eager_kwargs
        if self._num_frozen and wants_input_grad(args, kwargs):  # through the frozen blocks: uncut, eager
            return False, None, None, eager_args, eager_kwargs
        if self._hooks is not None and self._hooks.backward:
            if not self._hooks.backward_told():
                logger.warning(
                    "fxfreeze: backward hooks on %s, which a captured graph cannot run: %s runs its own forward while "
                    "they are registered (frozen blocks still cut, no activation cache)",
                    self._hooks.backward, type(model).__name__,
                )
            return False, None, None, eager_args, eager_kwargs
        entry = self.graphs.lookup(training, args, kwargs)
        if entry is None:  # (a training call of a model that must run its own forward returned above)
            return False, None, None, eager_args, eager_kwargs
        if self._own_forward.on(entry.capture, training):  # the model's own forward keeps what its graph would lose
            return True, None, None, eager_args, eager_kwargs
        gm = self.graph_module_of(entry)
        if self._call_trains and self._cached is not None and self._num_frozen > 0 and self._cache.enabled \
                and self._cached.pays(self._num_frozen, self.freezer, self.prefix_trains):
            cgm = self._cached.graph_for(entry, gm, model, self._num_frozen, self.frozen_tensors)
            if cgm is not None:
                gm = cgm
        return False, entry, gm, args, kwargs

    def detach(self) -> None:
        """Give the model back: unfreeze every block, stop the controller (optimizer hook,
        background threads) and undo :meth:`install`. The module still runs, unfrozen."""
        if self.freezer is not None:
            self.freezer.detach()
        self._set_prefix(0)
        self.uninstall()
        release_owner(self._model, self)

    # -- freezing mechanics (the controller decides; this applies) ------------------------
    def freeze_prefix(self, k: int) -> None:
        """Freeze exactly the first ``k`` blocks (0 unfreezes everything)."""
        if self.freezer is not None:
            self.freezer.freeze_prefix(k, reason="freeze_prefix() called")
        else:
            self._set_prefix(k)

    def check_prefix(self, k: Any) -> int:
        """``k`` if it is a valid number of frozen blocks for this plan, else FreezeError."""
        if isinstance(k, bool) or not isinstance(k, int):
            raise FreezeError(f"the number of frozen blocks must be an int, got {type(k).__name__} {k!r}")
        if k < 0:
            raise FreezeError(f"the number of frozen blocks cannot be negative, got {k}")
        if k > self.plan.max_frozen:
            raise FreezeError(
                f"cannot freeze {k} blocks: the plan of {self.plan.model} has {len(self.plan.blocks)} "
                f"blocks and at most {self.plan.max_frozen} may be frozen (the head is never frozen"
                + ("" if self.plan.max_frozen == len(self.plan.blocks) else ", and it trains no parameter that reaches an output")
                + ")"
            )
        return k

    def frozen_parameter_names(self, k: int | None = None) -> list[str]:
        """Parameters frozen with a prefix of ``k`` blocks: those whose every use lies in it
        (a parameter shared with a later block or the head keeps training)."""
        k = self._num_frozen if k is None else k
        return [n for n, last in self._param_last_block.items() if last < k]

    def prefix_trains(self, k: int) -> list[str]:
        """Parameters a prefix of ``k`` blocks uses that keep training (tied with a later
        block or the head, such as GPT-2's embedding): its outputs change at every step."""
        last = self._param_last_block
        return [n for n, first in self._param_first_block.items()
                if first < k <= last[n] and self._named_params[n].requires_grad]

    def frozen_tensors(self, k: int) -> list[tuple[str, torch.Tensor]]:
        """What the outputs of a frozen prefix of ``k`` blocks depend on: its frozen
        parameters and its buffers, by name (the activation cache's key and watch)."""
        buffers = dict(self._model.named_buffers())
        tensors = [(n, self._named_params[n]) for n in self.frozen_parameter_names(k)]
        return tensors + [(n, buffers[n]) for b in self.plan.blocks[:k] for n in b.buffers if n in buffers]

    def _frozen_modules(self, k: int) -> list[nn.Module]:
        mods: list[nn.Module] = []
        for b in self.plan.blocks[:k]:
            for path in b.modules:
                try:
                    mods.append(self._model.get_submodule(path))
                except AttributeError:
                    continue
        return mods

    def _set_prefix(self, k: int, keep_grads: bool = False) -> None:
        """Freeze exactly blocks ``0..k-1``. ``keep_grads``: newly frozen parameters keep this
        step's gradients (another optimizer of the round may still step them)."""
        k = self.check_prefix(k)
        # parameters: restore the previously frozen, then freeze the new prefix
        for name, flag in self._saved_requires_grad.items():
            self._named_params[name].requires_grad_(flag)
        self._saved_requires_grad = {}
        for name in self.frozen_parameter_names(k):
            p = self._named_params[name]
            self._saved_requires_grad[name] = p.requires_grad
            p.requires_grad_(False)
            if not keep_grads:
                p.grad = None
        # modules: frozen ones run in eval mode, whatever train() calls follow
        mode = self.training
        for m in self._eval_modules:
            release_eval(m, mode)
        self._eval_modules = self._frozen_modules(k)
        for m in self._eval_modules:
            hold_eval(m)
        self._num_frozen = k
        if self.graphs.set_prefix(k, self._eval_modules, len(self.plan.blocks)) and self._cached is not None:
            self._cached.reset()  # its graphs were rewritten from dropped ones

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters that currently require gradients."""
        return (p for p in self.parameters() if p.requires_grad)

    def extra_repr(self) -> str:
        return (
            f"plan={self.plan.model} ({len(self.plan.blocks)} blocks, {self.strategy}), "
            f"num_frozen={self._num_frozen}, " + ("eager only" if self.eager_only else f"graphs={len(self.graphs)}")
        )


def _loss_of(out: Any) -> torch.Tensor | None:
    """A scalar ``loss`` in a model's output (a Hugging Face ``ModelOutput`` or a dict)."""
    loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
    return loss if isinstance(loss, torch.Tensor) and loss.dim() == 0 else None
