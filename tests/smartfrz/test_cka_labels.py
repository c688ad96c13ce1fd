"""Linear CKA's defining properties and the label rule on synthetic CKA series."""

from __future__ import annotations

import pytest
import torch

from fxfreeze.smartfrz import LabelRule, linear_cka


def test_linear_cka_is_one_for_identical_and_invariant_to_rotation_and_scale():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 20, generator=g)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    assert linear_cka(x, (x.double() @ q).float()) == pytest.approx(1.0, abs=1e-6)  # orthogonal transform
    assert linear_cka(x, 7.5 * x) == pytest.approx(1.0, abs=1e-12)  # isotropic scaling
    y = torch.randn(64, 20, generator=g)
    assert linear_cka(x, y) < 0.5  # unrelated representations
    # non-isotropic scaling is not an invariance
    assert linear_cka(x, x * torch.linspace(0.01, 10, 20)) < 0.99
    # activations of any shape (conv maps) are flattened per sample; it is symmetric
    a, b = torch.randn(32, 4, 5, 5, generator=g), torch.randn(32, 8, 3, 3, generator=g)
    assert linear_cka(a, b) == pytest.approx(linear_cka(b, a))
    with pytest.raises(ValueError, match="same samples"):
        linear_cka(x, y[:10])


def test_label_rule_needs_level_stability_window_and_a_freezable_prefix():
    t = torch.arange(20, dtype=torch.float64)
    early = 1 - 0.5 * torch.exp(-t / 2)  # converges fast
    late = 1 - 0.5 * torch.exp(-t / 6)  # converges later
    noisy = 0.97 + 0.04 * (t % 2)  # high, but jumps by 0.04 every snapshot
    rule = LabelRule(level=0.95, window=3, max_std=0.01)
    lab = rule.labels(torch.stack([early, late, early], 1))
    first = [int(lab[:, b].float().argmax()) if lab[:, b].any() else None for b in range(3)]
    # block 0 passes once 3 snapshots in a row are >= 0.95 and steady
    expected0 = next(i for i in range(2, 20) if early[i - 2 : i + 1].min() >= 0.95 and early[i - 2 : i + 1].std(unbiased=False) <= 0.01)
    assert first[0] == expected0
    assert first[1] > first[0]
    assert first[2] == first[1]  # converged early itself, but waits for block 1 in front of it
    assert bool(lab[-1].all())
    lab2 = rule.labels(torch.stack([early, noisy], 1))
    assert not lab2[:, 1].any()  # never steady enough
    assert not rule.labels(torch.stack([early], 1))[:2].any()  # not before a full window
    with pytest.raises(ValueError):
        LabelRule(level=1.5)
