"""The SmartFRZ freeze predictor: attention over a block's weight history -> P(freeze).

Input: a block's last ``T <= window`` snapshots of ``sample_size`` sampled weights
(:class:`~fxfreeze.runtime.history.WeightHistory`), oldest first. Every snapshot is
standardised by the newest one's mean and standard deviation, so that the predictor sees
weights in the block's own units (a layer's scale depends on its fan-in and its
normalisation, which would not carry across architectures). Then, as in SmartFRZ (Li et al.,
ICLR 2023):

- a shared MLP encoder (``sample_size -> hidden -> hidden``) embeds each snapshot;
- the **query** comes from the newest snapshot, **keys** and **values** from the earlier
  ones; keys and values also carry an embedding of the snapshot's age, and values the log of
  how far the weights moved since that snapshot (relative to their spread) -- the signal a
  converged block shows most plainly;
- softmax attention over the earlier snapshots gives a context vector; an MLP reads it with
  the query and the block's relative depth (its index over the number of freezable blocks,
  0 for the first) and returns the logit of P(freeze). The depth is the one input beyond the
  paper's: weights alone cannot tell that a front block's representation settles while its
  weights still move (the CKA labels show front blocks freezable much earlier than deep
  ones at the same weight motion), and where a block sits is known from the plan.

The weights are a versioned file in the package (``fxfreeze/weights/``), written by
``fxfreeze train-predictor`` (:mod:`fxfreeze.smartfrz`) in fxfreeze's own tensor-file
format (plain data, no pickle). A missing or corrupt file raises :class:`PredictorError`
naming the file and the command that regenerates it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import PredictorError
from ..tensorfile import read_tensor_file, write_tensor_file

__all__ = ["FreezePredictor", "normalize_history", "batch_histories", "relative_depth", "load_predictor", "save_predictor",
           "default_weights_path", "FORMAT", "FORMAT_VERSION", "REGENERATE"]

FORMAT = "fxfreeze-smartfrz-predictor"
FORMAT_VERSION = 2  # 2: the relative-depth input
#: the command that (re)writes the shipped weights
REGENERATE = "fxfreeze train-predictor"


def default_weights_path() -> Path:
    """The weights file that ships with the package."""
    return Path(__file__).resolve().parent.parent / "weights" / "smartfrz_predictor.fxtf"


def normalize_history(h: torch.Tensor) -> torch.Tensor:
    """Standardise snapshots ``[T, n]`` by the newest one's mean and standard deviation."""
    newest = h[-1]
    return (h - newest.mean()) / (newest.std(unbiased=False) + 1e-8)


def relative_depth(index: int, num_blocks: int) -> float:
    """A block's position among ``num_blocks`` freezable blocks, in [0, 1]."""
    return index / max(num_blocks - 1, 1)


def batch_histories(histories: list[torch.Tensor], window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-align raw histories of various lengths into ``[B, window, n]`` plus a validity
    mask ``[B, window]`` (the newest snapshot is always at position ``window - 1``)."""
    n = histories[0].shape[1]
    x = torch.zeros(len(histories), window, n)
    valid = torch.zeros(len(histories), window, dtype=torch.bool)
    for i, h in enumerate(histories):
        h = h[-window:]
        t = h.shape[0]
        x[i, window - t :] = normalize_history(h.float())
        valid[i, window - t :] = True
    return x, valid


class FreezePredictor(nn.Module):
    """See the module docstring. ``forward(x, valid, depth)`` takes right-aligned, normalised
    histories (:func:`batch_histories`) and relative depths ``[B]``; returns logits ``[B]``."""

    def __init__(self, sample_size: int = 1024, window: int = 30, hidden: int = 256, dim: int = 64) -> None:
        super().__init__()
        self.sample_size, self.window, self.hidden, self.dim = sample_size, window, hidden, dim
        self.encoder = nn.Sequential(nn.Linear(sample_size, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.query = nn.Linear(hidden, dim)
        self.key = nn.Linear(hidden, dim)
        self.value = nn.Linear(hidden, dim)
        self.age = nn.Embedding(window, dim)
        self.motion = nn.Linear(1, dim)
        self.depth = nn.Linear(1, dim)
        self.head = nn.Sequential(nn.Linear(3 * dim, dim), nn.ReLU(), nn.Linear(dim, 1))

    @property
    def config(self) -> dict[str, int]:
        return {"sample_size": self.sample_size, "window": self.window, "hidden": self.hidden, "dim": self.dim}

    def forward(self, x: torch.Tensor, valid: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        b, w, n = x.shape
        if w != self.window or n != self.sample_size:
            raise PredictorError(f"the predictor takes histories of {self.window} x {self.sample_size}, got {w} x {n}")
        if depth.shape != (b,):
            raise PredictorError(f"the predictor takes one relative depth per history ({b}), got shape {tuple(depth.shape)}")
        e = self.encoder(x)  # [B, W, H]
        q = self.query(e[:, -1])  # the newest snapshot
        past, past_valid = e[:, :-1], valid[:, :-1]
        ages = torch.arange(w - 1, 0, -1, device=x.device)  # age in snapshots of positions 0..W-2
        age = self.age(ages)  # [W-1, D]
        moved = (x[:, -1:, :] - x[:, :-1, :]).pow(2).mean(-1, keepdim=True).sqrt()  # [B, W-1, 1]
        k = self.key(past) + age
        v = self.value(past) + age + self.motion(torch.log(moved + 1e-6))
        scores = (k @ q.unsqueeze(-1)).squeeze(-1) / math.sqrt(self.dim)  # [B, W-1]
        scores = scores.masked_fill(~past_valid, float("-inf"))
        any_past = past_valid.any(-1, keepdim=True)
        attn = torch.softmax(scores.masked_fill(~any_past, 0.0), dim=-1) * past_valid
        ctx = (attn.unsqueeze(-1) * v).sum(1)
        d = self.depth(depth.to(x.dtype).unsqueeze(-1))
        return self.head(torch.cat([ctx, q, d], dim=-1)).squeeze(-1)

    @torch.no_grad()
    def predict(self, histories: list[torch.Tensor], depths: list[float]) -> torch.Tensor:
        """P(freeze) for raw histories ``[T_i, sample_size]`` (oldest first) of blocks at
        relative depths ``depths`` (:func:`relative_depth`)."""
        was = self.training
        self.eval()
        x, valid = batch_histories(histories, self.window)
        p = torch.sigmoid(self(x, valid, torch.tensor(depths, dtype=torch.float32)))
        self.train(was)
        return p


def save_predictor(model: FreezePredictor, path: str | os.PathLike[str], meta: Mapping[str, Any] | None = None) -> None:
    """Write the weights (float16: the file stays small; inference runs in float32) with a
    header: format, version, architecture, and ``meta`` (training data, evaluation...)."""
    header = {"format": FORMAT, "version": FORMAT_VERSION, "config": model.config, **dict(meta or {})}
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_tensor_file(path, model.state_dict(), header, store_dtype=torch.float16)
    except OSError as e:
        raise PredictorError(f"cannot write SmartFRZ predictor weights to {str(path)!r}: {e.strerror}; "
                             f"choose a writable file with --out") from e


def load_predictor(path: str | os.PathLike[str] | None = None) -> tuple[FreezePredictor, dict[str, Any]]:
    """``(predictor in eval mode, header)`` from ``path`` (default: the shipped weights).
    Raises :class:`PredictorError` naming the file and the command that regenerates it."""
    p = Path(path) if path is not None else default_weights_path()
    fix = f"regenerate it with `{REGENERATE} --out {p}`" + ("" if path is None else " or point smartfrz.weights at a valid file")
    if not p.is_file():
        raise PredictorError(f"SmartFRZ predictor weights file {str(p)!r} does not exist; {fix}")
    try:
        tensors, meta = read_tensor_file(p)
    except OSError as e:
        raise PredictorError(f"cannot read SmartFRZ predictor weights file {str(p)!r}: {e.strerror}; {fix}") from e
    except ValueError as e:
        raise PredictorError(f"SmartFRZ predictor weights file {str(p)!r} is corrupt ({e}); {fix}") from e
    if meta.get("format") != FORMAT:
        raise PredictorError(f"{str(p)!r} is not a SmartFRZ predictor weights file (format {meta.get('format')!r}); {fix}")
    if meta.get("version") != FORMAT_VERSION:
        raise PredictorError(
            f"SmartFRZ predictor weights file {str(p)!r} has format version {meta.get('version')!r}, this fxfreeze "
            f"reads version {FORMAT_VERSION}; {fix}"
        )
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise PredictorError(
            f"SmartFRZ predictor weights file {str(p)!r} holds NaN or infinite values (in {', '.join(bad[:3])}): "
            f"such a predictor never says freeze; {fix}"
        )
    try:
        cfg = {k: int(v) for k, v in dict(meta["config"]).items()}
        model = FreezePredictor(**cfg)
        model.load_state_dict({k: v.float() for k, v in tensors.items()})
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise PredictorError(f"SmartFRZ predictor weights file {str(p)!r} does not hold a valid predictor ({e}); {fix}") from e
    model.eval()
    return model, meta
