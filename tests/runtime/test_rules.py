"""The pure decision rules (fxfreeze.runtime.policies.rules) at their edges, and the
controller's agreement hook (their docstring examples run in tests/test_docs.py)."""

from __future__ import annotations

import pytest
import torch

import fxfreeze
from fxfreeze import zoo
from fxfreeze.runtime.policies import rules


def test_smartfrz_rule_waits_for_patience_and_resets_on_a_miss():
    assert rules.smartfrz_rule([0.9, 0.9], 0, 0.5, streak=0, patience=3) == (None, 1)
    assert rules.smartfrz_rule([0.9, 0.9], 0, 0.5, streak=1, patience=3) == (None, 2)
    assert rules.smartfrz_rule([0.9, 0.2], 0, 0.5, streak=2, patience=3) == (1, 0)
    assert rules.smartfrz_rule([0.2, 0.9], 0, 0.5, streak=2, patience=3) == (None, 0)
    assert rules.smartfrz_rule([float("nan")], 0, 0.5, streak=2, patience=1) == (None, 0)


def test_autofreeze_rule_needs_every_active_block():
    assert rules.autofreeze_rule({0: 0.01, 1: 0.5}, 0, 3, 50) is None  # block 2 has no change yet
    assert rules.autofreeze_rule({1: 0.01}, 1, 2, 50) is None  # one active block: nothing to compare
    assert rules.autofreeze_rule({1: 0.01, 2: 0.02, 3: 0.9}, 1, 4, 50) == 2


def test_egeria_rules_bounds():
    assert rules.egeria_rule({3: 9}, num_frozen=3, max_frozen=3, patience=1) is None  # never past max_frozen
    assert rules.egeria_rule({1: 2, 2: 2, 3: 2}, num_frozen=1, max_frozen=3, patience=2, run=5) == 3  # nor in a run
    assert rules.egeria_rule({1: 2, 2: 1, 3: 2}, num_frozen=1, max_frozen=9, patience=2, run=5) == 2  # a run stops at a gap
    assert rules.egeria_rule({1: 2, 2: 2}, num_frozen=1, max_frozen=9, patience=2, run=0) == 2  # run < 1 reads as 1
    assert rules.lr_step_rule("last", 0) is None
    with pytest.raises(ValueError, match="unknown unfreeze mode"):
        rules.lr_step_rule("some", 2)
    assert rules.evaluation_gap(10, 0.0, 5.0, 0.1) == 10  # no budget: the configured interval
    assert rules.evaluation_gap(10, 0.01, 5.0, None) == 10  # step time unknown yet


def test_agreement_hook_decides_the_prefix():
    torch.manual_seed(0)
    model = zoo.resnet20()
    x = zoo.example_inputs("resnet20", 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fm = fxfreeze.compile(model, x, optimizer=opt, policy="manual")
    proposals: list[int] = []

    def agree(proposed: int) -> int:
        proposals.append(proposed)
        return 1

    fm.freezer.set_agreement(agree)
    fm(*x).sum().backward()
    opt.step()
    assert proposals == [0] and fm.num_frozen == 1
    fm.freezer.set_agreement(None)
    with pytest.raises(fxfreeze.FreezeError, match="callable"):
        fm.freezer.set_agreement(3)  # type: ignore[arg-type]
    fm.freezer.detach()


@pytest.mark.parametrize("total, expected", [(None, 50), (900, 15), (100, 10), (20000, 50)])  # 100: min_window_steps (50) over a window of 5
def test_egeria_scales_its_interval_to_the_planned_run(total, expected):
    torch.manual_seed(0)
    model = zoo.resnet20()
    x = zoo.example_inputs("resnet20", 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fm = fxfreeze.compile(model, x, optimizer=opt, total_steps=total)
    fm(*x).sum().backward()
    opt.step()
    pol = fm.freezer.policy
    assert pol.interval == expected
    assert pol.next_eval == (min(50, 1 + expected) if total else 50)
    fm.freezer.detach()
