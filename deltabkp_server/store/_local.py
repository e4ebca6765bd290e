"""``LocalStore``: the archive store on a local directory (the embedded default).

Job: hold ``(target id, seq) → archive + signature`` as files with atomic writes.
Invariants:
- a new archive is written to a ``.part`` file, fsynced, renamed into place and the
  directory fsynced, all before the catalog row is committed; the catalog commit is the
  point of truth, so a crash at any instant leaves either a committed archive or garbage
  that ``reconcile`` removes at the next start (one server owns the directory, so every
  ``.part`` file found then is garbage, and so is a signature's temp file);
- the signature is stored beside its archive, written after the catalog commit with the one
  atomic write (``deltabkp._atomic``): a committed ``.tgz`` without its ``.sig`` is a crash's
  leftover, not a fault (made at its next use: ``_signature``; ``reconcile`` notes it);
- every method is blocking: the server calls them from worker threads, never on the loop.

Layout: ``DIR/archives/<target-id>/<seq>.tgz`` and ``<seq>.sig`` for a whole version,
``<seq>.rdelta`` for one held as a reverse delta (see docs/formats.md, store); ``DIR/tmp/``
holds rebuilt versions while they are served or checked (removed at start-up).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from deltabkp._atomic import atomic_write, fsync_dir
from deltabkp.errors import MissingObject, StoreError
from deltabkp_server.store._cache import BaseCache, Scratch
from deltabkp_server.store._protocol import ReconcileReport
from deltabkp_server.store._spool import Spool

__all__ = ["LocalStore"]

_NAME = re.compile(r"^(\d+)\.(tgz|sig|rdelta)(\.part)?$")
#: ``atomic_write``'s temp file of a signature (``.<seq>.sig.<random>.part``).
_SIG_TEMP = re.compile(r"^\.(\d+)\.sig\.\w+\.part$")
#: The files a whole version must have, and may have (its signature is made after its commit).
_WHOLE = frozenset({"tgz"})
_WHOLE_ALLOWED = frozenset({"tgz", "sig"})
_DELTA = frozenset({"rdelta"})


def _open_part(part: Path, mode_flag: int) -> BinaryIO:
    """A new ``.part`` file for writing (mode 0600, 1 MiB buffer); ``mode_flag``: O_EXCL or O_TRUNC."""
    try:
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | mode_flag, 0o600)
    except OSError as exc:
        raise StoreError(f"cannot create {part}: {exc.strerror}") from None
    return os.fdopen(fd, "wb", buffering=1 << 20)


class _LocalPart(Spool):
    """``PartWriter`` for ``LocalStore``: ``<seq>.tgz.part`` then rename."""

    def __init__(self, directory: Path, seq: int) -> None:
        self._dir = directory
        self.tgz = directory / f"{seq}.tgz"
        self.part = directory / f"{seq}.tgz.part"
        self._done = False
        # O_EXCL: two writers of one seq would be a server bug; fail loudly instead.
        self._f = _open_part(self.part, os.O_EXCL)
        # Written out as it grows: the commit's fsync then waits for the last few MiB only.
        super().__init__(self.part, self._f, writeback=True)

    def commit(self) -> None:
        if self._done:
            raise StoreError(f"{self.part}: already committed or aborted")
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            os.rename(self.part, self.tgz)
            fsync_dir(self._dir)
        except OSError as exc:
            self.abort()
            raise StoreError(f"cannot commit {self.tgz}: {exc.strerror}") from None
        self._done = True

    def abort(self) -> None:
        """Remove the ``.part`` file (a renamed one is the caller's: ``Store.delete``)."""
        self._done = True
        try:
            self._f.close()
        except OSError:
            pass
        try:
            self.part.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StoreError(f"cannot remove {self.part}: {exc.strerror}") from None


class _LocalDeltaPart(Spool):
    """``DeltaWriter`` for ``LocalStore``: ``<seq>.rdelta.part``, then fsync and rename."""

    def __init__(self, directory: Path, seq: int) -> None:
        self._dir = directory
        self.path = directory / f"{seq}.rdelta"
        self.part = directory / f"{seq}.rdelta.part"
        self._done = False
        # Truncate: a part left by an attempt that failed is ours to overwrite (one
        # converter per target, under its lease).
        self._f = _open_part(self.part, os.O_TRUNC)
        super().__init__(self.part, self._f)

    def commit(self) -> None:
        if self._done:
            raise StoreError(f"{self.part}: already committed or aborted")
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            # Replaces an orphan a crash left before its catalog commit.
            os.rename(self.part, self.path)
            fsync_dir(self._dir)
        except OSError as exc:
            self.abort()
            raise StoreError(f"cannot commit {self.path}: {exc.strerror}") from None
        self._done = True

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            self._f.close()
        except OSError:
            pass
        try:
            self.part.unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot remove {self.part}: {exc.strerror}") from None


class LocalStore:
    """``Store`` on a local directory tree: ``<root>/archives/<target-id>/<seq>.{tgz,sig}``
    (whole) or ``<seq>.rdelta`` (reverse delta)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.archives = self.root / "archives"
        try:
            self.archives.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create {self.archives}: {exc.strerror}") from None
        self._scratch = Scratch(self.root / "tmp")

    def _dir(self, target_id: int) -> Path:
        return self.archives / str(int(target_id))

    def tgz_path(self, target_id: int, seq: int) -> Path:
        return self._dir(target_id) / f"{int(seq)}.tgz"

    def sig_path(self, target_id: int, seq: int) -> Path:
        return self._dir(target_id) / f"{int(seq)}.sig"

    def delta_path(self, target_id: int, seq: int) -> Path:
        return self._dir(target_id) / f"{int(seq)}.rdelta"

    def _mkdir(self, target_id: int) -> Path:
        d = self._dir(target_id)
        try:
            if not d.exists():
                d.mkdir(parents=True)
                fsync_dir(self.archives)
        except FileExistsError:
            pass
        except OSError as exc:
            raise StoreError(f"cannot create {d}: {exc.strerror}") from None
        return d

    def begin(self, target_id: int, seq: int) -> _LocalPart:
        d = self._mkdir(target_id)
        if self.tgz_path(target_id, seq).exists():
            raise StoreError(f"{self.tgz_path(target_id, seq)} already exists")
        return _LocalPart(d, seq)

    @contextmanager
    def base(
        self, target_id: int, seq: int, *, size: int | None = None, digest: bytes | None = None
    ) -> Iterator[memoryview | bytes]:
        """The archive as a read-only buffer (an mmap: the patcher copies blocks from it).

        A ``size`` given is checked (a truncated file is caught before patching); ``digest``
        is not: the file is the store itself, and the patched result's blake3 is checked
        against the agent's anyway, so hashing the base too would only cost a read.
        """
        del digest
        p = self.tgz_path(target_id, seq)
        try:
            f = open(p, "rb")
        except FileNotFoundError:
            raise MissingObject(f"cannot open base archive {p}: no such file") from None
        except OSError as exc:
            raise StoreError(f"cannot open base archive {p}: {exc.strerror}") from None
        actual = os.fstat(f.fileno()).st_size
        if size is not None and actual != size:
            f.close()
            raise StoreError(f"base archive {p} has {actual} bytes, the catalog says {size}")
        with BaseCache.mapped(f) as buf:
            yield buf

    def read_signature(self, target_id: int, seq: int) -> bytes:
        p = self.sig_path(target_id, seq)
        try:
            return p.read_bytes()
        except FileNotFoundError:
            raise MissingObject(f"cannot read signature {p}: no such file") from None
        except OSError as exc:
            raise StoreError(f"cannot read signature {p}: {exc.strerror}") from None

    def write_signature(self, target_id: int, seq: int, data: bytes) -> None:
        p = self.sig_path(target_id, seq)
        try:
            # Durable: a reader trusts a signature that parses and names its archive.
            with atomic_write(p, mode=0o600) as f:
                f.write(data)
        except OSError as exc:
            raise StoreError(f"cannot write signature {p}: {exc.strerror}") from None

    def read_chunks(self, target_id: int, seq: int, chunk_size: int) -> Iterator[bytes]:
        p = self.tgz_path(target_id, seq)
        try:
            f = open(p, "rb")
        except OSError as exc:
            raise StoreError(f"cannot open archive {p}: {exc.strerror}") from None
        with f:
            while True:
                block = f.read(chunk_size)
                if not block:
                    return
                yield block

    def exists(self, target_id: int, seq: int) -> bool:
        return self.tgz_path(target_id, seq).is_file()

    def begin_delta(self, target_id: int, seq: int) -> _LocalDeltaPart:
        return _LocalDeltaPart(self._mkdir(target_id), seq)

    def read_delta_chunks(self, target_id: int, seq: int, chunk_size: int) -> Iterator[bytes]:
        p = self.delta_path(target_id, seq)
        try:
            f = open(p, "rb")
        except FileNotFoundError:
            raise MissingObject(f"cannot open reverse delta {p}: no such file") from None
        except OSError as exc:
            raise StoreError(f"cannot open reverse delta {p}: {exc.strerror}") from None
        with f:
            while True:
                try:
                    block = f.read(chunk_size)
                except OSError as exc:
                    raise StoreError(f"cannot read {p}: {exc.strerror}") from None
                if not block:
                    return
                yield block

    def delta_exists(self, target_id: int, seq: int) -> bool:
        return self.delta_path(target_id, seq).is_file()

    def stored_size(self, target_id: int, seq: int) -> int:
        """Bytes the version takes in the store, whatever its form (0 if none)."""
        total = 0
        for p in (self.tgz_path(target_id, seq), self.sig_path(target_id, seq),
                  self.delta_path(target_id, seq)):
            try:
                total += p.stat().st_size
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise StoreError(f"cannot stat {p}: {exc.strerror}") from None
        return total

    def scratch(self) -> tuple[Path, BinaryIO]:
        """A temp file for a rebuilt version (open for writing and reading; caller removes)."""
        return self._scratch.new_temp()

    def _unlink(self, *paths: Path) -> None:
        for p in paths:
            try:
                p.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise StoreError(f"cannot delete {p}: {exc.strerror}") from None

    def delete_whole(self, target_id: int, seq: int) -> None:
        """Remove the whole copy of a version now held as a reverse delta."""
        self._unlink(self.tgz_path(target_id, seq), self.sig_path(target_id, seq))

    def delete(self, target_id: int, seq: int) -> None:
        """Remove the version in every form (idempotent)."""
        self._unlink(self.tgz_path(target_id, seq), self.sig_path(target_id, seq),
                     self.delta_path(target_id, seq))

    def _walk(self) -> Iterator[tuple[tuple[int, int], Path, str, bool]]:
        """``((target, seq), file, kind, is a temp file)`` for every store file."""
        for d in sorted(self.archives.iterdir()):
            if not d.is_dir() or not d.name.isdigit():
                continue
            for f in sorted(d.iterdir()):
                if m := _NAME.match(f.name):
                    yield (int(d.name), int(m.group(1))), f, m.group(2), bool(m.group(3))
                elif m := _SIG_TEMP.match(f.name):
                    yield (int(d.name), int(m.group(1))), f, "sig", True

    def _kinds(self) -> dict[tuple[int, int], set[str]]:
        seen: dict[tuple[int, int], set[str]] = {}
        for k, _f, kind, temp in self._walk():
            if not temp:
                seen.setdefault(k, set()).add(kind)
        return seen

    def keys(self) -> set[tuple[int, int]]:
        """Versions in place in some form: .tgz (its .sig may be made later), or .rdelta."""
        return {k for k, kinds in self._kinds().items() if _WHOLE <= kinds or _DELTA <= kinds}

    def reconcile(
        self, committed: AbstractSet[tuple[int, int]],
        deltas: AbstractSet[tuple[int, int]] = frozenset(),
    ) -> ReconcileReport:
        """Delete ``.part`` (and signature temp) files and files the catalog does not expect
        — a version of ``committed`` is whole (.tgz, and .sig once made) unless it is in
        ``deltas`` (.rdelta) — and report committed versions whose files are not there, and
        whole ones whose signature is not made yet."""
        parts: list[str] = []
        orphans: list[str] = []
        try:
            for k, f, kind, temp in list(self._walk()):
                if temp:
                    f.unlink()
                    parts.append(str(f))
                elif kind not in _expected(k, committed, deltas, allowed=True):
                    f.unlink()
                    orphans.append(str(f))
            touched = {Path(p).parent for p in parts + orphans}
            for d in touched:
                fsync_dir(d)
        except OSError as exc:
            raise StoreError(f"reconciling {self.archives}: {exc.strerror}") from None
        kinds = self._kinds()
        missing = tuple(sorted(
            k for k in committed if not _expected(k, committed, deltas) <= kinds.get(k, set())
        ))
        unsigned = tuple(sorted(
            k for k in committed - deltas if kinds.get(k, set()) == _WHOLE
        ))
        return ReconcileReport(tuple(parts), tuple(orphans), missing, unsigned)


def _expected(
    k: tuple[int, int], committed: AbstractSet[tuple[int, int]],
    deltas: AbstractSet[tuple[int, int]], *, allowed: bool = False,
) -> frozenset[str]:
    """The files the catalog says version ``k`` must have (``allowed``: may have)."""
    if k not in committed:
        return frozenset()
    if k in deltas:
        return _DELTA
    return _WHOLE_ALLOWED if allowed else _WHOLE
