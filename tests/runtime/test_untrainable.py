"""Blocks the user froze (``requires_grad=False``) are not judged by an adaptive policy: it
sees the prefix widened over them, its freezes take them along, and until then they run as
the user left them. Schedules the user wrote see the prefix as it is."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

import fxfreeze
from fxfreeze.registry import unregister_policy
from fxfreeze.runtime.policies import Decision, Policy


@dataclass
class _PlanConfig:
    """``decisions``: step -> the number of frozen blocks asked for at that step."""

    decisions: dict = field(default_factory=dict)


class _Scripted(Policy):
    """Records the prefix each step shows it; asks for what ``decisions`` says."""

    name = "scripted"

    def __init__(self, config, plan):
        super().__init__(config, plan)
        self.seen: list[int] = []

    def decide(self, s):
        self.seen.append(s.num_frozen)
        k = self.config.section("scripted").decisions.get(s.step)
        return None if k is None else Decision(k, "scripted")


@pytest.fixture(autouse=True, scope="module")
def _registered():
    fxfreeze.register_policy("scripted", _Scripted, _PlanConfig, replace=True)
    yield
    unregister_policy("scripted")


class _Res(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(torch.relu(self.lin(x)))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.blocks = nn.Sequential(*[_Res(16) for _ in range(5)])
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def _compile(frozen: list[str], decisions: dict, policy: str = "scripted"):
    torch.manual_seed(0)
    model = _Net()
    for name in frozen:
        model.get_submodule(name).requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    sections = {"scripted": {"decisions": decisions}, "manual": {"schedule": decisions}}
    cfg = {"policy": policy, "safety_net": {"enabled": False}}
    if policy in sections:
        cfg[policy] = sections[policy]
    fm = fxfreeze.compile(model, (torch.randn(4, 8),), optimizer=opt, config=cfg)
    assert fm.plan.names == ["stem", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4"]
    return model, fm, opt


def _train(fm, opt, steps: int) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, 8, generator=g)
        loss = fm(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_leading_blocks_the_user_froze_are_skipped_and_frozen_with_the_next_freeze(caplog):
    model, fm, opt = _compile(["stem", "blocks.0", "blocks.1"], {2: 2, 4: 4})
    with caplog.at_level(logging.INFO, logger="fxfreeze"):
        _train(fm, opt, 3)
        assert fm.freezer.policy.seen == [3, 3, 3] and fm.num_frozen == 0  # asking for 2: nothing to do
        # the user's blocks run as the user left them until a freeze reaches past them
        assert model.blocks[0].drop.training and model.stem.weight.grad is None
        _train(fm, opt, 1)
    assert fm.num_frozen == 4 and fm.freezer.policy.seen[-1] == 3
    assert not model.blocks[0].drop.training and not model.blocks[2].drop.training
    assert not model.blocks[2].lin.weight.requires_grad and model.blocks[3].lin.weight.requires_grad
    assert [(e["step"], e["blocks"]) for e in fm.freezer.history if e["action"] == "freeze"] == [
        (4, ["stem", "blocks.0", "blocks.1", "blocks.2"])
    ]
    told = [r.getMessage() for r in caplog.records if "frozen by the user" in r.getMessage()]
    assert len(told) == 1 and "stem, blocks.0, blocks.1" in told[0] and "from blocks.2 on" in told[0]
    fm.freeze_prefix(0)  # an unfreeze gives back the user's choice, not a trainable block
    assert not model.stem.weight.requires_grad and model.blocks[2].lin.weight.requires_grad


def test_a_freeze_that_reaches_frozen_blocks_in_the_middle_takes_them_along():
    """A distillation teacher or layers the user froze mid-model: not candidates either."""
    model, fm, opt = _compile(["blocks.1", "blocks.2"], {2: 1, 3: 2, 5: 3})
    _train(fm, opt, 5)
    # step 2: stem; step 3: blocks.0, and with it the frozen blocks.1-2 (seen 4 from step 4);
    # step 5 sets the prefix to 3, as asked: blocks.2 leaves eval mode, still frozen by the user
    assert fm.freezer.policy.seen == [0, 0, 1, 4, 4]
    assert [(e["action"], e["num_frozen"]) for e in fm.freezer.history] == [("freeze", 1), ("freeze", 4), ("unfreeze", 3)]
    assert model.blocks[2].drop.training and not model.blocks[2].lin.weight.requires_grad


def test_a_block_the_user_unfreezes_is_a_candidate_again():
    model, fm, opt = _compile(["stem", "blocks.0"], {})
    _train(fm, opt, 2)
    model.blocks[0].requires_grad_(True)
    opt.add_param_group({"params": list(model.blocks[0].parameters())})
    _train(fm, opt, 2)
    assert fm.freezer.policy.seen == [2, 2, 1, 1]


def test_parameters_the_user_makes_trainable_again_get_their_gradients_from_the_next_step(caplog):
    """Lightning's ``BaseFinetuning`` pattern: a backbone the user froze, taken along by a
    freeze, then unfrozen by the user (``requires_grad_(True)`` and a param group). Before,
    the graphs kept cutting the backward pass into it: its parameters required gradients
    and got none, silently. Now the next optimizer step cuts the prefix back to the first
    block holding such a parameter, and the user's flag stays when the prefix changes."""
    model, fm, opt = _compile(["stem", "blocks.0"], {2: 4})
    _train(fm, opt, 2)
    assert fm.num_frozen == 4  # the freeze took the user's stem and blocks.0 along
    model.blocks[0].requires_grad_(True)
    opt.add_param_group({"params": list(model.blocks[0].parameters())})
    with caplog.at_level(logging.INFO, logger="fxfreeze"):
        _train(fm, opt, 1)  # this step's backward is still cut; its optimizer step sees the flag
    assert fm.num_frozen == 1 and model.blocks[0].drop.training  # blocks.0 trains (and leaves eval mode)
    assert not model.stem.weight.requires_grad  # still the user's frozen stem
    last = fm.freezer.history[-1]
    assert last["action"] == "unfreeze" and last["blocks"] == ["blocks.0", "blocks.1", "blocks.2"]
    assert "blocks.0.lin.weight and 1 more trainable again" in last["reason"]
    assert any("trainable again" in r.getMessage() for r in caplog.records)
    # the next step trains blocks.0 as eager code does (blocks.1-2 trainable again too)
    ref = _Net()
    ref.load_state_dict(model.state_dict())
    for m_ref, m in zip(ref.modules(), model.modules()):
        m_ref.train(m.training)
    for p_ref, p in zip(ref.parameters(), model.parameters()):
        p_ref.requires_grad_(p.requires_grad)
    x = torch.randn(4, 8)
    opt.zero_grad()
    torch.manual_seed(5)
    fm(x).square().mean().backward()
    torch.manual_seed(5)
    ref(x).square().mean().backward()
    for (n, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (p_ref.grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-6, atol=1e-7, msg=n)
    assert model.blocks[0].lin.weight.grad is not None
    # a later freeze past blocks.0 and an unfreeze keep the user's word: trainable
    fm.freeze_prefix(3)
    assert not model.blocks[0].lin.weight.requires_grad
    fm.freeze_prefix(0)
    assert model.blocks[0].lin.weight.requires_grad and not model.stem.weight.requires_grad


def test_a_gan_loop_that_sets_requires_grad_on_the_whole_discriminator_keeps_its_freezes():
    """``set_requires_grad(netD, False)`` for the generator's step, ``True`` before the
    discriminator's (CycleGAN, pix2pix): parameters that were trainable when a freeze took
    them are set trainable again before every step. That is no unfreeze: the prefix stays."""
    model, fm, opt = _compile([], {2: 3})
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        model.requires_grad_(False)  # the generator's step would run here
        model.requires_grad_(True)
        loss = fm(torch.randn(4, 8, generator=g)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fm.num_frozen == 3 and [e["action"] for e in fm.freezer.history] == ["freeze"]
    assert model.stem.weight.grad is None and not model.blocks[0].drop.training


def test_a_schedule_the_user_wrote_sees_the_prefix_as_it_is():
    model, fm, opt = _compile(["stem", "blocks.0"], {2: 1}, policy="manual")
    _train(fm, opt, 3)
    assert [e["num_frozen"] for e in fm.freezer.history if e["action"] == "freeze"] == [1]


def test_smartfrz_judges_only_blocks_that_train():
    """SmartFRZ's predictor rates a block whose weights never move as converged; it used to
    include the user's three blocks in its judgement (and, on a harder task, to spend its
    first freeze on them alone). Now its first candidate is blocks.2."""
    model, fm, opt = _compile(["stem", "blocks.0", "blocks.1"], {}, policy="smartfrz")
    _train(fm, opt, 160)
    [event] = [e for e in fm.freezer.history if e["action"] == "freeze"]
    assert "for blocks 3..5" in event["reason"] and event["num_frozen"] == 6


def test_widen_drops_a_freeze_within_the_users_blocks_and_passes_unfreezes_as_they_are():
    """Also what a freeze capped by the safety net's hold becomes (the controller widens
    after the cap): capped into the user's blocks, it is dropped, not applied to them."""
    from fxfreeze.runtime.untrainable import UntrainableBlocks

    model, fm, opt = _compile(["stem", "blocks.0", "blocks.1", "blocks.3"], {})
    u = UntrainableBlocks(fm)
    top = fm.plan.max_frozen
    assert u.seen(0, top) == 3
    assert u.widen(Decision(2, "x"), 0, 3, top) is None
    assert u.widen(Decision(3, "x"), 0, 3, top) is None
    assert u.widen(Decision(4, "x"), 0, 3, top) == Decision(5, "x")  # blocks.3 after blocks.2: taken too
    assert u.widen(Decision(1, "undo"), 4, 5, top) == Decision(1, "undo")
    assert u.widen(None, 0, 3, top) is None


def test_a_freeze_never_takes_the_last_block_that_trains(caplog):
    """The user froze the head and the blocks after ``blocks.1`` (prompt or prefix tuning
    freeze the whole model after a trainable prompt encoder). A freeze of every block left
    the loss without a gradient: the loop's ``loss.backward()`` raised "element 0 of
    tensors does not require grad". Now the freeze stops before the last block that trains,
    for every policy, with one INFO line."""
    for policy in ("scripted", "manual"):
        model, fm, opt = _compile(["head", "blocks.2", "blocks.3", "blocks.4"], {2: 6}, policy)
        with caplog.at_level(logging.INFO, logger="fxfreeze"):
            _train(fm, opt, 4)  # raised at the fourth step's backward before
        assert fm.num_frozen == 2, policy
        assert model.blocks[1].lin.weight.requires_grad and model.blocks[1].lin.weight.grad is not None
        assert "blocks.1 holds the last parameters that train" in caplog.text
        fm.freezer.detach()


def test_a_head_without_parameters_does_not_hold_back_the_last_free_block():
    """A head that owns no parameter (an output layer tied to the embeddings, as BART's)
    already keeps the last block trainable (``plan.max_frozen``); the cap adds nothing."""
    torch.manual_seed(0)
    model = _Net()
    model.head = nn.Identity()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    fm = fxfreeze.compile(model, (torch.randn(4, 8),), optimizer=opt,
                          config={"policy": "manual", "manual": {"schedule": {2: 5}}, "safety_net": {"enabled": False}})
    assert fm.plan.max_frozen == 5
    _train(fm, opt, 3)
    assert fm.num_frozen == 5
