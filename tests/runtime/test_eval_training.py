"""A loop that trains the model in eval mode (``model.eval()`` to keep dropout off or
BatchNorm fixed, or an evaluation's ``eval()`` never undone). Before, its calls were not
training calls: Egeria never got its probe batch and so never froze, the safety net never saw
the model's loss, and the first optimizer step warned that "something calls the model
itself" and routed the model, though the loop called the compiled module."""

from __future__ import annotations

import logging

import torch
from torch import nn

import fxfreeze
from _nets import ResidualMLP


class WithLoss(ResidualMLP):
    """Computes its own loss when given labels, as Hugging Face models do."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = super().forward(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def _setup() -> tuple[nn.Module, "fxfreeze.runtime.FreezableModule", torch.optim.Optimizer, list[int]]:
    torch.manual_seed(0)
    model = WithLoss(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    fm = fxfreeze.compile(model, (torch.randn(8, 8),), optimizer=opt, config={"policy": "manual", "manual": {"schedule": {}}})
    probed: list[int] = []
    fm.probe_hook = lambda args, kwargs: probed.append(args[0].shape[0])  # what Egeria's probe is offered
    return model, fm, opt, probed


def _step(fm, opt, n: int = 8) -> torch.Tensor:
    out = fm(torch.randn(n, 8), labels=torch.randint(0, 3, (n,)))
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    return out["loss"]


def test_calls_with_gradients_count_as_training_calls_once_a_step_shows_the_loop_trains_in_eval_mode(caplog):
    model, fm, opt, probed = _setup()
    fm.eval()
    with caplog.at_level(logging.INFO, logger="fxfreeze"):
        _step(fm, opt)  # the first step tells: a call with gradients on, none in training mode
        assert fm.training_calls == 0 and fm.grad_calls == 1
        assert not fm.installed  # the loop calls fm: nothing to route
        assert not any("without a call of the compiled module" in r.message for r in caplog.records)
        assert any("trained in eval mode" in r.message for r in caplog.records)
        loss = _step(fm, opt)
    assert fm.training_calls == 1 and probed == [8]
    assert list(fm.freezer.safety.recent) == [float(loss)]  # the safety net saw the second step's loss
    assert not model.training  # the mode is the user's: nothing switched it
    with torch.no_grad():  # an evaluation in the same loop is not a training call
        fm(torch.randn(5, 8))
    with torch.inference_mode():
        fm(torch.randn(5, 8))
    assert fm.training_calls == 1 and probed == [8]


def test_a_call_in_training_mode_ends_it_and_an_evaluation_with_gradients_between_steps_does_not_start_it():
    model, fm, opt, probed = _setup()
    fm.eval()
    _step(fm, opt)
    _step(fm, opt)
    assert fm.training_calls == 1
    fm.train()
    _step(fm, opt, n=4)
    assert fm.training_calls == 2 and probed == [8, 4]
    fm.eval()
    fm(torch.randn(6, 8))  # an evaluation with gradients on, in a loop that trains in training mode
    assert fm.training_calls == 2 and probed == [8, 4]
    fm.train()
    _step(fm, opt, n=3)  # the step follows a training-mode call: still training mode
    fm.eval()
    fm(torch.randn(6, 8))
    assert fm.training_calls == 3 and probed == [8, 4, 3]


def test_training_in_eval_mode_matches_eager_and_freezes():
    torch.manual_seed(0)
    model, ref = ResidualMLP(3), ResidualMLP(3)
    ref.load_state_dict(model.state_dict())
    opt, ropt = torch.optim.SGD(model.parameters(), lr=0.05), torch.optim.SGD(ref.parameters(), lr=0.05)
    fm = fxfreeze.compile(model, (torch.randn(8, 8),), optimizer=opt, config={"policy": "manual", "manual": {"schedule": {3: 2}}})
    fm.eval()
    for i in range(6):
        x, y = torch.randn(8, 8), torch.randint(0, 3, (8,))
        for m, o in ((fm, opt), (ref, ropt)):
            loss = nn.functional.cross_entropy(m(x), y)
            o.zero_grad()
            loss.backward()
            o.step()
        if i == 2:  # the freeze: as fxfreeze froze blocks 0-1, freeze the reference's by hand
            for p in [*ref.stem.parameters(), *ref.blocks[0].parameters()]:
                p.requires_grad_(False)
    assert fm.num_frozen == 2
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)  # float32 sums: 1e-5 relative


def test_a_loop_training_in_eval_mode_reads_the_activation_cache():
    """A pretrained model loaded with ``from_pretrained`` is in eval mode, and a plain loop
    that never calls ``train()`` trains it so. Its training calls used the eval graph, which
    the cache was never offered: with ``cache.enabled`` nothing was cached, silently. Now a
    training call in eval mode reads it; the losses equal the uncached run's (exact)."""
    x, y = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)), torch.randint(0, 3, (32,))
    ds = torch.utils.data.TensorDataset(x, y)

    def run(cache: bool):
        torch.manual_seed(0)
        model = WithLoss(3)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        fm = fxfreeze.compile(model, (x[:2],), optimizer=opt, config={
            "policy": "manual", "manual": {"schedule": {2: 2}, "unit": "step"}, "cache": {"enabled": cache}})
        fm.eval()
        loader = torch.utils.data.DataLoader(ds, batch_size=8)
        losses = []
        for _ in range(3):
            for xb, yb in (fm.wrap_loader(loader) if cache else loader):
                loss = fm(xb, labels=yb)["loss"]
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
        return fm, losses

    _, ref = run(False)
    fm, losses = run(True)
    assert losses == ref
    assert fm.activation_cache.stats["hits"] > 0 and fm.activation_cache.enabled
