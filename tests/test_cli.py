"""The fxfreeze CLI: plan, viz, and one-line errors with non-zero exit."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from fxfreeze.cli import main, parse_input_shape


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fxfreeze.cli", *args], capture_output=True, text=True, timeout=300)


def test_plan_table(capsys):
    assert main(["plan", "fxfreeze.zoo:resnet20", "--input-shape", "2,3,32,32"]) == 0
    out = capsys.readouterr().out
    assert "ResNetCifar: 10 blocks" in out
    assert "layer3.2" in out and "head" in out and "GFLOPs" in out


def test_plan_yaml_and_json(capsys, tmp_path):
    assert main(["plan", "fxfreeze.zoo:bert_style", "--input-shape", "input_ids=2,16:int64", "--input-shape", "attention_mask=2,16:int64", "--format", "yaml"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert [b["name"] for b in data["blocks"]][1:] == ["layers.0", "layers.1", "layers.2", "layers.3"]
    out = tmp_path / "p.json"
    assert main(["plan", "fxfreeze.zoo:resnet20", "--format", "json", "-o", str(out)]) == 0
    assert len(json.loads(out.read_text())["blocks"]) == 10


def test_plan_with_example_inputs_file_and_kwargs(capsys, tmp_path):
    f = tmp_path / "inputs.pt"
    torch.save((torch.randn(2, 1, 28, 28),), f)
    assert main(["plan", "fxfreeze.zoo:resnet_cifar", "--kwargs", '{"depth": 20, "in_channels": 1}', "--example-inputs", str(f)]) == 0
    assert "10 blocks" in capsys.readouterr().out


_NET = """
import torch
from torch import nn
from helper_blocks import Block


class Net(nn.Module):
    def __init__(self, depth=4):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList([Block() for _ in range(depth)])
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = self.stem(x)
        for b in self.blocks:
            h = h + b(h)
        return self.fc(h.mean((2, 3)))


def make(depth=4):
    return Net(depth)
"""


def test_a_model_file_named_by_its_path_with_a_sibling_import(tmp_path):
    """``path/to/net.py:make`` from another folder: the file runs as a module, and a module
    beside it imports, as ``python path/to/net.py`` would see it."""
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "net.py").write_text(_NET)
    (folder / "helper_blocks.py").write_text(
        "from torch import nn\n\n\nclass Block(nn.Sequential):\n    def __init__(self):\n"
        "        super().__init__(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())\n"
    )
    proc = run("plan", f"{folder / 'net.py'}:make", "--kwargs", '{"depth": 3}', "--input-shape", "2,3,16,16")
    assert proc.returncode == 0, proc.stderr
    assert "Net: 4 blocks" in proc.stdout and "blocks.2" in proc.stdout
    # a file named like an installed module does not replace it (the YAML output needs yaml)
    (folder / "yaml.py").write_text(_NET)
    same_name = run("plan", f"{folder / 'yaml.py'}:make", "--input-shape", "2,3,16,16", "--format", "yaml")
    assert same_name.returncode == 0, same_name.stderr
    assert "model: Net" in same_name.stdout
    missing = run("plan", f"{folder / 'nope.py'}:make")
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    (folder / "broken.py").write_text("import no_such_module_xyz\n")
    broken = run("plan", f"{folder / 'broken.py'}:make")
    assert broken.returncode == 2 and "no_such_module_xyz" in broken.stderr and "Traceback" not in broken.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["plan", "no_such_module_xyz:f"], "cannot import module 'no_such_module_xyz'"),
        (["plan", "fxfreeze.zoo:nothing"], "has no attribute 'nothing'"),
        (["plan", "fxfreeze.zoo"], "MODULE:CALLABLE"),
        (["plan", "fxfreeze.zoo:resnet20", "--input-shape", "2,three,32"], "'three' is not a positive integer"),
        (["plan", "fxfreeze.zoo:resnet20", "--input-shape", "2,5"], "fails on the example inputs"),
        (["plan", "fxfreeze.zoo:resnet20", "--kwargs", "{bad"], "--kwargs is not valid JSON"),
        (["plan", "torch.nn:ReLU"], "no parameters"),
        (["plan", "fxfreeze.zoo:__doc__"], "neither an nn.Module nor callable"),
        (["viz", "fxfreeze.zoo:resnet20", "-o", "x.png"], "unknown format 'png'"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args, needle):
    proc = run(*args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0]


def test_parse_input_shape():
    assert parse_input_shape("1,3,224,224") == (None, (1, 3, 224, 224), "float32")
    assert parse_input_shape("input_ids=2,128:long") == ("input_ids", (2, 128), "int64")


@pytest.mark.parametrize("fmt", ["dot", "json"])
def test_viz_without_graphviz_formats(tmp_path, fmt):
    out = tmp_path / f"g.{fmt}"
    assert main(["viz", "fxfreeze.zoo:unet", "--input-shape", "1,3,32,32", "-o", str(out)]) == 0
    text = out.read_text()
    if fmt == "dot":
        assert "cluster_0" in text and "cluster_head" in text and "color=red" in text
    else:
        data = json.loads(text)
        assert any(e["frontier"] for e in data["edges"])
        assert {n["block"] for n in data["nodes"]} >= {0, "head"}


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed")
@pytest.mark.parametrize("fmt", ["svg", "html"])
def test_viz_svg_html(tmp_path, fmt):
    out = tmp_path / f"g.{fmt}"
    assert main(["viz", "fxfreeze.zoo:resnet20", "--input-shape", "1,3,32,32", "-o", str(out)]) == 0
    assert "<svg" in out.read_text()


def test_viz_svg_without_dot_is_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert main(["viz", "fxfreeze.zoo:resnet20", "-o", str(tmp_path / "g.svg")]) == 2
    assert "apt-get install graphviz" in capsys.readouterr().err
