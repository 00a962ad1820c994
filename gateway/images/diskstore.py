"""The disk cache of images: files under ``images.dir``, at most ``images.max_disk_bytes``.

Layout: ``{dir}/{key[:2]}/{key}.{ext}``. A download is written to ``{dir}/tmp/``, synced, and
only then renamed to its name, atomically: a crash (kill -9, power loss) never leaves half an
image under a name that is served. Every worker of the host (and the next start) shares the
directory, and the files are the index: a file's access time is the LRU clock (set explicitly
when it is served, at most once a minute, whatever the mount's atime options), its
modification time is the image's Last-Modified. The bytes in use are kept in ``{dir}/usage``
and changed only under an exclusive lock on ``{dir}/.lock``, so the bound holds for all the
workers together; the least recently served files are removed to make room.

Every method but ``get`` blocks on the disk: call them in a thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from gateway.metrics import IMAGE_DISK_BYTES

__all__ = ["EXTENSIONS", "DiskStore", "StoredImage"]

EXTENSIONS = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/gif": "gif",
    "image/webp": "webp",
    "image/avif": "avif",
}
_CONTENT_TYPES = {ext: content_type for content_type, ext in EXTENSIONS.items()}
_TOUCH_EVERY_S = 60
# Eviction frees this share of the bound at once, so the writes after it need no rescan.
_LOW_WATER = 0.9
# Temporary files older than this when the store opens were left by a crash.
_STALE_TEMP_S = 3600


@dataclass(frozen=True, slots=True)
class StoredImage:
    """An image file in the store."""

    key: str
    path: Path
    content_type: str
    stat: os.stat_result


class DiskStore:
    """Images on disk under one directory, bounded in bytes, least recently served out."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._tmp = directory / "tmp"
        self._usage = directory / "usage"
        self._lock = directory / ".lock"
        self._known: dict[str, str] = {}  # key -> extension, for files this process has seen

    def open(self) -> None:
        """Create the directory, drop what crashed writes left, and count what is there."""
        self._tmp.mkdir(parents=True, exist_ok=True)
        now = time.time()
        for temp in self._tmp.iterdir():
            with contextlib.suppress(OSError):
                if now - temp.stat().st_mtime > _STALE_TEMP_S:
                    temp.unlink()
        with self._locked():
            self._write_usage(sum(size for _, size, _ in self._scan()))

    def get(self, key: str) -> StoredImage | None:
        """The image stored under ``key``, marked as just served. One stat when present."""
        known = self._known.get(key)
        for ext in [known] if known else _CONTENT_TYPES:
            path = self._path(key, ext)
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                continue
            self._known[key] = ext
            if time.time() - stat.st_atime > _TOUCH_EVERY_S:
                with contextlib.suppress(OSError):
                    os.utime(path, ns=(time.time_ns(), stat.st_mtime_ns))
            return StoredImage(key, path, _CONTENT_TYPES[ext], stat)
        self._known.pop(key, None)
        return None

    def temp(self) -> tuple[Path, BinaryIO]:
        """A new temporary file to download into, and its path."""
        fd, name = tempfile.mkstemp(dir=self._tmp, suffix=".part")
        return Path(name), os.fdopen(fd, "wb")

    def commit(self, temp: Path, out: BinaryIO, key: str, content_type: str) -> StoredImage:
        """Make a finished download the image under ``key``, making room for it first."""
        out.flush()
        os.fsync(out.fileno())
        out.close()
        size = temp.stat().st_size
        ext = EXTENSIONS[content_type]
        path = self._path(key, ext)
        path.parent.mkdir(exist_ok=True)
        with self._locked():
            used = self._read_usage()
            with contextlib.suppress(FileNotFoundError):
                used -= path.stat().st_size  # the same image, written by another worker
            if used + size > self.max_bytes:
                used = self._evict(size)
            os.replace(temp, path)
            _sync_directory(path.parent)
            self._write_usage(used + size)
        self._known[key] = ext
        return StoredImage(key, path, content_type, os.stat(path))

    def discard(self, temp: Path, out: BinaryIO) -> None:
        """Throw away an unfinished download."""
        out.close()
        temp.unlink(missing_ok=True)

    def used(self) -> int:
        """Bytes of images stored, as last counted."""
        with self._locked():
            return self._read_usage()

    def _evict(self, incoming: int) -> int:
        """Remove least recently served files until ``incoming`` bytes fit under the low-water
        mark; the bytes left."""
        files = sorted(self._scan())
        used = sum(size for _, size, _ in files)
        target = max(self.max_bytes * _LOW_WATER - incoming, 0)
        for _, size, path in files:
            if used <= target:
                break
            path.unlink(missing_ok=True)
            self._known.pop(path.stem, None)
            used -= size
        return used

    def _scan(self) -> Iterator[tuple[float, int, Path]]:
        """(access time, size, path) of every stored image."""
        for shard in self.directory.iterdir():
            if len(shard.name) != 2 or not shard.is_dir():
                continue
            for path in shard.iterdir():
                if path.suffix[1:] in _CONTENT_TYPES:
                    with contextlib.suppress(FileNotFoundError):
                        stat = path.stat()
                        yield stat.st_atime, stat.st_size, path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive against every other process and thread using the directory."""
        with open(self._lock, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _read_usage(self) -> int:
        try:
            return int(self._usage.read_text())
        except (OSError, ValueError):
            return sum(size for _, size, _ in self._scan())

    def _write_usage(self, used: int) -> None:
        self._usage.write_text(str(used))
        IMAGE_DISK_BYTES.set(used)

    def _path(self, key: str, ext: str) -> Path:
        return self.directory / key[:2] / f"{key}.{ext}"


def _sync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
