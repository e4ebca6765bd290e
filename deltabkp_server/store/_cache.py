"""A bounded local cache of base archives for a remote store: one file per archive version.

Job: give the patcher an mmap of a base archive that lives in S3 without downloading it for
every backup, and keep local disk use bounded.
Invariants:
- an entry is named by ``(target, seq, ETag)``: the ETag comes from the store at each use
  (HEAD), so an object replaced or deleted in the store never matches a stale entry; size
  (and blake3, when the caller knows it) are checked by the caller before each use;
- entries appear whole: they are written under ``tmp/`` and renamed into ``bases/``;
- bounded: installing ``(target, seq)`` drops the target's older entries (a backup's base is
  the target's newest archive), then entries that can never fit, then the least recently
  used ones while the total exceeds ``max_bytes``;
- entries are opened under the lock and read through the open file: on POSIX an unlinked
  file stays readable (and mapped), so eviction never waits for, nor breaks, a patcher;
- ``tmp/`` files are named by the writing process's pid: start-up removes only those of
  processes that are gone, never another live server's.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from deltabkp import _mmap
from deltabkp._process import pid_alive as _pid_alive
from deltabkp.errors import StoreError

__all__ = ["BaseCache", "Scratch"]

_ENTRY = re.compile(r"^(\d+)-(\d+)-([0-9A-Za-z_-]*)\.tgz$")
_TMP = re.compile(r"^(\d+)-[0-9a-f]+\.part$")
_TAG_UNSAFE = re.compile(r"[^0-9A-Za-z_-]")


def _tag(etag: str) -> str:
    """An ETag as a file-name component (quotes and anything unusual dropped)."""
    return _TAG_UNSAFE.sub("", etag)


class Scratch:
    """A directory of temp files named by the writing process's pid: creating it removes
    those of processes that are gone (a kill -9 leaves them), never a live server's."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            for f in self.dir.iterdir():
                m = _TMP.match(f.name)
                if m and not _pid_alive(int(m.group(1))):
                    f.unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot prepare the temp dir {self.dir}: {exc.strerror}") from None

    def new_temp(self) -> tuple[Path, BinaryIO]:
        """A fresh file (``O_EXCL``), open for reading and writing; the caller removes it."""
        path = self.dir / f"{os.getpid()}-{uuid.uuid4().hex}.part"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot create {path}: {exc.strerror}") from None
        return path, os.fdopen(fd, "w+b", buffering=1 << 20)


class BaseCache:
    """``directory/bases/<target>-<seq>-<etag>.tgz`` and ``directory/tmp/`` (being written)."""

    def __init__(self, directory: str | Path, max_bytes: int) -> None:
        self.dir = Path(directory)
        self.bases = self.dir / "bases"
        self.tmp = self.dir / "tmp"
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self.scratch = Scratch(self.tmp)
        try:
            self.bases.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot prepare the base cache {self.dir}: {exc.strerror}") from None

    # -- writing ------------------------------------------------------------------------------

    def new_temp(self) -> tuple[Path, BinaryIO]:
        """A fresh file under ``tmp/`` (``O_EXCL``), open for writing."""
        return self.scratch.new_temp()

    def install(self, temp: Path, target_id: int, seq: int, etag: str) -> Path:
        """Rename ``temp`` into place as the entry of ``(target, seq, etag)``; then bound the
        cache (the target's older entries go first, then the least recently used).  A reader
        opens ``temp`` before: if the entry is evicted at once, its open file still reads."""
        path = self.bases / f"{target_id}-{seq}-{_tag(etag)}.tgz"
        with self._lock:
            try:
                os.replace(temp, path)
            except OSError as exc:
                temp.unlink(missing_ok=True)
                raise StoreError(f"cannot install {path}: {exc.strerror}") from None
            for tid, s, f in self._entries():
                if tid == target_id and f != path and s <= seq:
                    f.unlink(missing_ok=True)
            self._trim()
        return path

    # -- reading ------------------------------------------------------------------------------

    def open_entry(self, target_id: int, seq: int, etag: str, size: int) -> BinaryIO | None:
        """The entry of ``(target, seq, etag)``, open for reading, if it has ``size`` bytes
        (else it is dropped).  Opened under the lock: an eviction cannot come in between."""
        path = self.bases / f"{target_id}-{seq}-{_tag(etag)}.tgz"
        with self._lock:
            try:
                f = open(path, "rb")
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise StoreError(f"cannot open {path}: {exc.strerror}") from None
            if os.fstat(f.fileno()).st_size != size:
                f.close()
                path.unlink(missing_ok=True)
                return None
            with contextlib.suppress(OSError):
                os.utime(path)  # the LRU clock
        return f

    def discard(self, target_id: int, seq: int, etag: str) -> None:
        """Drop the entry of ``(target, seq, etag)`` (found damaged)."""
        with self._lock:
            (self.bases / f"{target_id}-{seq}-{_tag(etag)}.tgz").unlink(missing_ok=True)

    def drop(self, target_id: int, seq: int) -> None:
        """Forget every entry of ``(target, seq)`` (the archive was deleted from the store)."""
        with self._lock:
            for tid, s, f in self._entries():
                if tid == target_id and s == seq:
                    f.unlink(missing_ok=True)

    def total_bytes(self) -> int:
        with self._lock:
            return sum(st.st_size for st in self._stats())

    def _stats(self) -> Iterator[os.stat_result]:
        for _t, _s, f in self._entries():
            with contextlib.suppress(FileNotFoundError):
                yield f.stat()

    @staticmethod
    @contextlib.contextmanager
    def mapped(f: BinaryIO) -> Iterator[memoryview | bytes]:
        """The open file ``f`` as a read-only buffer (an mmap; ``b""`` when empty); closes it."""
        with f, _mmap.mapped(f) as buf:
            yield buf

    # -- internals (under the lock) -----------------------------------------------------------

    def _entries(self) -> Iterator[tuple[int, int, Path]]:
        try:
            names = list(self.bases.iterdir())
        except OSError as exc:
            raise StoreError(f"cannot list the base cache {self.bases}: {exc.strerror}") from None
        for f in names:
            m = _ENTRY.match(f.name)
            if m:
                yield int(m.group(1)), int(m.group(2)), f

    def _trim(self) -> None:
        stats: list[tuple[float, int, Path]] = []
        for _t, _s, f in self._entries():
            with contextlib.suppress(FileNotFoundError):
                st = f.stat()
                stats.append((st.st_mtime, st.st_size, f))
        total = sum(size for _m, size, _f in stats)
        # Entries that can never fit go first (they would push out everything else), then
        # the least recently used.
        order = sorted(stats, key=lambda e: (e[1] <= self.max_bytes, e[0]))
        for _mtime, size, f in order:
            if total <= self.max_bytes:
                break
            f.unlink(missing_ok=True)
            total -= size
