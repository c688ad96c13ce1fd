"""The run's planned length from a learning-rate scheduler (issue 17, point 2): each
scheduler's horizon, the conversion to optimizer steps (per step, per epoch), the search
for a scheduler, and the controller and Egeria using it."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import fxfreeze
from fxfreeze.runtime.horizon import RunLength, find_schedulers, register_horizon, schedule_horizon

S = torch.optim.lr_scheduler


def _opt(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=lr)


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda o: S.CosineAnnealingLR(o, T_max=700), 700),
        (lambda o: S.OneCycleLR(o, max_lr=0.1, total_steps=900), 900),
        (lambda o: S.PolynomialLR(o, total_iters=450), 450),
        (lambda o: S.LinearLR(o, start_factor=1.0, end_factor=0.0, total_iters=300), 300),
        # a warm-up (rising) ends nothing
        (lambda o: S.LinearLR(o, start_factor=0.1, end_factor=1.0, total_iters=50), None),
        (lambda o: S.StepLR(o, step_size=30), None),
        (lambda o: S.ExponentialLR(o, gamma=0.99), None),
        (lambda o: S.MultiStepLR(o, milestones=[100, 150]), None),
        (lambda o: S.ReduceLROnPlateau(o), None),
        (lambda o: S.LambdaLR(o, lambda s: 1.0), None),
        (lambda o: S.LambdaLR(o, lambda s: 0.99**s), None),  # tends to 0, never reaches it
        # the Hugging Face linear schedule: warm-up over 100, zero from step 1000 on
        (lambda o: S.LambdaLR(o, lambda s: (s + 1) / 100 if s < 100 else max(0.0, (1000 - s) / 900)), 1000),
        # a warm-up then a cosine: the milestone plus the cosine's horizon
        (lambda o: S.SequentialLR(o, [S.LinearLR(o, 0.1, 1.0, 50), S.CosineAnnealingLR(o, T_max=450)], milestones=[50]), 500),
    ],
)
def test_horizon_of_each_scheduler(make, expected):
    assert schedule_horizon(make(_opt())) == expected


def test_hugging_face_schedules():
    transformers = pytest.importorskip("transformers")
    o = _opt()
    assert schedule_horizon(transformers.get_linear_schedule_with_warmup(o, 90, 897)) == 897
    o = _opt()
    assert schedule_horizon(transformers.get_polynomial_decay_schedule_with_warmup(o, 10, 400, lr_end=0.0)) == 400
    o = _opt()
    assert schedule_horizon(transformers.get_constant_schedule_with_warmup(o, 10)) is None


def test_a_failing_lambda_is_no_horizon_and_a_registered_handler_wins():
    def boom(s: int) -> float:
        if s > 10:
            raise ValueError("no")
        return 1.0

    assert schedule_horizon(S.LambdaLR(_opt(), boom)) is None

    class Mine(S.LambdaLR):
        def __init__(self, opt: torch.optim.Optimizer, total: int) -> None:
            self.total = total
            super().__init__(opt, lambda s: 1.0)

    assert schedule_horizon(Mine(_opt(), 250)) is None  # its parent's rule: a constant never ends
    register_horizon(Mine, lambda s: s.total)
    assert schedule_horizon(Mine(_opt(), 250)) == 250
    with pytest.raises(TypeError):
        register_horizon("Mine", lambda s: 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("per_epoch", [1, 7])
def test_run_length_per_step_and_per_epoch(per_epoch):
    o = _opt()
    horizon = 12
    sched = S.CosineAnnealingLR(o, T_max=horizon)
    rl = RunLength(sched)
    seen = []
    for step in range(1, horizon * per_epoch + 1):
        o.step()
        seen.append(rl.observe(step))
        if step % per_epoch == 0:
            sched.step()
    assert seen[-1] == horizon * per_epoch
    first = next(i for i, t in enumerate(seen, start=1) if t is not None)
    assert first == per_epoch + 1  # known once the scheduler has moved once


def test_find_schedulers():
    o1, o2 = _opt(), _opt()
    assert find_schedulers([o1]) == []
    s1 = S.CosineAnnealingLR(o1, T_max=10)
    s2 = S.StepLR(o2, step_size=3)
    assert find_schedulers([o1]) == [s1]
    assert find_schedulers([o1, o2]) == [s1, s2]


def _small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 3))


def _train(fm, opt, sched, steps: int, per_epoch: int = 1) -> None:
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    for step in range(1, steps + 1):
        opt.zero_grad()
        nn.functional.cross_entropy(fm(x), y).backward()
        opt.step()
        if sched is not None and step % per_epoch == 0:
            sched.step()


def test_compiled_module_learns_the_length_from_its_scheduler(caplog):
    """A plain loop that states the length only to its scheduler: found at the first step,
    known at the second, logged once; Egeria scales its evaluation interval to it."""
    m = _small()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    fm = fxfreeze.compile(m, (torch.randn(4, 8),), optimizer=opt, config={"egeria": {"eval_interval": 50}})
    sched = S.CosineAnnealingLR(opt, T_max=600)  # made after compile, as loops do
    assert fm.freezer.planned_steps is None
    with caplog.at_level(logging.INFO, logger="fxfreeze"):
        _train(fm, opt, sched, 3)
    assert fm.freezer.planned_steps == 600
    assert fm.freezer.policy.interval == 10  # 600 steps / 60 evaluations per run
    assert sum("planned for 600 optimizer steps" in r.message for r in caplog.records) == 1
    state = fm.freezer.state_dict()
    fm.detach()

    # a resume keeps it before any scheduler has moved
    m2 = _small()
    opt2 = torch.optim.SGD(m2.parameters(), lr=0.1)
    fm2 = fxfreeze.compile(m2, (torch.randn(4, 8),), optimizer=opt2)
    fm2.freezer.load_state_dict(state)
    assert fm2.freezer.planned_steps == 600
    fm2.detach()


def test_stated_length_wins_and_a_given_scheduler_is_used():
    m = _small()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    sched = S.CosineAnnealingLR(opt, T_max=600)
    fm = fxfreeze.compile(m, (torch.randn(4, 8),), optimizer=opt, total_steps=90)
    _train(fm, opt, sched, 3)
    assert fm.freezer.planned_steps == 90
    fm.detach()

    m = _small()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    sched = S.OneCycleLR(opt, max_lr=0.1, total_steps=40)  # 10 epochs of 4 steps, stepped per epoch
    fm = fxfreeze.compile(m, (torch.randn(4, 8),), optimizer=opt, scheduler=S.CosineAnnealingLR(opt, T_max=10))
    _train(fm, opt, None, 5)
    assert fm.freezer.planned_steps is None  # the given scheduler never moved
    fm.detach()
    with pytest.raises(fxfreeze.FxFreezeError, match="learning-rate scheduler"):
        fxfreeze.compile(_small(), (torch.randn(4, 8),), scheduler=object())
    del sched


def test_no_scheduler_leaves_the_length_unknown():
    m = _small()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    fm = fxfreeze.compile(m, (torch.randn(4, 8),), optimizer=opt, config={"egeria": {"eval_interval": 50}})
    _train(fm, opt, None, 3)
    assert fm.freezer.planned_steps is None and fm.freezer.policy.interval == 50
    fm.detach()
