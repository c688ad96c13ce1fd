"""Row arithmetic of a batch that finds only some of its samples in the activation cache.

In the epoch after a freeze a shuffled loader mixes samples whose frontier was stored (they
came after the freeze in the epoch before) with samples it has not stored yet. Running the
frozen prefix on the whole batch for the missing rows wastes the share that was stored:
half of the epoch's prefix work in the epoch after a mid-epoch freeze. These helpers let the
cache run the prefix on the missing rows only and put the batch back together:

- :func:`take_rows` slices the prefix's inputs to some rows (only tensors with one row per
  sample; masks broadcast over the batch, sizes and other values pass as they are);
- :func:`fits` checks that what a sub-batch run returned has the rows and row shapes the
  stored part has (a graph specialised to its batch size, or code that squeezes a batch of
  one, hands back something else);
- :func:`merge_rows` interleaves stored and computed rows in the batch's order;
- :func:`disagreement` compares a sub-batch run with the whole batch's rows once per
  prefix: a prefix whose output for a sample depends on the batch around it is run whole.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

__all__ = ["has_rows", "take_rows", "fits", "merge_rows", "disagreement"]


def has_rows(t: Any, n: int) -> bool:
    """Is ``t`` a tensor with one row per sample of a batch of ``n``?

    Example::

        >>> has_rows(torch.zeros(4, 3), 4), has_rows(torch.zeros(1, 3), 4), has_rows(7, 4)
        (True, False, False)
    """
    return isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n


def take_rows(inputs: Sequence[Any], rows: list[int], n: int) -> tuple[Any, ...]:
    """``inputs`` restricted to these rows of a batch of ``n`` samples: every tensor with
    ``n`` rows is indexed, everything else is passed on unchanged.

    Example::

        >>> x, mask = torch.arange(8.).reshape(4, 2), torch.ones(1, 2)
        >>> take_rows((x, mask, 7), [1, 3], 4)[0]
        tensor([[2., 3.],
                [6., 7.]])
    """
    idx: dict[torch.device, torch.Tensor] = {}

    def one(t: Any) -> Any:
        if not has_rows(t, n):
            return t
        if t.device not in idx:
            idx[t.device] = torch.tensor(rows, device=t.device)
        return t.index_select(0, idx[t.device])

    return tuple(one(t) for t in inputs)


def fits(part: Sequence[Any], have: Sequence[torch.Tensor], rows: int) -> bool:
    """Does a sub-batch's frontier ``part`` hold ``rows`` rows of the shapes, devices and
    value kinds of the stored rows ``have``?

    Example::

        >>> fits((torch.zeros(2, 3),), (torch.zeros(5, 3),), 2), fits((torch.zeros(3),), (torch.zeros(5, 3),), 1)
        (True, False)
    """
    if len(part) != len(have):
        return False
    for p, h in zip(part, have):
        if not isinstance(p, torch.Tensor) or p.dim() != h.dim() or p.shape[0] != rows:
            return False
        if p.shape[1:] != h.shape[1:] or p.device != h.device or p.is_floating_point() != h.is_floating_point():
            return False
    return True


def merge_rows(n: int, present: list[int], have: Sequence[torch.Tensor], miss: list[int],
               part: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The batch's frontier: rows ``present`` from ``have`` and rows ``miss`` from ``part``
    (in the dtype of ``have``, what a full read returns).

    Example::

        >>> merge_rows(3, [1], (torch.tensor([[9.]]),), [0, 2], (torch.tensor([[1.], [3.]]),))[0].flatten()
        tensor([1., 9., 3.])
    """
    out = []
    for h, p in zip(have, part):
        t = torch.empty((n, *h.shape[1:]), dtype=h.dtype, device=h.device)
        t[torch.tensor(present, device=h.device)] = h
        t[torch.tensor(miss, device=h.device)] = p.to(h.dtype)
        out.append(t)
    return tuple(out)


def disagreement(full: Sequence[Any], part: Sequence[Any], miss: list[int]) -> float | None:
    """The largest difference between a sub-batch's frontier ``part`` and the rows ``miss``
    of the whole batch's ``full``, when it exceeds what another summation order explains
    (relative 1e-4 in float32, 1e-2 in half precision); else None.

    Example::

        >>> full = (torch.tensor([[1.], [2.], [3.]]),)
        >>> disagreement(full, (torch.tensor([[2.], [3.]]),), [1, 2]) is None
        True
        >>> disagreement(full, (torch.tensor([[2.], [4.]]),), [1, 2])
        1.0
    """
    worst = None
    for f, p in zip(full, part):
        if not isinstance(f, torch.Tensor) or not isinstance(p, torch.Tensor):
            continue
        rows = f[torch.tensor(miss, device=f.device)]
        if rows.shape != p.shape:
            return float("inf")
        if not f.is_floating_point():
            if not torch.equal(rows, p):
                return float("inf")
            continue
        tol = 1e-4 if f.element_size() >= 4 else 1e-2
        a, b = rows.float(), p.float()
        scale = float(a.abs().max()) if a.numel() else 0.0
        diff = float((a - b).abs().max()) if a.numel() else 0.0
        if diff > tol * max(scale, 1.0):
            worst = max(worst or 0.0, diff)
    return worst
