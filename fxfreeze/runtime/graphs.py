"""One graph per kind of call, like ``torch.compile``'s guarded cache.

A compiled module must accept every call the eager model accepts: other keyword sets
(``labels=``, ``return_dict=False``, ``output_hidden_states=True``), other batch sizes and
sequence lengths, the other training mode. A graph, however, is specialised: fx bakes in
the arguments the example call left out (``concrete_args``) and the training flags;
``torch.export`` also bakes in non-tensor arguments, dtypes, and any dimension it could
not keep dynamic. So :class:`GraphCache` keys graphs by the *structure* of a call:

- the training mode and the autocast state (an exported graph bakes in the autocast
  dtypes: its dtype checks fail under another state);
- for every argument, in canonical form (:func:`fxfreeze.trace.canonical_call`): a
  tensor's dtype, rank and device (not its shape), a plain value itself (``True``,
  ``None``, ``3``), containers recursively.

Within a key, each export graph checks its shape guards (:meth:`Capture.accepts`); fx
graphs are shape-generic. A call no graph accepts is captured anew, labelled with the
plan's blocks (:func:`fxfreeze.passes.labels.transfer_blocks`), and runs on the same
parameters with the same frozen prefix as every other graph. Dynamic dimensions mean that
sequence lengths from ``padding="longest"`` do not capture again.

A frozen block runs in eval mode, and each graph's frozen prefix is cut
(:class:`~fxfreeze.passes.cut_backward.CutBackward`), which switches dropout and batch norm
to inference. Where a block's training-mode code leaves more in the graph (stochastic depth,
noise, a buffer it updates: :func:`~fxfreeze.passes.residue.training_residue`, looked for
once on the example call's training graph), training graphs are captured with the frozen
blocks in eval mode instead, and again whenever the frozen prefix changes
(:meth:`GraphCache.set_prefix`).

At most ``max_graphs`` graphs are kept. Past the bound, and for a call whose capture
fails, the module runs the model's own ``forward`` (eagerly: correct, frozen parameters
still get no gradient, but no activation cache), with one warning that says why.

A model whose example call could only be captured as module order (``hooks``: neither fx
nor ``torch.export`` could capture it) has no graph at all: :attr:`GraphCache.eager_only`,
and every call runs the model's own forward (``fxfreeze.compile`` says so once).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import SUPPORTED_NODES

from ..analysis import placeholder_values
from ..errors import ExampleInputError, FxFreezeError
from ..passes.cut_backward import CutBackward, copy_graph
from ..passes.labels import transfer_blocks
from ..passes.residue import training_residue
from ..calls import describe_call, forward_signature
from ..trace import Capture, capture_call, preserved_state
from ..trace_state import fresh_containers

__all__ = ["GraphEntry", "GraphCache", "call_key", "DEFAULT_MAX_GRAPHS"]

logger = logging.getLogger("fxfreeze")

#: Graphs a compiled module keeps before further kinds of call run eagerly.
DEFAULT_MAX_GRAPHS = 8


def _describe(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return (torch.Tensor, x.dtype, x.dim(), x.device)
    if x is None or isinstance(x, (bool, int, str)):
        return (type(x), x)
    if isinstance(x, float):
        return (float, repr(x))  # repr: NaN equals itself
    if isinstance(x, (tuple, list)):
        return (type(x), tuple(_describe(v) for v in x))
    if isinstance(x, dict):
        return (type(x), tuple((k, _describe(v)) for k, v in x.items()))
    node = SUPPORTED_NODES.get(type(x))
    if node is not None:
        children, context = node.flatten_fn(x)
        try:
            hash(context)
        except TypeError:
            context = repr(context)
        return (type(x), context, tuple(_describe(c) for c in children))
    return (type(x),)


_AMP_DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


def autocast_state() -> tuple[Any, ...]:
    """Which autocast is on, per device type, and its dtype."""
    return tuple(
        (d, torch.get_autocast_dtype(d)) for d in _AMP_DEVICES if torch.is_autocast_enabled(d)
    )


def call_key(training: bool, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """The structure of a canonical call under the current autocast state (see the module
    docstring); hashable."""
    return (bool(training), autocast_state(), _describe(args), _describe(kwargs))


class GraphEntry:
    """One captured graph and the GraphModule built over it (lazily, on the model's
    current parameters and buffers)."""

    def __init__(self, key: tuple[Any, ...], capture: Capture, held: int = 0) -> None:
        self.key = key
        self.capture = capture
        #: captured with the first ``held`` blocks in eval mode (frozen), the rest in the key's mode
        self.held = held
        self.graph_module: fx.GraphModule | None = None
        self._n_placeholders: int | None = None

    @property
    def training(self) -> bool:
        return bool(self.key[0])

    def placeholder_map(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], signature: Any) -> dict[str, Any]:
        """Values of the graph's placeholders for this call, by placeholder name."""
        gm = self.graph_module
        assert gm is not None, "build the graph module first"
        names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        return dict(zip(names, placeholder_values(gm, model, args, kwargs, signature, self.capture.in_spec)))

    def run(self, gm: fx.GraphModule, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], signature: Any) -> Any:
        """Run ``gm`` (this entry's graph module, or a rewritten copy) on the call."""
        if self.capture.strategy == "export":
            return gm(*args, **kwargs)  # the graph's own pytree calling convention
        if self._n_placeholders is None:
            self._n_placeholders = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
        if not kwargs and len(args) == self._n_placeholders:
            return gm(*args)
        return gm(*placeholder_values(gm, model, args, kwargs, signature))


class GraphCache:
    """The graphs of one model, by call structure (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        primary: Capture,
        *,
        max_graphs: int = DEFAULT_MAX_GRAPHS,
        timeout: float | None = None,
        bypass: Callable[[], Any] | None = None,
    ) -> None:
        self.model = model
        self.signature = forward_signature(model)
        #: the graph that carries the plan's block labels; every other graph copies them
        self.labels = primary.graph
        self.strategy = primary.strategy
        self.max_graphs = max_graphs
        self.timeout = timeout
        self._bypass = bypass
        self.primary_call = (primary.example_args, primary.example_kwargs)
        self._entries: dict[tuple[Any, ...], list[GraphEntry]] = {}
        self._eager: dict[tuple[Any, ...], str] = {}
        self._warned_bound = False
        #: blocks whose training-mode code the cut cannot switch to eval (None: not looked yet)
        self.residue: dict[int, list[str]] | None = None
        #: (frozen blocks, their modules) that training captures hold in eval mode
        self._held: tuple[int, tuple[nn.Module, ...]] = (0, ())
        #: no graph can run (the example call was captured as module order only): every
        #: call runs the model's own forward, without a capture attempt or a warning each
        self.eager_only = not primary.executable
        self.eager_reason = "; ".join(primary.reasons) if self.eager_only else ""
        if not self.eager_only:
            self._add(GraphEntry(call_key(primary.training, *self.primary_call), primary))

    # -- bookkeeping -----------------------------------------------------------------------
    def _add(self, entry: GraphEntry) -> GraphEntry:
        self._entries.setdefault(entry.key, []).append(entry)
        return entry

    def entries(self) -> list[GraphEntry]:
        return [e for es in self._entries.values() for e in es]

    def __len__(self) -> int:
        return sum(len(es) for es in self._entries.values())

    @property
    def eager_calls(self) -> dict[tuple[Any, ...], str]:
        """Call structures that run eagerly, with the reason."""
        return dict(self._eager)

    def reset(self) -> None:
        """Forget every graph (the model moved to another dtype or device: graphs may have
        baked the old one in); the label source stays."""
        self._entries.clear()
        self._eager.clear()
        self._warned_bound = False

    def set_prefix(self, k: int, frozen: list[nn.Module], n_blocks: int) -> bool:
        """The first ``k`` blocks are now frozen (``frozen``: their modules, in eval mode).
        Cut every built graph at ``k``. Where the frozen blocks' training-mode code would
        still act (:attr:`residue`), training graphs are captured with those blocks in eval
        mode: the ones captured for another prefix are dropped (the next call of their kind
        captures anew). Returns whether any was dropped."""
        for e in self.entries():
            if e.graph_module is not None:
                CutBackward(k)(e.graph_module)
        if self.eager_only:
            return False
        if k and self.residue is None:
            self.residue = self._find_residue(n_blocks)
        residue = {b: w for b, w in (self.residue or {}).items() if b < k}
        held = k if residue else 0
        if held:
            logger.info(
                "fxfreeze: frozen blocks of %s would go on acting as in training mode in a graph captured in that "
                "mode (%s): its training graphs are captured with the %d frozen blocks in eval mode",
                type(self.model).__name__, "; ".join(f"block {b}: {', '.join(w[:2])}" for b, w in sorted(residue.items())), k,
            )
        self._held = (held, tuple(frozen) if held else ())
        dropped = False
        for key in list(self._entries):
            keep = [e for e in self._entries[key] if not e.training or e.held == held]
            dropped |= len(keep) < len(self._entries[key])
            if keep:
                self._entries[key] = keep
            else:
                del self._entries[key]
        return dropped

    def _find_residue(self, n_blocks: int) -> dict[int, list[str]]:
        """:func:`training_residue` of every block in a training graph: one already captured
        in the call's modes (its key's autocast state is the loop's), else the example call's."""
        entry = next((e for e in self.entries() if e.training and not e.held), None)
        try:
            entry = entry or self.primary(True)
        except FxFreezeError:
            return {}  # no training graph: training calls run the model's own forward
        gm = fx.GraphModule(entry.capture.attributes(self.model), copy_graph(entry.capture.graph))  # the entry's stays as cut
        CutBackward(n_blocks)(gm)
        return training_residue(gm, n_blocks)

    # -- lookup ------------------------------------------------------------------------------
    def lookup(self, training: bool, args: tuple[Any, ...], kwargs: dict[str, Any]) -> GraphEntry | None:
        """The graph for this canonical call, captured if needed; None: run eagerly."""
        if self.eager_only:
            return None
        key = call_key(training, args, kwargs)
        for e in self._entries.get(key, ()):
            if e.capture.accepts(args, kwargs):
                return e
        if key in self._eager:
            return None
        if len(self) >= self.max_graphs:
            if not self._warned_bound:
                self._warned_bound = True
                logger.warning(
                    "fxfreeze: %s has been called in %d different ways (last: %s, %s mode); past "
                    "max_graphs=%d further kinds of call run the model's own forward (correct, but without "
                    "the activation cache). Raise max_graphs in fxfreeze.compile if this is expected.",
                    type(self.model).__name__, len(self) + 1, describe_call(args, kwargs),
                    "training" if training else "eval", self.max_graphs,
                )
            return None
        try:
            cap, held = self._capture(training, args, kwargs)
        except ExampleInputError as e:
            # the model itself fails on this call (a wrong shape, say): its own error, and
            # the next call of this kind is tried again
            raise (e.__cause__ or e) from None
        except FxFreezeError as e:
            self._eager[key] = str(e)
            # an inference call (generate's, with its key/value cache) loses nothing by running
            # the model's own forward: said at INFO; a call that may train, at WARNING
            level = logging.WARNING if training or torch.is_grad_enabled() else logging.INFO
            logger.log(
                level, "fxfreeze: a call of %s (%s, %s mode) cannot be captured, so calls like it run the model's own "
                "forward: %s", type(self.model).__name__, describe_call(args, kwargs),
                "training" if training else "eval", e,
            )
            return None
        return self._add(GraphEntry(key, cap, held))

    def primary_inputs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The example call's arguments, moved to the model's device (and floating ones to its
        dtype)."""
        args, kwargs = fresh_containers(*self.primary_call)  # state objects among them: a copy per run
        return _to_model(self.model, args), _to_model(self.model, kwargs)

    def primary(self, training: bool) -> GraphEntry:
        """The graph for the example call's structure in the given mode (the probe and the
        activation cache use it); captured on first use."""
        if self.eager_only:
            raise FxFreezeError(
                f"{type(self.model).__name__} runs its own forward: no graph of it could be captured ({self.eager_reason})"
            )
        args, kwargs = self.primary_inputs()
        key = call_key(training, args, kwargs)
        for e in self._entries.get(key, ()):
            if e.capture.accepts(args, kwargs):
                return e
        return self._add(GraphEntry(key, *self._capture(training, args, kwargs)))

    def _capture(self, training: bool, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Capture, int]:
        """The capture and how many frozen blocks it holds in eval mode."""
        model = self.model
        held, frozen = self._held if training else (0, ())
        with preserved_state(model), (self._bypass() if self._bypass else contextlib.nullcontext()):
            # every module in the capture's mode, frozen ones included: the graph must not
            # bake in a frozen block's eval mode (CutBackward sets inference in the prefix),
            # unless the cut cannot (see set_prefix)
            for m in model.modules():
                m.training = training
            for f in frozen:
                for m in f.modules():
                    m.training = False
            cap = capture_call(model, args, kwargs, strategy=self.strategy, timeout=self.timeout)
        if not cap.executable:
            raise FxFreezeError("only the module order could be captured: " + "; ".join(cap.reasons[-2:]))
        transfer_blocks(self.labels, cap.graph)
        logger.info(
            "fxfreeze: captured %s again for %s (%s, %s mode; %d graphs)", type(model).__name__,
            f"its {held} frozen blocks in eval mode" if held else "a new kind of call",
            describe_call(args, kwargs), "training" if training else "eval", len(self) + 1,
        )
        return cap, held


def _to_model(model: nn.Module, x: Any) -> Any:
    """Example inputs moved to the model's device, floating ones to its dtype (after
    ``.to()``); integer ones (token ids, masks) keep theirs."""
    p = next(model.parameters(), None)
    if p is None:
        return x
    from torch.utils._pytree import tree_map

    def move(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        if t.is_floating_point() and p.is_floating_point():
            return t.to(device=p.device, dtype=p.dtype)
        return t.to(device=p.device)

    return tree_map(move, x)
