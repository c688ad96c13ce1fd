"""``fxfreeze.compile`` and the module it returns.

:class:`FreezableModule` runs the captured graph instead of the model's Python ``forward``
and shares every parameter, buffer and submodule with the original model: its
``state_dict()`` keys are the original's, so checkpoints move freely between the two. Until
a prefix is frozen it computes exactly what the model computes; with ``k`` blocks frozen the
:class:`~fxfreeze.passes.CutBackward` pass keeps autograd out of those blocks, their
parameters stop requiring gradients and their modules run in ``eval()`` mode (BatchNorm
running statistics stop updating, dropout is off).

A graph is captured per training mode, because tracing bakes the mode into functional
calls (``F.dropout(x, training=self.training)``) and ``torch.export`` specialises on it.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections import deque
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch import nn

from ..analysis import placeholder_values
from ..api import Analysis, analyze
from ..config import FreezeConfig, load_config
from ..errors import FreezeError, ModelError
from ..passes import CutBackward
from ..passes.cache_load import META_CACHE, CacheLoad, cache_load
from ..passes.cut_backward import META_INSERTED, META_ORIG_ARGS
from ..passes.subgraph import extract
from ..plan import HEAD, META_BLOCK, FreezePlan, block_of, param_uses, starts_from_plan
from ..trace import Capture, capture, module_path_of, preserved_state

__all__ = ["FreezableModule", "SampleIdLoader", "compile"]

logger = logging.getLogger("fxfreeze")
_INF = 1 << 30


def _transfer_blocks(src: fx.Graph, dst: fx.Graph) -> None:
    """Annotate ``dst`` (the same model captured in the other training mode) with the
    blocks of ``src``: by node name when the graphs match, else by owning module, keeping
    block indices non-decreasing in execution order."""
    comp = ("call_function", "call_method", "call_module")
    # src may carry a CutBackward cut (the graph is shared with its GraphModule): skip its nodes
    s_nodes = [n for n in src.nodes if n.op in comp and not n.meta.get(META_INSERTED)]
    d_nodes = [n for n in dst.nodes if n.op in comp]
    if [n.name for n in s_nodes] == [n.name for n in d_nodes]:
        for a, b in zip(s_nodes, d_nodes):
            b.meta[META_BLOCK] = a.meta.get(META_BLOCK)
    else:
        by_owner: dict[str, list[int]] = {}
        for n in s_nodes:
            b = n.meta.get(META_BLOCK)
            key = _INF if b == HEAD else int(b)
            by_owner.setdefault(module_path_of(n), []).append(key)
        prev = 0
        for n in d_nodes:
            owner = module_path_of(n)
            cands: list[int] = []
            while True:
                cands = sorted(set(by_owner.get(owner, [])))
                if cands or not owner:
                    break
                owner = owner.rsplit(".", 1)[0] if "." in owner else ""
            ok = [c for c in cands if c >= prev]
            cur = ok[0] if ok else prev
            prev = cur
            n.meta[META_BLOCK] = HEAD if cur == _INF else cur
    for n in dst.nodes:
        if n.op == "get_attr":
            bs = [u.meta.get(META_BLOCK) for u in n.users if u.meta.get(META_BLOCK) is not None]
            n.meta[META_BLOCK] = min(bs, key=lambda x: (x == HEAD, x)) if bs else None


class FreezableModule(nn.Module):
    """The compiled model. Use it exactly like the original; see :func:`compile`."""

    def __init__(self, model: nn.Module, analysis: Analysis) -> None:
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
        self.training = model.training
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_analysis", analysis)
        self.plan: FreezePlan = analysis.plan
        self._captures: dict[bool, Capture] = {analysis.capture.training: analysis.capture}
        self._gms: dict[bool, fx.GraphModule] = {}
        self._num_frozen = 0
        self._saved_requires_grad: dict[str, bool] = {}
        self._eval_modules: list[nn.Module] = []
        self.freezer: Any = None  # set by compile()
        #: called with (args, kwargs) on training-mode forwards (the Egeria probe batch)
        self._probe_hook: Any = None
        self._cache: Any = None  # an ActivationCache when caching is on (set by compile)
        self._cached_gm: fx.GraphModule | None = None
        self._cache_k = 0
        self._cache_frontier: list[str] | None = None  # for refilling a deeper prefix
        ix = analysis.index
        proposal = starts_from_plan(ix, self.plan)
        uses, _ = param_uses(ix)
        self._param_last_block: dict[str, int] = {}
        for name, positions in uses.items():
            bs = [block_of(i, proposal.starts, proposal.head_start) for i in positions]
            self._param_last_block[name] = max(_INF if b == HEAD else b for b in bs)
        self._named_params = dict(model.named_parameters())
        try:  # bound once: keyword calls map onto graph inputs every step
            self._signature: inspect.Signature | None = inspect.signature(model.forward)
        except (TypeError, ValueError):
            self._signature = None

    # -- graph management ----------------------------------------------------------------
    @property
    def num_frozen(self) -> int:
        """How many leading blocks are frozen now."""
        return self._num_frozen

    @property
    def strategy(self) -> str:
        return self._analysis.capture.strategy

    def _capture_for(self, mode: bool) -> Capture:
        cap = self._captures.get(mode)
        if cap is None:
            base = self._analysis.capture
            model = self._model
            inputs = base.example_kwargs if base.example_kwargs else base.example_args
            with preserved_state(model):  # restores every module's training flag
                model.train(mode)
                cap = capture(model, inputs if (base.example_args or base.example_kwargs) else None, strategy=base.strategy)
            _transfer_blocks(base.graph, cap.graph)
            self._captures[mode] = cap
        return cap

    def _graph_module(self, mode: bool) -> fx.GraphModule:
        gm = self._gms.get(mode)
        if gm is None:
            gm = self._capture_for(mode).build(self._model)
            CutBackward(self._num_frozen)(gm)
            self._gms[mode] = gm
        return gm

    def graph_module(self, training: bool | None = None) -> fx.GraphModule:
        """The graph module run in the given (default: current) training mode."""
        return self._graph_module(self.training if training is None else training)

    def _apply(self, fn: Any, recurse: bool = True) -> "FreezableModule":
        super()._apply(fn, recurse)
        # buffers are new tensor objects after .to(); keep the original model in step and
        # rebuild graph modules so that get_attr nodes see them
        for name in list(self._buffers):
            self._model._buffers[name] = self._buffers[name]
        for name in list(self._parameters):
            self._model._parameters[name] = self._parameters[name]
        self._gms.clear()
        self._cached_gm = None
        self._cache_k = 0
        if self._cache is not None:
            self._cache.clear()
        self._named_params = dict(self._model.named_parameters())
        return self

    # -- forward ---------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._probe_hook is not None and self.training:
            self._probe_hook(args, kwargs)
        gm = self._graph_module(self.training)
        cap = self._captures[self.training]
        if self.training and self._cache is not None and self._num_frozen > 0 and self._cache.enabled:
            cgm = self._cache_graph()
            if cgm is not None:
                gm = cgm
        grad_mode = torch.is_grad_enabled()
        try:
            if cap.strategy == "export":
                return gm(*args, **kwargs)
            if not kwargs and len(args) == self._n_placeholders(gm):
                return gm(*args)
            return gm(*placeholder_values(gm, self._model, args, kwargs, self._signature))
        finally:
            torch._C._set_grad_enabled(grad_mode)  # an exception inside a frozen prefix

    @staticmethod
    def _n_placeholders(gm: fx.GraphModule) -> int:
        n = gm.__dict__.get("_fxfreeze_nph")
        if n is None:
            n = sum(1 for x in gm.graph.nodes if x.op == "placeholder")
            gm.__dict__["_fxfreeze_nph"] = n
        return n

    # -- freezing mechanics (the controller decides; this applies) ------------------------
    def freeze_prefix(self, k: int) -> None:
        """Freeze exactly the first ``k`` blocks (0 unfreezes everything)."""
        if self.freezer is not None:
            self.freezer.freeze_prefix(k, reason="freeze_prefix() called")
        else:
            self._set_prefix(k)

    def check_prefix(self, k: Any) -> int:
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
        # modules: frozen ones run in eval mode
        for m in self._eval_modules:
            m.train(self.training)
        self._eval_modules = self._frozen_modules(k)
        for m in self._eval_modules:
            m.eval()
        self._num_frozen = k
        for gm in self._gms.values():
            CutBackward(k)(gm)
        self._cached_gm = None  # rebuilt for the new prefix on the next training forward

    # -- the activation cache ---------------------------------------------------------------------
    def _cache_graph(self) -> fx.GraphModule | None:
        """The training graph with the frozen prefix replaced by a cache-load node (built
        once per prefix); None when the prefix hands on nothing cacheable."""
        k = self._num_frozen
        if self._cached_gm is not None and self._cache_k == k:
            return self._cached_gm
        cap = self._capture_for(True)
        base = self._graph_module(True)  # CutBackward(k) applied: inference flags in the prefix
        root = cap.attributes(self._model)
        graph = fx.Graph()
        graph._codegen = base.graph._codegen  # torch.export's pytree calling convention
        val_map: dict[fx.Node, fx.Node] = {}
        out = graph.graph_copy(base.graph, val_map)
        graph.output(out)
        for n in graph.nodes:  # arguments CutBackward saved refer to the source graph's nodes
            saved = n.meta.get(META_ORIG_ARGS)
            if saved is not None:
                n.meta[META_ORIG_ARGS] = tuple(fx.map_arg(a, lambda x: val_map[x]) for a in saved)
        gm = fx.GraphModule(root, graph, class_name=type(self._model).__name__ + "Cached")
        res = CacheLoad(k)(gm, self._cache)
        if not res.modified:
            self._cached_gm, self._cache_k = None, k
            self._cache.enabled = False
            logger.warning("fxfreeze cache: the frozen prefix hands on no tensor to cache; caching is off")
            return None
        load = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is cache_load)
        frontier: list[str] = load.meta[META_CACHE]
        in_names = [a.name for a in load.args[1:]]
        prefix = extract(base.graph, root, 0, k, outputs=frontier, class_name="FrozenPrefix")
        order = [in_names.index(n) for n in prefix.inputs]

        def runner(inputs: Any) -> Any:
            return prefix.graph_module(*[inputs[i] for i in order])

        refill = None
        old_k, old_frontier = self._cache_k, self._cache_frontier
        if old_frontier and 0 < old_k < k:
            refill = self._refill_fn(base.graph, root, old_k, k, old_frontier, frontier, in_names)
        self._cache.set_prefix(k, runner, refill)
        self._cached_gm, self._cache_k, self._cache_frontier = gm, k, frontier
        return gm

    @staticmethod
    def _refill_fn(graph: fx.Graph, root: Any, old_k: int, k: int, old: list[str], new: list[str], in_names: list[str]) -> Any:
        """New frontier from the old one: run blocks old_k..k-1 only (None when they read
        anything else than the old frontier and the graph inputs)."""
        try:
            produced = [n for n in new if n not in old]
            mid = extract(graph, root, old_k, k, outputs=produced, class_name="RefillBlocks")
        except ValueError:
            return None
        if any(n not in old and n not in in_names for n in mid.inputs) or any(n not in old and n not in produced for n in new):
            return None

        def refill(inputs: Any, old_frontier: Any) -> Any:
            env = dict(zip(in_names, inputs))
            env.update(zip(old, old_frontier))
            env.update(zip(mid.outputs, mid.graph_module(*[env[n] for n in mid.inputs])))
            return tuple(env[n] for n in new)

        return refill

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

    def wrap_loader(self, loader: Any) -> "SampleIdLoader":
        """Iterate ``loader`` (a ``torch.utils.data.DataLoader``, any sampler, shuffling or
        ``DistributedSampler``) recording each batch's dataset indices for the cache."""
        return SampleIdLoader(self, loader)

    def train(self, mode: bool = True) -> "FreezableModule":
        super().train(mode)
        self._model.training = mode
        for m in self._eval_modules:
            m.eval()
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters that currently require gradients."""
        return (p for p in self.parameters() if p.requires_grad)

    def extra_repr(self) -> str:
        return f"plan={self.plan.model} ({len(self.plan.blocks)} blocks, {self.strategy}), num_frozen={self._num_frozen}"


class _RecordingBatchSampler:
    """Wraps a batch sampler; remembers the index lists it hands out, in order."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.issued: deque[list[int]] = deque()

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.inner:
            batch = list(batch)
            self.issued.append(batch)
            yield batch

    def __len__(self) -> int:
        return len(self.inner)


class SampleIdLoader:
    """``fm.wrap_loader(loader)``: yields the loader's batches unchanged while telling the
    activation cache each batch's dataset indices, and prefetches the next batch's spilled
    entries. DataLoader workers return batches in sampler order, so the recorded index lists
    line up with the batches."""

    def __init__(self, module: FreezableModule, loader: Any) -> None:
        from torch.utils.data import DataLoader

        if not isinstance(loader, DataLoader):
            raise FreezeError(
                f"wrap_loader needs a torch.utils.data.DataLoader, got {type(loader).__name__}; "
                "for other loops declare each batch's dataset indices with `with fm.sample_ids(ids):`"
            )
        if loader.batch_sampler is None:
            raise FreezeError("wrap_loader needs a DataLoader with automatic batching (batch_size set)")
        self.module = module
        self.recorder = _RecordingBatchSampler(loader.batch_sampler)
        kw: dict[str, Any] = dict(
            batch_sampler=self.recorder, num_workers=loader.num_workers, collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory, timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
            persistent_workers=loader.persistent_workers,
        )
        if loader.num_workers > 0:
            kw["prefetch_factor"] = loader.prefetch_factor
        self.loader = DataLoader(loader.dataset, **kw)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        cache = self.module._cache
        self.recorder.issued.clear()
        it = iter(self.loader)
        try:
            nxt = next(it)
        except StopIteration:
            return
        ids = self.recorder.issued.popleft()
        try:
            while True:
                batch, batch_ids = nxt, ids
                try:
                    nxt = next(it)
                    ids = self.recorder.issued.popleft()
                    if cache is not None:
                        cache.prefetch(ids)
                    last = False
                except StopIteration:
                    last = True
                if cache is not None:
                    cache.ids = torch.tensor(batch_ids)
                yield batch
                if last:
                    return
        finally:
            if cache is not None:
                cache.ids = None


def compile(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    policy: str | None = None,
    config: FreezeConfig | dict[str, Any] | str | None = None,
    plan: FreezePlan | str | None = None,
    strategy: str = "auto",
) -> FreezableModule:
    """Compile ``model`` into a :class:`FreezableModule` driven by a freezing controller.

    - ``example_inputs``: as for :func:`fxfreeze.plan`; needed for models ``torch.fx``
      cannot trace (captured with ``torch.export``) and for FLOP/byte figures.
    - ``optimizer``: when given, the controller runs after every ``optimizer.step()``
      (``register_step_post_hook``) and releases optimizer state of frozen parameters;
      otherwise call ``fm.freezer.step()`` yourself.
    - ``policy`` / ``config``: a policy name, and a :class:`FreezeConfig` (object, dict or
      YAML path). The default policy is ``egeria``.
    - ``plan``: an edited plan to use instead of the proposed one.
    """
    from .controller import Freezer

    if not isinstance(model, nn.Module):
        raise ModelError(f"expected a torch.nn.Module, got {type(model).__module__}.{type(model).__name__}")
    if isinstance(model, FreezableModule):
        raise ModelError("this model is already compiled by fxfreeze; compile the original model once")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ModelError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    cfg = load_config(config, policy)
    analysis = analyze(model, example_inputs, plan=plan, strategy=strategy)
    if not analysis.capture.executable:
        raise ModelError(
            f"{type(model).__name__} could only be captured as module order (hooks strategy), which "
            "cannot run: " + "; ".join(analysis.capture.reasons)
        )
    fm = FreezableModule(model, analysis)
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
    fm.freezer = Freezer(fm, cfg, optimizer)
    return fm
