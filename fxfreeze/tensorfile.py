"""Tensors as plain data on disk: a small binary header, raw bytes and a CRC-32; no pickle.

Two layers:

- :func:`encode_tensors` / :func:`decode_tensors`: a list of tensors <-> bytes (the
  activation cache's spill files), optionally stored in a narrower floating dtype;
- :func:`write_tensor_file` / :func:`read_tensor_file`: named tensors plus a JSON header
  (the SmartFRZ predictor weights), written atomically.

Decoding raises :class:`ValueError` on anything malformed (bad magic, truncation, a checksum
that does not match); callers turn that into an error that names the file.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

__all__ = ["encode_tensors", "decode_tensors", "write_tensor_file", "read_tensor_file"]

_MAGIC = b"FXFC"
_VERSION = 1
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.bool, torch.uint8, torch.int8]
_CODE = {d: i for i, d in enumerate(_DTYPES)}
_FILE_MAGIC = b"FXTF"


def encode_tensors(tensors: Sequence[torch.Tensor], store_dtype: torch.dtype | None = None) -> bytes:
    """``tensors`` (CPU) as bytes; floating tensors are stored as ``store_dtype`` when given
    and come back in their own dtype."""
    head = bytearray(_MAGIC + struct.pack("<BB", _VERSION, len(tensors)))
    body = bytearray()
    for t in tensors:
        orig = t.dtype
        if store_dtype is not None and t.is_floating_point():
            t = t.to(store_dtype)
        t = t.contiguous()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        head += struct.pack("<BBB", _CODE[orig], _CODE[t.dtype], t.dim()) + struct.pack(f"<{t.dim()}I", *t.shape)
        head += struct.pack("<Q", len(raw))
        body += raw
    payload = bytes(head) + bytes(body)
    return payload + struct.pack("<I", zlib.crc32(payload))


def decode_tensors(data: bytes) -> list[torch.Tensor]:
    """The inverse of :func:`encode_tensors`. Raises ValueError on anything malformed."""
    if len(data) < 10 or data[:4] != _MAGIC:
        raise ValueError("bad magic or too short")
    payload, crc = data[:-4], struct.unpack("<I", data[-4:])[0]
    if zlib.crc32(payload) != crc:
        raise ValueError("checksum mismatch")
    version, n = struct.unpack("<BB", payload[4:6])
    if version != _VERSION:
        raise ValueError(f"unknown version {version}")
    pos = 6
    specs = []
    try:
        for _ in range(n):
            orig, stored, ndim = struct.unpack("<BBB", payload[pos : pos + 3])
            pos += 3
            shape = struct.unpack(f"<{ndim}I", payload[pos : pos + 4 * ndim])
            pos += 4 * ndim
            (nbytes,) = struct.unpack("<Q", payload[pos : pos + 8])
            pos += 8
            specs.append((_DTYPES[orig], _DTYPES[stored], shape, nbytes))
    except (struct.error, IndexError) as e:
        raise ValueError(f"malformed header: {e}") from e
    out = []
    for orig, stored, shape, nbytes in specs:
        raw = payload[pos : pos + nbytes]
        if len(raw) != nbytes:
            raise ValueError("truncated")
        pos += nbytes
        t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(stored).reshape(shape) if nbytes else torch.empty(shape, dtype=stored)
        out.append(t.to(orig))
    return out


def write_tensor_file(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                      store_dtype: torch.dtype | None = None) -> None:
    """Write named tensors and a JSON-serialisable ``meta`` to ``path`` (via a temporary file
    and a rename, so a crash never leaves half a file under the final name)."""
    names = list(tensors)
    header = json.dumps({"meta": dict(meta), "names": names}, sort_keys=True).encode("utf-8")
    body = encode_tensors([tensors[n].detach().cpu() for n in names], store_dtype)
    data = _FILE_MAGIC + struct.pack("<I", len(header)) + header + body
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_bytes(data + struct.pack("<I", zlib.crc32(data)))
    os.replace(tmp, p)


def read_tensor_file(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors by name, meta)`` from a file of :func:`write_tensor_file`. Raises OSError
    when it cannot be read and ValueError when its content is malformed."""
    data = Path(path).read_bytes()
    if len(data) < 12 or data[:4] != _FILE_MAGIC:
        raise ValueError("not an fxfreeze tensor file (bad magic or too short)")
    if zlib.crc32(data[:-4]) != struct.unpack("<I", data[-4:])[0]:
        raise ValueError("checksum mismatch (the file is corrupt or truncated)")
    (hlen,) = struct.unpack("<I", data[4:8])
    try:
        header = json.loads(data[8 : 8 + hlen].decode("utf-8"))
        names, meta = list(header["names"]), dict(header["meta"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"malformed header: {e}") from e
    tensors = decode_tensors(data[8 + hlen : -4])
    if len(tensors) != len(names):
        raise ValueError(f"header names {len(names)} tensors, the file holds {len(tensors)}")
    return dict(zip(names, tensors)), meta
