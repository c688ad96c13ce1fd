"""fxfreeze on architectures its tests do not name: does each compile, equal eager, freeze?

For each model (small random configurations, no download): ``fxfreeze.compile`` with the
default policy, one training call compared with the eager model (loss and every gradient,
1e-5 relative), three blocks frozen, a training call compared with the eager model whose same
blocks are frozen and in eval mode, and an optimizer step (frozen weights unchanged), and one
line: the capture strategy, whether the model runs eagerly (no graph: ``fm.eager_only``),
the blocks, and how many blocks Egeria may freeze (it never freezes an ``unmeasurable``
block, one it has no reference for, nor anything after it).
A failure prints its error and the sweep goes on; the exit status counts the failures.

    .venv/bin/python benchmarks/arch_sweep.py [--only deberta-v2,unet,...]

Dropout is off in most configurations; ConvNeXt and Swin keep stochastic depth
(``drop_path_rate``), whose draws a frozen block must not make: both forwards of a
comparison start from one seed. wav2vec2 keeps its SpecAugment masking (numpy randomness,
which is what makes it uncapturable), so its comparisons run in eval mode.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import fxfreeze

V = 100


def _ids(b: int = 4, t: int = 12) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, V, (b, t)), "attention_mask": torch.ones(b, t, dtype=torch.long)}


def _cls(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**x, "labels": torch.randint(0, 2, (x["input_ids"].shape[0],))}


def _lm(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**x, "labels": x["input_ids"].clone()}


def _pixels(n: int = 3) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(4, 3, 32, 32), "labels": torch.randint(0, n, (4,))}


def _hf() -> dict[str, tuple[Callable[[], nn.Module], Callable[[], dict[str, Any]]]]:
    import transformers as T

    enc = dict(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    dec = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
               max_position_embeddings=64)
    vit = dict(image_size=32, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return {
        "albert": (lambda: T.AlbertForSequenceClassification(T.AlbertConfig(embedding_size=16, classifier_dropout_prob=0.0, **enc)),
                   lambda: _cls(_ids())),
        "distilbert": (lambda: T.DistilBertForSequenceClassification(T.DistilBertConfig(
            vocab_size=V, dim=32, n_layers=3, n_heads=2, hidden_dim=64, max_position_embeddings=64, dropout=0.0,
            attention_dropout=0.0, seq_classif_dropout=0.0)), lambda: _cls(_ids())),
        "roberta": (lambda: T.RobertaForSequenceClassification(T.RobertaConfig(**enc)), lambda: _cls(_ids())),
        "deberta-v2": (lambda: T.DebertaV2ForSequenceClassification(T.DebertaV2Config(**enc)), lambda: _cls(_ids())),
        "electra": (lambda: T.ElectraForSequenceClassification(T.ElectraConfig(embedding_size=16, **enc)), lambda: _cls(_ids())),
        "mobilebert": (lambda: T.MobileBertForSequenceClassification(T.MobileBertConfig(
            embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16, **{**enc, "intermediate_size": 32})),
            lambda: _cls(_ids())),
        "mistral": (lambda: T.MistralForCausalLM(T.MistralConfig(num_key_value_heads=1, **dec)), lambda: _lm(_ids())),
        "phi": (lambda: T.PhiForCausalLM(T.PhiConfig(resid_pdrop=0.0, embd_pdrop=0.0, **dec)), lambda: _lm(_ids())),
        "gpt-neox": (lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(hidden_dropout=0.0, attention_dropout=0.0, **dec)),
                     lambda: _lm(_ids())),
        "vit": (lambda: T.ViTForImageClassification(T.ViTConfig(patch_size=8, num_labels=3, **vit)), _pixels),
        "clip-vision": (lambda: T.CLIPVisionModel(T.CLIPVisionConfig(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)),
            lambda: {"pixel_values": torch.randn(4, 3, 32, 32)}),
        "levit": (lambda: T.LevitForImageClassification(T.LevitConfig(  # fx traces it: a ModelOutput from fx
            image_size=32, hidden_sizes=[16, 24, 32], num_attention_heads=[1, 2, 2], depths=[1, 1, 1],
            key_dim=[8, 8, 8], patch_size=16, num_labels=3)), _pixels),
        "hf-resnet": (lambda: T.ResNetForImageClassification(T.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[2, 2], num_labels=3)), _pixels),
        "convnext": (lambda: T.ConvNextForImageClassification(T.ConvNextConfig(
            num_stages=2, hidden_sizes=[8, 16], depths=[2, 2], num_labels=3, drop_path_rate=0.5,
            layer_scale_init_value=1.0)), _pixels),
        "swin": (lambda: T.SwinForImageClassification(T.SwinConfig(
            image_size=32, patch_size=4, embed_dim=8, depths=[2, 2], num_heads=[2, 2], window_size=4, num_labels=3,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.5)), _pixels),
        "wav2vec2": (lambda: T.Wav2Vec2ForSequenceClassification(T.Wav2Vec2Config(
            vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
            conv_dim=(8, 8), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=2, num_labels=2, hidden_dropout=0.0, attention_dropout=0.0,
            activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0)),
            lambda: {"input_values": torch.randn(4, 400), "labels": torch.randint(0, 2, (4,))}),
        "data2vec-audio": (lambda: T.Data2VecAudioForSequenceClassification(T.Data2VecAudioConfig(  # LayerDrop: row 69
            vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
            conv_dim=(8, 8), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=4,
            num_conv_pos_embedding_groups=2, num_labels=2, hidden_dropout=0.0, attention_dropout=0.0,
            activation_dropout=0.0, feat_proj_dropout=0.0, mask_time_prob=0.0, layerdrop=0.5)),
            lambda: {"input_values": torch.randn(4, 400), "labels": torch.randint(0, 2, (4,))}),
        "poolformer": (lambda: T.PoolFormerForImageClassification(T.PoolFormerConfig(  # zipped lists: row 67
            hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1], num_labels=3)), _pixels),
        "qwen2": (lambda: T.Qwen2ForCausalLM(T.Qwen2Config(num_key_value_heads=1, **dec)), lambda: _lm(_ids())),
        "gemma": (lambda: T.GemmaForCausalLM(T.GemmaConfig(num_key_value_heads=1, head_dim=16, **dec)),
                  lambda: _lm(_ids())),
        "bart": (lambda: T.BartForConditionalGeneration(T.BartConfig(
            vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)), lambda: _lm(_ids())),
        "modernbert": (lambda: T.ModernBertForSequenceClassification(T.ModernBertConfig(
            vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
            global_attn_every_n_layers=2, local_attention=4, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            cls_token_id=1, sep_token_id=2)), lambda: _cls(_ids())),
        "funnel": (lambda: T.FunnelForSequenceClassification(T.FunnelConfig(
            vocab_size=V, d_model=32, n_head=2, d_head=16, d_inner=64, block_sizes=[1, 1, 1], hidden_dropout=0.0,
            attention_dropout=0.0, activation_dropout=0.0)), lambda: _cls(_ids())),
        "fnet": (lambda: T.FNetForSequenceClassification(T.FNetConfig(
            vocab_size=V, hidden_size=32, num_hidden_layers=3, intermediate_size=64, hidden_dropout_prob=0.0)),
            lambda: _cls(_ids())),
        "qwen3": (lambda: T.Qwen3ForCausalLM(T.Qwen3Config(num_key_value_heads=1, head_dim=16, **dec)),
                  lambda: _lm(_ids())),
        "gemma2": (lambda: T.Gemma2ForCausalLM(T.Gemma2Config(num_key_value_heads=1, head_dim=16, sliding_window=4, **dec)),
                   lambda: _lm(_ids())),
        "gpt-bigcode": (lambda: T.GPTBigCodeForCausalLM(T.GPTBigCodeConfig(
            vocab_size=V, n_embd=32, n_layer=3, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0)), lambda: _lm(_ids())),
        "mamba": (lambda: T.MambaForCausalLM(T.MambaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=3, state_size=4)),
                  lambda: _lm(_ids())),
        "dinov2": (lambda: T.Dinov2Model(T.Dinov2Config(patch_size=8, **vit)),
                   lambda: {"pixel_values": torch.randn(4, 3, 32, 32)}),
        "whisper": (lambda: T.WhisperForConditionalGeneration(T.WhisperConfig(
            vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
            max_target_positions=32, pad_token_id=0, decoder_start_token_id=1, bos_token_id=1, eos_token_id=2,
            dropout=0.0)),
            lambda: {"input_features": torch.randn(4, 8, 32), "decoder_input_ids": torch.randint(0, V, (4, 5)),
                     "labels": torch.randint(0, V, (4, 5))}),
    }


class _UNet(nn.Module):
    """Encoder-decoder with skip connections from the front blocks to the back ones."""

    def __init__(self) -> None:
        super().__init__()

        def c(i: int, o: int) -> nn.Module:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())

        self.e1, self.e2, self.e3, self.d2, self.d1 = c(1, 8), c(8, 16), c(16, 32), c(48, 16), c(24, 8)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.e1(x)
        b = self.e2(F.max_pool2d(a, 2))
        m = self.e3(F.max_pool2d(b, 2))
        u = self.d2(torch.cat([F.interpolate(m, scale_factor=2), b], 1))
        return self.out(self.d1(torch.cat([F.interpolate(u, scale_factor=2), a], 1)))


class _LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.l1, self.l2, self.l3 = (nn.LSTM(16, 16, batch_first=True) for _ in range(3))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.l1(self.emb(x))
        h, _ = self.l2(h)
        h, _ = self.l3(h)
        return self.head(h[:, -1])


class _Dense(nn.Module):
    """DenseNet-style: every layer reads the concatenation of all earlier outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.layers = nn.ModuleList(
            [nn.Sequential(nn.BatchNorm2d(8 + 4 * i), nn.ReLU(), nn.Conv2d(8 + 4 * i, 4, 3, padding=1)) for i in range(4)]
        )
        self.head = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [self.stem(x)]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, 1)))
        return self.head(torch.cat(feats, 1).mean((2, 3)))


class _Branchy(nn.Module):
    """Residual MLP whose root forward branches on a tensor's value (fx and export fail)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.GELU()) for _ in range(3)])
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for b in self.blocks:
            h = h + b(h)
        if bool((h.abs().mean() > 100).item()):
            h = h / h.abs().mean()
        return self.head(h)


class _Momentum(nn.Module):
    """BYOL-style: a target encoder under ``torch.no_grad()`` inside the forward (fx would lose it)."""

    def __init__(self) -> None:
        super().__init__()

        def enc() -> nn.Module:
            return nn.Sequential(nn.Linear(8, 16), *[_Res(16) for _ in range(3)])

        self.online, self.target, self.head = enc(), enc(), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = self.target(x)
        return (self.head(self.online(x)) - t).pow(2).mean()


class _Res(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.lin(x))


class _AutocastBody(nn.Module):
    """Its body under ``torch.autocast`` inside the forward (fx would lose it)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.blocks, self.head = nn.Linear(8, 16), nn.Sequential(*[_Res(16) for _ in range(3)]), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.blocks(self.stem(x))
        return self.head(h.float())


class _Reverse(torch.autograd.Function):
    """Gradient reversal: identity forward, negated backward (a graph would keep the identity)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return -g


class _Adversarial(nn.Module):
    """Domain-adversarial: a label head and, behind a gradient reversal layer, a domain head;
    each residual branch's gradient scaled by a hook registered in the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.GELU()) for _ in range(4))
        self.label, self.domain = nn.Linear(16, 2), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            r = b(h)
            if r.requires_grad:
                r.register_hook(lambda g: g * 0.5)
            h = h + r
        return self.label(h) + self.domain(_Reverse.apply(h))


def _custom() -> dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple[Any, ...]]]]:
    return {
        "unet": (_UNet, lambda: (torch.randn(4, 1, 16, 16),)),
        "lstm": (_LSTMNet, lambda: (torch.randint(0, 50, (4, 7)),)),
        "densenet-like": (_Dense, lambda: (torch.randn(4, 1, 8, 8),)),
        "branchy-root": (_Branchy, lambda: (torch.randn(4, 8),)),
        "momentum-encoder": (_Momentum, lambda: (torch.randn(4, 8),)),
        "autocast-body": (_AutocastBody, lambda: (torch.randn(4, 8),)),
        "adversarial": (_Adversarial, lambda: (torch.randn(4, 8),)),
    }


def _loss(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.float().pow(2).mean()
    loss = getattr(out, "loss", None)
    return loss if loss is not None else out.last_hidden_state.float().pow(2).mean()


def _call(m: nn.Module, x: Any) -> Any:
    return m(**x) if isinstance(x, dict) else m(*x)


def _seeded(m: nn.Module, x: Any, seed: int) -> Any:
    torch.manual_seed(seed)
    return _call(m, x)


def check(name: str, factory: Callable[[], nn.Module], inputs: Callable[[], Any]) -> str:
    torch.manual_seed(0)
    model = factory()
    ref = copy.deepcopy(model)
    x = inputs()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    fm = fxfreeze.compile(model, x, optimizer=opt)
    if name == "wav2vec2":  # masking draws from numpy: compare in eval mode
        fm.eval()
        ref.eval()
    got, exp = _loss(_seeded(fm, x, 1)), _loss(_seeded(ref, x, 1))
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)
    got.backward()
    exp.backward()
    ref_params = dict(ref.named_parameters())
    for n, p in fm.named_parameters():
        q = ref_params[n]
        if (p.grad is None) != (q.grad is None) or (p.grad is not None and not torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6)):
            raise AssertionError(f"gradient of {n} differs from eager")
    fm.train()
    k = min(3, fm.plan.max_frozen)
    fm.freeze_prefix(k)
    frozen = {n: fm.params_by_name[n].detach().clone() for n in fm.frozen_parameter_names()}
    names = {id(m): n for n, m in model.named_modules()}
    for m in fm.frozen_modules:  # the eager meaning of a frozen block
        ref.get_submodule(names[id(m)]).eval().requires_grad_(False)
    x = inputs()
    if name == "wav2vec2":
        fm.eval()
        ref.eval()
    got, exp = _loss(_seeded(fm, x, 2)), _loss(_seeded(ref, x, 2))
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6, msg=lambda m: f"with {k} blocks frozen: {m}")
    fm.train()
    opt.zero_grad(set_to_none=True)
    _loss(_seeded(fm, x, 2)).backward()
    opt.step()
    if any(not torch.equal(fm.params_by_name[n], t) for n, t in frozen.items()):
        raise AssertionError("a frozen parameter changed")
    unmeasurable = getattr(fm.freezer.policy, "unmeasurable", {})
    reach = min([*unmeasurable, fm.plan.max_frozen])  # Egeria never freezes past an unmeasurable block
    fm.detach()
    return (f"{fm.strategy:6s} eager_only={str(fm.eager_only):5s} blocks={len(fm.plan.blocks)} "
            f"({', '.join(b.name for b in fm.plan.blocks)}) frozen {k} ({len(frozen)} params), "
            f"egeria may freeze {reach} of {fm.plan.max_frozen}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated model names")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("fxfreeze").addHandler(logging.NullHandler())
    models: dict[str, Any] = {**_custom()}
    try:
        models.update(_hf())
    except ImportError:
        print("transformers is not importable: Hugging Face models skipped")
    only = [s for s in args.only.split(",") if s]
    failures = 0
    for name, (factory, inputs) in models.items():
        if only and name not in only:
            continue
        try:
            print(f"ok   {name:14s} {check(name, factory, inputs)}", flush=True)
        except Exception as e:  # noqa: BLE001 - report and go on
            failures += 1
            print(f"FAIL {name:14s} {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}", flush=True)
    return failures


if __name__ == "__main__":
    sys.exit(main())
