"""Partitioner: expected blocks on the in-repo zoo, frontiers, determinism."""

from __future__ import annotations

import pytest
import torch

import fxfreeze
from fxfreeze import zoo


def _plan(name: str, batch: int = 2) -> fxfreeze.FreezePlan:
    torch.manual_seed(0)
    factory, inputs = zoo.MODELS[name]
    return fxfreeze.plan(factory(), inputs(batch))


def test_resnet56_stem_plus_27_blocks():
    p = _plan("resnet56")
    assert p.strategy == "fx"
    assert len(p.blocks) == 28
    assert p.blocks[0].name == "stem"
    expected = [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(9)]
    assert [b.name for b in p.blocks[1:]] == expected
    assert p.head.modules == ["avgpool", "fc"]
    # every cut between residual blocks carries exactly one tensor
    assert all(len(b.frontier) == 1 for b in p.blocks)
    # params of blocks + head add up to the model's
    assert sum(b.num_params for b in p.blocks) + p.head.num_params == p.total_params
    assert p.blocks[1].frontier_bytes == 16 * 32 * 32 * 4  # per sample, fp32


def test_resnet50_shape_16_bottlenecks():
    p = _plan("resnet50_like", batch=1)
    names = [b.name for b in p.blocks]
    assert names[0] == "stem" and len(names) == 17
    assert names[1:] == [f"layer{s}.{i}" for s, n in ((1, 3), (2, 4), (3, 6), (4, 3)) for i in range(n)]


def test_mobilenet_v2_17_inverted_residuals():
    p = _plan("mobilenet_v2_like")
    assert [b.name for b in p.blocks[1:]] == [f"features.{i}" for i in range(1, 18)]
    assert p.blocks[0].modules == ["features.0"]
    assert "classifier" in " ".join(p.head.modules)


def test_transformer_encoder_classifier_one_block_per_layer():
    p = _plan("transformer_classifier")
    # fx cannot see inside nn.TransformerEncoder; export recovers the layers
    assert p.strategy == "export"
    assert [b.name for b in p.blocks[1:]] == [f"encoder.layers.{i}" for i in range(4)]
    assert any("encoder" in n for n in p.notes)
    assert p.head.modules == ["fc"]


def test_seq2seq_transformer_encoder_and_decoder_layers_with_memory_in_frontier():
    p = _plan("seq2seq_transformer")
    names = [b.name for b in p.blocks]
    assert names[1:4] == [f"transformer.encoder.layers.{i}" for i in range(3)]
    assert names[4:7] == [f"transformer.decoder.layers.{i}" for i in range(3)]
    # the encoder memory crosses every decoder-layer boundary: more than one tensor
    assert all(len(b.frontier) >= 2 for b in p.blocks[3:6])
    assert "generator" in p.head.modules


def test_bert_style_layers_mask_in_frontier_and_pooler_head():
    p = _plan("bert_style")
    assert [b.name for b in p.blocks] == ["stem", "layers.0", "layers.1", "layers.2", "layers.3"]
    assert p.head.modules == ["pooler", "classifier"]
    # hidden state + attention mask cross every layer boundary
    assert all(len(b.frontier) == 2 for b in p.blocks[:-1])


def test_unet_long_skips_make_multi_tensor_frontiers():
    p = _plan("unet")
    names = [b.name for b in p.blocks]
    for n in ("down1", "down2", "down3", "up1", "up2", "up3"):
        assert n in names
    assert names.index("down1") < names.index("down3") < names.index("up1") < names.index("up3")
    widths = {b.name: len(b.frontier) for b in p.blocks}
    assert widths["down3"] == 4  # x1, x2, x3 still needed by the decoder, plus x4
    assert widths["up1"] == 3 and widths["up3"] == 1
    assert p.head.modules == ["outc"]


def test_data_dependent_control_flow_becomes_leaf_blocks():
    p = _plan("gated_net")
    assert p.strategy == "fx"
    assert [b.name for b in p.blocks[1:]] == [f"blocks.{i}" for i in range(4)]
    assert any("leaves" in n for n in p.notes)


def test_a_residual_join_after_the_last_block_belongs_to_it():
    """``h = h + block(h)`` in the parent's forward: the join after each block is that
    block's, the last one's too, so every frontier is the one joined tensor (the cache of a
    fully frozen prefix holds one tensor per sample, not the join's two inputs)."""
    import torch
    from torch import nn

    import fxfreeze

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.blocks = nn.ModuleList(
                nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()) for _ in range(3)
            )
            self.fc = nn.Linear(8, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.stem(x)
            for b in self.blocks:
                h = h + b(h)
            return self.fc(h.mean((2, 3)))

    p = fxfreeze.plan(Net(), (torch.randn(2, 3, 16, 16),))
    assert [b.name for b in p.blocks] == ["stem", "blocks.0", "blocks.1", "blocks.2"]
    assert [len(b.frontier) for b in p.blocks] == [1, 1, 1, 1]
    assert len({b.frontier_bytes for b in p.blocks}) == 1
    assert p.head.modules == ["fc"]


def test_a_head_whose_parameters_reach_no_output_keeps_the_last_block_trainable():
    """A pooler whose result the model drops (BERT's inside a sentence-transformers model)
    is a head with parameters that trains nothing: freezing every block would leave the
    loss without a gradient. The plan says so and the last block never freezes."""
    import torch
    from torch import nn

    import fxfreeze
    from fxfreeze.errors import FreezeError

    class Net(nn.Module):
        def __init__(self, use_pool: bool) -> None:
            super().__init__()
            self.use_pool = use_pool
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))
            self.pool = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            for b in self.blocks:
                x = x + b(x)
            pooled = self.pool(x[:, 0])  # computed either way, returned only when used
            return {"emb": x.mean(1), "pooled": pooled} if self.use_pool else {"emb": x.mean(1)}

    x = torch.randn(4, 5, 8)
    dead = Net(use_pool=False)
    p = fxfreeze.plan(dead, (x,))
    assert p.head.num_params == 8 * 8 + 8 and p.head.trains is False
    assert p.max_frozen == len(p.blocks) - 1
    assert any("reaches an output" in n for n in p.notes)
    assert fxfreeze.FreezePlan.from_yaml(p.to_yaml()) == p
    fm = fxfreeze.compile(dead, (x,), config={"policy": "manual"})
    with pytest.raises(FreezeError, match="trains no parameter that reaches an output"):
        fm.freeze_prefix(len(p.blocks))
    fm.freeze_prefix(p.max_frozen)
    fm(x)["emb"].sum().backward()  # the last block still gives the loss a gradient
    assert dead.blocks[-1][0].weight.grad is not None and dead.blocks[0][0].weight.grad is None
    for e in fm.graphs.entries():
        fm.graph_module_of(e).graph.lint()

    live = fxfreeze.plan(Net(use_pool=True), (x,))
    assert live.head.trains is True and live.max_frozen == len(live.blocks)
    assert not any("reaches an output" in n for n in live.notes)

    class InPlace(Net):  # the head's parameter reaches the output through an in-place op nobody reads
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for b in self.blocks:
                x = x + b(x)
            y = x.mean(1).clone()
            y.mul_(self.pool.weight.diagonal())
            return y

    written = fxfreeze.plan(InPlace(use_pool=False), (x,))
    assert written.head.trains is True and written.max_frozen == len(written.blocks)


def test_multi_input_and_dict_output():
    p = _plan("multi_input_net")
    assert [b.name for b in p.blocks[1:]] == ["blocks.0", "blocks.1", "blocks.2"]
    assert "head" in p.head.modules
    assert len(p.inputs) == 2
    q = _plan("dict_output_net")
    assert [b.name for b in q.blocks[1:]] == ["blocks.0", "blocks.1", "blocks.2"]


def test_plain_model_without_repetition_falls_back_to_children():
    m = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3), torch.nn.Flatten(), torch.nn.LazyLinear(4)
    )
    x = torch.randn(2, 3, 10, 10)
    m(x)
    p = fxfreeze.plan(m, (x,))
    assert len(p.blocks) == 2
    assert p.head.modules == ["4"]
    assert any("no repeated chain" in n for n in p.notes)


class _RecurrentStack(torch.nn.Module):
    """A language model of LSTM layers in a ``ModuleList``, residual adds in its own loop,
    returning each layer's state (truncated backpropagation through time carries them)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.rnns = torch.nn.ModuleList(torch.nn.LSTM(16, 16, batch_first=True) for _ in range(3))
        self.pool, self.out = torch.nn.Linear(16, 16), torch.nn.Linear(16, 50)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list]:
        h, states = self.emb(x), []
        for rnn in self.rnns:
            o, st = rnn(h)
            h = h + o
            states.append(st)
        return self.out(torch.tanh(self.pool(h))), states


def test_a_stack_of_childless_layers_is_a_run_and_a_pooler_before_the_classifier_is_not():
    """Before: a unit of one childless module never made a run, so the three LSTM layers
    were one block (nothing froze apart). The pooler and classifier, two chained Linear
    layers holding a small share of the parameters, stay out of the run (the head)."""
    torch.manual_seed(0)
    model = _RecurrentStack()
    x = torch.randint(0, 50, (4, 12))
    fm = fxfreeze.compile(model, (x,), config={"policy": "manual"})
    assert fm.plan.names == ["stem", "rnns.0", "rnns.1", "rnns.2"]
    assert fm.plan.head.modules == ["pool", "out"]
    fm.graph_module().graph.lint()
    ref = _RecurrentStack()
    ref.load_state_dict(model.state_dict())
    fm.freeze_prefix(2)
    for p_ in [*ref.emb.parameters(), *ref.rnns[0].parameters()]:
        p_.requires_grad_(False)
    fm(x)[0].pow(2).mean().backward()
    ref(x)[0].pow(2).mean().backward()
    for (name, p_), q in zip(model.named_parameters(), ref.parameters()):
        assert (p_.grad is None) == (q.grad is None), name
        if q.grad is not None:
            torch.testing.assert_close(p_.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert model.rnns[0].weight_ih_l0.grad is None and model.rnns[1].weight_ih_l0.grad is not None


def test_plan_without_example_inputs_has_structure_only():
    p = fxfreeze.plan(zoo.resnet20())
    assert len(p.blocks) == 10
    assert p.blocks[0].flops is None and p.blocks[0].frontier_bytes is None


def test_flops_match_conv_arithmetic():
    p = _plan("resnet20", batch=1)
    # layer1.0: two 3x3 convs 16->16 on 32x32, 2 FLOPs per MAC
    conv = 2 * 16 * 16 * 9 * 32 * 32
    assert p.blocks[1].flops == 2 * conv
    assert p.total_flops == sum(b.flops for b in p.blocks) + p.head.flops


@pytest.mark.parametrize("name", ["resnet20", "bert_style", "unet"])
def test_plan_is_deterministic_and_round_trips(name):
    a, b = _plan(name), _plan(name)
    assert a.to_dict() == b.to_dict()
    assert fxfreeze.FreezePlan.from_yaml(a.to_yaml()) == a
    assert fxfreeze.FreezePlan.from_json(a.to_json()) == a


def test_edited_plan_merges_blocks(tmp_path):
    m = zoo.resnet20()
    x = zoo.example_inputs("resnet20")
    p = fxfreeze.plan(m, x)
    d = p.to_dict()
    del d["blocks"][2]  # merge layer1.1 into layer1.0
    path = tmp_path / "plan.yaml"
    fxfreeze.FreezePlan.from_dict(d).save(path)
    q = fxfreeze.plan(m, x, plan=str(path))
    assert len(q.blocks) == len(p.blocks) - 1
    assert q.blocks[1].num_params == p.blocks[1].num_params + p.blocks[2].num_params
    assert q.blocks[1].frontier == p.blocks[2].frontier


def test_edited_plan_with_unknown_node_is_a_clear_error():
    m = zoo.resnet20()
    p = fxfreeze.plan(m)
    d = p.to_dict()
    d["blocks"][3]["start"] = "no_such_node"
    with pytest.raises(fxfreeze.PlanError, match="no_such_node"):
        fxfreeze.plan(m, plan=fxfreeze.FreezePlan.from_dict(d))


def test_plan_from_dict_rejects_unknown_keys():
    p = fxfreeze.plan(zoo.resnet20())
    d = p.to_dict()
    d["blocks"][0]["nmae"] = "x"
    with pytest.raises(fxfreeze.PlanError, match="nmae"):
        fxfreeze.FreezePlan.from_dict(d)


def test_layers_under_spectral_or_weight_norm_are_repeats_of_each_other():
    """``parametrize`` gives every module it touches a class of its own (a
    ``ParametrizedLinear`` per layer): compared by class identity, a GAN discriminator's or
    a vocoder's layers were no repetition and the plan fell back to the model's children
    (stem, and one block holding every layer)."""
    from torch import nn
    from torch.nn.utils.parametrizations import spectral_norm, weight_norm

    class Disc(nn.Module):
        def __init__(self, norm) -> None:
            super().__init__()
            self.stem = norm(nn.Conv1d(1, 8, 3, padding=1))
            self.layers = nn.ModuleList([nn.Sequential(norm(nn.Conv1d(8, 8, 3, padding=1)), nn.LeakyReLU(0.2)) for _ in range(4)])
            self.head = nn.Linear(8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.stem(x)
            for layer in self.layers:
                h = h + layer(h)
            return self.head(h.mean(-1))

    for norm in (spectral_norm, weight_norm):
        torch.manual_seed(0)
        p = fxfreeze.plan(Disc(norm), (torch.randn(2, 1, 16),))
        assert [b.name for b in p.blocks] == ["stem"] + [f"layers.{i}" for i in range(4)], norm.__name__
        assert all(len(b.frontier) == 1 for b in p.blocks)


def test_runs_of_two_lists_zipped_in_one_loop_are_blocks_in_execution_order():
    """A stage's downsampling from one ``ModuleList`` then its layers from another, zipped in
    one loop (PoolFormer, many hierarchical vision models): each list is a run, found one
    after the other. Listed in that order the block starts went back and forth, and
    ``compile`` raised ``PlanError`` "empty or out of order" on its own proposal."""
    from torch import nn

    class Layer(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.conv = nn.Conv2d(c, c, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.relu(self.conv(x))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            widths = [4, 8, 12]
            self.downs = nn.ModuleList(
                nn.Sequential(nn.Conv2d(a, b, 2, stride=2), nn.GroupNorm(1, b)) for a, b in zip([3] + widths, widths)
            )
            self.stages = nn.ModuleList(nn.Sequential(Layer(c), Layer(c)) for c in widths)
            self.fc = nn.Linear(widths[-1], 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for down, stage in zip(self.downs, self.stages):
                x = stage(down(x))
            return self.fc(x.mean((2, 3)))

    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 3, 16, 16)
    p = fxfreeze.plan(model, (x,))
    names = [b.name for b in p.blocks]
    assert names[:3] == ["downs.0", "stages.0.0", "stages.0.1"], names
    assert names[3:] == ["downs.1", "stages.1.0", "stages.1.1", "downs.2", "stages.2.0", "stages.2.1"], names
    assert all(len(b.frontier) == 1 for b in p.blocks)

    torch.manual_seed(0)
    ref = Net()
    fm = fxfreeze.compile(model, (x,), config={"policy": "manual", "manual": {"schedule": {}}})
    fm.freeze_prefix(4)
    frozen = set(fm.frozen_parameter_names(4))
    assert frozen == {n for n, _ in ref.named_parameters() if n.startswith(("downs.0.", "stages.0.", "downs.1."))}
    for n, q in ref.named_parameters():
        q.requires_grad_(n not in frozen)
    out, expected = fm(x), ref(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # same operations, same order
    out.square().mean().backward()
    expected.square().mean().backward()
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        assert (a.grad is None) == (n in frozen), n
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


def test_stages_of_alternating_depths_split_into_their_blocks():
    """Stages in one ``nn.Sequential`` with 2, 3, 2, 3 residual blocks (timm's MobileNetV3
    small): the stages repeat with period 2, and a unit of two stages was not split, so the
    plan had 3 blocks (stem, two pairs of stages) for 10 residual blocks."""
    from torch import nn

    class Res(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.relu(self.conv(x))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.stages = nn.Sequential(*[nn.Sequential(*[Res() for _ in range(d)]) for d in (2, 3, 2, 3)])
            self.fc = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.stages(self.stem(x)).mean((2, 3)))

    torch.manual_seed(0)
    p = fxfreeze.plan(Net(), (torch.randn(2, 3, 8, 8),))
    want = [f"stages.{s}.{i}" for s, d in enumerate((2, 3, 2, 3)) for i in range(d)]
    assert [b.name for b in p.blocks] == ["stem"] + want
    assert all(len(b.frontier) == 1 for b in p.blocks)


def test_layers_of_two_kinds_alternating_are_one_block_each():
    """A hybrid stack (Jamba: state-space layers and attention layers, alternating) repeats
    with period 2; each unit of two layers was one block, so a freeze went two layers at a
    time. Each layer is a block now; a unit of single ops keeps them together (below)."""
    from torch import nn

    class Mixer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.proj = nn.LayerNorm(8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.proj(self.norm(x)).tanh()

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.qkv, self.out = nn.LayerNorm(8), nn.Linear(8, 24), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self.qkv(self.norm(x)).chunk(3, -1)
            return x + self.out(torch.softmax(q @ k.transpose(1, 2), -1) @ v)

    class Hybrid(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(20, 8)
            self.layers = nn.ModuleList(Mixer() if i % 2 == 0 else Attention() for i in range(6))
            self.head = nn.Linear(8, 20)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = self.embed(ids)
            for layer in self.layers:
                h = layer(h)
            return self.head(h)

    class ConvPairs(nn.Module):
        """Conv then norm, twice, inside one residual: the pairs stay whole."""

        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.body = nn.Sequential(*[m for _ in range(3) for m in (nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8))])
            self.fc = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.body(self.stem(x)).mean((2, 3)))

    torch.manual_seed(0)
    p = fxfreeze.plan(Hybrid(), (torch.randint(0, 20, (2, 5)),))
    assert [b.name for b in p.blocks] == ["stem"] + [f"layers.{i}" for i in range(6)]
    assert all(len(b.frontier) == 1 for b in p.blocks)
    p = fxfreeze.plan(ConvPairs(), (torch.randn(2, 3, 8, 8),))
    assert [b.name for b in p.blocks][1:] == ["body.0..1", "body.2..3", "body.4..5"]


class _Stack(torch.nn.Module):
    def __init__(self, vocab: int, d: int, layers: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.norm = torch.nn.LayerNorm(d)
        self.layers = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.GELU(), torch.nn.Linear(d, d)) for _ in range(layers)
        )


class _EncoderDecoder(torch.nn.Module):
    """An encoder and a decoder, each with its own embeddings; the decoder reads the
    encoder's output (a cross term added to every layer's input)."""

    def __init__(self, vocab: int = 50, d: int = 16) -> None:
        super().__init__()
        self.encoder, self.decoder = _Stack(vocab, d, 2), _Stack(vocab, d, 2)
        self.lm_head = torch.nn.Linear(d, vocab)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        h = self.encoder.norm(self.encoder.embed(src))
        for layer in self.encoder.layers:
            h = h + layer(h)
        memory = h.mean(1, keepdim=True)
        y = self.decoder.norm(self.decoder.embed(tgt))
        for layer in self.decoder.layers:
            y = y + layer(y + memory)
        return self.lm_head(y)


def test_the_decoders_embeddings_open_the_decoder_not_close_the_encoder():
    """The decoder's embeddings run between the last encoder layer and the first decoder
    layer. They went to the block before them, so freezing the whole encoder froze the
    decoder's embeddings too (BART, T5, bert2bert, ViT+GPT-2). Modules of the next unit's
    subtree there now open its block; the encoder's own trailing code stays with it."""
    src, tgt = torch.randint(0, 50, (2, 7)), torch.randint(0, 50, (2, 5))
    model = _EncoderDecoder()
    p = fxfreeze.plan(model, (src, tgt))
    assert p.names == ["stem", "encoder.layers.0", "encoder.layers.1", "decoder.layers.0", "decoder.layers.1"]
    assert p.blocks[2].modules == ["encoder.layers.1"]
    assert p.blocks[3].modules == ["decoder.embed", "decoder.norm", "decoder.layers.0"]
    fm = fxfreeze.compile(model, (src, tgt), policy="manual")
    fm.freeze_prefix(3)  # the whole encoder
    frozen = set(fm.frozen_parameter_names())
    assert {n for n, _ in model.encoder.named_parameters(prefix="encoder")} == frozen
    fm(src, tgt).sum().backward()
    assert model.decoder.embed.weight.grad is not None and model.encoder.embed.weight.grad is None
