"""The decision rules of the adaptive policies, as pure functions.

A policy object gathers evidence (probe activations and reference runs, gradient norms,
weight histories) and keeps it across steps; the *rule* that turns the evidence into a
prefix is here, free of state and of the model, so that the policies and the tests call the
same code. Every rule returns the new number of frozen blocks, or None for "no change".
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from ...policy_configs import UNFREEZE_MODES

__all__ = [
    "egeria_rule",
    "lr_step_rule",
    "evaluation_gap",
    "instalment",
    "run_length_interval",
    "autofreeze_changes",
    "autofreeze_cut",
    "autofreeze_rule",
    "leading_run",
    "smartfrz_rule",
]



def egeria_rule(
    flat_counts: Mapping[int, int], num_frozen: int, max_frozen: int, patience: int, run: int = 1
) -> int | None:
    """Egeria: freeze the front block once its plasticity has been flat at ``patience``
    evaluations in a row (``flat_counts[j]``: consecutive flat evaluations of block ``j``,
    as :class:`~fxfreeze.runtime.egeria.plasticity.PlasticityTracker` counts them), never
    past ``max_frozen``.

    ``run``: at most this many blocks in one decision. With more than 1, the blocks right
    behind the front one that have settled too (each at ``patience`` evaluations in a row)
    freeze with it, as a leading run: a block behind the front one can settle first and then
    wait, already converged, for the front one (docs/egeria.md, "Freezing a settled run").
    With 1, one block at a time, as in Egeria.

    Example::

        >>> egeria_rule({0: 3, 1: 5}, num_frozen=0, max_frozen=4, patience=3)
        1
        >>> egeria_rule({0: 3, 1: 5, 2: 1}, num_frozen=0, max_frozen=4, patience=3, run=3)
        2
        >>> egeria_rule({0: 2, 1: 5}, num_frozen=0, max_frozen=4, patience=3, run=3) is None
        True
    """
    k = num_frozen
    n = leading_run([flat_counts.get(j, 0) for j in range(k, min(max_frozen, k + max(1, int(run))))], patience)
    return k + n if n else None


def lr_step_rule(mode: str, num_frozen: int) -> int | None:
    """The prefix after a learning-rate step: ``"all"`` unfreezes everything, ``"last"``
    the last frozen block, ``"none"`` keeps it.

    Example::

        >>> lr_step_rule("last", 3), lr_step_rule("all", 3), lr_step_rule("none", 3)
        (2, 0, None)
    """
    if mode not in UNFREEZE_MODES:
        raise ValueError(f"unknown unfreeze mode {mode!r}; valid: {', '.join(UNFREEZE_MODES)}")
    if mode == "none" or num_frozen == 0:
        return None
    return 0 if mode == "all" else num_frozen - 1


def evaluation_gap(interval: int, budget: float, cost_seconds: float, step_seconds: float | None) -> int:
    """Steps until the next evaluation: ``interval``, spaced out so that an evaluation
    costing ``cost_seconds`` stays within ``budget`` (a fraction) of training time at
    ``step_seconds`` per step (unknown or a zero budget: ``interval``).

    Example::

        >>> evaluation_gap(10, 0.01, cost_seconds=0.5, step_seconds=0.1)  # 0.5 s per 50 s
        500
    """
    gap = int(interval)
    if budget > 0 and step_seconds:
        gap = max(gap, int(math.ceil(cost_seconds / (budget * step_seconds))))
    return gap


def instalment(debt: float, rate: float, cost: float, parts: int) -> tuple[float, float, float]:
    """Pay a one-off ``cost`` (seconds) in ``parts`` instalments: adds it to ``debt``, resets
    the instalment to the new debt over ``parts``, and pays one. Returns ``(paid, debt,
    rate)``; every second is paid in the end.

    Example::

        >>> instalment(0.0, 0.0, 2.0, 4), instalment(1.5, 0.5, 0.0, 4)
        ((0.5, 1.5, 0.5), (0.5, 1.0, 0.5))
    """
    if cost > 0:
        debt += cost
        rate = debt / max(1, int(parts))
    paid = min(debt, rate)
    return paid, debt - paid, rate


def run_length_interval(interval: int, total_steps: int | None, evaluations: int, floor: int = 10) -> int:
    """The evaluation interval for a run of ``total_steps`` steps: ``interval`` (set for
    runs of thousands of steps), shortened so that the run holds about ``evaluations`` of
    them, never below ``floor`` steps (Egeria: a window of evidence must span enough steps
    for a trend to stand out of SGD noise). Unknown length, or ``evaluations`` 0:
    ``interval``.

    Example::

        >>> run_length_interval(50, 900, evaluations=60), run_length_interval(50, 20000, 60)
        (15, 50)
        >>> run_length_interval(50, None, 60), run_length_interval(50, 100, 60)
        (50, 10)
    """
    if not total_steps or evaluations <= 0:
        return int(interval)
    return max(min(int(floor), int(interval)), min(int(interval), int(total_steps) // int(evaluations)))


def autofreeze_changes(acc: Mapping[int, float], prev: Mapping[int, float]) -> dict[int, float]:
    """AutoFreeze's relative change of each block's gradient norm between two intervals,
    ``|n_t - n_{t-1}| / n_{t-1}``, for the blocks with a positive previous norm.

    Example::

        >>> autofreeze_changes({0: 1.1, 1: 3.0}, {0: 1.0, 1: 0.0})
        {0: 0.10000000000000009}
    """
    return {i: abs(acc[i] - prev[i]) / prev[i] for i in acc if prev.get(i, 0) > 0}


def autofreeze_cut(changes: Sequence[float], percentile: float) -> int:
    """How many leading entries of ``changes`` fall below their ``percentile``-th percentile,
    stopping at the first that does not.

    Example::

        >>> autofreeze_cut([0.01, 0.02, 0.5, 0.03, 0.6], 50)
        2
    """
    if not changes:
        return 0
    cut = float(torch.quantile(torch.tensor(list(changes), dtype=torch.float64), percentile / 100.0))
    n = 0
    for c in changes:
        if c < cut:
            n += 1
        else:
            break
    return n


def autofreeze_rule(changes: Mapping[int, float], num_frozen: int, max_frozen: int, percentile: float) -> int | None:
    """AutoFreeze: once every active block (``num_frozen..max_frozen-1``, at least two) has a
    change, freeze the leading ones below the ``percentile``-th percentile.

    Example::

        >>> autofreeze_rule({0: 0.01, 1: 0.02, 2: 0.5}, num_frozen=0, max_frozen=3, percentile=50)
        1
    """
    active = [changes[i] for i in range(num_frozen, max_frozen) if i in changes]
    if len(active) != max_frozen - num_frozen or len(active) < 2:
        return None
    n = autofreeze_cut(active, percentile)
    return num_frozen + n if n > 0 else None


def leading_run(probs: Sequence[float], threshold: float) -> int:
    """How many leading entries of ``probs`` are at or above ``threshold`` (NaN never is).

    Example::

        >>> leading_run([0.9, 0.8, 0.2, 0.9], 0.5)
        2
    """
    n = 0
    for p in probs:
        if p >= threshold:  # NaN never passes
            n += 1
        else:
            break
    return n


def smartfrz_rule(probs: Sequence[float], num_frozen: int, threshold: float, streak: int, patience: int) -> tuple[int | None, int]:
    """SmartFRZ at one freezing stage: ``probs`` are P(freeze) of the leading active blocks.
    When the front block passes ``threshold`` at ``patience`` stages in a row, the leading
    run of passing blocks freezes. Returns the new prefix (or None) and the new streak.

    Example::

        >>> smartfrz_rule([0.9, 0.7, 0.1], num_frozen=2, threshold=0.5, streak=1, patience=2)
        (4, 0)
        >>> smartfrz_rule([0.9], num_frozen=2, threshold=0.5, streak=0, patience=2)
        (None, 1)
    """
    n = leading_run(probs, threshold)
    if n == 0:
        return None, 0
    streak += 1
    if streak < patience:
        return None, streak
    return num_frozen + n, 0
