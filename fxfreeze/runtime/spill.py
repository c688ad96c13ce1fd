"""The activation cache's last tier: entries spilled to files, one per sample.

A file holds a key (32 bytes: the plan, the prefix and a fingerprint of its frozen weights),
a small header (shapes and dtypes), the raw bytes and a CRC-32 of them
(:mod:`fxfreeze.tensorfile`). Files are plain data, no pickle. A file that is truncated, fails
its checksum or carries another key (another run sharing the folder, stale weights) is
detected, deleted and reported as missing: the caller recomputes it, never uses it. The
folder of each cache instance is its own (``run-<pid>-<random>``), so runs that share a
``directory`` never touch each other's files. A folder that becomes unwritable mid-run turns
spilling off with one warning.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable

import torch

from ..errors import ConfigError
from ..tensorfile import decode_tensors as _decode
from ..tensorfile import encode_tensors as _encode

__all__ = ["DiskTier", "KEY_BYTES"]

logger = logging.getLogger("fxfreeze")
KEY_BYTES = 32  # a sha256 digest


class DiskTier:
    """Spill files of one cache instance in ``directory`` (a fresh temporary folder when None,
    deleted with the instance). ``stats`` is the cache's counter dict (``spilled``,
    ``corrupt``, ``foreign``, ``spill_failures``); ``pool`` reads upcoming entries ahead."""

    def __init__(self, directory: str | os.PathLike[str] | None, stats: dict[str, int],
                 pool: ThreadPoolExecutor | None) -> None:
        self._own_dir = directory is None
        self.directory = Path(tempfile.mkdtemp(prefix="fxfreeze-cache-")) if directory is None else Path(directory)
        check_writable(self.directory)
        if self._own_dir:  # a temporary folder of ours goes with the cache, closed or not
            weakref.finalize(self, shutil.rmtree, str(self.directory), True)
        self._run = f"run-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.key = b"\0" * KEY_BYTES
        self.k = 0
        self.ok = True
        self.stats = stats
        self._pool = pool
        self._ids: set[int] = set()
        self._prefetched: dict[int, Future[Any]] = {}

    def __contains__(self, i: object) -> bool:
        return i in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def set_prefix(self, k: int, key: bytes | None) -> None:
        self.k = k
        self.key = (key or b"")[:KEY_BYTES].ljust(KEY_BYTES, b"\0")

    def path(self, i: int) -> Path:
        return self.directory / self._run / f"k{self.k}" / f"{i}.fxfc"

    def files(self) -> list[Path]:
        return [self.path(i) for i in sorted(self._ids)]

    def clear(self) -> None:
        for i in list(self._ids):
            try:
                self.path(i).unlink()
            except OSError:
                pass
        self._ids = set()
        self._prefetched = {}

    def close(self) -> None:
        self.clear()
        shutil.rmtree(self.directory if self._own_dir else self.directory / self._run, ignore_errors=True)

    def put(self, i: int, rows: tuple[torch.Tensor, ...], budget_mb: float) -> bool:
        """Write sample ``i``'s rows; False when spilling is off (or just failed: then it is
        turned off, with one warning naming ``budget_mb``, the memory that is left)."""
        if not self.ok:
            return False
        path = self.path(i)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(self.key + _encode([t.cpu() for t in rows], None))
            os.replace(tmp, path)
        except OSError as e:
            self.ok = False
            self.stats["spill_failures"] += 1
            logger.warning(
                "fxfreeze cache: cannot spill to %s (%s); spilling is off, entries beyond the memory budget "
                "(%.0f MiB) are recomputed from now on", path.parent, e.strerror or e, budget_mb,
            )
            return False
        self._ids.add(i)
        self.stats["spilled"] += 1
        return True

    def get(self, i: int) -> tuple[torch.Tensor, ...] | None:
        """Sample ``i``'s rows on the CPU, or None when there are none or the file is
        unreadable or foreign (then it is deleted)."""
        if i not in self._ids:
            return None
        fut = self._prefetched.pop(i, None)
        try:
            data = fut.result() if fut is not None else self.path(i).read_bytes()
            if data[:KEY_BYTES] != self.key:
                self.stats["foreign"] += 1
                raise ValueError("written for another run, prefix or frozen weights")
            return tuple(_decode(data[KEY_BYTES:]))
        except (OSError, ValueError) as err:
            self.stats["corrupt"] += 1
            logger.warning("fxfreeze cache: entry %s is unreadable (%s); recomputing it", self.path(i), err)
            self._ids.discard(i)
            try:
                self.path(i).unlink()
            except OSError:
                pass
            return None

    def prefetch(self, ids: Iterable[int]) -> None:
        """Start reading the files of an upcoming batch on the background thread."""
        if self._pool is None or not self._ids:
            return
        for i in ids:
            if i in self._ids and i not in self._prefetched:
                self._prefetched[i] = self._pool.submit(self.path(i).read_bytes)


def check_writable(directory: Path) -> None:
    """A ``ConfigError`` now, when the model is compiled, rather than mid-epoch."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".fxfreeze-write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"cache.directory {str(directory)!r} is not writable ({e.strerror or e}); choose another folder "
            "or turn caching off"
        ) from e
