"""The Hugging Face Trainer with one added callback: the optimizer and scheduler it builds,
gradient accumulation, bf16 on the CPU, gradient clipping, evaluation during training, freeze
events in its logs, checkpoints and an exact resume, and a saved model that loads into the
plain model class."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import fxfreeze  # noqa: E402
from fxfreeze.integrations.transformers import FxFreezeCallback  # noqa: E402

V = 100


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, V, (n, 12), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        # "source" is a column the model does not take: the Trainer drops it by the signature
        return {"input_ids": self.x[i], "attention_mask": torch.ones_like(self.x[i]), "labels": self.x[i], "source": "synthetic"}


def _model():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=3, n_head=2, n_positions=64))


def _trainer(model, out: Path, callbacks, **kw):
    kw = {"bf16": True, **kw}
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=12,
        learning_rate=1e-3, logging_steps=2, save_steps=6, eval_strategy="steps", eval_steps=6, report_to="none",
        use_cpu=True, gradient_accumulation_steps=2, max_grad_norm=1.0, disable_tqdm=True, seed=0, **kw,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=_Tokens(64, 0), eval_dataset=_Tokens(8, 1), callbacks=callbacks)


def _callback():
    return FxFreezeCallback(policy="manual", config={"manual": {"schedule": {4: 1, 8: 2}}})


def test_trainer_freezes_logs_checkpoints_resumes_exactly_and_saves_a_plain_model(tmp_path):
    model = _model()
    cb = _callback()
    trainer = _trainer(model, tmp_path, [cb])
    trainer.train()
    fm = cb.module
    assert fm is not None and fm.model is model
    assert [b.name for b in fm.plan.blocks] == ["stem", "transformer.h.0", "transformer.h.1", "transformer.h.2"]
    # one decision per optimizer step (gradient accumulation 2: 24 batches, 12 steps)
    assert fm.freezer.step_count == trainer.state.global_step == 12
    assert [(e["step"], e["num_frozen"]) for e in fm.freezer.history] == [(4, 1), (8, 2)]
    events = [h for h in trainer.state.log_history if "fxfreeze/event" in h]
    assert [(h["step"], h["fxfreeze/num_frozen"], h["fxfreeze/blocks"]) for h in events] == [
        (4, 1, "stem"), (8, 2, "transformer.h.0")
    ]
    assert any("eval_loss" in h for h in trainer.state.log_history)  # evaluation ran (its own graph)
    assert any(not e.training for e in fm.graphs.entries())
    # the end of training gave the model back: nothing frozen, nothing held in eval mode
    assert fm.num_frozen == 0 and all(p.requires_grad for p in model.parameters())
    assert not any("train" in m.__dict__ for m in model.modules())
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = json.loads((tmp_path / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["FxFreezeCallback"]["attributes"]["freezer_state"]

    # resume from the checkpoint at step 6 (one block frozen): the same run
    model2 = _model()
    cb2 = _callback()
    _trainer(model2, tmp_path, [cb2]).train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
    assert [(e["step"], e["num_frozen"]) for e in cb2.module.freezer.history] == [(4, 1), (8, 2)]
    for n, p in model2.named_parameters():
        torch.testing.assert_close(p, final[n], rtol=0, atol=0, msg=f"{n} differs after the resume")

    # save_model writes the model's own checkpoint: from_pretrained loads it into the plain class
    trainer.save_model(str(tmp_path / "final"))
    plain = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "final"))
    for n, p in plain.named_parameters():
        torch.testing.assert_close(p, final[n], rtol=0, atol=0)
    assert "forward" not in plain.__dict__


def test_callback_added_after_the_trainer_was_built_and_default_policy(tmp_path):
    model = _model()
    ref = copy.deepcopy(model)
    trainer = _trainer(model, tmp_path, [], save_strategy="no")
    cb = FxFreezeCallback()  # the default policy, added late: routes at train begin
    trainer.add_callback(cb)
    trainer.train()
    assert cb.module is not None and cb.module.freezer.config.policy == "egeria"
    assert cb.module.freezer.step_count == 12
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))
    # added late, over accelerate's bf16 wrapper: the graphs still run under bf16 autocast
    assert any(e.key[1] for e in cb.module.graphs.entries())


class _Classified(_Tokens):
    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "attention_mask": torch.ones_like(self.x[i]), "labels": int(self.x[i, 0] % 2)}


def test_trainer_with_a_model_export_cannot_capture(tmp_path):
    """DeBERTa-v2 with labels (data-dependent loss code): compiled on the Trainer's first call
    from its module order, it runs its own forward and freezes on schedule."""
    torch.manual_seed(0)
    model = transformers.DebertaV2ForSequenceClassification(transformers.DebertaV2Config(
        vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64,
    ))
    cb = _callback()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=12, learning_rate=1e-3,
        report_to="none", use_cpu=True, disable_tqdm=True, seed=0, save_strategy="no",
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Classified(48, 0), callbacks=[cb])
    at_freeze: dict[str, torch.Tensor] = {}

    class _Snapshot(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 8:
                at_freeze.update({n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad})

    trainer.add_callback(_Snapshot())
    trainer.train()
    fm = cb.module
    assert fm.eager_only and fm.freezer.step_count == 12
    assert [(e["step"], e["num_frozen"]) for e in fm.freezer.history] == [(4, 1), (8, 2)]
    assert set(at_freeze) == set(fm.frozen_parameter_names(2)) and at_freeze
    for n, t in at_freeze.items():
        assert torch.equal(fm.params_by_name[n], t), f"frozen {n} changed"


def test_trainer_with_torch_compile_freezes_on_schedule(tmp_path):
    """``torch_compile=True``: the Trainer wraps the routed model in ``torch.compile``; the
    first call compiles fxfreeze outside dynamo's trace and the freezes apply."""
    torch._dynamo.reset()
    model = _model()
    cb = FxFreezeCallback(policy="manual", config={"manual": {"schedule": {2: 1, 4: 2}}})
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6, learning_rate=1e-3, report_to="none",
        use_cpu=True, disable_tqdm=True, seed=0, save_strategy="no", torch_compile=True,
        torch_compile_backend="aot_eager",
    )
    try:
        transformers.Trainer(model=model, args=args, train_dataset=_Tokens(24, 0), callbacks=[cb]).train()
    finally:
        torch._dynamo.reset()
    fm = cb.module
    assert fm is not None and fm.plan.names == ["stem", "transformer.h.0", "transformer.h.1", "transformer.h.2"]
    assert fm.freezer.history[-1]["num_frozen"] == 2 and fm.training_calls == 6
    assert "transformer.h.0.attn.c_attn.weight" in fm.frozen_parameter_names(2)


@pytest.mark.parametrize("bf16", [False, True])
def test_the_end_of_training_gives_the_model_back_for_a_later_stage(tmp_path, bf16):
    """Two stages on one model: the first with the callback, the second a Trainer of its own
    without it (domain adaptation, then the task). Before, the model left the first stage
    with its prefix frozen (``requires_grad=False``, held in eval mode, routed to a
    controller no optimizer drove): the second Trainer built its optimizer without those
    parameters and never trained them, silently. With ``bf16`` accelerate's autocast wraps
    the route, which stays under it and passes calls through."""
    model = _model()
    cb = _callback()
    _trainer(model, tmp_path / "one", [cb], save_strategy="no", bf16=bf16).train()
    assert [e["num_frozen"] for e in cb.module.freezer.history] == [1, 2]  # the record stays
    assert cb.module.num_frozen == 0 and all(p.requires_grad for p in model.parameters())
    assert not any("train" in m.__dict__ for m in model.modules())
    assert ("forward" in model.__dict__) == bf16  # without a wrapper above it, the route is gone
    assert cb.state()["attributes"]["freezer_state"]  # trainer.save_state() after training keeps it
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    two = _trainer(model, tmp_path / "two", [], save_strategy="no", bf16=bf16)
    two.train()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == [], unchanged
    model.train()
    assert all(m.training for m in model.modules())

    # another run with the callback compiles the model again and freezes on its schedule
    again = _callback()
    _trainer(model, tmp_path / "three", [again], save_strategy="no", bf16=bf16).train()
    assert again.module is not None
    assert [(e["step"], e["num_frozen"]) for e in again.module.freezer.history] == [(4, 1), (8, 2)]
    assert again.module.num_frozen == 0 and all(p.requires_grad for p in model.parameters())


def test_the_trainers_own_ddp_applies_rank_0s_decisions_on_every_rank(tmp_path):
    """``torchrun`` with the Trainer (two processes, gloo): the Trainer's DDP finds unused
    parameters by default, and the callback makes every rank apply rank 0's decisions. Rank 1
    is given a schedule of its own ({2: 3}); before, it froze apart from rank 0 and the ranks
    diverged. Now both follow {4: 1, 8: 2}, end with the same parameters, and the frozen stem
    did not move after its freeze."""
    import json
    import subprocess
    import sys

    job = Path(__file__).with_name("_hf_ddp_job.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(job), str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"result{r}.json").read_text()) for r in range(2))
    assert r0["world"] == 2
    for r in (r0, r1):
        assert [(s, k) for s, k, _ in r["history"]] == [(4, 1), (8, 2)], r["history"]
        assert r["stem_unchanged"] and r["stem_grad_none"] and r["frozen_at_end"] == 0  # given back at the end
    assert r1["history"][0][2] == "decided on rank 0"
    torch.testing.assert_close(torch.load(tmp_path / "params0.pt"), torch.load(tmp_path / "params1.pt"), rtol=0, atol=0)


def test_the_trainers_ddp_without_unused_parameters_is_refused_before_the_first_step():
    """The Trainer's DDP with ``find_unused_parameters`` off (``ddp_find_unused_parameters=False``,
    or a checkpointing model, for which the Trainer turns it off) or a static graph would
    raise at the step after the first freeze: the callback says so at the start."""
    from types import SimpleNamespace

    import fxfreeze

    state = SimpleNamespace(global_step=0, max_steps=10)
    for extra, says in (({"ddp_find_unused_parameters": False}, "find_unused_parameters off"),
                        ({"ddp_static_graph": True}, "a static graph")):
        cb = _callback()
        args = SimpleNamespace(world_size=2, **extra)
        with pytest.raises(fxfreeze.DistributedError, match=f"2 processes with DDP's {says}.*ddp_find_unused_parameters=True"):
            cb.on_train_begin(args, state, None, model=_model())
        assert cb.lazy is None  # nothing routed
    checkpointing = _model()
    checkpointing.gradient_checkpointing_enable()
    with pytest.raises(fxfreeze.DistributedError, match="find_unused_parameters off"):
        _callback().on_train_begin(SimpleNamespace(world_size=2), state, None, model=checkpointing)
    cb = _callback()
    cb.on_train_begin(SimpleNamespace(world_size=2), state, None, model=_model())  # the Trainer's default: on
    assert cb.lazy.data_parallel


def test_neftune_noise_is_kept_and_egeria_still_measures(tmp_path):
    """``neftune_noise_alpha``: the Trainer hooks the input embeddings with noise export
    cannot take. Before, the model ran eagerly from a plan of module order and Egeria, with
    no reference for its stem, never froze; now the graph is exported without the hook and
    every call runs the model's own forward with it."""
    model = _model()
    cfg = {"egeria": {"eval_interval": 2, "window": 3, "patience": 1, "asynchronous": False, "overhead_budget": 0.0}}
    cb = FxFreezeCallback(policy="egeria", config=cfg)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=10, learning_rate=1e-3, report_to="none",
        use_cpu=True, disable_tqdm=True, seed=0, save_strategy="no", neftune_noise_alpha=5.0,
    )
    transformers.Trainer(model=model, args=args, train_dataset=_Tokens(40, 0), callbacks=[cb]).train()
    fm = cb.module
    assert not fm.eager_only and fm._analysis.capture.hooks_left_out == ("transformer.wte",)
    assert fm.plan.names == ["stem", "transformer.h.0", "transformer.h.1", "transformer.h.2"]
    assert fm.freezer.policy.evaluations >= 3 and not fm.freezer.policy.unmeasurable
    assert not model.transformer.wte._forward_hooks  # the Trainer took its hook off at the end


def test_lora_on_a_causal_lm_keeps_its_last_adapters_training(tmp_path):
    """LoRA on a causal language model: PEFT freezes the output layer, so the last decoder
    layer's adapters are the last parameters that train. A schedule (or Egeria, once every
    layer settled) that froze every block left the loss without a gradient, and the
    Trainer's step raised "element 0 of tensors does not require grad". Now the freeze stops
    before that layer, and its adapters go on training to the end."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_model(), peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["c_attn"]))
    cb = FxFreezeCallback(policy="manual", config={"manual": {"schedule": {4: 4}}})
    last = [p for n, p in model.named_parameters() if "h.2." in n and "lora_" in n]
    before = [p.detach().clone() for p in last]
    _trainer(model, tmp_path, [cb], bf16=False).train()  # raised at step 5
    assert [(e["step"], e["num_frozen"]) for e in cb.module.freezer.history if e["action"] == "freeze"] == [(4, 3)]
    assert all(not torch.equal(a, p) for a, p in zip(before, last))


@pytest.mark.parametrize("kind", ["torch-dataset", "datasets-Dataset", "peft-lora"])
def test_the_activation_cache_under_the_trainer_reads_the_ids_the_batch_carries(tmp_path, kind):
    """``fxfreeze.with_sample_ids`` on the training (and evaluation) set: the Trainer keeps the
    id column (the route names it in its signature, and a PEFT model's base model's forward,
    which the Trainer reads instead; it drops the columns ``forward`` does not name, "source"
    here), every call takes it out before the model sees it, and the cache reads it. Before,
    the Trainer's batches came without ids and the cache never served one. The run equals the
    uncached one (an untied model: a tied one is never cached), within rounding: the batches of
    epoch 2 run the prefix on their missing rows only, and a GEMM over fewer rows may round
    otherwise (bitwise on the machines measured so far)."""

    def run(cache: bool):
        torch.manual_seed(0)
        config = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=3, n_head=2, n_positions=64, tie_word_embeddings=False)
        model = transformers.GPT2LMHeadModel(config)
        if kind == "peft-lora":
            peft = pytest.importorskip("peft")
            model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["c_attn"]))
        cb = FxFreezeCallback(policy="manual", config={"manual": {"schedule": {1: 2}}, "cache": {"enabled": cache}})
        train, held_out = _Tokens(32, 0), _Tokens(8, 1)
        if kind == "datasets-Dataset":
            datasets = pytest.importorskip("datasets")
            rows = [{k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in train[i].items()} for i in range(32)]
            train = datasets.Dataset.from_list(rows)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(cache)), per_device_train_batch_size=8, per_device_eval_batch_size=4,
            max_steps=12, learning_rate=1e-2, eval_strategy="steps", eval_steps=6, report_to="none", use_cpu=True,
            disable_tqdm=True, seed=0, save_strategy="no",
        )
        trainer = transformers.Trainer(model=model, args=args, train_dataset=fxfreeze.with_sample_ids(train),
                                       eval_dataset=fxfreeze.with_sample_ids(held_out), callbacks=[cb])
        trainer.train()
        return model, cb, trainer

    ref, _, ref_trainer = run(False)
    model, cb, trainer = run(True)
    stats = cb.module.activation_cache.stats
    # 4 batches an epoch; the freeze after step 1 stores the rest of epoch 1 (24 samples), epoch 2 reads those and
    # runs the prefix on its 8 other samples only; epoch 3 reads all
    assert stats["hits"] == 24 + 32 and stats["misses"] == 32 and stats["uncached_batches"] == 0
    assert stats["partial_batches"] >= 1
    assert cb.lazy.epoch_steps == 4
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"{n} differs from the uncached run")
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 2
    torch.testing.assert_close(evals, [h["eval_loss"] for h in ref_trainer.state.log_history if "eval_loss" in h],
                               rtol=1e-5, atol=1e-6)
    assert not any("forward" in m.__dict__ for m in model.modules())  # the base model's forward is its own again
