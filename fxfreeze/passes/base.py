"""The one contract every pass follows (as in ``torch.fx.passes.infra``)."""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch.fx as fx

__all__ = ["PassResult", "GraphPass"]


class PassResult(NamedTuple):
    """What a pass returns: the (possibly rewritten) graph module and whether it changed."""

    graph_module: fx.GraphModule
    modified: bool


class GraphPass(Protocol):
    def __call__(self, gm: fx.GraphModule) -> PassResult: ...
