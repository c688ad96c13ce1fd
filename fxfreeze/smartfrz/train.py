"""Training and evaluating the SmartFRZ predictor on recorded runs.

Every (run, block, snapshot ``t``) with at least ``min_history`` snapshots is one example:
the block's last ``window`` weight snapshots up to ``t`` (fewer early on), labelled by the
:class:`~fxfreeze.smartfrz.labels.LabelRule` on the run's CKA series. The predictor is fit
with binary cross-entropy (positives weighted by the class ratio) and Adam. The sampled
positions of a block carry no meaning of their own, so each training example's positions
are shuffled (the same way across its snapshots): the predictor has to learn from how the
values move, not where they sit.

:func:`leave_one_out` is the evaluation reported in ``docs/smartfrz.md``: for each
architecture family, a predictor trained on the other families' runs is scored on that
family's (precision and recall of the freeze label at ``threshold``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..runtime.predictor import FreezePredictor, batch_histories, relative_depth
from .jobs import JobRecord
from .labels import LabelRule

__all__ = ["TrainSettings", "Example", "examples", "fit", "evaluate", "leave_one_out"]

Example = tuple[int, int, int, bool]  # (record, block, snapshot, freezable)


@dataclass(frozen=True)
class TrainSettings:
    window: int = 30
    min_history: int = 10
    hidden: int = 256
    dim: int = 64
    steps: int = 600
    batch_size: int = 128
    lr: float = 1e-3
    threshold: float = 0.5
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def examples(records: Sequence[JobRecord], rule: LabelRule, min_history: int) -> list[Example]:
    out: list[Example] = []
    for r, rec in enumerate(records):
        lab = rule.labels(rec.cka)
        for b in range(len(rec.blocks)):
            for t in range(min_history - 1, rec.cka.shape[0]):
                out.append((r, b, t, bool(lab[t, b])))
    return out


def _batch(records: Sequence[JobRecord], exs: Sequence[Example], window: int,
           gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    hists = []
    depth = torch.tensor([relative_depth(b, len(records[r].blocks)) for r, b, _, _ in exs])
    for r, b, t, _ in exs:
        h = records[r].history[b, max(0, t - window + 1) : t + 1].float()
        if gen is not None:
            h = h[:, torch.randperm(h.shape[1], generator=gen)]
        hists.append(h)
    x, valid = batch_histories(hists, window)
    y = torch.tensor([float(e[3]) for e in exs])
    return x, valid, depth, y


def fit(records: Sequence[JobRecord], exs: Sequence[Example], s: TrainSettings,
        log: Callable[[str], None] | None = None) -> FreezePredictor:
    """A predictor trained on ``exs`` (see the module docstring)."""
    if not exs:
        raise ValueError("no training examples: record longer runs (at least min_history snapshots)")
    torch.manual_seed(s.seed)
    gen = torch.Generator().manual_seed(s.seed)
    n = records[0].history.shape[-1]
    model = FreezePredictor(sample_size=n, window=s.window, hidden=s.hidden, dim=s.dim)
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=s.steps)
    pos = sum(e[3] for e in exs)
    weight = torch.tensor((len(exs) - pos) / max(pos, 1)).clamp(0.1, 10.0)
    lossf = nn.BCEWithLogitsLoss(pos_weight=weight)
    model.train()
    t0 = time.perf_counter()
    for step in range(s.steps):
        pick = torch.randint(len(exs), (min(s.batch_size, len(exs)),), generator=gen)
        x, valid, depth, y = _batch(records, [exs[int(i)] for i in pick], s.window, gen)
        loss = lossf(model(x, valid, depth), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log is not None and (step + 1) % max(1, s.steps // 4) == 0:
            log(f"  step {step + 1}/{s.steps}: loss {float(loss.detach()):.4f} ({time.perf_counter() - t0:.0f}s)")
    model.eval()
    return model


@torch.no_grad()
def evaluate(model: FreezePredictor, records: Sequence[JobRecord], exs: Sequence[Example],
             threshold: float = 0.5) -> dict[str, float]:
    """Precision, recall, F1 and accuracy of ``P(freeze) >= threshold`` against the labels;
    also how early the first positive prediction per (run, block) comes relative to the first
    positive label, in snapshots (negative: too early)."""
    model.eval()
    tp = fp = fn = tn = 0
    first_pred: dict[tuple[int, int], int] = {}
    first_label: dict[tuple[int, int], int] = {}
    for i in range(0, len(exs), 256):
        chunk = exs[i : i + 256]
        x, valid, depth, _ = _batch(records, chunk, model.window)
        p = torch.sigmoid(model(x, valid, depth)) >= threshold
        for (r, b, t, lab), pred in zip(chunk, p.tolist()):
            tp += pred and lab
            fp += pred and not lab
            fn += (not pred) and lab
            tn += (not pred) and not lab
            if pred:
                first_pred.setdefault((r, b), t)
            if lab:
                first_label.setdefault((r, b), t)
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    lags = [first_pred[k] - first_label[k] for k in first_label if k in first_pred]
    early = [k for k in first_pred if k not in first_label or first_pred[k] < first_label[k]]
    return {
        "examples": len(exs), "positives": tp + fn, "precision": prec, "recall": rec,
        "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0, "accuracy": (tp + tn) / max(len(exs), 1),
        "median_first_freeze_lag": float(torch.tensor(lags, dtype=torch.float).median()) if lags else float("nan"),
        "blocks_first_predicted_early": len(early), "blocks": len({(e[0], e[1]) for e in exs}),
    }


def leave_one_out(records: Sequence[JobRecord], rule: LabelRule, s: TrainSettings,
                  log: Callable[[str], None] | None = None) -> dict[str, dict[str, float]]:
    """For each architecture family: train on the others, evaluate on it."""
    families = sorted({r.family for r in records})
    out: dict[str, dict[str, float]] = {}
    for fam in families:
        train = [r for r in records if r.family != fam]
        test = [r for r in records if r.family == fam]
        if not train:
            continue
        if log is not None:
            log(f"leave out {fam}: train on {', '.join(r.name for r in train)}")
        model = fit(train, examples(train, rule, s.min_history), s, log)
        out[fam] = evaluate(model, test, examples(test, rule, s.min_history), s.threshold)
        if log is not None:
            m = out[fam]
            log(f"  {fam}: precision {m['precision']:.3f}, recall {m['recall']:.3f} over {m['examples']} examples")
    return out
