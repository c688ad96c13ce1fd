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
  ``max_graphs``; beyond, or when a capture fails, the model's own forward runs.
  ``inspect.signature(fm.forward)`` is the model's, so libraries that inspect it (the HF
  Trainer drops dataset columns the signature does not name) see the model.
- **One training mode.** The module and the model share one mode: ``fm.training`` *is*
  ``model.training``, and ``train()``/``eval()`` on either object switch both. Frozen
  modules stay in eval mode whoever calls ``train()``.
- **In place.** :meth:`FreezableModule.install` routes calls of the original model to the
  compiled module, for training loops that hold the model (the HF Trainer and Lightning
  integrations use it).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import types
import weakref
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch import nn

from ..api import Analysis, analyze
from ..config import FreezeConfig, load_config
from ..errors import CallError, FreezeError, ModelError
from ..passes import CutBackward
from ..plan import HEAD, FreezePlan, block_of, param_uses, starts_from_plan
from ..trace import DEFAULT_TIMEOUT, canonical_call, describe_call, forward_signature
from .cached_graph import CachedGraph
from .graphs import DEFAULT_MAX_GRAPHS, GraphCache, GraphEntry
from .loader import SampleIdLoader

__all__ = ["FreezableModule", "SampleIdLoader", "compile"]

logger = logging.getLogger("fxfreeze")
_INF = 1 << 30
#: original model -> weak reference to the module compiled from it (a second compile takes over)
_OWNERS: "weakref.WeakKeyDictionary[nn.Module, weakref.ref[FreezableModule]]" = weakref.WeakKeyDictionary()
#: per thread: ids of compiled modules whose installed route steps aside (captures, eager calls)
_BYPASS = threading.local()


def _frozen_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """``train`` of a frozen module: it stays in eval mode, whoever asks."""
    return type(self).train(self, False)


def _hold_eval(m: nn.Module) -> None:
    m.__dict__["train"] = types.MethodType(_frozen_train, m)
    m.train(False)


def _release_eval(m: nn.Module, mode: bool) -> None:
    m.__dict__.pop("train", None)
    m.train(mode)


@contextlib.contextmanager
def plain_forward(model: nn.Module, previous: tuple[bool, Any] | None) -> Iterator[None]:
    """Within the block, ``model.forward`` is what it was before a route was installed
    (``previous``: had an instance forward, its value); nothing happens when None."""
    if previous is None:
        yield
        return
    had_now, now = "forward" in model.__dict__, model.__dict__.get("forward")
    had, value = previous
    if had:
        model.__dict__["forward"] = value
    else:
        model.__dict__.pop("forward", None)
    try:
        yield
    finally:
        if had_now:
            model.__dict__["forward"] = now
        else:
            model.__dict__.pop("forward", None)


def _forward_with(sig: inspect.Signature | None, run: Any) -> Any:
    """A per-instance ``forward`` function whose signature is ``sig`` (plus ``self``)."""

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        return run(self, args, kwargs)

    if sig is not None:
        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
        forward.__signature__ = sig.replace(parameters=[self_param, *sig.parameters.values()])  # type: ignore[attr-defined]
    return forward


class FreezableModule(nn.Module):
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
        for name, child in model._modules.items():
            self._modules[name] = child
        for name, p in model._parameters.items():
            self._parameters[name] = p
        for name, b in model._buffers.items():
            self._buffers[name] = b
        self._non_persistent_buffers_set = set(model._non_persistent_buffers_set)
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_analysis", analysis)
        self.plan: FreezePlan = analysis.plan
        self._installed: tuple[bool, Any] | None = None  # (had an instance forward, its value)
        self._eager_forward = model.forward
        self.graphs = GraphCache(
            model, analysis.capture, max_graphs=max_graphs, timeout=capture_timeout, bypass=self._capturing
        )
        self._num_frozen = 0
        self._saved_requires_grad: dict[str, bool] = {}
        self._eval_modules: list[nn.Module] = []
        self.freezer: Any = None  # set by compile()
        #: called with the canonical (args, kwargs) of training-mode forwards (Egeria's probe)
        self.probe_hook: Any = None
        self._cache: Any = None  # an ActivationCache when caching is on (set by compile)
        self._cached: CachedGraph | None = None
        ix = analysis.index
        proposal = starts_from_plan(ix, self.plan)
        uses, _ = param_uses(ix)
        self._param_last_block: dict[str, int] = {}
        for name, positions in uses.items():
            bs = [block_of(i, proposal.starts, proposal.head_start) for i in positions]
            self._param_last_block[name] = max(_INF if b == HEAD else b for b in bs)
        self._named_params = dict(model.named_parameters())
        self.forward = types.MethodType(_forward_with(self.graphs.signature, FreezableModule._run), self)

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

    @contextlib.contextmanager
    def _bypass(self) -> Iterator[None]:
        """Calls of the model inside go to its own forward (an installed route steps aside)."""
        active = getattr(_BYPASS, "ids", None)
        if active is None:
            active = _BYPASS.ids = {}
        active[id(self)] = active.get(id(self), 0) + 1
        try:
            yield
        finally:
            active[id(self)] -= 1
            if not active[id(self)]:
                del active[id(self)]

    @contextlib.contextmanager
    def _capturing(self) -> Iterator[None]:
        """A capture sees the plain model: calls reach its own forward, and an installed
        route (with whatever wrapped it since, such as accelerate's autocast) is taken off
        ``model.forward`` meanwhile."""
        with self._bypass(), plain_forward(self._model, self._installed):
            yield

    def _bypassed(self) -> bool:
        return id(self) in getattr(_BYPASS, "ids", {})

    def _apply(self, fn: Any, recurse: bool = True) -> "FreezableModule":
        super()._apply(fn, recurse)
        # root-level tensors are new objects after .to(): keep the original model in step;
        # graphs may have baked in the old dtype or device: capture again on the next call
        for name in list(self._buffers):
            self._model._buffers[name] = self._buffers[name]
        for name in list(self._parameters):
            self._model._parameters[name] = self._parameters[name]
        self.graphs.reset()
        if self._cached is not None:
            self._cached.reset()
        self._named_params = dict(self._model.named_parameters())
        return self

    # -- forward -------------------------------------------------------------------------------------
    def _run(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        model = self._model
        training = model.training
        try:
            args, kwargs = canonical_call(self.graphs.signature, args, kwargs)
        except TypeError as e:
            raise CallError(
                f"{type(model).__name__}.forward does not accept this call ({describe_call(args, kwargs)}): {e}"
            ) from e
        if training and self.probe_hook is not None:
            self.probe_hook(args, kwargs)
        entry = self.graphs.lookup(training, args, kwargs)
        if entry is None:
            return self._run_eager(args, kwargs)
        gm = self.graph_module_of(entry)
        if training and self._cached is not None and self._num_frozen > 0 and self._cache.enabled:
            cgm = self._cached.graph_for(entry, gm, model, self._num_frozen)
            if cgm is not None:
                gm = cgm
        grad_mode = torch.is_grad_enabled()
        try:
            return entry.run(gm, model, args, kwargs, self.graphs.signature)
        finally:
            torch._C._set_grad_enabled(grad_mode)  # an exception inside a frozen prefix

    def _run_eager(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._installed is not None:  # model(...) would route back here: call its forward
            with self._bypass():
                return self._eager_forward(*args, **kwargs)
        return self._model(*args, **kwargs)

    # -- in place ------------------------------------------------------------------------------------
    def install(self) -> None:
        """Route calls of the original model (``model(...)``) to this module, so that a
        training loop holding the model trains the compiled graphs. The model's
        ``forward`` becomes an instance attribute with the same signature; wrappers added
        later (accelerate's autocast) wrap it. :meth:`uninstall` restores the model."""
        if self._installed is not None:
            return
        model = self._model
        self.adopt_route((("forward" in model.__dict__), model.__dict__.get("forward")), model.forward)
        me = weakref.ref(self)

        def run(model_self: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            fm = me()
            if fm is None:
                return type(model_self).forward(model_self, *args, **kwargs)
            return fm.route(args, kwargs)

        model.__dict__["forward"] = types.MethodType(_forward_with(self.graphs.signature, run), model)

    def adopt_route(self, previous: tuple[bool, Any], eager_forward: Any) -> None:
        """Record that ``model.forward`` routes to :meth:`route` (installed by
        :meth:`install`, or by an integration that compiled on the first call):
        ``previous`` is what :meth:`uninstall` restores (had an instance forward, its
        value) and ``eager_forward`` what runs when a call must run eagerly."""
        self._installed = previous
        self._eager_forward = eager_forward

    def route(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """What an installed ``model(...)`` runs: the compiled graphs, or the model's own
        forward inside a capture or an eager call."""
        if self._bypassed():
            return self._eager_forward(*args, **kwargs)
        return self._run(args, kwargs)

    def uninstall(self) -> None:
        """Undo :meth:`install`: calls of the model run its own forward again."""
        if self._installed is None:
            return
        had, previous = self._installed
        if had:
            self._model.__dict__["forward"] = previous
        else:
            self._model.__dict__.pop("forward", None)
        self._installed = None
        self._eager_forward = self._model.forward

    @property
    def installed(self) -> bool:
        return self._installed is not None

    def detach(self) -> None:
        """Give the model back: unfreeze every block, stop the controller (optimizer hook,
        background threads) and undo :meth:`install`. The module still runs, unfrozen."""
        if self.freezer is not None:
            self.freezer.detach()
        self._set_prefix(0)
        self.uninstall()
        owner = _OWNERS.get(self._model)
        if owner is not None and owner() is self:
            del _OWNERS[self._model]

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
                f"blocks and at most {self.plan.max_frozen} may be frozen (the head is never frozen)"
            )
        return k

    def frozen_parameter_names(self, k: int | None = None) -> list[str]:
        """Parameters frozen with a prefix of ``k`` blocks: those whose every use lies in it
        (a parameter shared with a later block or the head keeps training)."""
        k = self._num_frozen if k is None else k
        return [n for n, last in self._param_last_block.items() if last < k]

    def _frozen_modules(self, k: int) -> list[nn.Module]:
        mods: list[nn.Module] = []
        for b in self.plan.blocks[:k]:
            for path in b.modules:
                try:
                    mods.append(self._model.get_submodule(path))
                except AttributeError:
                    continue
        return mods

    def _set_prefix(self, k: int) -> None:
        k = self.check_prefix(k)
        # parameters: restore the previously frozen, then freeze the new prefix
        for name, flag in self._saved_requires_grad.items():
            self._named_params[name].requires_grad_(flag)
        self._saved_requires_grad = {}
        for name in self.frozen_parameter_names(k):
            p = self._named_params[name]
            self._saved_requires_grad[name] = p.requires_grad
            p.requires_grad_(False)
            p.grad = None
        # modules: frozen ones run in eval mode, whatever train() calls follow
        mode = self.training
        for m in self._eval_modules:
            _release_eval(m, mode)
        self._eval_modules = self._frozen_modules(k)
        for m in self._eval_modules:
            _hold_eval(m)
        self._num_frozen = k
        for e in self.graphs.entries():
            if e.graph_module is not None:
                CutBackward(k)(e.graph_module)

    # -- the activation cache ------------------------------------------------------------------
    @contextlib.contextmanager
    def sample_ids(self, ids: Any) -> Iterator[None]:
        """Declare the dataset indices of the batch the enclosed forward calls see (for the
        activation cache); ``fm.wrap_loader`` does this for a DataLoader."""
        if self._cache is None:
            yield
            return
        prev = self._cache.ids
        self._cache.ids = torch.as_tensor(ids).reshape(-1).cpu()
        try:
            yield
        finally:
            self._cache.ids = prev

    def wrap_loader(self, loader: Any) -> SampleIdLoader:
        """Iterate ``loader`` (a ``torch.utils.data.DataLoader``, any sampler, shuffling or
        ``DistributedSampler``) recording each batch's dataset indices for the cache."""
        return SampleIdLoader(self, loader)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters that currently require gradients."""
        return (p for p in self.parameters() if p.requires_grad)

    def extra_repr(self) -> str:
        return (
            f"plan={self.plan.model} ({len(self.plan.blocks)} blocks, {self.strategy}), "
            f"num_frozen={self._num_frozen}, graphs={len(self.graphs)}"
        )


def compile(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    policy: str | None = None,
    config: FreezeConfig | dict[str, Any] | str | None = None,
    plan: FreezePlan | str | None = None,
    strategy: str = "auto",
    max_graphs: int = DEFAULT_MAX_GRAPHS,
    capture_timeout: float | None = DEFAULT_TIMEOUT,
    total_steps: int | None = None,
) -> FreezableModule:
    """Compile ``model`` into a :class:`FreezableModule` driven by a freezing controller.

    - ``example_inputs``: as for :func:`fxfreeze.plan`; needed for models ``torch.fx``
      cannot trace (captured with ``torch.export``) and for FLOP/byte figures. Later calls
      may differ (other keyword arguments, shapes, the other training mode).
    - ``optimizer``: when given, the controller runs after every ``optimizer.step()``
      (``register_step_post_hook``) and releases optimizer state of frozen parameters;
      otherwise call ``fm.freezer.step()`` yourself.
    - ``policy`` / ``config``: a policy name, and a :class:`FreezeConfig` (object, dict or
      YAML path). The default policy is ``egeria``.
    - ``plan``: an edited plan to use instead of the proposed one.
    - ``max_graphs``: graphs kept for different kinds of call before the rest run eagerly;
      ``capture_timeout``: seconds one capture attempt may take (None: no bound).
    - ``total_steps``: the planned number of optimizer steps (sets the config's
      ``total_steps``), for policies that schedule by the length of training.

    Compiling a model that is already compiled detaches the earlier module (its
    controller stops; see :meth:`FreezableModule.detach`).

    Example::

        fm = fxfreeze.compile(model, {"input_ids": ids, "attention_mask": mask}, optimizer=opt)
        loss = fm(**batch, labels=labels).loss   # another keyword set: captured once more
    """
    from .controller import Freezer

    if not isinstance(model, nn.Module):
        raise ModelError(f"expected a torch.nn.Module, got {type(model).__module__}.{type(model).__name__}")
    if isinstance(model, FreezableModule):
        raise ModelError("this model is already compiled by fxfreeze; compile the original model once")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ModelError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
        raise ModelError(f"max_graphs must be a positive int, got {max_graphs!r}")
    cfg = load_config(config, policy)
    if total_steps is not None:
        d = cfg.to_dict()
        d["total_steps"] = total_steps
        cfg = FreezeConfig.from_dict(d)
    previous = _OWNERS.get(model)
    previous = previous() if previous is not None else None
    if previous is not None:
        logger.warning(
            "fxfreeze: %s was already compiled; the earlier compiled module is detached (its blocks unfrozen, "
            "its controller stopped) and this one takes over", type(model).__name__,
        )
        previous.detach()
    analysis = analyze(model, example_inputs, plan=plan, strategy=strategy, capture_timeout=capture_timeout)
    if not analysis.capture.executable:
        raise ModelError(
            f"{type(model).__name__} could only be captured as module order (hooks strategy), which "
            "cannot run: " + "; ".join(analysis.capture.reasons)
        )
    fm = FreezableModule(model, analysis, max_graphs=max_graphs, capture_timeout=capture_timeout)
    if cfg.cache.enabled:
        if cfg.cache.random_augmentation:
            logger.warning(
                "fxfreeze cache: caching stays off because the config declares random augmentation "
                "(a sample's frozen-prefix output changes every epoch)"
            )
        else:
            from .cache import ActivationCache

            c = cfg.cache
            fm._cache = ActivationCache(c.memory_budget_mb, c.directory, c.dtype, c.verify_fraction, c.prefetch)
            fm._cached = CachedGraph(fm._cache)
    fm.freezer = Freezer(fm, cfg, optimizer)
    _OWNERS[model] = weakref.ref(fm)
    return fm
