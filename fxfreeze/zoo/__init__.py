"""A small zoo of architectures, written here, for tests, examples and benchmarks.

Each factory builds a randomly initialised model; :func:`example_inputs` gives inputs of the
right shape for it. They cover the structures the partitioner must handle: residual stages
(ResNet-56, ResNet-50 shape), inverted residuals (MobileNetV2), a plain VGG-style CNN, ``nn.TransformerEncoder``
and ``nn.Transformer`` (untraceable by fx inside), a BERT-style encoder with an attention
mask and pooler, a U-Net with long skips, data-dependent control flow inside a submodule,
and several inputs and a dict output. Use with the CLI as ``fxfreeze plan
fxfreeze.zoo:resnet56 --input-shape 2,3,32,32``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "resnet_cifar",
    "resnet20",
    "resnet56",
    "resnet50_like",
    "mobilenet_v2_like",
    "VGGLike",
    "vgg_like",
    "TransformerClassifier",
    "transformer_classifier",
    "Seq2SeqTransformer",
    "seq2seq_transformer",
    "BertStyleEncoder",
    "bert_style",
    "bert_base_style",
    "UNet",
    "unet",
    "GatedNet",
    "gated_net",
    "MultiInputNet",
    "multi_input_net",
    "DictOutputNet",
    "dict_output_net",
    "example_inputs",
    "MODELS",
]


# -- residual CNNs --------------------------------------------------------------------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNetCifar(nn.Module):
    """CIFAR ResNet (He et al. 2016, section 4.2): 3 stages of n BasicBlocks, depth 6n+2."""

    def __init__(self, depth: int = 56, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(width, width, n, 1)
        self.layer2 = self._stage(width, 2 * width, n, 2)
        self.layer3 = self._stage(2 * width, 4 * width, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    @staticmethod
    def _stage(cin: int, cout: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(cin, cout, stride)] + [BasicBlock(cout, cout) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet_cifar(depth: int = 56, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> ResNetCifar:
    return ResNetCifar(depth, num_classes, in_channels, width)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> ResNetCifar:
    return ResNetCifar(20, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> ResNetCifar:
    return ResNetCifar(56, num_classes, in_channels)


class ResNet50Like(nn.Module):
    """ImageNet ResNet-50 shape (stages of 3, 4, 6, 3 bottlenecks), written here."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        stages = []
        for width, n, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            blocks = []
            for i in range(n):
                blocks.append(Bottleneck(cin, width, stride if i == 0 else 1))
                cin = width * 4
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50_like(num_classes: int = 1000) -> ResNet50Like:
    return ResNet50Like(num_classes)


# -- MobileNetV2 ----------------------------------------------------------------------------
class ConvBNAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNAct(cin, hidden, 1))
        layers += [ConvBNAct(hidden, hidden, 3, stride, groups=hidden), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2Like(nn.Module):
    """MobileNetV2 (Sandler et al. 2018) layout: 17 inverted residuals between a stem and a
    1x1 conv + classifier; ``width`` scales the channels."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = 10, width: float = 0.25, in_channels: int = 3) -> None:
        super().__init__()

        def c(v: int) -> int:
            return max(8, int(math.ceil(v * width / 8) * 8))

        cin = c(32)
        feats: list[nn.Module] = [ConvBNAct(in_channels, cin, 3, 2)]
        for t, ch, n, s in self.SETTINGS:
            for i in range(n):
                feats.append(InvertedResidual(cin, c(ch), s if i == 0 else 1, t))
                cin = c(ch)
        last = c(1280)
        feats.append(ConvBNAct(cin, last, 1))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


def mobilenet_v2_like(num_classes: int = 10, width: float = 0.25) -> MobileNetV2Like:
    return MobileNetV2Like(num_classes, width)


# -- plain CNN --------------------------------------------------------------------------------
class VGGLike(nn.Module):
    """A plain (no skip connections) VGG-style CNN: stages of 3x3 conv + BN + ReLU, max
    pooling between stages, global average pooling and a linear classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, widths: tuple[int, ...] = (16, 32, 64), convs_per_stage: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for i, w in enumerate(widths):
            if i:
                layers.append(nn.MaxPool2d(2))
            for _ in range(convs_per_stage):
                layers.append(nn.Sequential(nn.Conv2d(cin, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)))
                cin = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def vgg_like(num_classes: int = 10, in_channels: int = 3) -> VGGLike:
    return VGGLike(num_classes, in_channels)


# -- transformers -----------------------------------------------------------------------------
class TransformerClassifier(nn.Module):
    """Token classifier over ``nn.TransformerEncoder`` (fx cannot trace inside it)."""

    def __init__(self, vocab: int = 1000, d_model: int = 64, nhead: int = 4, layers: int = 4, num_classes: int = 2, max_len: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(1, max_len, d_model))
        layer = nn.TransformerEncoderLayer(d_model, nhead, 4 * d_model, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.fc = nn.Linear(d_model, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[:, : tokens.shape[1]]
        return self.fc(self.encoder(x).mean(dim=1))


def transformer_classifier(layers: int = 4, d_model: int = 64) -> TransformerClassifier:
    return TransformerClassifier(layers=layers, d_model=d_model)


class Seq2SeqTransformer(nn.Module):
    """Encoder-decoder ``nn.Transformer`` with embeddings and a generator."""

    def __init__(self, vocab: int = 500, d_model: int = 64, nhead: int = 4, enc_layers: int = 3, dec_layers: int = 3) -> None:
        super().__init__()
        self.src_embed = nn.Embedding(vocab, d_model)
        self.tgt_embed = nn.Embedding(vocab, d_model)
        self.transformer = nn.Transformer(d_model, nhead, enc_layers, dec_layers, 4 * d_model, dropout=0.1, batch_first=True)
        self.generator = nn.Linear(d_model, vocab)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return self.generator(self.transformer(self.src_embed(src), self.tgt_embed(tgt)))


def seq2seq_transformer() -> Seq2SeqTransformer:
    return Seq2SeqTransformer()


class SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // h) + mask
        ctx = self.dropout(scores.softmax(-1)) @ v
        return self.out(ctx.transpose(1, 2).reshape(b, t, d))


class BertLayerStyle(nn.Module):
    def __init__(self, d: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.attention = SelfAttention(d, heads, dropout)
        self.norm1 = nn.LayerNorm(d)
        self.intermediate = nn.Linear(d, ff)
        self.output = nn.Linear(ff, d)
        self.norm2 = nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.dropout(self.attention(x, mask)))
        return self.norm2(x + self.dropout(self.output(F.gelu(self.intermediate(x)))))


class BertEmbeddingsStyle(nn.Module):
    def __init__(self, vocab: int, d: int, max_len: int, dropout: float) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab, d)
        self.position = nn.Embedding(max_len, d)
        self.token_type = nn.Embedding(2, d)
        self.norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = self.word(input_ids) + self.position(pos) + self.token_type(torch.zeros_like(input_ids))
        return self.dropout(self.norm(x))


class BertStyleEncoder(nn.Module):
    """A BERT-style encoder written here (fx-traceable), called with keyword inputs
    ``input_ids`` and ``attention_mask`` like a Hugging Face model; returns a dict."""

    def __init__(self, vocab: int = 1000, d: int = 64, layers: int = 4, heads: int = 4, ff: int = 256, max_len: int = 128, dropout: float = 0.1, num_classes: int = 2) -> None:
        super().__init__()
        self.embeddings = BertEmbeddingsStyle(vocab, d, max_len, dropout)
        self.layers = nn.ModuleList(BertLayerStyle(d, heads, ff, dropout) for _ in range(layers))
        self.pooler = nn.Linear(d, d)
        self.classifier = nn.Linear(d, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * -1e4
        x = self.embeddings(input_ids)
        for layer in self.layers:
            x = layer(x, mask)
        pooled = torch.tanh(self.pooler(x[:, 0]))
        return {"last_hidden_state": x, "logits": self.classifier(pooled)}


def bert_style(layers: int = 4, d: int = 64) -> BertStyleEncoder:
    return BertStyleEncoder(layers=layers, d=d, heads=4, ff=4 * d)


def bert_base_style() -> BertStyleEncoder:
    """BERT-base dimensions: 12 layers, 768 hidden, 12 heads, 3072 intermediate."""
    return BertStyleEncoder(vocab=30522, d=768, layers=12, heads=12, ff=3072, max_len=512)


# -- U-Net ------------------------------------------------------------------------------------
class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        )


class Down(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.conv = DoubleConv(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x))


class Up(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin // 2, 2, stride=2)
        self.conv = DoubleConv(cin, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """U-Net (Ronneberger et al. 2015) with long skip connections: the frontier after a
    down block holds every skip tensor still needed by the decoder."""

    def __init__(self, in_channels: int = 3, classes: int = 2, base: int = 8) -> None:
        super().__init__()
        b = base
        self.inc = DoubleConv(in_channels, b)
        self.down1, self.down2, self.down3 = Down(b, 2 * b), Down(2 * b, 4 * b), Down(4 * b, 8 * b)
        self.up1, self.up2, self.up3 = Up(8 * b, 4 * b), Up(4 * b, 2 * b), Up(2 * b, b)
        self.outc = nn.Conv2d(b, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        y = self.up1(x4, x3)
        y = self.up2(y, x2)
        y = self.up3(y, x1)
        return self.outc(y)


def unet() -> UNet:
    return UNet()


# -- control flow, several inputs, dict output ------------------------------------------------
class GatedBlock(nn.Module):
    """A residual block with data-dependent control flow (fx cannot trace its body)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, d)
        self.fc2 = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        if h.mean() > 0.5:  # data-dependent branch
            h = h * 0.5
        return x + self.fc2(h)


class GatedNet(nn.Module):
    def __init__(self, d_in: int = 16, d: int = 32, blocks: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.blocks = nn.Sequential(*[GatedBlock(d) for _ in range(blocks)])
        self.out = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(torch.relu(self.inp(x))))


def gated_net() -> GatedNet:
    return GatedNet()


class MultiInputNet(nn.Module):
    """Image and tabular inputs: a residual conv trunk, then fusion with an MLP branch."""

    def __init__(self, tab_dim: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(*[BasicBlock(16, 16) for _ in range(3)])
        self.tab = nn.Sequential(nn.Linear(tab_dim, 16), nn.ReLU())
        self.head = nn.Linear(32, classes)

    def forward(self, image: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(image)).mean(dim=(2, 3))
        return self.head(torch.cat([x, self.tab(table)], dim=1))


def multi_input_net() -> MultiInputNet:
    return MultiInputNet()


class DictOutputNet(nn.Module):
    """Residual MLP returning a dict of logits and features."""

    def __init__(self, d_in: int = 20, d: int = 32, blocks: int = 3, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU()) for _ in range(blocks))
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.embed(x)
        for blk in self.blocks:
            h = h + blk(h)
        return {"features": h, "logits": self.head(h)}


def dict_output_net() -> DictOutputNet:
    return DictOutputNet()


# -- registry -------------------------------------------------------------------------------
def _tokens(b: int, t: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (b, t), generator=g)


def _rand(*shape: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=g)


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int], Any]]] = {
    "resnet56": (resnet56, lambda b: (_rand(b, 3, 32, 32),)),
    "resnet20": (resnet20, lambda b: (_rand(b, 3, 32, 32),)),
    "resnet50_like": (resnet50_like, lambda b: (_rand(b, 3, 224, 224),)),
    "mobilenet_v2_like": (mobilenet_v2_like, lambda b: (_rand(b, 3, 64, 64),)),
    "vgg_like": (vgg_like, lambda b: (_rand(b, 3, 32, 32),)),
    "transformer_classifier": (transformer_classifier, lambda b: (_tokens(b, 16, 1000),)),
    "seq2seq_transformer": (seq2seq_transformer, lambda b: (_tokens(b, 12, 500), _tokens(b, 10, 500))),
    "bert_style": (bert_style, lambda b: {"input_ids": _tokens(b, 16, 1000), "attention_mask": torch.ones(b, 16, dtype=torch.long)}),
    "unet": (unet, lambda b: (_rand(b, 3, 32, 32),)),
    "gated_net": (gated_net, lambda b: (_rand(b, 16),)),
    "multi_input_net": (multi_input_net, lambda b: (_rand(b, 3, 16, 16), _rand(b, 8))),
    "dict_output_net": (dict_output_net, lambda b: (_rand(b, 20),)),
}


def example_inputs(name: str, batch: int = 2) -> Any:
    """Example inputs for zoo model ``name`` at batch size ``batch``."""
    return MODELS[name][1](batch)
