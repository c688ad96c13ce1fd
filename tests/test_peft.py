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
