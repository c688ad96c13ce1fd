"""training_residue: what a frozen prefix of a training graph still does as in training mode
after CutBackward (random draws, buffer writes), found from the graph alone."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

import fxfreeze
from fxfreeze.passes.cut_backward import CutBackward
from fxfreeze.passes.residue import training_residue
from _nets import Res, StochasticDepthMLP


def _training_graph(model: nn.Module, strategy: str) -> tuple[fx.GraphModule, int]:
    fm = fxfreeze.compile(model, (torch.randn(4, 8),), strategy=strategy, config={"policy": "manual", "manual": {"schedule": {}}})
    gm = fm.graphs.primary(True).capture.build(model)
    return gm, len(fm.plan.blocks)


def test_random_draws_and_buffer_writes_are_found_per_block_with_fx_and_export():
    for strategy, no_grad in (("fx", False), ("export", False), ("export", True)):
        gm, n = _training_graph(StochasticDepthMLP(3, no_grad=no_grad).train(), strategy)
        assert n == 4
        CutBackward(3)(gm)
        gm.graph.lint()
        found = training_residue(gm, 3)
        assert sorted(found) == [1, 2], (strategy, found)  # block 0 (the stem) has none; block 3 is not frozen
        text = " ".join(found[1])
        assert "blocks.0.ema" in text, (strategy, text)
        # fx keeps the childless DropPath a module call, which runs in the module's own mode
        assert ("bernoulli_" in text) == (strategy == "export"), (strategy, text)
        assert "blocks.1" not in text
        if no_grad:  # export records the torch.no_grad() region as one higher-order node: looked inside
            assert "inside wrap_with_set_grad_enabled" in text and "blocks.0.steps" in text
        assert training_residue(gm, 3, start=2) == {2: found[2]}


def test_what_the_cut_switches_to_inference_is_no_residue():
    """Dropout and BatchNorm (its batch counter included, which export records apart) are
    switched by the cut; a block of plain layers has nothing."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Linear(8, 16)
            self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Dropout(0.3)) for _ in range(2)])
            self.tail = Res(16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.tail(self.blocks(self.stem(x)))

    for strategy in ("fx", "export"):
        gm, n = _training_graph(Net().train(), strategy)
        CutBackward(n)(gm)
        assert training_residue(gm, n) == {}, strategy
        if strategy == "export":
            counters = [x for x in gm.graph.nodes if "num_batches_tracked" in str(x.args[0] if x.args else "")]
            add, add_ = torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor
            assert counters and all(x.target is add for x in counters)  # counts no batch, writes nothing
            gm.graph.lint()
            CutBackward(0)(gm)
            assert all(x.target is add_ and x.args[1] == 1 for x in counters)  # the cut undone restores it
            assert set(training_residue(gm, n)) == {1, 2}  # uncut, the BatchNorms count batches
