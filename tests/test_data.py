"""Data readers: real files when ../shared is there, and clear errors for bad files."""

from __future__ import annotations

import gzip
import struct

import pytest
import torch

from fxfreeze import DataError
from fxfreeze.data import load_mnist_idx, load_polarity, load_tsv, split_indices


def test_mnist10k(shared_data):
    x, y = load_mnist_idx(shared_data / "mnist10k")
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and set(y.tolist()) == set(range(10))


def test_movie_reviews(shared_data):
    texts, labels = load_polarity(shared_data / "movie-review-polarity")
    assert len(texts) == 10662 and sum(labels) == 5331  # the stray bytes are replaced, not fatal


def _idx(path, data: bytes, dims: tuple[int, ...], ndim_code: int):
    header = struct.pack(">HBB", 0, 8, ndim_code) + struct.pack(">" + "I" * len(dims), *dims)
    path.write_bytes(gzip.compress(header + data))


def test_mnist_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_mnist_idx(tmp_path / "nope")
    with pytest.raises(DataError, match="no MNIST images"):
        load_mnist_idx(tmp_path)
    _idx(tmp_path / "t-images-idx3-ubyte.gz", bytes(2 * 4 * 4 - 3), (2, 4, 4), 3)  # truncated
    _idx(tmp_path / "t-labels-idx1-ubyte.gz", bytes(2), (2,), 1)
    with pytest.raises(DataError, match="truncated"):
        load_mnist_idx(tmp_path)
    (tmp_path / "t-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8bnot gzip")
    with pytest.raises(DataError, match="not a valid gzip"):
        load_mnist_idx(tmp_path)
    _idx(tmp_path / "t-images-idx3-ubyte.gz", bytes(3 * 16), (3, 4, 4), 3)
    with pytest.raises(DataError, match="3 images but .* 2 labels"):
        load_mnist_idx(tmp_path)


def test_tsv(tmp_path):
    p = tmp_path / "d.tsv"
    p.write_text("good film\t1\n\nbad film\t0\n", encoding="utf-8")
    assert load_tsv(p) == (["good film", "bad film"], [1, 0])
    p.write_text("no label here\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 1"):
        load_tsv(p)
    p.write_text("x\tpositive\n", encoding="utf-8")
    with pytest.raises(DataError, match="not an integer"):
        load_tsv(p)


def test_split_is_fixed_and_checked():
    a1, b1 = split_indices(100, 80, seed=3)
    a2, b2 = split_indices(100, 0.8, seed=3)
    assert torch.equal(a1, a2) and torch.equal(b1, b2) and len(a1) == 80
    assert sorted(torch.cat([a1, b1]).tolist()) == list(range(100))
    with pytest.raises(DataError):
        split_indices(10, 10)
