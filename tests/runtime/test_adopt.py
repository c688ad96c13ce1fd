"""An optimizer built after ``fxfreeze.compile`` (which got none) drives the controller as if
it had been given: the same steps, the same freezes, its frozen parameters' state released;
a loop that calls ``fm.freezer.step()`` by hand keeps its own clock."""

from __future__ import annotations

import gc
import logging
import weakref

import pytest
import torch
from torch import nn
from torch.optim.optimizer import _global_optimizer_post_hooks

import fxfreeze
from fxfreeze.runtime import adopt

SCHEDULE = {"policy": "manual", "manual": {"schedule": {3: 2, 6: 4}}}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), *[nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(4)], nn.Linear(16, 3))


def _batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)


def _train(fm: nn.Module, opt: torch.optim.Optimizer, steps: int, by_hand: str = "") -> list[float]:
    losses = []
    for i in range(steps):
        x, y = _batch(i)
        loss = nn.functional.cross_entropy(fm(x), y)
        opt.zero_grad()
        loss.backward()
        if by_hand == "before":
            fm.freezer.step()
        opt.step()
        if by_hand == "after":
            fm.freezer.step()
        losses.append(loss.item())
    return losses


def _hooks() -> int:
    """Global optimizer hooks, less the one every controller's ClockWatch shares."""
    return sum(1 for h in _global_optimizer_post_hooks.values() if h is not adopt._clock_hook)


def _step_both(fm: nn.Module, head: torch.optim.Optimizer, front: torch.optim.Optimizer, i: int) -> None:
    """One training step of two optimizers side by side (one per parameter subset)."""
    x, y = _batch(i)
    head.zero_grad()
    front.zero_grad()
    nn.functional.cross_entropy(fm(x), y).backward()
    head.step()
    front.step()


def _events(fm) -> list[tuple[int, str, int]]:
    return [(e["step"], e["action"], e["num_frozen"]) for e in fm.freezer.history]


def test_an_optimizer_built_after_compile_drives_the_controller_like_a_given_one(caplog):
    given = fxfreeze.compile(_mlp(), (torch.randn(2, 8),), optimizer=None, config=SCHEDULE)
    opt_g = torch.optim.SGD(given.parameters(), lr=0.1, momentum=0.9)
    given.freezer.attach_optimizer(opt_g)  # the explicit way
    later = fxfreeze.compile(_mlp(), (torch.randn(2, 8),), config=SCHEDULE)
    with caplog.at_level(logging.INFO, logger="fxfreeze"):
        opt_l = torch.optim.SGD(later.parameters(), lr=0.1, momentum=0.9)
        losses_l = _train(later, opt_l, 8)
    losses_g = _train(given, opt_g, 8)
    assert later.freezer.step_count == given.freezer.step_count == 8
    assert _events(later) == _events(given) == [(3, "freeze", 2), (6, "freeze", 4)]
    assert later.freezer.optimizer is opt_l
    assert any("follows the steps of the SGD" in r.getMessage() for r in caplog.records)
    # the same training, bit for bit (frozen momentum released at the same steps)
    assert losses_l == losses_g
    for (n, p), q in zip(later.named_parameters(), given.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    frozen = [later.params_by_name[n] for n in later.frozen_parameter_names()]
    assert frozen and not any(p in opt_l.state for p in frozen)


def test_a_second_optimizer_of_the_models_parameters_is_watched_but_is_not_a_clock():
    model = _mlp()
    fm = fxfreeze.compile(model, (torch.randn(2, 8),), policy="manual")
    head = torch.optim.SGD(list(model[2:].parameters()), lr=0.1, momentum=0.9)
    front = torch.optim.Adam(list(model[:2].parameters()), lr=1e-3)
    for i in range(3):
        _step_both(fm, head, front, i)
    assert fm.freezer.step_count == 3  # the first to step is the clock
    assert fm.freezer.optimizer is head and fm.freezer.optimizers == [head, front]
    assert all(p in front.state for p in model[0].parameters())
    fm.freeze_prefix(2)
    frozen = [fm.params_by_name[n] for n in fm.frozen_parameter_names()]
    assert not any(p in front.state or p in head.state for p in frozen)  # released in both


def test_an_optimizer_of_another_model_is_not_adopted():
    fm = fxfreeze.compile(_mlp(), (torch.randn(2, 8),), config=SCHEDULE)
    other = nn.Linear(4, 4)
    o = torch.optim.SGD(other.parameters(), lr=0.1)
    for _ in range(4):
        other(torch.randn(2, 4)).sum().backward()
        o.step()
    assert fm.freezer.step_count == 0 and fm.freezer.optimizer is None
    opt = torch.optim.SGD(fm.parameters(), lr=0.1)
    _train(fm, opt, 4)
    assert fm.freezer.step_count == 4 and _events(fm) == [(3, "freeze", 2)]


@pytest.mark.parametrize("order", ["before", "after"])
def test_a_loop_that_steps_the_controller_by_hand_keeps_its_own_clock(order, caplog):
    hooks = _hooks()
    fm = fxfreeze.compile(_mlp(), (torch.randn(2, 8),), config=SCHEDULE)
    assert _hooks() == hooks + 1
    opt = torch.optim.SGD(fm.parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING, logger="fxfreeze"):
        _train(fm, opt, 8, by_hand=order)
    # one count per iteration, never two: the by-hand call is the clock
    assert fm.freezer.step_count == 8
    assert _events(fm) == [(3, "freeze", 2), (6, "freeze", 4)]
    assert _hooks() == hooks  # the watch is gone
    warned = [r for r in caplog.records if "called by hand" in r.getMessage()]
    # called after the optimizer's step, the first call finds the step counted already (said once)
    assert len(warned) == (1 if order == "after" else 0)


def test_an_explicit_optimizer_or_detach_ends_the_watch_and_a_dropped_model_is_not_kept_alive():
    hooks = _hooks()
    fm = fxfreeze.compile(_mlp(), (torch.randn(2, 8),), config=SCHEDULE)
    fm.freezer.attach_optimizer(torch.optim.SGD(fm.parameters(), lr=0.1))
    assert _hooks() == hooks
    fm2 = fxfreeze.compile(_mlp(), (torch.randn(2, 8),), config=SCHEDULE)
    fm2.detach()
    assert _hooks() == hooks
    fm3 = fxfreeze.compile(_mlp(), (torch.randn(2, 8),), config=SCHEDULE)
    ref = weakref.ref(fm3.freezer)
    del fm3
    gc.collect()
    assert ref() is None  # the global hook holds the controller weakly
    opt = torch.optim.SGD(_mlp().parameters(), lr=0.1)
    opt.step()  # an inert hook left behind does nothing


def test_an_optimizer_that_replaces_the_followed_one_gets_the_clock(caplog):
    """A second phase with a new optimizer (``opt = AdamW(...)`` mid-run): before, the
    controller kept following the first one, which never stepped again: no step counted, no
    decision (the schedule's freeze at step 6 never came), silently. Now the new one is the
    clock after its third step, its earlier steps counted; an optimizer stepping beside the
    followed one, or another model's, never is; a dropped controller leaves no hook."""
    model = _mlp()
    first = torch.optim.SGD(model.parameters(), lr=0.1)
    fm = fxfreeze.compile(model, (torch.randn(2, 8),), optimizer=first, config=SCHEDULE)
    _train(fm, first, 4)
    assert _events(fm) == [(3, "freeze", 2)]
    second = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with caplog.at_level(logging.INFO, logger="fxfreeze"):
        _train(fm, second, 2)
        assert fm.freezer.step_count == 4 and fm.freezer.optimizer is first  # two steps: not yet
        _train(fm, second, 3)
    assert fm.freezer.optimizer is second and fm.freezer.optimizers == [second]
    assert fm.freezer.step_count == 9  # every step of both, as if it had been given
    assert _events(fm)[-1] == (7, "freeze", 4)  # "4 blocks from step 6", seen at the first step it decides on
    assert any("it follows AdamW from now on" in r.getMessage() for r in caplog.records)
    frozen = [fm.params_by_name[n] for n in fm.frozen_parameter_names()]
    assert not any(p in second.state for p in frozen)  # its frozen parameters' state released

    # side by side with the followed one: never the clock
    model = _mlp()
    head = torch.optim.SGD(list(model[2:].parameters()), lr=0.1)
    front = torch.optim.SGD(list(model[:2].parameters()), lr=0.1)
    fm = fxfreeze.compile(model, (torch.randn(2, 8),), optimizer=head, config=SCHEDULE)
    other = nn.Linear(4, 4)
    o = torch.optim.SGD(other.parameters(), lr=0.1)
    for i in range(5):
        _step_both(fm, head, front, i)
        for _ in range(3):
            other(torch.randn(2, 4)).sum().backward()
            o.step()  # another model's: never
    assert fm.freezer.optimizer is head and fm.freezer.step_count == 5
    ref = weakref.ref(fm.freezer)
    del fm, head, front  # the followed optimizer's own hook holds the controller
    gc.collect()
    assert ref() is None and not any(w._controller() is None for w in adopt._CLOCKS)


class _Loss(nn.Module):
    """A loss that holds the model and calls it itself (sentence-transformers' losses do)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.model(x), y)


def test_a_loop_that_calls_the_model_itself_is_routed_to_the_compiled_module(caplog):
    """Nothing reached the compiled module in the first step, though a backward reached the
    model's parameters: the model's calls are routed to it from then on (one warning), so
    the graphs run and the policies see the training calls; the run equals one that called
    ``fm`` from the start."""
    model = _mlp()
    fm = fxfreeze.compile(model, (torch.randn(2, 8),), config=SCHEDULE)
    loss_fn = _Loss(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING, logger="fxfreeze"):
        for i in range(8):
            x, y = _batch(i)
            loss = loss_fn(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    warned = [r.getMessage() for r in caplog.records if "without a call of the compiled module" in r.getMessage()]
    assert len(warned) == 1 and "fm.install()" in warned[0]
    assert fm.installed and fm.training_calls == 7  # every call after the first step
    assert _events(fm) == [(3, "freeze", 2), (6, "freeze", 4)]

    twin = fxfreeze.compile(_mlp(), (torch.randn(2, 8),), config=SCHEDULE)
    _train(twin, torch.optim.SGD(twin.parameters(), lr=0.1), 8)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_no_route_when_the_loop_calls_the_compiled_module_or_no_backward_ran(caplog):
    with caplog.at_level(logging.WARNING, logger="fxfreeze"):
        fm = fxfreeze.compile(_mlp(), (torch.randn(2, 8),), config=SCHEDULE)
        _train(fm, torch.optim.SGD(fm.parameters(), lr=0.1), 3)
        assert not fm.installed and fm.training_calls == 3
        by_hand = fxfreeze.compile(_mlp(), (torch.randn(2, 8),), config=SCHEDULE)
        by_hand.freezer.step()  # a step with no backward: nothing to tell
        assert not by_hand.installed
    assert not [r for r in caplog.records if "without a call of the compiled module" in r.getMessage()]


def test_a_model_whose_forward_a_wrapper_holds_is_not_routed_and_the_warning_says_what_to_do(caplog):
    """accelerate's mixed precision (the HF Trainer with bf16, no callback) makes the model's
    forward an instance wrapper; a route would replace it and captures would run through it,
    so the model is left as it is and the warning names the ways that work."""
    import types

    model = _mlp()
    fm = fxfreeze.compile(model, (torch.randn(2, 8),), config=SCHEDULE)
    plain = type(model).forward

    def under_autocast(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return plain(self, x)

    model.forward = types.MethodType(under_autocast, model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING, logger="fxfreeze"):
        for i in range(4):
            x, y = _batch(i)
            loss = nn.functional.cross_entropy(model(x).float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    warned = [r.getMessage() for r in caplog.records if "without a call of the compiled module" in r.getMessage()]
    assert len(warned) == 1 and "wrapper of its forward" in warned[0] and "FxFreezeCallback" in warned[0]
    assert not fm.installed and model.forward.__func__ is under_autocast
