"""Lightning with one added callback, the LightningModule unchanged: accumulate_grad_batches,
bf16-mixed, gradient clipping, validation, ModelCheckpoint and an exact ckpt_path resume;
and a submodule compiled in the LightningModule, with no callback."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

pl = pytest.importorskip("pytorch_lightning")

from fxfreeze import zoo  # noqa: E402
from fxfreeze.integrations.lightning import FxFreezeCallback  # noqa: E402


class _Lit(pl.LightningModule):
    """Calls its network directly in the steps (no forward of its own)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = zoo.resnet20(num_classes=4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _loader():
    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(64, 3, 16, 16, generator=g), torch.randint(0, 4, (64,), generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=8)


def _fit(tmp_path, cb, ckpt_path=None, lit=None):
    from pytorch_lightning.callbacks import ModelCheckpoint

    lit = _Lit() if lit is None else lit
    callbacks = [] if cb is None else [cb]
    trainer = pl.Trainer(
        max_steps=8, accumulate_grad_batches=2, precision="bf16-mixed", gradient_clip_val=1.0, accelerator="cpu",
        callbacks=[*callbacks, ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)], logger=False,
        enable_progress_bar=False, enable_model_summary=False, val_check_interval=4, limit_val_batches=2,
        num_sanity_val_steps=1,
    )
    trainer.fit(lit, _loader(), _loader(), ckpt_path=ckpt_path)
    return lit


def test_lightning_freezes_and_resumes_exactly(tmp_path):
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    cb = FxFreezeCallback(policy="manual", config={"manual": {"schedule": {2: 2, 5: 5}}})
    lit = _fit(tmp_path, cb)
    fm = cb.module
    assert fm is not None and fm.model is lit.net  # the network the steps call, found without naming it
    assert "forward" not in lit.__dict__  # the other candidate route was taken off
    assert fm.freezer.step_count == 8  # accumulate_grad_batches=2: one decision per optimizer step
    assert [(e["step"], e["num_frozen"]) for e in fm.freezer.history] == [(2, 2), (5, 5)]
    assert any(e.key[1] for e in fm.graphs.entries())  # captured under bf16 autocast
    final = {n: p.detach().clone() for n, p in lit.named_parameters()}
    ckpt = next(p for p in tmp_path.iterdir() if "step=4" in p.name)
    assert torch.load(ckpt, weights_only=False)["callbacks"]["FxFreezeCallback"]["freezer"]["num_frozen"] == 2

    cb2 = FxFreezeCallback(policy="manual", config={"manual": {"schedule": {2: 2, 5: 5}}})
    lit2 = _fit(tmp_path / "again", cb2, ckpt_path=str(ckpt))
    assert [(e["step"], e["num_frozen"]) for e in cb2.module.freezer.history] == [(2, 2), (5, 5)]
    for n, p in lit2.named_parameters():
        torch.testing.assert_close(p, final[n], rtol=0, atol=0, msg=f"{n} differs after the resume")


def test_the_end_of_fit_gives_the_network_back_and_the_callback_serves_another_fit(tmp_path):
    """After ``fit`` the network is as plain training leaves it: a second stage without the
    callback trains every parameter (before, the frozen prefix stayed frozen, held in eval
    mode and routed to a controller no optimizer drove). The same callback then resumes a
    checkpoint of its first fit exactly: the state Lightning restores before ``on_fit_start``
    waits for the network's first call."""
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    cb = FxFreezeCallback(policy="manual", config={"manual": {"schedule": {2: 2, 5: 5}}})
    lit = _fit(tmp_path / "one", cb)
    first = cb.module
    assert [(e["step"], e["num_frozen"]) for e in first.freezer.history] == [(2, 2), (5, 5)]
    assert first.num_frozen == 0 and all(p.requires_grad for p in lit.parameters())
    assert not any("train" in m.__dict__ for m in lit.modules()) and "forward" not in lit.net.__dict__
    assert cb.state_dict()["freezer"]["num_frozen"] == 5  # a checkpoint written after fit keeps the state
    final = {n: p.detach().clone() for n, p in lit.named_parameters()}

    _fit(tmp_path / "two", None, lit=lit)
    unchanged = [n for n, p in lit.named_parameters() if torch.equal(p, final[n])]
    assert unchanged == [], unchanged

    ckpt = next(p for p in (tmp_path / "one").iterdir() if "step=4" in p.name)
    lit3 = _fit(tmp_path / "three", cb, ckpt_path=str(ckpt))
    assert cb.module is not first and cb.module.model is lit3.net
    assert [(e["step"], e["num_frozen"]) for e in cb.module.freezer.history] == [(2, 2), (5, 5)]
    for n, p in lit3.named_parameters():
        torch.testing.assert_close(p, final[n], rtol=0, atol=0, msg=f"{n} differs after the resume")


def test_lightnings_own_ddp_applies_rank_0s_decisions_on_every_rank(tmp_path):
    """Two CPU processes under ``strategy="ddp_find_unused_parameters_true"``: rank 1 is given
    a schedule of its own ({1: 6}); both follow rank 0's ({2: 2, 5: 5}) and end equal."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    job = Path(__file__).with_name("_pl_ddp_job.py")
    done = subprocess.run([sys.executable, str(job), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"result{r}.json").read_text()) for r in range(2))
    assert r0["world"] == 2
    for r in (r0, r1):
        assert [(s, k) for s, k, _ in r["history"]] == [(2, 2), (5, 5)], r["history"]
    torch.testing.assert_close(torch.load(tmp_path / "params0.pt"), torch.load(tmp_path / "params1.pt"), rtol=0, atol=0)


def test_lightnings_ddp_without_unused_parameters_or_another_strategy_is_refused():
    """Lightning's plain ``strategy="ddp"`` leaves ``find_unused_parameters`` off: DDP would
    raise at the step after the first freeze. Said at ``on_fit_start``, as for FSDP."""
    from types import SimpleNamespace

    import fxfreeze

    ddp = pl.strategies.DDPStrategy()
    for strategy, says in ((ddp, "find_unused_parameters off.*ddp_find_unused_parameters_true"),
                           (SimpleNamespace(), "with SimpleNamespace, which FxFreezeCallback does not support")):
        cb = FxFreezeCallback(policy="manual")
        lit = _Lit()
        with pytest.raises(fxfreeze.DistributedError, match=f"on 4 processes .*{says}"):
            cb.on_fit_start(SimpleNamespace(world_size=4, optimizers=[], strategy=strategy), lit)
        assert "forward" not in lit.net.__dict__  # nothing routed


def test_base_finetuning_unfreezing_a_backbone_a_freeze_took_trains_it_again():
    """Lightning's ``BaseFinetuning``: ``layer1`` frozen by the user before training (its
    BatchNorms left trainable, the callback's default), taken along by a freeze of four blocks
    at step 2, unfrozen by the callback at epoch 1. Before, ``layer1`` required gradients
    from then on and got none; now the prefix is cut back to the stem and ``layer1`` trains."""
    from pytorch_lightning.callbacks import BaseFinetuning

    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)

    class _Unfreeze(BaseFinetuning):
        def freeze_before_training(self, pl_module):
            self.freeze(pl_module.net.layer1)

        def finetune_function(self, pl_module, current_epoch, optimizer):
            if current_epoch == 1:
                self.unfreeze_and_add_param_group(modules=pl_module.net.layer1, optimizer=optimizer, lr=0.01)

    cb = FxFreezeCallback(policy="manual", config={"manual": {"schedule": {2: 4}}})
    lit = _Lit()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[_Unfreeze(), cb])
    trainer.fit(lit, _loader())
    convs = {n: p.detach().clone() for n, p in lit.net.layer1.named_parameters() if "conv" in n}
    history = [(e["step"], e["action"], e["num_frozen"]) for e in cb.module.freezer.history]
    assert history == [(2, "freeze", 4), (9, "unfreeze", 1)], history  # 8 steps per epoch: the first of epoch 1
    assert "layer1.0.conv1.weight and 5 more trainable again" in cb.module.freezer.history[-1]["reason"]
    # layer1's convolutions moved: frozen by the user in epoch 0, only epoch 1 can have moved them
    # (_Lit seeds its initialisation, so a new one holds the initial weights)
    initial = _Lit().net.layer1
    assert all(not torch.equal(p, initial.get_parameter(n)) for n, p in convs.items())
    assert all(p.requires_grad for p in lit.net.layer1.parameters())


def test_module_by_name_and_a_clear_error_for_a_wrong_one(tmp_path):
    cb = FxFreezeCallback(module="nope", policy="manual")
    with pytest.raises(Exception, match="no submodule 'nope'"):
        _fit(tmp_path, cb)


def test_a_compiled_submodule_without_the_callback_follows_lightnings_optimizer():
    """``self.net = fxfreeze.compile(net, x)`` inside the LightningModule, no callback: the
    optimizer ``configure_optimizers`` builds later (stepped through Lightning's wrapper,
    with gradient accumulation) drives the controller, one step per optimizer step."""
    import fxfreeze

    class _Sub(_Lit):
        def __init__(self) -> None:
            super().__init__()
            self.net = fxfreeze.compile(self.net, (torch.randn(2, 3, 16, 16),),
                                        config={"policy": "manual", "manual": {"schedule": {2: 2, 3: 3}}})

    lit = _Sub()
    trainer = pl.Trainer(max_steps=4, accumulate_grad_batches=2, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(lit, _loader())
    fm = lit.net
    assert fm.freezer.step_count == 4 and fm.freezer.optimizer is trainer.optimizers[0]
    assert [(e["step"], e["num_frozen"]) for e in fm.freezer.history] == [(2, 2), (3, 3)]
    frozen = [fm.params_by_name[n] for n in fm.frozen_parameter_names()]
    assert frozen and not any(p in trainer.optimizers[0].state for p in frozen)


class _GAN(pl.LightningModule):
    """Two networks, one optimizer each (the generator's first), manual optimization: the
    discriminator steps on real and generated samples, then the generator through it."""

    def __init__(self) -> None:
        super().__init__()
        from _nets import Res  # (here: the DDP job script imports this file from outside pytest's path)

        self.automatic_optimization = False
        torch.manual_seed(0)

        def tower(i: int, o: int) -> torch.nn.Module:
            return torch.nn.Sequential(torch.nn.Linear(i, 16), *[Res(16) for _ in range(3)],
                                       torch.nn.Linear(16, o))

        self.gen, self.disc = tower(4, 8), tower(8, 1)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        opt_g, opt_d = self.optimizers()
        z = torch.randn(x.shape[0], 4)
        d_loss = F.softplus(self.disc(self.gen(z).detach())).mean() + F.softplus(-self.disc(x)).mean()
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        g_loss = F.softplus(-self.disc(self.gen(z))).mean()
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()

    def configure_optimizers(self):
        return [torch.optim.Adam(self.gen.parameters(), 1e-3), torch.optim.Adam(self.disc.parameters(), 1e-3)]


def test_a_gan_with_an_optimizer_per_network_follows_the_compiled_networks_own():
    """Before: the first optimizer (the generator's) was given to the discriminator's
    controller, which refused it at the first step (``ConfigError``: it holds none of the
    discriminator's parameters)."""
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    lit = _GAN()
    cb = FxFreezeCallback(policy="manual", module="disc", config={"manual": {"schedule": {4: 2}}})
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    ds = torch.utils.data.TensorDataset(torch.randn(64, 8, generator=torch.Generator().manual_seed(0)))
    snapshot: dict[str, torch.Tensor] = {}
    frozen: list[str] = []

    class _Snap(pl.Callback):  # the frozen prefix's weights right after the freeze
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 3:
                snapshot.update({n: p.detach().clone() for n, p in cb.module.params_by_name.items()})
                frozen.extend(cb.module.frozen_parameter_names())

    trainer.callbacks.append(_Snap())
    trainer.fit(lit, torch.utils.data.DataLoader(ds, batch_size=8))
    fm = cb.module
    assert fm.model is lit.disc and fm.freezer.optimizer is trainer.optimizers[1]
    assert fm.freezer.step_count == 8  # one per discriminator step
    assert [(e["step"], e["num_frozen"]) for e in fm.freezer.history] == [(4, 2)]
    assert set(frozen) == {n for n in snapshot if n.startswith(("0.", "1."))}
    moved = [n for n, p in lit.disc.named_parameters() if not torch.equal(p, snapshot[n])]
    assert moved and not any(n.startswith(("0.", "1.")) for n in moved), moved  # stem and first block held


class _DictLit(_Lit):
    """Dict batches; checks that the training step never sees the sample ids."""

    def training_step(self, batch, batch_idx):
        assert set(batch) == {"x", "y"}, sorted(batch)
        return F.cross_entropy(self.net(batch["x"]), batch["y"])

    def validation_step(self, batch, batch_idx):
        assert set(batch) == {"x", "y"}, sorted(batch)
        self.log("val_loss", F.cross_entropy(self.net(batch["x"]), batch["y"]))


@pytest.mark.parametrize("sub_batches", [False, True])
def test_the_activation_cache_under_lightning_reads_the_ids_the_batch_carries(sub_batches):
    """``fxfreeze.with_sample_ids`` on a dataset of dicts: the callback takes the ids out of
    each training batch (and validation batch) before the step sees it and declares them for
    a training step's calls, so the
    cache reads them (before, Lightning's batches came without ids and the cache served
    none). The run equals the uncached one: bitwise when every batch runs the prefix whole;
    within rounding when a batch partly stored runs it on its missing rows only (a
    convolution over fewer rows may round otherwise, by about 1e-7)."""
    import fxfreeze

    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 16, 16, generator=g), torch.randint(0, 4, (32,), generator=g)
    data = fxfreeze.with_sample_ids([{"x": x[i], "y": y[i]} for i in range(32)])

    def fit(cache: bool):
        lit = _DictLit()
        cb = FxFreezeCallback(policy="manual", config={"manual": {"schedule": {1: 3}},
                                                       "cache": {"enabled": cache, "sub_batches": sub_batches}})
        trainer = pl.Trainer(max_epochs=3, accelerator="cpu", callbacks=[cb], logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False, limit_val_batches=1)
        loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3))
        trainer.fit(lit, loader, torch.utils.data.DataLoader(data, batch_size=8))
        return lit, cb

    ref, _ = fit(False)
    lit, cb = fit(True)
    stats = cb.module.activation_cache.stats
    assert stats["hits"] >= 32 and stats["uncached_batches"] == 0 and cb.lazy.epoch_steps == 4  # epoch 3 reads all
    # epoch 1 stores 24 samples after the freeze, epoch 2 the other 8: the batches that mix them run the prefix on
    # the 8 only (and read the 24), or whole
    assert stats["misses"] == 32 and (stats["partial_batches"] > 0) == sub_batches
    assert stats["hits"] == 24 + 32 if sub_batches else stats["hits"] < 24 + 32
    tol = 1e-5 if sub_batches else 0.0
    for (n, p), q in zip(lit.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol, msg=f"{n} differs from the uncached run")
