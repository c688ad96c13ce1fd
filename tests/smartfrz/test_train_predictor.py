"""``fxfreeze train-predictor``: records runs, evaluates leave-one-architecture-out and writes
a weights file the policy loads (``--quick``: tiny runs, a smoke test of the pipeline)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import fxfreeze
from fxfreeze.cli import main
from fxfreeze.runtime.predictor import load_predictor
from fxfreeze.smartfrz.jobs import JobRecord, hash_tokenize


def test_hash_tokenize_is_deterministic_and_masks_padding():
    ids, mask = hash_tokenize(["A good film.", "bad"], vocab=100, max_len=6)
    assert ids.shape == (2, 6) and ids[0, 0] == 1 and ids[1, 0] == 1
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]
    assert torch.equal(ids, hash_tokenize(["a GOOD film", "bad"], vocab=100, max_len=6)[0])
    assert int(ids.max()) < 100


def test_quick_train_predictor_writes_loadable_weights_and_a_report(tmp_path: Path, capsys):
    out, report, records = tmp_path / "p.fxtf", tmp_path / "r.json", tmp_path / "runs"
    shared = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
    args = ["train-predictor", "--quick", "--out", str(out), "--report", str(report), "--records", str(records)]
    if not (shared / "mnist10k").is_dir():
        args += ["--mnist", str(tmp_path)]  # no MNIST files there: the digits runs are enough
    assert main(args) == 0
    rep = json.loads(report.read_text())
    fams = {r["family"] for r in rep["runs"]}
    assert {"resnet", "mobilenet", "vgg"} <= fams
    assert set(rep["leave_one_out"]) == fams
    for m in rep["leave_one_out"].values():
        assert 0.0 <= m["precision"] <= 1.0 and 0.0 <= m["recall"] <= 1.0
    model, meta = load_predictor(out)
    assert meta["leave_one_out"] == rep["leave_one_out"] and meta["record_interval"] == 10
    assert "held-out family" in capsys.readouterr().out
    # the recorded runs are plain data files and are reused
    rec = JobRecord.load(records / "resnet8-digits.fxtf")
    assert rec.history.shape[0] == len(rec.blocks) and rec.cka.shape == (rec.history.shape[1], len(rec.blocks))
    assert torch.allclose(rec.cka[-1], torch.ones(len(rec.blocks)), atol=1e-5)  # the last snapshot is the reference
    # the written weights drive the policy
    fm = fxfreeze.compile(fxfreeze.zoo.resnet20(), config={"policy": "smartfrz", "smartfrz": {"weights": str(out)}})
    assert fm.freezer.policy.predictor.config == model.config


def test_train_predictor_bad_arguments_are_one_line_errors(tmp_path: Path, capsys):
    assert main(["train-predictor", "--quick", "--mnist", str(tmp_path / "nope")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert main(["train-predictor", "--quick", "--label-level", "2"]) == 2
    assert "--label-*" in capsys.readouterr().err
    bad = tmp_path / "runs"
    bad.mkdir()
    (bad / "resnet8-digits.fxtf").write_bytes(b"garbage")
    assert main(["train-predictor", "--quick", "--records", str(bad), "--out", str(tmp_path / "x.fxtf")]) == 2
    assert "resnet8-digits.fxtf" in capsys.readouterr().err
    assert main(["train-predictor", "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
