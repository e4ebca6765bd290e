"""``LocalStore``: the archive store on a local directory (the embedded default).

Job: hold ``(target id, seq) → archive + signature`` as files with atomic writes.
Invariants:
- a new archive is written to ``.part`` files, fsynced, renamed into place and the
  directory fsynced, all before the catalog row is committed; the catalog commit is the
  point of truth, so a crash at any instant leaves either a committed archive or garbage
  that ``reconcile`` removes at the next start (one server owns the directory, so every
  ``.part`` file found then is garbage);
- the signature is stored beside its archive and is never recomputed;
- every method is blocking: the server calls them from worker threads, never on the loop.

Layout: ``DIR/archives/<target-id>/<seq>.tgz`` and ``<seq>.sig`` (see docs/formats.md, store).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deltabkp._atomic import fsync_dir
from deltabkp.errors import MissingObject, StoreError
from deltabkp_server.store._cache import BaseCache
from deltabkp_server.store._protocol import ReconcileReport

__all__ = ["LocalStore"]

_NAME = re.compile(r"^(\d+)\.(tgz|sig)(\.part)?$")


class _LocalPart:
    """``PartWriter`` for ``LocalStore``: ``<seq>.tgz.part`` then rename."""

    def __init__(self, directory: Path, seq: int) -> None:
        self._dir = directory
        self.tgz = directory / f"{seq}.tgz"
        self.sig = directory / f"{seq}.sig"
        self.part = directory / f"{seq}.tgz.part"
        self.sig_part = directory / f"{seq}.sig.part"
        self._size = 0
        self._done = False
        try:
            # O_EXCL: two writers of one seq would be a server bug; fail loudly instead.
            fd = os.open(self.part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot create {self.part}: {exc.strerror}") from None
        self._f = os.fdopen(fd, "wb", buffering=1 << 20)

    @property
    def size(self) -> int:
        return self._size

    def write(self, data: bytes | memoryview) -> None:
        try:
            self._f.write(data)
        except OSError as exc:
            raise StoreError(f"cannot write {self.part}: {exc.strerror}") from None
        self._size += len(data)

    def read_back(self, chunk_size: int) -> Iterator[bytes]:
        """What was written so far (used to sign a first archive of unknown size)."""
        try:
            self._f.flush()
            with open(self.part, "rb") as f:
                while block := f.read(chunk_size):
                    yield block
        except OSError as exc:
            raise StoreError(f"cannot read back {self.part}: {exc.strerror}") from None

    def commit(self, signature: bytes) -> None:
        if self._done:
            raise StoreError(f"{self.part}: already committed or aborted")
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            with open(self.sig_part, "wb") as s:
                s.write(signature)
                s.flush()
                os.fsync(s.fileno())
            # Signature first: a crash between the renames leaves a lone .sig, which is an
            # orphan (no catalog row) and is removed at start-up.
            os.rename(self.sig_part, self.sig)
            os.rename(self.part, self.tgz)
            fsync_dir(self._dir)
        except OSError as exc:
            self.abort()
            raise StoreError(f"cannot commit {self.tgz}: {exc.strerror}") from None
        self._done = True

    def abort(self) -> None:
        """Remove whatever this writer left (also the renamed files if the commit half-failed)."""
        self._done = True
        try:
            self._f.close()
        except OSError:
            pass
        for p in (self.part, self.sig_part):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise StoreError(f"cannot remove {p}: {exc.strerror}") from None


class LocalStore:
    """``Store`` on a local directory tree: ``<root>/archives/<target-id>/<seq>.{tgz,sig}``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.archives = self.root / "archives"
        try:
            self.archives.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create {self.archives}: {exc.strerror}") from None

    def _dir(self, target_id: int) -> Path:
        return self.archives / str(int(target_id))

    def tgz_path(self, target_id: int, seq: int) -> Path:
        return self._dir(target_id) / f"{int(seq)}.tgz"

    def sig_path(self, target_id: int, seq: int) -> Path:
        return self._dir(target_id) / f"{int(seq)}.sig"

    def begin(self, target_id: int, seq: int) -> _LocalPart:
        d = self._dir(target_id)
        try:
            if not d.exists():
                d.mkdir(parents=True)
                fsync_dir(self.archives)
        except FileExistsError:
            pass
        except OSError as exc:
            raise StoreError(f"cannot create {d}: {exc.strerror}") from None
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
        return self.tgz_path(target_id, seq).is_file() and self.sig_path(target_id, seq).is_file()

    def delete(self, target_id: int, seq: int) -> None:
        for p in (self.tgz_path(target_id, seq), self.sig_path(target_id, seq)):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise StoreError(f"cannot delete {p}: {exc.strerror}") from None

    def _walk(self) -> Iterator[tuple[int, Path, re.Match[str]]]:
        for d in sorted(self.archives.iterdir()):
            if not d.is_dir() or not d.name.isdigit():
                continue
            for f in sorted(d.iterdir()):
                m = _NAME.match(f.name)
                if m:
                    yield int(d.name), f, m

    def keys(self) -> set[tuple[int, int]]:
        """Archives whose .tgz and .sig are both in place (``.part`` files excluded)."""
        seen: dict[tuple[int, int], set[str]] = {}
        for tid, _f, m in self._walk():
            if not m.group(3):
                seen.setdefault((tid, int(m.group(1))), set()).add(m.group(2))
        return {k for k, kinds in seen.items() if kinds == {"tgz", "sig"}}

    def reconcile(self, committed: set[tuple[int, int]]) -> ReconcileReport:
        """Delete ``.part`` files and files with no committed row; report rows with no file."""
        parts: list[str] = []
        orphans: list[str] = []
        try:
            for tid, f, m in list(self._walk()):
                if m.group(3):
                    f.unlink()
                    parts.append(str(f))
                elif (tid, int(m.group(1))) not in committed:
                    f.unlink()
                    orphans.append(str(f))
            touched = {Path(p).parent for p in parts + orphans}
            for d in touched:
                fsync_dir(d)
        except OSError as exc:
            raise StoreError(f"reconciling {self.archives}: {exc.strerror}") from None
        present = self.keys()
        missing = tuple(sorted(k for k in committed if k not in present))
        return ReconcileReport(tuple(parts), tuple(orphans), missing)
