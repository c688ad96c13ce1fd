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

from typing import Any

from ._lazy import LazyCompile, decode_state, encode_state

__all__ = ["LazyCompile", "encode_state", "decode_state", "comparison"]


def comparison(module: Any, label: str, plain: tuple[float, float], frozen: tuple[float, float], note: str) -> str:
    """What froze and when, and the timed comparison of a run without and with fxfreeze, as
    the examples print it.

    Args:
        module: the compiled module (its plan and freeze history are read).
        label: what the run was (printed first).
        plain, frozen: ``(seconds, accuracy %)`` of the run without and with fxfreeze.
        note: one more line (how the times were taken).

    Example::

        >>> # print(comparison(fm, "MiniLM, 3 epochs", (192.1, 80.0), (179.4, 79.75), "warm, same process"))
    """
    plan, history = module.plan, module.freezer.history
    lines = [f"plan: {len(plan.blocks)} blocks ({', '.join(plan.names)}), policy {module.freezer.config.policy}"]
    events = [e for e in history if e["action"] in ("freeze", "unfreeze")]
    lines += [
        f"  step {e['step']:>4} (epoch {e['epoch']}): {e['action']} {', '.join(e['blocks'])} -> {e['num_frozen']} frozen ({e['reason']})"
        for e in events
    ] or ["  nothing froze (the policy did not judge any block converged in this run)"]
    lines += [
        "",
        f"{'run':<24}{'train time (s)':>16}{'test accuracy':>16}",
        f"{label:<24}{plain[0]:>16.1f}{plain[1]:>15.2f}%",
        f"{label + ' + fxfreeze':<24}{frozen[0]:>16.1f}{frozen[1]:>15.2f}%",
        f"speed-up {plain[0] / frozen[0]:.2f}x ({note})",
    ]
    cache = module.activation_cache
    if cache is not None:
        st = cache.stats
        lines.append(f"activation cache: {st['hits']} samples read, {st['refills']} computed from a shallower "
                     f"prefix's, {st['misses']} stored, {st['uncached_batches']} batches without sample ids")
    return "\n".join(lines)
