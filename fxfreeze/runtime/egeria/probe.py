"""Training-side activation capture on a fixed probe batch.

Plasticity compares the same samples over time, so the probe batch is fixed: the first
``size`` samples of the first training batch the compiled module sees (or a batch the user
gives with :meth:`ActivationProbe.set`); samples of later batches too when the first holds
one; the positions of that one sample when batches hold one sequence each, of another
length each time (packed, padding-free batches); the whole first batch when its slice
cannot run (a graph network's nodes). On an evaluation, the blocks that may still be frozen
run once on it in ``eval()`` mode under ``no_grad`` (BatchNorm uses its running statistics
and updates nothing, dropout is off, and the user's modes are restored afterwards), and every
block's inputs and outputs are returned as detached CPU tensors by graph node name.
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any, Callable, Iterable

import torch
import torch.utils._pytree as pytree

from ...analysis import batch_size_of
from ...passes.subgraph import Subgraph, extract
from ..host_tier import HostFuture, to_host_later
from .builder import all_finite

__all__ = ["ActivationProbe", "ProbeError", "all_finite"]

logger = logging.getLogger("fxfreeze")


class ProbeError(RuntimeError):
    """The probe batch cannot run through the blocks, not even whole: nothing to measure."""


class _Parked:
    """A tensor copied to the host, and the device it goes back to."""

    def __init__(self, t: torch.Tensor) -> None:
        self.device, self.tensor = t.device, t.detach().to("cpu", copy=True)


def _park(x: Any) -> Any:
    return pytree.tree_map(lambda t: _Parked(t) if isinstance(t, torch.Tensor) else t, x)


def _unpark(x: Any) -> Any:
    return pytree.tree_map(lambda p: p.tensor.to(p.device) if isinstance(p, _Parked) else p, x)


def _length(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The second dimension of the call's first tensor of two or more (a sequence's length)."""
    for t in pytree.tree_leaves((args, kwargs)):
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            return int(t.shape[1])
    return None


def _take(x: Any, bs: int | None, n: int) -> Any:
    """The first ``n`` samples of every tensor in ``x`` (a dict of features included), copied:
    the probe must not share the caller's containers or storage."""

    def one(y: Any) -> Any:
        if isinstance(y, torch.Tensor):
            y = y.detach()
            if bs is not None and y.dim() > 0 and y.shape[0] == bs:
                y = y[:n]
            return y.clone()
        return y

    return pytree.tree_map(one, x)


class ActivationProbe:
    """Records the probe batch and computes block activations of a FreezableModule."""

    def __init__(self, module: Any, size: int, hi: int) -> None:
        self.module = module
        self.size = size
        self.hi = hi
        self.args: tuple[Any, ...] | None = None
        self.kwargs: dict[str, Any] = {}
        #: samples in the probe batch (plasticity compares samples: it needs at least 2), or its
        #: positions when it compares those (:attr:`positions`)
        self.samples = 0
        #: the probe is one packed sequence: plasticity compares its positions (``_append``)
        self.positions = False
        self._filling = False
        self._offers = 0
        self._ranges: dict[int, Subgraph] = {}  # blocks [0, hi) by hi
        self._blocks: dict[int, Subgraph] = {}
        self._key: Any = None
        #: the whole first batch, while slicing it is a guess no run has confirmed (:meth:`set`)
        self._whole: tuple[Any, int] | None = None
        self._waiting_reported = False

    @property
    def ready(self) -> bool:
        """A probe batch of at least 2 samples is there, and complete (the same samples at
        every evaluation): with one sample the SP loss (a comparison between samples) is
        identically 0, which would read as converged."""
        return self.args is not None and self.samples >= 2 and not self._filling

    def set(self, *args: Any, **kwargs: Any) -> None:
        """Use these inputs (a batch, sliced to ``size`` samples) as the probe batch."""
        bs = batch_size_of(args, kwargs)
        self.args = tuple(_take(a, bs, self.size) for a in args)
        self.kwargs = {k: _take(v, bs, self.size) for k, v in kwargs.items()}
        self.samples = min(bs or 0, self.size)
        # The slice takes every tensor whose leading dimension is the first one's, which is a
        # guess about what a sample is: a graph network's node features are sliced and its
        # edge list, which indexes the nodes dropped, is not (nor a dense adjacency's columns).
        # The whole batch waits on the host until a run of the slice confirms it (:meth:`run`).
        self._whole = None
        if bs is not None and bs > self.size:
            self._whole = (_park((tuple(args), dict(kwargs))), bs)

    def note_waiting(self) -> None:
        """Say once that the policy waits because the probe has fewer than 2 samples."""
        if self.args is not None and not self._waiting_reported:
            self._waiting_reported = True
            logger.warning(
                "egeria: the first training batch held %d sample(s): plasticity compares samples and needs at "
                "least 2, so the policy waits (never freezes) while later batches fill the probe to %d",
                1 if self.samples else 0, self.size,
            )

    def _append(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Add a later batch's samples (training with small batches): only when its
        tensors match the probe's in everything but the batch dimension."""
        assert self.args is not None
        bs = batch_size_of(args, kwargs)
        if not bs or len(args) != len(self.args) or set(kwargs) != set(self.kwargs):
            return
        if bs == 1:
            length = _length(self.args, self.kwargs)
            if length is not None and length >= 2 and length != _length(args, kwargs):
                # one sample a batch, of another length each time: sequences packed into one row
                # (padding-free batches, HF's DataCollatorWithFlattening, TRL's packing) or one
                # sequence a batch. Few later batches could join, so plasticity compares the
                # first sample's positions (:func:`fxfreeze.runtime.egeria.plasticity.sp_loss`)
                self.args = tuple(_take(a, self.samples, 1) for a in self.args)
                self.kwargs = {k: _take(v, self.samples, 1) for k, v in self.kwargs.items()}
                self.positions, self.samples, self._filling = True, length, False
                logger.info("egeria: training batches hold one sequence (or one packed row) each, of varying "
                            "length; plasticity compares the probe's %d positions", length)
                return
        take = min(bs, self.size - self.samples)

        def leaf(old: Any, new: Any) -> Any:
            if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor):
                if old.dim() == 0 or new.dim() != old.dim() or new.shape[0] != bs or new.shape[1:] != old.shape[1:]:
                    raise ValueError("shapes differ")
                return torch.cat([old, new.detach()[:take].to(old.device)])
            return old

        def join(old: Any, new: Any) -> Any:  # through dicts and lists of the same structure
            old_leaves, spec = pytree.tree_flatten(old)
            new_leaves, new_spec = pytree.tree_flatten(new)
            if spec != new_spec:
                raise ValueError("structures differ")
            return pytree.tree_unflatten([leaf(o, n) for o, n in zip(old_leaves, new_leaves)], spec)

        try:
            joined_args = tuple(join(o, n) for o, n in zip(self.args, args))
            joined_kwargs = {k: join(v, kwargs[k]) for k, v in self.kwargs.items()}
        except ValueError:
            return
        self.args, self.kwargs, self.samples = joined_args, joined_kwargs, self.samples + take

    @property
    def filling(self) -> bool:
        """Still collecting samples from later batches (the first one had fewer than 2)."""
        return self._filling

    def state_dict(self) -> dict[str, Any] | None:
        """The probe batch (tensors and plain values), or None before the first batch."""
        if self.args is None:
            return None
        return {"args": list(self.args), "kwargs": dict(self.kwargs), "samples": self.samples, "filling": self._filling,
                "positions": self.positions}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Use a saved probe batch; once it is complete, stop listening to training calls."""
        self.args = tuple(state["args"])
        self.kwargs = dict(state["kwargs"])
        self.samples = int(state["samples"])
        self._filling = bool(state.get("filling", False))
        self.positions = bool(state.get("positions", False))
        if not self._filling and self.module is not None and self.module.probe_hook == self.offer:
            self.module.probe_hook = None

    def offer(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Called by the module's forward in training mode: keeps the first batch (and
        when that batch had a single sample, the samples of later ones up to ``size``), then unhooks
        itself so that later training steps pay nothing."""
        if self.args is None:
            self.set(*args, **kwargs)
            self._filling = self.samples < 2  # batches of 1: fill the probe from later batches
        elif self._filling:
            self._append(args, kwargs)
            self._offers += 1
            # full, or enough tries (later batches of other shapes cannot join): use what is there
            if self.samples >= self.size or self._offers >= 4 * self.size:
                self._filling = False
        done = not self._filling
        if done and self.module.probe_hook == self.offer:
            self.module.probe_hook = None

    # -- graphs --------------------------------------------------------------------------------
    def _entry(self) -> Any:
        """The eval-mode graph for the probe call's structure (captured on first use); before
        the probe batch is there, the one for the example call's structure (what the probe batch
        normally finds again)."""
        graphs = self.module.graphs
        if self.args is None:
            entry = graphs.primary(False)
        else:
            entry = graphs.lookup(False, self.args, self.kwargs)
        if entry is None:  # that kind of call runs eagerly: probe with the example call instead
            entry = graphs.primary(False)
            args, kwargs = graphs.primary_inputs()
            self.set(*args, **kwargs)
        if entry is not self._key:
            self._ranges = {}
            self._blocks = {}
            self._key = entry
        return entry

    def _extract(self, lo: int, hi: int, name: str) -> Subgraph:
        entry = self._entry()
        return extract(entry.capture.graph, entry.capture.attributes(self.module.model), lo, hi, class_name=name)

    def _range(self, hi: int) -> Subgraph:
        """Blocks ``[0, hi)`` as one graph returning every block's outputs."""
        self._entry()
        sub = self._ranges.get(hi)
        if sub is None:
            sub = self._ranges[hi] = self._extract(0, hi, "ProbeBlocks")
        return sub

    @property
    def _full(self) -> Subgraph:
        return self._range(self.hi)

    def blocks(self, hi: int | None = None) -> Subgraph:
        """Blocks ``[0, hi)`` (default: all that may freeze) as one graph returning every
        block's outputs: its inputs are what :meth:`values` feeds them."""
        return self._range(self.hi if hi is None else hi)

    def block(self, j: int) -> Subgraph:
        """Block ``j`` alone, its inputs named as in :meth:`values`."""
        self._entry()
        sub = self._blocks.get(j)
        if sub is None:
            sub = self._blocks[j] = self._extract(j, j + 1, f"Block{j}")
        return sub

    def depth(self, stop: int) -> int:
        """How deep the probe runs for tracked blocks ending at ``stop``: ``stop`` rounded up to
        one of about 8 depths. Each depth is a graph extracted once (a copy of every node of
        the blocks before it, about 30 ms for ResNet-56's deepest on this CPU); one per depth
        grows with the square of the depth (1.2 s of ResNet-56's set-up), while the rounding
        costs at most an eighth of the blocks' forward on the small probe batch."""
        q = max(1, -(-self.hi // 8))
        return min(self.hi, -(-stop // q) * q)

    def prepare(self, lo: int, hi: int) -> None:
        """Build (once; cached) the graphs an evaluation of blocks ``[lo, hi)`` needs: the
        eval-mode capture, the graph of blocks ``[0, hi)`` and each tracked block's graph."""
        self._range(hi)
        for j in range(lo, hi):
            self.block(j)

    def set_up(self, prepare: Callable[[int, Subgraph, list[Any]], Any], stops: Iterable[int]) -> None:
        """Egeria's one-time set-up before training, on the example call: the eval-mode graph,
        every block's graph, ``prepare(j, block_graph, block_inputs)`` for every block (its
        reference builder: a builder needs the inputs' structure, not their values, and every
        reference is calibrated on the probe batch when it is built), the ranges for tracked
        blocks ending at ``stops``, and a first copy to the host (which pays for the pinned
        allocator's and the side stream's creation). Raises what any of it raises."""
        values = self.example_values()
        for j in range(self.hi):
            sub = self.block(j)
            prepare(j, sub, [values[n] for n in sub.inputs])
        for stop in stops:
            self._range(self.depth(stop))
        to_host_later(values, copy=False).result()

    def example_values(self) -> dict[str, Any]:
        """Inputs and outputs of every block that may freeze on the *example* call (where the
        module is; nothing is copied): what a reference builder is prepared on before the
        first probe batch exists. Raises when the example call cannot run."""
        args, kwargs = self.module.graphs.primary_inputs()
        return self._values(self.module.graphs.primary(False), args, kwargs, self.hi)

    def values(self, hi: int | None = None) -> dict[str, Any]:
        """Inputs and outputs of every block in ``[0, hi)`` (default: all that may freeze) on
        the probe batch (CPU). Blocks past ``hi`` do not run."""
        return self.values_async(hi).result()

    def run(self, hi: int | None = None) -> dict[str, Any]:
        """:meth:`values` where the module is (an accelerator's tensors stay there, nothing is
        copied). A slice of the first batch that cannot run is replaced by the whole batch
        (:meth:`set`); raises :class:`ProbeError` when the probe cannot run at all."""
        if self.args is None:
            raise RuntimeError("no probe batch yet")
        hi = self.hi if hi is None else hi
        # fx prints the failing line of its generated code to stderr before raising: a guess
        # that fails is not the user's error, so its print is dropped
        quiet = contextlib.redirect_stderr(io.StringIO()) if self._whole is not None else contextlib.nullcontext()
        try:
            with quiet:
                values = self._run(hi)
        except Exception as e:  # noqa: BLE001 - the slice was a guess; anything else is reported
            if self._whole is None:
                text = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise ProbeError(f"the probe batch cannot run through blocks 0-{hi - 1} ({type(e).__name__}: {text})") from e
            logger.info(
                "egeria: the probe batch's first %d samples cannot run on their own (%s: %s): the whole first batch "
                "(%d samples) is the probe", self.size, type(e).__name__, str(e).strip()[:200], self._whole[1],
            )
            (self.args, self.kwargs), self.samples = _unpark(self._whole[0]), self._whole[1]
            self._whole = None
            return self.run(hi)
        self._whole = None
        return values

    def _run(self, hi: int) -> dict[str, Any]:
        return self._values(self._entry(), self.args or (), self.kwargs, hi)

    def values_async(self, hi: int | None = None) -> HostFuture:
        """:meth:`values` on their way to the host: from an accelerator the training thread only
        launches the copies; whoever reads them (the reference worker) waits for them."""
        return to_host_later(self.run(hi), copy=False)

    @torch.no_grad()
    def _values(self, entry: Any, args: tuple[Any, ...], kwargs: dict[str, Any], hi: int) -> dict[str, Any]:
        """Blocks ``[0, hi)`` of ``entry``'s graph run on a call, in eval mode: their inputs and
        outputs by graph node name, where the module is."""
        full = self._range(hi)
        module = self.module
        module.graph_module_of(entry)
        model = module.model
        ph = entry.placeholder_map(model, args, kwargs, module.graphs.signature)
        inputs = [ph[n] for n in full.inputs]
        # eval mode for the modules the blocks call (the graph module holds the model's own
        # module objects), restored after; under no_grad in eval mode they change no buffer.
        # Only these, not the whole model's: on a GPU every Python step here is the training
        # thread's time (``preserved_state`` over the whole model took 1-2 ms per evaluation)
        training = [m for m in full.graph_module.modules() if m.training]
        devices = sorted({t.device.index or 0 for t in inputs if isinstance(t, torch.Tensor) and t.is_cuda})
        try:
            for m in training:
                m.training = False
            with torch.random.fork_rng(devices=devices):  # the user's random stream stays as it was
                outs = full.graph_module(*inputs)
        finally:
            for m in training:
                m.training = True
        # only what the blocks read and return: the graph's other placeholders (an exported
        # graph's parameters) need no copy to the host
        return {n: ph[n] for n in full.inputs} | dict(zip(full.outputs, outs))
