"""Training-loop integrations: one callback and the rest of the script unchanged.

- :mod:`fxfreeze.integrations.transformers`: ``FxFreezeCallback`` for the Hugging Face
  ``Trainer`` (needs ``transformers``);
- :mod:`fxfreeze.integrations.lightning`: ``FxFreezeCallback`` for Lightning (needs
  ``pytorch-lightning`` or ``lightning``).

Both compile the model in place on its first call (:class:`LazyCompile`): the loop keeps
calling the model it holds, whose calls then run fxfreeze's graphs. Importing this package
imports neither library.
"""

from __future__ import annotations

from ._lazy import LazyCompile, decode_state, encode_state

__all__ = ["LazyCompile", "encode_state", "decode_state"]
