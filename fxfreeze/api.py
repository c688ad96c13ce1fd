"""Public entry points: :func:`plan` (and :func:`analyze`, shared with ``compile``)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn

from .amp import plain_capture
from .analysis import batch_size_of, propagate
from .errors import PlanError
from .graph_index import GraphIndex
from .partition import Proposal, propose
from .plan import FreezePlan
from .plan_build import build_plan, starts_from_plan
from .trace import DEFAULT_TIMEOUT, Capture, capture, unwrap_compiled
from .trace_state import fresh_containers

__all__ = ["plan", "analyze", "Analysis"]

logger = logging.getLogger("fxfreeze")


@dataclass
class Analysis:
    """Everything learnt about a model: its capture, a graph module over it, the graph
    index the partitioner used and the resulting plan."""

    capture: Capture
    graph_module: fx.GraphModule
    index: GraphIndex
    plan: FreezePlan


def analyze(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    plan: FreezePlan | str | None = None,
    strategy: str = "auto",
    capture_timeout: float | None = DEFAULT_TIMEOUT,
    strict: bool = False,
) -> Analysis:
    """Capture, annotate and partition ``model``: everything :func:`plan` does, keeping the
    capture and the annotated graph (an :class:`Analysis`) for the compiler, the CLI and viz.

    Args:
        model: the ``nn.Module`` to analyse (it is not modified).
        example_inputs: a tensor, a tuple of positional arguments, or a dict of keyword
            arguments, as the model's forward takes them; None for models whose inputs can be
            made up (see :func:`plan`).
        plan: a :class:`FreezePlan` (or its YAML/JSON path) to apply instead of partitioning.
        strategy: ``"auto"``, ``"export"``, ``"fx"`` or ``"hooks"``: how to capture.
        capture_timeout: seconds each capture attempt may take (None: no bound).
        strict: refuse (``PlanError``) a plan whose blocks had to be merged, instead of warning.

    Example::

        >>> import torch
        >>> from fxfreeze import zoo
        >>> from fxfreeze.api import analyze
        >>> a = analyze(zoo.resnet20(), (torch.randn(2, 3, 32, 32),))
        >>> len(a.plan.blocks) > 3
        True
    """
    model = unwrap_compiled(model)  # torch.compile(model): the model inside
    with plain_capture(model):  # a mixed-precision wrapper's autocast, around its plain forward
        cap = capture(model, example_inputs, strategy=strategy, timeout=capture_timeout)
        args, kwargs = cap.example_args, cap.example_kwargs
        if cap.executable:
            gm = cap.build(model)
            if args or kwargs:
                propagate(gm, model, cap, *fresh_containers(args, kwargs))  # the run must not change them
    if not cap.executable:
        gm = _plain_graph_module(cap.graph)
    ix = GraphIndex(cap.graph, model)
    if plan is not None:
        if isinstance(plan, (str, os.PathLike)):
            plan = FreezePlan.load(plan)
        if not isinstance(plan, FreezePlan):
            raise PlanError(f"plan= must be a FreezePlan or a path, got {type(plan).__name__}")
        proposal = starts_from_plan(ix, plan)
        _compare_with_structure(ix, plan, proposal, type(model).__name__, strict)
    else:
        proposal = propose(ix)
    fp = build_plan(
        ix,
        gm,
        proposal,
        model_name=type(model).__name__,
        strategy=cap.strategy,
        batch_size=batch_size_of(args, kwargs),
        notes=cap.reasons,
    )
    return Analysis(cap, gm, ix, fp)


def _compare_with_structure(ix: GraphIndex, plan: FreezePlan, given: Proposal, model_name: str, strict: bool) -> None:
    """A plan applied to a model it does not describe must not merge blocks silently: say
    which proposed blocks each given block now covers (an edited plan that deleted an entry
    merges on purpose, and hears it too); ``strict`` refuses instead."""
    auto = propose(ix)
    bounds = [*given.starts[1:], given.head_start]
    problems: list[str] = []
    if plan.model != model_name:
        problems.append(f"the plan was made for {plan.model!r}, this model is {model_name!r}")
    for i, (lo, hi) in enumerate(zip(given.starts, bounds)):
        inside = [auto.names[j] for j, s in enumerate(auto.starts) if lo <= max(s, 0) < hi]
        if len(inside) > 1:
            problems.append(f"block {i} {plan.blocks[i].name!r} covers {len(inside)} of this model's blocks ({', '.join(inside)})")
    if not problems:
        return
    msg = (
        f"the plan given ({len(plan.blocks)} blocks) does not match {model_name}'s structure "
        f"({len(auto.starts)} blocks): " + "; ".join(problems)
    )
    if strict:
        raise PlanError(msg + "; run `fxfreeze plan` on this model for a matching plan, or pass strict=False to merge")
    logger.warning("fxfreeze: %s (merged as the plan says; strict=True refuses such a plan)", msg)


def _plain_graph_module(graph: fx.Graph) -> fx.GraphModule:
    """A non-executable holder for a hooks graph (its call_module targets are not bound)."""
    gm = fx.GraphModule.__new__(fx.GraphModule)
    nn.Module.__init__(gm)
    gm.__dict__["_graph"] = graph
    return gm


def plan(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    plan: FreezePlan | str | None = None,
    strategy: str = "auto",
    capture_timeout: float | None = DEFAULT_TIMEOUT,
    strict: bool = False,
) -> FreezePlan:
    """Find the freezable blocks of ``model``.

    ``example_inputs`` is a tuple of positional arguments, a dict of keyword arguments (for
    Hugging Face models: ``{"input_ids": ..., "attention_mask": ...}``), a single tensor or
    ``None``. With inputs, blocks carry FLOPs and per-sample frontier bytes, and models that
    ``torch.fx`` cannot trace are captured with ``torch.export``; without, only structure is
    known. ``plan`` re-derives an edited plan (or a path to one) on this model.
    A given plan that merges blocks of this model's structure (a plan of another model, or
    an edited one with an entry deleted) is applied with a warning naming the merged
    blocks; ``strict=True`` raises :class:`PlanError` instead.
    ``strategy`` forces a capture strategy (``fx``, ``export``, ``hooks``);
    ``capture_timeout`` bounds each capture attempt in seconds (None: no bound), past
    which fxfreeze falls back to the next strategy and says so in ``plan.notes``.

    Example::

        p = fxfreeze.plan(model, {"input_ids": ids, "attention_mask": mask})
        print(p.table())
        p.blocks[1].params      # exactly the parameters block 1 owns
    """
    return analyze(model, example_inputs, plan=plan, strategy=strategy, capture_timeout=capture_timeout, strict=strict).plan
