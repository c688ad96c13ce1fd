"""PEFT / LoRA: blocks are found through PEFT's wrappers; freezing a prefix stops its
adapters and cuts the backward pass through its (already frozen) base layers."""

from __future__ import annotations

import copy

import pytest
import torch

import fxfreeze

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
V = 100


def _lora(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=64,
        )
        base, targets = transformers.LlamaForCausalLM(cfg), ["q_proj", "v_proj", "down_proj"]
    else:
        cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=3, n_head=2, n_positions=64)
        base, targets = transformers.GPT2LMHeadModel(cfg), ["c_attn", "c_proj"]
    return peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=targets, lora_dropout=0.0))


def _autograd_nodes(t: torch.Tensor) -> list:
    seen, stack = set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        stack.extend(f for f, _ in fn.next_functions)
    return list(seen)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_lora_blocks_through_wrappers_and_frozen_prefix_cuts_backward(kind):
    model = _lora(kind)
    ref = copy.deepcopy(model)
    x = {"input_ids": torch.randint(0, V, (4, 10)), "attention_mask": torch.ones(4, 10, dtype=torch.long)}
    x["labels"] = x["input_ids"].clone()
    fm = fxfreeze.compile(model, x, policy="manual")
    layers = "base_model.model.model.layers" if kind == "llama" else "base_model.model.transformer.h"
    assert [b.name for b in fm.plan.blocks] == ["stem"] + [f"{layers}.{i}" for i in range(3)]
    # equal to eager: loss and the adapters' gradients (tolerance 1e-6 relative; exact on CPU)
    torch.manual_seed(1)
    out = fm(**x)
    torch.manual_seed(1)
    exp = ref(**x)
    torch.testing.assert_close(out.loss, exp.loss, rtol=1e-6, atol=1e-7)
    out.loss.backward()
    exp.loss.backward()
    ref_params = dict(ref.named_parameters())
    for n, p in fm.named_parameters():
        assert (p.grad is None) == (ref_params[n].grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(p.grad, ref_params[n].grad, rtol=1e-6, atol=1e-7)
    fm.zero_grad(set_to_none=True)
    n_all = len(_autograd_nodes(fm(**x).loss))

    fm.freeze_prefix(3)  # stem and two layers: their adapters stop
    frozen = fm.frozen_parameter_names()
    adapters = [n for n in frozen if "lora_" in n]
    assert adapters and all(f"{layers}.2." not in n for n in frozen)
    assert all(not fm.params_by_name[n].requires_grad for n in adapters)
    loss = fm(**x).loss
    nodes = _autograd_nodes(loss)
    leaves = {id(n.variable) for n in nodes if type(n).__name__ == "AccumulateGrad"}
    assert not leaves & {id(fm.params_by_name[n]) for n in frozen}
    assert len(nodes) < n_all  # backward no longer runs through the frozen layers
    loss.backward()
    assert all(fm.params_by_name[n].grad is None for n in frozen)
    trained = [n for n, p in fm.named_parameters() if p.grad is not None]
    assert trained and all("lora_" in n for n in trained)
    # unfreezing restores PEFT's own flags: base weights stay frozen, adapters train again
    fm.freeze_prefix(0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, p in ref.named_parameters() if p.requires_grad
    }


def _llama(layers: int = 3):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def _batch():
    ids = torch.randint(1, V, (4, 10), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_prompt_and_prefix_tuning_keep_the_prompt_encoder_trainable(kind):
    """Only the prompt encoder trains; the model after it is frozen whole. A schedule that
    freezes every block froze the prompt encoder too, and the loop's ``loss.backward()``
    raised "element 0 of tensors does not require grad" at the next step. Now the freeze
    stops before it and the prompt goes on training, as in eager code."""
    make = peft.PromptTuningConfig if kind == "prompt" else peft.PrefixTuningConfig
    model = peft.get_peft_model(_llama(), make(task_type="CAUSAL_LM", num_virtual_tokens=4))
    batch = _batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    n = len(fxfreeze.plan(model, batch).blocks)
    fm = fxfreeze.compile(model, batch, optimizer=opt,
                          config={"policy": "manual", "manual": {"schedule": {2: n}, "unit": "step"}})
    assert fm.plan.names[-1] == "prompt_encoder"
    prompt = [p for n_, p in model.named_parameters() if p.requires_grad]
    for step in range(5):
        before = [p.detach().clone() for p in prompt]
        loss = fm(**batch).loss
        loss.backward()  # raised from the third step on before
        opt.step()
        opt.zero_grad()
    assert fm.num_frozen == n - 1
    assert all(not torch.equal(a, p) for a, p in zip(before, prompt))  # still training


def test_adalora_gets_every_gradient_its_rank_allocation_reads(caplog):
    """AdaLoRA's ``update_and_allocate(step)`` multiplies every LoRA parameter by its
    gradient up to its step ``total_step - tfinal``; a parameter frozen before then has
    none, and the loop raised ``TypeError`` at the first step after a freeze. ``compile``
    reads that step from the model's AdaLoRA config: freezes wait until after it."""
    import logging

    cfg = peft.AdaLoraConfig(task_type="CAUSAL_LM", init_r=4, target_r=2, target_modules=["q_proj", "v_proj"],
                             total_step=12, tinit=2, tfinal=3, deltaT=1)
    model = peft.get_peft_model(_llama(), cfg)
    batch = _batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with caplog.at_level(logging.INFO, logger="fxfreeze"):
        fm = fxfreeze.compile(model, batch, optimizer=opt,
                              config={"policy": "manual", "manual": {"schedule": {3: 2}, "unit": "step"}})
    assert "no freeze before step 10" in caplog.text
    for step in range(14):
        fm(**batch).loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step)  # raised at step 3 before
        opt.zero_grad()
    assert [(e["step"], e["num_frozen"]) for e in fm.freezer.history if e["action"] == "freeze"] == [(10, 2)]
