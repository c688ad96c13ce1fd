"""Readers for the real data sets the examples, benchmarks and tests use.

No downloads: each reader takes a path to files the user already has and fails with a
:class:`~fxfreeze.errors.DataError` naming the file and what is wrong. Formats:

- MNIST idx files (``*-images-idx3-ubyte[.gz]`` and ``*-labels-idx1-ubyte[.gz]``);
- CIFAR-10 "python version" batches (pickled dicts by the data set's own format; read with a
  restricted unpickler that only builds plain containers and numpy arrays);
- sentence polarity files (``rt-polarity.pos`` / ``.neg``, one sentence per line) or a
  ``text<TAB>label`` TSV.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import DataError

__all__ = ["load_mnist_idx", "load_polarity", "load_tsv", "load_cifar10", "split_indices"]


def _open(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {str(path)!r}: {e.strerror}") from e
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{str(path)!r} is not a valid gzip file ({e})") from e
    return raw


def _find(folder: Path, patterns: Sequence[str], what: str) -> Path:
    for pat in patterns:
        hits = sorted(folder.glob(pat))
        if hits:
            return hits[0]
    raise DataError(f"no {what} file in {str(folder)!r} (looked for {', '.join(patterns)})")


def _idx(raw: bytes, path: Path, ndim: int) -> np.ndarray:
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{str(path)!r} is too short to be an idx file")
    zero, dtype, dims = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08 or dims != ndim:
        raise DataError(f"{str(path)!r} is not an idx{ndim} ubyte file (header {raw[:4].hex()})")
    shape = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    n = int(np.prod(shape))
    body = raw[4 + 4 * ndim :]
    if len(body) != n:
        raise DataError(f"{str(path)!r} holds {len(body)} bytes of data, its header promises {n} (truncated?)")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def load_mnist_idx(folder: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST from its idx files in ``folder`` (``*-images-idx3-ubyte[.gz]`` and
    ``*-labels-idx1-ubyte[.gz]``): images as float32 ``(N, 1, 28, 28)`` in [0, 1], labels as
    int64 ``(N,)``. ``DataError`` names the file that is missing or malformed.

    Example::

        >>> # x, y = load_mnist_idx("../shared/data/mnist10k"); x.shape -> (10000, 1, 28, 28)
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"MNIST folder {str(folder)!r} does not exist")
    ip = _find(folder, ("*images-idx3-ubyte.gz", "*images-idx3-ubyte", "*images.idx3-ubyte*"), "MNIST images")
    lp = _find(folder, ("*labels-idx1-ubyte.gz", "*labels-idx1-ubyte", "*labels.idx1-ubyte*"), "MNIST labels")
    images = _idx(_open(ip), ip, 3)
    labels = _idx(_open(lp), lp, 1)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{ip.name} has {images.shape[0]} images but {lp.name} has {labels.shape[0]} labels")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def load_polarity(folder: str | Path) -> tuple[list[str], list[int]]:
    """Sentences and labels (1 = positive) from ``rt-polarity.pos`` / ``rt-polarity.neg`` in
    ``folder``. Undecodable bytes (the files hold a few) are replaced, not fatal.

    Example::

        >>> # texts, labels = load_polarity("../shared/data/movie-review-polarity"); len(texts) -> 10662
    """
    folder = Path(folder)
    texts: list[str] = []
    labels: list[int] = []
    for name, label in (("rt-polarity.neg", 0), ("rt-polarity.pos", 1)):
        p = folder / name
        raw = _open(p)
        lines = [ln.strip() for ln in raw.decode("utf-8", errors="replace").splitlines()]
        lines = [ln for ln in lines if ln]
        if not lines:
            raise DataError(f"{str(p)!r} holds no sentences")
        texts += lines
        labels += [label] * len(lines)
    return texts, labels


def load_tsv(path: str | Path) -> tuple[list[str], list[int]]:
    """``text<TAB>label`` lines of ``path`` (integer labels); blank lines are skipped, any other
    malformed line is a ``DataError`` naming its line number.

    Example::

        >>> import pathlib, tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "d.tsv"
        >>> _ = p.write_text("good film\\t1\\n\\nbad film\\t0\\n")
        >>> load_tsv(p)
        (['good film', 'bad film'], [1, 0])
    """
    p = Path(path)
    texts: list[str] = []
    labels: list[int] = []
    for i, line in enumerate(_open(p).decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        text, sep, label = line.rpartition("\t")
        if not sep:
            raise DataError(f"{str(p)!r} line {i}: expected 'text<TAB>label'")
        try:
            labels.append(int(label))
        except ValueError:
            raise DataError(f"{str(p)!r} line {i}: label {label!r} is not an integer") from None
        texts.append(text)
    if not texts:
        raise DataError(f"{str(p)!r} holds no examples")
    return texts, labels


def load_cifar10(folder: str | Path, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 "python version" batches in ``folder`` (``data_batch_*`` when ``train``, else
    ``test_batch``) as float32 ``(N, 3, 32, 32)`` in [0, 1] and int64 labels. The batches are
    pickles: they are read with a restricted unpickler that builds only plain containers and
    numpy arrays.

    Example::

        >>> # x, y = load_cifar10("cifar-10-batches-py", train=False); x.shape -> (10000, 3, 32, 32)
    """
    import pickle

    class _Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str):  # type: ignore[no-untyped-def]
            if module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray") and name in (
                "_reconstruct", "ndarray", "dtype", "scalar"):
                return super().find_class(module, name)
            raise DataError(f"CIFAR batch refers to {module}.{name}, which a data file never needs")

    folder = Path(folder)
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    xs, ys = [], []
    for name in names:
        p = folder / name
        import io

        try:
            d = _Restricted(io.BytesIO(_open(p)), encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as e:
            raise DataError(f"{str(p)!r} is not a CIFAR-10 python batch ({e})") from e
        if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
            raise DataError(f"{str(p)!r} lacks the keys 'data' and 'labels'")
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[b"labels"], dtype=np.int64))
    x = torch.from_numpy(np.concatenate(xs).astype(np.float32) / 255.0)
    return x, torch.from_numpy(np.concatenate(ys))


def split_indices(n: int, first: int | float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random split of ``range(n)``: ``first`` items (an int, or a float fraction) and
    the rest, drawn with ``seed``.

    Example::

        >>> a, b = split_indices(10, 0.8, seed=0)
        >>> len(a), len(b), sorted(a.tolist() + b.tolist()) == list(range(10))
        (8, 2, True)
    """
    k = int(round(first * n)) if isinstance(first, float) else int(first)
    if not 0 < k < n:
        raise DataError(f"cannot split {n} items into {k} and {n - k}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:k], perm[k:]
