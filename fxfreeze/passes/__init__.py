"""Pure graph-to-graph transformations. No training state lives here; the runtime
(:mod:`fxfreeze.runtime`) decides when to run them.

Every pass is a :class:`GraphPass` returning a :class:`PassResult` and runs through
:func:`run_passes`, which checks its pre- and postconditions and ``graph.lint()`` and names
the pass (and those before it) in any error:

- :class:`TransferBlocks` (:mod:`.labels`): carry the plan's block labels to another graph;
- :class:`CutBackward` / :class:`UndoCut` (:mod:`.cut_backward`): keep autograd out of a
  frozen prefix, and take the cut out again;
- :class:`CacheLoad` (:mod:`.cache_load`): serve the frozen prefix from a cache;
- :class:`ExtractBlocks` (:mod:`.subgraph`): a block range as its own module;
- :class:`StripAutocast`, :class:`FoldBatchNorm`, :class:`LiftModules` (:mod:`.normalize`):
  the graph form of a block's low-precision reference.
"""

from .base import GraphPass, GraphSource, PassResult, run_passes
from .cache_load import CacheLoad
from .cut_backward import META_INSERTED, MODE_SENSITIVE, CutBackward, UndoCut, undo_cut
from .labels import TransferBlocks
from .normalize import FoldBatchNorm, LiftModules, StripAutocast
from .subgraph import ExtractBlocks

__all__ = [
    "PassResult",
    "GraphPass",
    "GraphSource",
    "run_passes",
    "CutBackward",
    "UndoCut",
    "undo_cut",
    "CacheLoad",
    "ExtractBlocks",
    "TransferBlocks",
    "FoldBatchNorm",
    "LiftModules",
    "StripAutocast",
    "MODE_SENSITIVE",
    "META_INSERTED",
]
