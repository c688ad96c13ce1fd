"""Linear CKA (Kornblith et al. 2019), the similarity that labels SmartFRZ's training data.

``CKA(X, Y) = <K_c, L_c> / (||K_c|| ||L_c||)`` with ``K = X X^T`` and ``L = Y Y^T`` the Gram
matrices of two activations of the same ``n`` samples, centred (``H K H``, ``H = I - 11^T/n``).
It is 1 for identical representations and invariant to orthogonal transforms and isotropic
scaling of the features, which is why it can compare a block's activations over training.
Working on Gram matrices keeps memory at ``n x n`` whatever the activation size.
"""

from __future__ import annotations

import torch

__all__ = ["centered_gram", "cka_from_grams", "linear_cka"]


def centered_gram(x: torch.Tensor) -> torch.Tensor:
    """The centred Gram matrix ``[n, n]`` (float64) of activations ``[n, ...]``."""
    f = x.detach().reshape(x.shape[0], -1).double()
    f = f - f.mean(0, keepdim=True)  # centring the features centres the Gram matrix
    return f @ f.T


def cka_from_grams(k: torch.Tensor, l: torch.Tensor) -> float:  # noqa: E741 - the paper's names
    """Linear CKA of two centred Gram matrices (0 when either representation is constant)."""
    hsic = float((k * l).sum())
    norm = float(k.norm() * l.norm())
    return hsic / norm if norm > 0 else 0.0


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between two activations of the same samples (first dimension)."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same samples in both: {x.shape[0]} vs {y.shape[0]}")
    return cka_from_grams(centered_gram(x), centered_gram(y))
