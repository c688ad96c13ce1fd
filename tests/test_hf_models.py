"""The models people fine-tune, with their default configs (KV cache on): causal LMs and
encoder-decoders from Hugging Face transformers (small random configs, no download).

For each: the plan has one block per layer plus the embeddings (encoder-decoders in
execution order), the compiled module equals eager on the call a training loop makes
(``labels=``: the loss and every gradient, tolerance 1e-6 relative, exact on CPU), other
batch sizes and sequence lengths reuse the graph, other keyword sets get their own graph,
and a frozen prefix trains: frozen parameters get no gradient and never change, the rest
learn, and the compiled module still equals eager with the same blocks frozen.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import fxfreeze

transformers = pytest.importorskip("transformers")
V = 100


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=3, n_head=2, n_positions=64))


def _llama():
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg)


def _qwen2():
    cfg = transformers.Qwen2Config(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64,
    )
    return transformers.Qwen2ForCausalLM(cfg)


def _t5():
    cfg = transformers.T5Config(vocab_size=V, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2)
    return transformers.T5ForConditionalGeneration(cfg)


def _bart():
    cfg = transformers.BartConfig(
        vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
    )
    return transformers.BartForConditionalGeneration(cfg)


# name -> (factory, expected block names, expected head modules, encoder-decoder?)
ARCHS = {
    "gpt2": (_gpt2, ["stem", "transformer.h.0", "transformer.h.1", "transformer.h.2"], ["transformer.ln_f", "lm_head"], False),
    "llama": (_llama, ["stem", "model.layers.0", "model.layers.1", "model.layers.2"], ["model.norm", "lm_head"], False),
    "qwen2": (_qwen2, ["stem", "model.layers.0", "model.layers.1", "model.layers.2"], ["model.norm", "lm_head"], False),
    "t5": (
        _t5,
        ["stem", "encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"],
        ["decoder.final_layer_norm", "lm_head"],
        True,
    ),
    "bart": (
        _bart,
        ["stem", "model.encoder.layers.0", "model.encoder.layers.1", "model.decoder.layers.0", "model.decoder.layers.1"],
        ["lm_head"],
        True,
    ),
}


def _batch(seq2seq: bool, b: int, t: int) -> dict[str, torch.Tensor]:
    x = {"input_ids": torch.randint(0, V, (b, t)), "attention_mask": torch.ones(b, t, dtype=torch.long)}
    x["attention_mask"][0, -2:] = 0  # padding in one row
    if seq2seq:
        x["decoder_input_ids"] = torch.randint(0, V, (b, max(2, t - 3)))
    return x


def _labels(x: dict[str, torch.Tensor], seq2seq: bool) -> torch.Tensor:
    return (x["decoder_input_ids"] if seq2seq else x["input_ids"]).clone()


def _assert_same_step(fm, ref, x, labels, seed, shared=()):
    torch.manual_seed(seed)
    got = fm(**x, labels=labels)
    torch.manual_seed(seed)
    exp = ref(**x, labels=labels)
    torch.testing.assert_close(got.loss, exp.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got.logits, exp.logits, rtol=1e-6, atol=1e-7)
    got.loss.backward()
    exp.loss.backward()
    ref_params = dict(ref.named_parameters())
    for n, p in fm.named_parameters():
        q = ref_params[n]
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None and n not in shared:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=f"gradient of {n}")
    fm.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", list(ARCHS))
def test_default_config_plans_compiles_matches_eager_and_trains_frozen(name):
    factory, blocks, head, seq2seq = ARCHS[name]
    torch.manual_seed(0)
    model = factory()
    assert model.config.use_cache  # the default: the forward returns a KV cache object
    ref = copy.deepcopy(model)
    x = _batch(seq2seq, 4, 12)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    fm = fxfreeze.compile(model, x, optimizer=opt, policy="manual")

    p = fm.plan
    assert p.strategy == "export"
    assert [b.name for b in p.blocks] == blocks
    assert p.head.modules == head
    assert any("cannot return" in n and "Cache" in n for n in p.notes), p.notes  # what was done about the cache
    owned = [m for b in p.blocks for m in b.modules] + p.head.modules
    assert len(owned) == len(set(owned))
    for b in p.blocks:  # no block lists a parent of another block's module
        assert not any(o != m and o.startswith(m + ".") for m in b.modules for o in owned), b.modules

    # the training call: another keyword set than the example's; equal to eager
    _assert_same_step(fm, ref, x, _labels(x, seq2seq), seed=1)
    n_graphs = len(fm.graphs)
    assert n_graphs == 2  # the example call's graph and the labels= one
    # other batch sizes and sequence lengths (padding="longest") reuse that graph
    for b, t in ((3, 9), (4, 20), (2, 7)):
        y = _batch(seq2seq, b, t)
        _assert_same_step(fm, ref, y, _labels(y, seq2seq), seed=2)
    assert len(fm.graphs) == n_graphs

    # freeze a prefix: the same step as eager with those blocks frozen (a parameter shared
    # with a trainable block, tied embeddings, trains from its trainable uses only). Both in
    # eval mode: a dropout module reused across blocks (T5's) cannot be off in the eager
    # model's frozen part only, while the graph turns it off in the frozen prefix.
    k = 2
    fm.freeze_prefix(k)
    frozen = set(fm.frozen_parameter_names())
    assert frozen and all(not fm.params_by_name[n].requires_grad for n in frozen)
    for n, q in ref.named_parameters():
        if n in frozen:
            q.requires_grad_(False)
    for b in p.blocks[:k]:
        for m in b.modules:
            ref.get_submodule(m).eval()
    fm.eval()
    ref.eval()
    _assert_same_step(fm, ref, x, _labels(x, seq2seq), seed=3, shared=set(p.shared_params))
    fm.train()
    assert model.training and all(not m.training for m in fm.frozen_modules)

    before = {n: t.detach().clone() for n, t in fm.named_parameters()}
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        y = _batch(seq2seq, 4, 10 + step)
        fm(**y, labels=_labels(y, seq2seq)).loss.backward()
        for n in frozen:
            assert fm.params_by_name[n].grad is None, n
        opt.step()
    for n, t in fm.named_parameters():
        if n in frozen:
            assert torch.equal(t, before[n]), f"frozen {n} changed"
        elif t.requires_grad and n != "final_logits_bias":
            assert not torch.equal(t, before[n]), f"{n} did not learn"
    fm.graph_module(True).graph.lint()
    if name == "t5":
        # encoder-decoders freeze in execution order: embeddings, encoder layers, decoder layers;
        # the embedding table shared by encoder, decoder and head trains until its last user freezes
        assert "shared.weight" in p.shared_params
        fm.freeze_prefix(3)  # stem, encoder.block.0, encoder.block.1
        frozen = fm.frozen_parameter_names()
        assert any(n.startswith("encoder.block.1.") for n in frozen)
        assert not any(n.startswith("decoder.") for n in frozen) and "shared.weight" not in frozen


def test_other_keyword_sets_and_outputs():
    torch.manual_seed(0)
    model = _gpt2().eval()
    ref = copy.deepcopy(model)
    x = _batch(False, 2, 8)
    fm = fxfreeze.compile(model, x, policy="manual")
    out = fm(**x, return_dict=False)
    exp = ref(**x, return_dict=False)
    assert isinstance(out, tuple)
    torch.testing.assert_close(out[0], exp[0], rtol=1e-6, atol=1e-7)
    hs = fm(**x, output_hidden_states=True).hidden_states
    hs_ref = ref(**x, output_hidden_states=True).hidden_states
    assert len(hs) == len(hs_ref) == 4
    for a, b in zip(hs, hs_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # positional and keyword spellings of one call are one kind of call
    n = len(fm.graphs)
    torch.testing.assert_close(fm(x["input_ids"], attention_mask=x["attention_mask"]).logits, ref(**x).logits)
    assert len(fm.graphs) == n


def test_what_a_block_owns_is_the_same_in_every_view(tmp_path):
    """GPT-2's stem and head both run code of ``transformer`` (a parent spanning every
    block): neither lists it; the table, YAML, JSON and the picture show the same ownership."""
    from fxfreeze.api import analyze
    from fxfreeze.viz import to_dot

    torch.manual_seed(0)
    a = analyze(_gpt2(), _batch(False, 2, 8))
    p = a.plan
    assert p.blocks[0].modules == ["transformer.wte", "transformer.wpe", "transformer.drop"]
    assert p.head.modules == ["transformer.ln_f", "lm_head"]
    assert "transformer" not in [m for b in p.blocks for m in b.modules] + p.head.modules
    assert p.blocks[1].params and all(n.startswith("transformer.h.0.") for n in p.blocks[1].params)
    assert sorted(p.head.params) == ["transformer.ln_f.bias", "transformer.ln_f.weight"]  # lm_head.weight is wte's (tied)
    assert "transformer.wte.weight" in p.blocks[0].params and "transformer.wte.weight" in p.shared_params
    owned_params = [n for b in p.blocks for n in b.params] + p.head.params
    assert sorted(owned_params) == sorted(n for n, _ in _gpt2().named_parameters())
    for again in (fxfreeze.FreezePlan.from_yaml(p.to_yaml()), fxfreeze.FreezePlan.from_json(p.to_json())):
        assert [(b.modules, b.params, b.buffers) for b in again.blocks] == [(b.modules, b.params, b.buffers) for b in p.blocks]
        assert (again.head.modules, again.head.params) == (p.head.modules, p.head.params)
    table = p.table()
    dot = to_dot(a.graph_module.graph, p)
    for b in p.blocks:
        assert ", ".join(b.modules) in table
        assert "owns: " + ", ".join(b.modules) in dot


def test_compiled_at_batch_one_then_other_batches_dtypes_and_a_bool_mask():
    """Export specialises a batch of 1; the guard sends other batches to a new capture. A
    bool mask is another dtype: its own graph. Moving the model to bfloat16 captures again."""
    torch.manual_seed(0)
    model = _gpt2().eval()
    ref = copy.deepcopy(model)
    fm = fxfreeze.compile(model, _batch(False, 1, 8), policy="manual")
    for b in (1, 4):
        x = _batch(False, b, 9)
        torch.testing.assert_close(fm(**x).logits, ref(**x).logits, rtol=1e-6, atol=1e-7)
    x = _batch(False, 3, 9)
    x["attention_mask"] = x["attention_mask"].bool()
    torch.testing.assert_close(fm(**x).logits, ref(**x).logits, rtol=1e-6, atol=1e-7)
    fm.to(torch.bfloat16)
    ref.to(torch.bfloat16)
    with torch.no_grad():
        y = _batch(False, 2, 8)
        torch.testing.assert_close(fm(**y).logits, ref(**y).logits)


def test_a_model_export_cannot_capture_runs_eagerly_and_freezes():
    """DeBERTa-v2's classification loss branches on the labels' values (``nonzero``, then
    ``if label_index.size(0) > 0``): neither fx nor export captures the call the Trainer
    makes. It runs its own forward from a module-order plan (one block per layer) and
    freezes: the same loss and gradients as eager with those blocks frozen, frozen weights
    unchanged by a step."""
    torch.manual_seed(0)
    cfg = transformers.DebertaV2Config(
        vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = transformers.DebertaV2ForSequenceClassification(cfg)
    ref = copy.deepcopy(model)
    x, labels = _batch(False, 4, 12), torch.randint(0, 2, (4,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    fm = fxfreeze.compile(model, {**x, "labels": labels}, optimizer=opt, policy="manual")
    assert fm.eager_only and fm.strategy == "hooks"
    assert [b.name for b in fm.plan.blocks] == ["stem", *[f"deberta.encoder.layer.{i}" for i in range(3)]]
    fm.freeze_prefix(2)
    frozen = set(fm.frozen_parameter_names())
    assert any(n.startswith("deberta.encoder.layer.0.") for n in frozen)
    assert not any(n.startswith("deberta.encoder.layer.1.") for n in frozen)
    for n, q in ref.named_parameters():
        q.requires_grad_(n not in frozen)
    for b in fm.plan.blocks[:2]:
        for m in b.modules:
            ref.get_submodule(m).eval()
    _assert_same_step(fm, ref, x, labels, seed=1)
    before = {n: fm.params_by_name[n].detach().clone() for n in frozen}
    fm(**x, labels=labels).loss.backward()
    opt.step()
    assert all(torch.equal(fm.params_by_name[n], t) for n, t in before.items())


def test_egeria_on_a_model_export_cannot_capture_judges_each_layer_captured_alone():
    """Egeria's probe on the eager-only DeBERTa-v2: the embeddings and each encoder layer are
    captured alone (export) at compile time, with a reference builder each, and evaluations
    measure every tracked block."""
    torch.manual_seed(0)
    cfg = transformers.DebertaV2Config(
        vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64,
    )
    model = transformers.DebertaV2ForSequenceClassification(cfg)
    x = {**_batch(False, 8, 12), "labels": torch.randint(0, 2, (8,))}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    egeria = {"asynchronous": False, "overhead_budget": 0, "eval_interval": 2, "evaluations_per_run": 0, "min_window_steps": 2}
    fm = fxfreeze.compile(model, x, optimizer=opt, config={"policy": "egeria", "egeria": egeria})
    p = fm.freezer.policy
    assert fm.eager_only and not p.unmeasurable
    assert sorted(p.refs.builders) == [0, 1, 2, 3]  # made in compile, on the example call
    for _ in range(6):
        opt.zero_grad(set_to_none=True)
        fm(**x).loss.backward()
        opt.step()
    measured = [t["plasticity"] for t in p.timeline if "plasticity" in t]
    assert measured and set(measured[-1]) == {0, 1, 2}  # the front block and lookahead 2
    assert all(v >= 0 for m in measured for v in m.values())
    fm.detach()


def test_padding_free_batches_match_eager_and_egeria_measures_them():
    """``DataCollatorWithFlattening`` packs a batch's sequences into one row, with
    ``position_ids`` restarting at each: the compiled module equals eager on such batches
    of every length, and Egeria compares the probe's positions (one sample per batch: it
    used to wait for a second sample that never came)."""
    torch.manual_seed(0)
    model = _llama().train()
    ref = copy.deepcopy(model)
    collate = transformers.DataCollatorWithFlattening()
    g = torch.Generator().manual_seed(0)

    def batch():
        rows = [torch.randint(0, V, (int(torch.randint(4, 16, (1,), generator=g)),), generator=g).tolist() for _ in range(4)]
        return collate([{"input_ids": r, "labels": r} for r in rows])

    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    cfg = {"egeria": {"eval_interval": 2, "window": 3, "patience": 1, "asynchronous": False, "overhead_budget": 0.0}}
    fm = fxfreeze.compile(model, batch(), optimizer=opt, config=cfg)
    for _ in range(10):
        b = batch()
        assert b["input_ids"].shape[0] == 1 and (b["position_ids"] == 0).sum() == 4
        opt.zero_grad()
        fm(**b).loss.backward()
        opt.step()
    assert fm.freezer.policy.evaluations >= 3 and fm.freezer.policy.probe.positions
    fm.freeze_prefix(0)
    ref.load_state_dict(model.state_dict())
    b = batch()
    torch.testing.assert_close(fm(**b).loss, ref(**b).loss, rtol=1e-6, atol=1e-6)


def test_a_model_fx_traces_returns_its_own_output_type():
    """LeViT is traced by fx, which records a returned mapping as a plain ``dict``: the
    compiled module returned ``{'logits': ...}`` where the model returns an
    ``ImageClassifierOutputWithNoAttention``, and ``out.logits`` raised ``AttributeError``.
    The graph now rebuilds the model's type; outputs and gradients equal eager (exact)."""
    torch.manual_seed(0)
    cfg = transformers.LevitConfig(image_size=32, hidden_sizes=[16, 24, 32], num_attention_heads=[1, 2, 2],
                                   depths=[1, 1, 1], key_dim=[8, 8, 8], patch_size=16, num_labels=3)
    model = transformers.LevitForImageClassification(cfg)
    ref = copy.deepcopy(model)
    img = torch.randn(2, 3, 32, 32)
    fm = fxfreeze.compile(model, (img,), policy="manual")
    assert fm.strategy == "fx"
    for training in (True, False):
        fm.train(training)
        ref.train(training)
        out, exp = fm(img), ref(img)
        assert type(out) is type(exp) and list(out.keys()) == list(exp.keys())
        torch.testing.assert_close(out.logits, exp.logits, rtol=0, atol=0)
    fm.train()
    ref.train()
    fm(img).logits.square().mean().backward()
    ref(img).logits.square().mean().backward()
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=n)
    fm.graph_module(True).graph.lint()


@pytest.mark.parametrize("name", list(ARCHS))
def test_generate_on_a_routed_model_mid_training_equals_the_plain_models(name, caplog):
    """``generate`` in the middle of training (a Seq2SeqTrainer's ``predict_with_generate``, a
    callback printing samples) calls the routed model with a ``DynamicCache`` it appends to.
    Capturing that new kind of call ran the model on the cache first, so the real call saw
    every key and value twice: Llama and BART generated other tokens than the plain model.
    Greedy and beam search now equal the plain model's, with blocks frozen; that such calls
    run the model's own forward (no graph takes a cache object) is said at INFO, not WARNING:
    an inference call loses nothing by it."""
    factory, _, _, seq2seq = ARCHS[name]
    torch.manual_seed(0)
    model = factory()
    model.generation_config.pad_token_id = 0
    model.generation_config.decoder_start_token_id = 0
    ref = copy.deepcopy(model)
    x = _batch(seq2seq, 2, 8)
    fm = fxfreeze.compile(model, {**x, "labels": _labels(x, seq2seq)}, policy="manual")
    fm.install()
    fm.freeze_prefix(2)
    model.eval()
    ref.eval()
    prompt = {"input_ids": x["input_ids"], "attention_mask": x["attention_mask"]}
    for beams in (1, 2):
        with caplog.at_level(logging.INFO, logger="fxfreeze"):
            got = model.generate(**prompt, max_new_tokens=6, do_sample=False, num_beams=beams)
        assert torch.equal(got, ref.generate(**prompt, max_new_tokens=6, do_sample=False, num_beams=beams)), beams
    assert not any(r.levelno >= logging.WARNING for r in caplog.records if r.name == "fxfreeze")


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_an_encoder_decoders_decoder_embeddings_open_its_first_decoder_block(name):
    """Freezing the whole encoder leaves the decoder's embeddings (positions, norm) training:
    they open the first decoder block (they closed the last encoder block before)."""
    factory, blocks, _, _ = ARCHS[name]
    torch.manual_seed(0)
    x = _batch(True, 2, 8)
    p = fxfreeze.plan(factory(), {**x, "labels": _labels(x, True)})
    assert p.names == blocks
    last_encoder, first_decoder = p.blocks[2].modules, p.blocks[3].modules
    assert not any("decoder" in m for m in last_encoder), last_encoder
    assert any("embed" in m for m in first_decoder) and first_decoder[-1] == blocks[3], first_decoder


def _lm_cache_run(factory, cache: bool) -> tuple[object, list[float]]:
    """A causal LM trained 3 epochs of 3 shuffled batches with the stem and a layer frozen at
    step 2 (mid-epoch): its losses."""
    torch.manual_seed(0)
    model = factory()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (24, 10), generator=g)
    mask = torch.ones(24, 10, dtype=torch.long)
    mask[::3, -3:] = 0  # some rows padded, at one length
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cfg = {"policy": "manual", "manual": {"schedule": {2: 2}, "unit": "step"}, "cache": {"enabled": cache}}
    fm = fxfreeze.compile(model, {"input_ids": ids[:4], "attention_mask": mask[:4], "labels": ids[:4]}, optimizer=opt,
                          config=cfg)
    losses = []
    for _ in range(3):
        for rows in torch.randperm(24, generator=g).split(8):
            with fm.sample_ids(rows):
                loss = fm(input_ids=ids[rows], attention_mask=mask[rows], labels=ids[rows]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return fm, losses


def test_a_llama_style_models_prefix_caches_its_hidden_states_and_recomputes_its_rotary_tables(caplog):
    """The frozen prefix of a rotary model hands the layers the hidden states and the rotary
    cos and sin (``(1, T, d)``, the batch's). Before, that turned the cache off at its first
    store, so no Llama-style model was ever cached; now the tables are computed at every
    step and the hidden states are read from the cache, with the uncached run's losses
    (Llama here; Mistral, Phi, GPT-NeoX, Qwen2, Qwen3, ModernBERT and Funnel were probed
    alike, docs/reliability.md row 81)."""
    factory = ARCHS["llama"][0]
    _, ref = _lm_cache_run(factory, False)
    with caplog.at_level(logging.INFO, logger="fxfreeze"):
        fm, losses = _lm_cache_run(factory, True)
    c = fm.activation_cache
    assert c.enabled and "caching is now off" not in caplog.text and "have no row per sample" in caplog.text
    assert c.stats["hits"] >= 24 and c.stats["misses"] == 24  # every sample stored once, then read
    torch.testing.assert_close(losses, ref, rtol=1e-5, atol=1e-6)
