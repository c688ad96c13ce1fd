"""Run by ``test_cut_backward.py`` in a subprocess (a regression crashes the process, not the
suite): a frozen prefix hands a channels_last activation to a trainable GroupNorm, as in
diffusers' VAE and UNet (their attention returns channels_last activations). On torch before
2.14, GroupNorm's backward on the CPU then crashed with a segmentation fault. Prints the
largest difference of the trainable gradients from an eager reference (whose input requires
a gradient, which keeps it off the crashing path)."""

from __future__ import annotations

import sys

import torch
from torch import nn

import fxfreeze


class ChannelsLast(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.conv(x)).contiguous(memory_format=torch.channels_last)


class Normed(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm, self.conv = nn.GroupNorm(4, c), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(torch.nn.functional.silu(self.norm(x)))


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ChannelsLast(8), Normed(8), ChannelsLast(8), Normed(8),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))


def main() -> int:
    x = torch.randn(2, 3, 16, 16)
    net, ref = model(), model()
    fm = fxfreeze.compile(net, (x,), policy="manual", strategy=sys.argv[1])
    fm.freeze_prefix(2)  # the stem and the first channels_last block
    frozen = set(fm.frozen_parameter_names())
    fm(x).pow(2).mean().backward()
    for n, p in ref.named_parameters():
        p.requires_grad_(n not in frozen)
    ref(x.clone().requires_grad_()).pow(2).mean().backward()
    pairs = [(p.grad, q.grad) for p, q in zip(net.parameters(), ref.parameters()) if q.grad is not None]
    assert len(pairs) == sum(1 for p in net.parameters() if p.grad is not None) > 0
    print(max((a - b).abs().max().item() for a, b in pairs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
