"""What a graph cut runs on the tensors leaving a frozen prefix (the targets of the nodes
:class:`~fxfreeze.passes.cut_backward.CutBackward` inserts, and the eager cut's hooks)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["detach_tree", "cut_tensor", "crashing_layout"]


#: torch before 2.14 crashes the process (a segmentation fault) in GroupNorm's backward on
#: the CPU when its input is channels_last and needs no gradient while its weight needs one:
#: what a frozen prefix hands on to a trainable GroupNorm (diffusers' VAE and UNet, whose
#: attention returns channels_last activations). Measured on 2.13.0; 2.14.1 runs it.
_CHANNELS_LAST_GN_CRASH = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < (2, 14)


def cut_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t.detach()``: a tensor leaving a frozen prefix. On a torch that crashes on it (see
    above), a channels_last tensor on the CPU is made contiguous as well (same values).

    Example::

        >>> t = torch.ones(2, 3, 4, 4, requires_grad=True)
        >>> cut_tensor(t).requires_grad, cut_tensor(t).shape
        (False, torch.Size([2, 3, 4, 4]))
    """
    d = t.detach()
    return d.contiguous() if crashing_layout(d) else d


def crashing_layout(t: torch.Tensor) -> bool:
    """Whether ``t``, needing no gradient, would crash a trainable GroupNorm's backward on
    this torch (a channels_last tensor on the CPU before torch 2.14).

    Example::

        >>> crashing_layout(torch.ones(2, 3, 4, 4))  # contiguous: never
        False
    """
    if not _CHANNELS_LAST_GN_CRASH or t.device.type != "cpu" or t.dim() not in (4, 5) or t.is_contiguous():
        return False
    return t.is_contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)


def detach_tree(x: Any) -> Any:
    """``detach()`` every tensor in ``x`` (a tensor, or a tuple/list/dict of them); other values
    pass through (:func:`cut_tensor`). The graph node on each tensor leaving a frozen prefix.

    Example::

        >>> t = torch.ones(2, requires_grad=True)
        >>> [v.requires_grad for v in detach_tree((t, [t * 2]))[1]] + [detach_tree(t).requires_grad]
        [False, False]
    """
    if isinstance(x, torch.Tensor):
        return cut_tensor(x)
    if isinstance(x, (tuple, list, dict)):
        return torch.utils._pytree.tree_map(lambda t: cut_tensor(t) if isinstance(t, torch.Tensor) else t, x)
    return x
