"""Pure graph-to-graph transformations. No training state lives here; the runtime
(:mod:`fxfreeze.runtime`) decides when to run them."""

from .base import GraphPass, PassResult
from .cut_backward import CutBackward, MODE_SENSITIVE, META_INSERTED

__all__ = ["PassResult", "GraphPass", "CutBackward", "MODE_SENSITIVE", "META_INSERTED"]
