"""The one contract every pass follows, and the runner that checks it.

As in ``torch.fx.passes.infra`` (``PassBase``, ``PassManager``): a pass is an object whose
:meth:`GraphPass.call` takes a graph module and returns a :class:`PassResult`. Passes are run
by :func:`run_passes` (calling a pass runs it alone through the same runner), which for
each pass in turn

1. checks the pass's precondition (:meth:`GraphPass.requires`: a reason string when the
   input is not what the pass needs, e.g. a compute node without its block label);
2. runs it; any exception it raises becomes a :class:`~fxfreeze.errors.PassError` that
   names the pass and the passes that ran before it in this pipeline;
3. when the graph changed, checks ``graph.lint()`` and the pass's postcondition
   (:meth:`GraphPass.ensures`).

Extraction reads a graph whose attributes live elsewhere (a captured graph and the model it
was captured from): :class:`GraphSource` carries the two where a pass accepts one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence, Union

import torch.fx as fx

from ..errors import PassError
from ..graph_utils import COMPUTE_OPS, block_label

__all__ = ["PassResult", "GraphPass", "GraphSource", "run_passes", "unlabelled_nodes"]

META_INSERTED = "fxfreeze.inserted"


class PassResult(NamedTuple):
    """What a pass returns: the (possibly rewritten, possibly new) graph module and whether
    it changed."""

    graph_module: fx.GraphModule
    modified: bool


@dataclass
class GraphSource:
    """A graph read by a pass that builds a new module from it, and the object its
    ``get_attr`` / ``call_module`` targets resolve on (a module or a dict of attributes)."""

    graph: fx.Graph
    root: Any


Target = Union[fx.GraphModule, GraphSource]


class GraphPass(ABC):
    """A graph-to-graph transformation with optional pre- and postconditions.

    Subclasses set :attr:`name` and implement :meth:`call`; ``pass_(gm)`` runs the pass
    through :func:`run_passes`, so that its conditions are always checked.

    Example::

        >>> from fxfreeze.passes import CutBackward, run_passes
        >>> # res = run_passes(gm, [CutBackward(2)])   # gm: a graph annotated by a plan
    """

    #: the name errors and logs give the pass
    name: str = "pass"

    def requires(self, gm: Target) -> str | None:
        """Why ``gm`` is not a valid input (None when it is)."""
        return None

    def ensures(self, gm: fx.GraphModule) -> str | None:
        """Why the output breaks the pass's promise (None when it holds). Checked only when
        the pass reports a change."""
        return None

    @abstractmethod
    def call(self, gm: Any) -> PassResult:
        """Transform ``gm`` (in place, or into a new module returned in the result)."""

    def __call__(self, gm: Any) -> PassResult:
        return run_passes(gm, [self])

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def run_passes(gm: Any, passes: Sequence[GraphPass]) -> PassResult:
    """Run ``passes`` in order on ``gm``, checking each one's conditions (module docstring).

    Returns the last pass's graph module and whether any pass changed something. Raises
    :class:`~fxfreeze.errors.PassError` naming the pass at fault and the ones before it.

    Example::

        >>> from fxfreeze.passes import FoldBatchNorm, LiftModules, run_passes
        >>> # gm = run_passes(block_gm, [FoldBatchNorm(), LiftModules()]).graph_module
    """
    done: list[str] = []
    modified = False
    for p in passes:
        if not isinstance(p, GraphPass):
            raise PassError(repr(p), done, f"{type(p).__name__} is not a GraphPass")
        why = p.requires(gm)
        if why is not None:
            raise PassError(p.name, done, f"precondition failed: {why}")
        try:
            res = p.call(gm)
        except PassError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure is reported with the pipeline so far
            raise PassError(p.name, done, f"{type(e).__name__}: {e}") from e
        if not isinstance(res, PassResult):
            raise PassError(p.name, done, f"returned {type(res).__name__}, not a PassResult")
        if res.modified:
            try:
                res.graph_module.graph.lint()
            except Exception as e:  # noqa: BLE001
                raise PassError(p.name, done, f"the graph it produced fails graph.lint(): {e}") from e
            why = p.ensures(res.graph_module)
            if why is not None:
                raise PassError(p.name, done, f"postcondition failed: {why}")
        modified |= res.modified
        gm = res.graph_module
        done.append(p.name)
    return PassResult(gm, modified)


def unlabelled_nodes(graph: fx.Graph, limit: int = 3) -> list[str]:
    """Names of (up to ``limit``) compute nodes of ``graph`` without a block label; nodes a pass
    inserted are not counted. The precondition of the passes that work on blocks.

    Example::

        >>> import torch, torch.fx as fx
        >>> unlabelled_nodes(fx.symbolic_trace(torch.nn.ReLU()).graph)
        ['relu']
    """
    out: list[str] = []
    for n in graph.nodes:
        if n.op in COMPUTE_OPS and not n.meta.get(META_INSERTED) and block_label(n) is None:
            out.append(n.name)
            if len(out) >= limit:
                break
    return out
