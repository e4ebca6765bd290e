"""The agent's on-disk cache: signatures by archive hash, tree fingerprints by (path, hash),
and the last archive built per path with its index.  Long on purpose: the kept build, its
index, signature and seek file are one argument about what may be reused and when (the
invariants below), best read in one place.

Job: let the agent answer a backup request without the server sending a signature (it keeps
the signature of every archive it produced, keyed by the archive's blake3), without
reading a single file when nothing changed (it keeps, for each path, the tree fingerprint
taken just before it built each archive), and build the next archive incrementally,
reading and compressing only what changed (it keeps the last archive it built for each path
and its ``ArchiveIndex``: the compressed bytes to reuse must come from somewhere).

Layout (version 1) under the cache dir::

    sigs/<archive hash hex>.sig      a signature, format v1 (docs/formats.md); for an
                                     archive kept below, made from it when a backup
                                     first needs it (``keep_signature``), not by its build
    paths/<blake3(path)[:16] hex>.json
        {"version": 1, "path": P, "entries": [{"hash": hex, "fingerprint": hex | null,
          "exclude": [..], "at": unix time}, ...]}   newest first, at most ``keep``
    builds/<blake3(path)[:16] hex>.tgz / .idx
        the last archive built for the path and its index (docs/formats.md "Archive
        index"); disk cost: one archive per path served (a third of the tree for source
        trees; two while a build of that path runs) plus ~100 bytes per entry; ``keep_archives=False`` (``--no-archive-cache``)
        keeps none, and every build is a full one
    builds/<blake3(path)[:16] hex>.sk
        the kept archive's seek points (docs/formats.md "Seek points", ~3 % of it): the
        next layout delta inflates the kept archive only around what changed.  Made after
        the backup's answer went (``make_seek``): derived from the replaced build's (the
        cost of what changed), else from the kept archive and its index (one inflate)

Invariants:
- it is only a cache: whatever is missing, torn or corrupt reads as a miss (never an
  error, never a wrong answer): a signature is used only if it parses and its base hash
  is the hash it is filed under; a fingerprint is used only for the exact (path, archive
  hash, exclude list) it was recorded for, and never when it was racy;
- writes go to a temp file and are renamed into place, so a reader sees old or new;
- each path keeps its ``keep`` newest entries; a signature file no entry refers to is
  deleted when the entries change.
- every method blocks (file I/O): call them from a worker thread;
- a kept archive is replaced only by a build that ran to its end: the old one is moved
  aside (held open until after the answer: freeing it is no part of the backup's path),
  the new archive renamed into place, then its index; a crash between these leaves no
  kept archive or an index that names another archive, which the incremental builder
  detects (missing, or by blake3) and answers with a full build.  A build
  is never failed by this cache (a full disk drops the kept archive with a warning).
  The blake3 is skipped only for the archive this process kept itself, while its file
  has the ``stat`` (device, inode, size, mtime, ctime) taken right after it was kept
  (``KeptBuild.hashed``; memory only: a restarted agent hashes it once).
- a seek file names its archive (blake3 and size inside): one left by an older kept
  build, torn or corrupt is not used (logged at DEBUG) and the delta inflates from the
  start, as without one; failing to make one never touches the kept build.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import attrs
import blake3

from deltabkp import Signature
from deltabkp._atomic import atomic_write, write_bytes_atomic
from deltabkp._mmap import mapped
from deltabkp._xdg import user_dir
from deltabkp.archive import ArchiveIndex, SeekPoints
from deltabkp.errors import DeltabkpError, FormatError, UsageError

__all__ = ["AgentCache", "CacheEntry", "KeptBuild", "default_cache_dir"]

log = logging.getLogger("deltabkp_agent")
CACHE_VERSION = 1


def default_cache_dir(port: int) -> Path:
    """``$XDG_CACHE_HOME/deltabkp/agent-<port>`` (``~/.cache/deltabkp/agent-<port>``)."""
    base = user_dir("cache")
    if base is None:
        raise UsageError("no home directory for the agent's cache: pass --cache-dir")
    return base / f"agent-{port}"


@attrs.frozen
class CacheEntry:
    """What the agent remembers about one archive it produced (or was told about) for a path."""

    hash: bytes
    fingerprint: bytes | None
    exclude: tuple[str, ...]
    at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "hash": self.hash.hex(),
            "fingerprint": self.fingerprint.hex() if self.fingerprint is not None else None,
            "exclude": list(self.exclude),
            "at": self.at,
        }

    @classmethod
    def from_json(cls, obj: Any) -> CacheEntry:
        if not isinstance(obj, dict):
            raise ValueError("entry is not an object")
        fp = obj.get("fingerprint")
        exclude = obj.get("exclude", [])
        if not isinstance(exclude, list) or not all(isinstance(e, str) for e in exclude):
            raise ValueError("bad exclude list")
        return cls(
            hash=bytes.fromhex(str(obj["hash"])),
            fingerprint=bytes.fromhex(fp) if isinstance(fp, str) else None,
            exclude=tuple(exclude),
            at=float(obj.get("at", 0.0)),
        )


@attrs.define
class KeptBuild:
    """The previous build of a path to build from (``index``/``archive``, None if there is
    none), and where this build's archive goes: ``write`` every chunk, then ``done`` with
    its index."""

    index: ArchiveIndex | None
    archive: Path | None
    #: ``archive``'s ``stat`` when this process wrote (and so hashed) it, if it still is
    #: that build: the builder then trusts it without hashing it again.
    hashed: os.stat_result | None = None
    _out: IO[bytes] | None = None
    _failed: str = ""
    _done: ArchiveIndex | None = None

    def write(self, chunk: bytes) -> None:
        if self._out is None or self._failed:
            return
        try:
            self._out.write(chunk)
        except OSError as exc:  # only a cache: the build goes on without it
            self._failed = exc.strerror or str(exc)

    def done(self, index: ArchiveIndex) -> None:
        self._done = index

    @property
    def keeping(self) -> bool:
        """Whether this build's archive is being written to the cache (so far)."""
        return self._out is not None and not self._failed

    def reopen(self) -> IO[bytes] | None:
        """This build's archive as written so far, opened for reading (the layout delta
        reads it beside the kept one before it replaces it); None if it is not being kept."""
        if self._out is None or self._failed:
            return None
        try:
            self._out.flush()
            # The temp file is open write-only; Linux reopens it by its descriptor.
            return open(f"/proc/self/fd/{self._out.fileno()}", "rb")
        except OSError as exc:
            self._failed = exc.strerror or str(exc)
            return None


class _Unread:
    """``kept_build``'s default: the kept index is read from disk."""


_UNREAD = _Unread()


class _NotKept(Exception):
    """The build did not finish (or its copy failed): drop the half-written archive."""


class AgentCache:
    """The cache directory; thread-safe only per path (the agent serialises each path)."""

    def __init__(
        self, root: str | os.PathLike[str], *, keep: int = 3, keep_archives: bool = True
    ) -> None:
        if keep < 1:
            raise UsageError("the agent cache must keep at least one entry per path")
        self.root = Path(root)
        self.keep = keep
        self.keep_archives = keep_archives
        self._sigs = self.root / "sigs"
        self._paths = self.root / "paths"
        self._builds = self.root / "builds"
        # Per path, the index of the kept build this one replaced: its seek file (still on
        # disk) gives the new one's at the cost of what changed (``make_seek``).
        self._prior: dict[str, ArchiveIndex] = {}
        # Per path, the hash of the archive this process kept and its file's stat right
        # after (``KeptBuild.hashed``): the next build skips re-hashing that very file.
        self._hashed: dict[str, tuple[bytes, os.stat_result]] = {}
        # Per path, a descriptor of the kept archive the last build replaced (and the
        # name it was moved aside to), held across the new one's rename: the last reference
        # to a ~30 MB file going inside ``os.replace`` freed its pages and blocks there (~19
        # ms on the stdlib pair), after the layout delta's last byte and before
        # ``backup-done``, the server waiting.  Let go by ``make_seek`` (after the answer)
        # or the next ``kept_build``.
        self._retired: dict[str, tuple[int, Path]] = {}
        try:
            self._sigs.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._paths.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._builds.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise UsageError(f"cannot create cache dir {self.root}: {exc.strerror}") from None
        if not keep_archives:
            # Turned off: what an earlier run kept is only disk space now.
            for f in self._builds.iterdir():
                f.unlink(missing_ok=True)
        else:
            # Temp files of builds cut short by a crash (this agent owns its cache dir).
            for f in self._builds.glob(".*.part"):
                f.unlink(missing_ok=True)

    # -- the last build per path ------------------------------------------------------------

    @contextlib.contextmanager
    def kept_build(
        self, path: str, index: ArchiveIndex | None | _Unread = _UNREAD
    ) -> Iterator[KeptBuild]:
        """The previous build of ``path`` and a sink for this one (see ``KeptBuild``).

        ``index``: the kept index as the caller already read it (``kept_index``, the path
        lock held since), so it is not parsed again.  This build's archive replaces the kept
        one only if the block ends normally after ``done``; an exception (a stopped build)
        or a failed write leaves the kept one."""
        if not self.keep_archives:
            yield KeptBuild(None, None)
            return
        self._release(path)
        tgz, idx = self._build_files(path)
        if isinstance(index, _Unread):
            index = self._read_index(idx)
        was = self._hashed.pop(path, None)  # the kept archive is about to be replaced
        kept = KeptBuild(
            index, tgz if index is not None else None,
            was[1] if was is not None and index is not None and was[0] == index.archive_hash else None,
        )
        entered = finished = False
        try:
            with atomic_write(tgz, durable=False, mode=0o600) as f:
                entered = True
                kept._out = f
                yield kept
                finished = True
                if kept._failed or kept._done is None:
                    raise _NotKept(kept._failed)
                # The kept archive moves aside (held open) before the new one is renamed in:
                # renamed over it, ext4 also started writing the new file back there
                # (``auto_da_alloc``), ~10 ms more.  A crash in between leaves no kept
                # archive (the next build is a full one; the ``.part`` goes at start-up).
                retired = tgz.with_name(f".{tgz.name}.retired.part")
                with contextlib.suppress(OSError):  # none kept yet: nothing to hold
                    fd = os.open(tgz, os.O_RDONLY | os.O_CLOEXEC)
                    self._retired[path] = (fd, retired)
                    os.replace(tgz, retired)
            write_bytes_atomic(idx, kept._done.encode(), durable=False, mode=0o600)
            with contextlib.suppress(OSError):
                self._hashed[path] = (kept._done.archive_hash, os.stat(tgz))
            if kept.index is not None:  # make_seek derives the new table from its one
                self._prior[path] = kept.index
        except _NotKept as exc:
            if str(exc):
                log.warning("cache: could not keep the archive of %s: %s", path, exc)
        except OSError as exc:
            if entered and not finished:
                raise  # the build's own error, not the cache's
            log.warning("cache: could not keep the archive of %s: %s", path, exc)
        if not entered:  # no temp file: build without keeping this one
            yield kept

    def kept_index(self, path: str) -> ArchiveIndex | None:
        """The index of the last build kept for ``path`` (None if none, or turned off)."""
        if not self.keep_archives:
            return None
        return self._read_index(self._build_files(path)[1])

    def settle_kept(self, path: str, settled: Callable[[ArchiveIndex], ArchiveIndex | None]) -> bool:
        """Replace the kept index of ``path`` by ``settled(index)`` (the same archive, its
        files racy when built and read again since recorded as reusable:
        ``IncrementalBuilder.settled``) when that gives one; whether it did.  Under the
        path's lock, after the backup's answer went.  Never raises for the cache's sake: a
        failed write leaves the kept index as it was (still right, only racier)."""
        index = self.kept_index(path)
        if index is None:
            return False
        new = settled(index)
        if new is None or new.archive_hash != index.archive_hash:
            return False
        try:
            write_bytes_atomic(self._build_files(path)[1], new.encode(), durable=False,
                               mode=0o600)
        except OSError as exc:
            log.debug("cache: kept index of %s not settled: %s", path, exc.strerror or exc)
            return False
        return True

    def kept_archive(self, path: str) -> Path | None:
        """The last archive kept for ``path`` (None if turned off); check it against
        ``kept_index`` before trusting it: a crash may leave an index naming another."""
        return self._build_files(path)[0] if self.keep_archives else None

    def drop_kept(self, path: str) -> None:
        """Forget the kept build of ``path`` (its index goes: the next build is a full one
        and the next delta a rolling one), e.g. after a layout delta failed midway."""
        self._hashed.pop(path, None)
        self._build_files(path)[1].unlink(missing_ok=True)
        self._seek_file(path).unlink(missing_ok=True)
        self._prior.pop(path, None)

    def kept_seek(self, path: str, index: ArchiveIndex) -> SeekPoints | None:
        """The seek points of the kept archive ``index`` describes; None if there are none
        for it (missing, another archive's, corrupt: a corrupt one is deleted)."""
        if not self.keep_archives:
            return None
        seek = self._read_seek(path)
        if seek is not None and not seek.matches(index.archive_hash, index.archive_size):
            log.debug("cache: seek file of %s is another archive's", path)
            return None
        return seek

    def _read_seek(self, path: str) -> SeekPoints | None:
        f = self._seek_file(path)
        try:
            # Mapped: the table's windows stay views of the file's pages (~1 % of the
            # archive, held through the encode), not a copy in the agent's memory.
            with open(f, "rb") as fh, mapped(fh) as buf:
                return SeekPoints.parse(buf)
        except OSError as exc:
            log.debug("cache: no seek points for %s (%s)", path, exc.strerror or exc)
            return None
        except DeltabkpError as exc:
            log.debug("cache: dropping unreadable seek file %s: %s", f, exc)
            f.unlink(missing_ok=True)
            return None

    def make_seek(self, path: str) -> bool:
        """Make the seek points of the kept build of ``path`` unless it has them; whether
        it has them now.  Derived from the seek file of the build it replaced where there
        is one (``SeekPoints.derive``: ~0.04 s on the stdlib pair after the ~1 % change),
        else one inflate of the kept archive (~0.4 s per 30 MB on one core): call it after
        the backup's answer went, under the path's lock.  Never raises for the cache's
        sake: a failure (full disk, a kept archive that changed under it) leaves no seek
        file and the kept build as it was."""
        try:
            return self._make_seek(path)
        finally:
            self._release(path)  # the replaced archive goes now, off the answer's path

    def _release(self, path: str) -> None:
        """Close the descriptor held on the kept archive a build of ``path`` replaced."""
        held = self._retired.pop(path, None)
        if held is not None:
            with contextlib.suppress(OSError):
                held[1].unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                os.close(held[0])  # the file's blocks and pages go here

    def _make_seek(self, path: str) -> bool:
        prior_index = self._prior.pop(path, None)
        index = self.kept_index(path)
        if index is None:
            return False
        prior = self._read_seek(path)
        if prior is not None and prior.matches(index.archive_hash, index.archive_size):
            return True
        tgz, f = self._build_files(path)[0], self._seek_file(path)
        try:
            with open(tgz, "rb") as fh, mapped(fh) as buf:
                seek = None
                if prior is not None and prior_index is not None and prior.matches(
                        prior_index.archive_hash, prior_index.archive_size):
                    try:
                        seek = SeekPoints.derive(prior, prior_index, buf, index)
                    except DeltabkpError as exc:
                        log.debug("cache: seek points of %s made anew: %s", path, exc)
                if seek is None:
                    # The index names the archive by blake3 (the builder checks it before
                    # reuse, and a wrong table is refused downstream): not recomputed.
                    seek = SeekPoints.build(buf, index.archive_hash, index=index)
            write_bytes_atomic(f, seek.encode(), durable=False, mode=0o600)
        except (OSError, DeltabkpError) as exc:
            log.debug("cache: no seek points for %s: %s", path, exc)
            f.unlink(missing_ok=True)
            return False
        return True

    def _read_index(self, idx: Path) -> ArchiveIndex | None:
        if (data := _read_quietly(idx)) is None:
            return None
        try:
            return ArchiveIndex.parse(data)
        except FormatError as exc:
            log.warning("cache: dropping unreadable archive index %s: %s", idx, exc)
            idx.unlink(missing_ok=True)
            return None

    def _seek_file(self, path: str) -> Path:
        return self._builds / f"{self._path_file(path).stem}.sk"

    def _build_files(self, path: str) -> tuple[Path, Path]:
        stem = self._builds / self._path_file(path).stem
        return stem.with_suffix(".tgz"), stem.with_suffix(".idx")

    # -- reading -----------------------------------------------------------------------------

    def entries(self, path: str) -> list[CacheEntry]:
        try:
            with open(self._path_file(path), "rb") as f:
                obj = json.loads(f.read())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.warning("cache: ignoring unreadable entry file for %s: %s", path, exc)
            return []
        try:
            if obj.get("version") != CACHE_VERSION or obj.get("path") != path:
                return []
            return [CacheEntry.from_json(e) for e in obj.get("entries", [])]
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            log.warning("cache: ignoring malformed entry file for %s: %s", path, exc)
            return []

    def fingerprint(self, path: str, archive_hash: bytes, exclude: tuple[str, ...]) -> bytes | None:
        """The (non-racy) fingerprint recorded when ``archive_hash`` was built from ``path``."""
        for e in self.entries(path):
            if e.hash == archive_hash and e.exclude == exclude:
                return e.fingerprint
        return None

    def signature(self, archive_hash: bytes) -> bytes | None:
        """The cached signature of the archive ``archive_hash``, verified, or None."""
        p = self._sig_file(archive_hash)
        if (data := _read_quietly(p)) is None:
            return None
        try:
            sig = Signature.parse(data)
        except FormatError as exc:
            log.warning("cache: dropping corrupt signature %s: %s", p, exc)
            p.unlink(missing_ok=True)
            return None
        if sig.base_hash != archive_hash:
            log.warning("cache: dropping %s: it is the signature of another archive", p)
            p.unlink(missing_ok=True)
            return None
        return data

    # -- writing -----------------------------------------------------------------------------

    def keep_signature(self, archive_hash: bytes, signature: bytes) -> None:
        """File ``signature`` under ``archive_hash`` (an archive some path's entries name:
        a signature no entry refers to is deleted with the next change of entries)."""
        self._write_atomic(self._sig_file(archive_hash), signature)

    def record(
        self,
        path: str,
        archive_hash: bytes,
        *,
        fingerprint: bytes | None,
        exclude: tuple[str, ...],
        signature: bytes | None,
    ) -> None:
        """Remember ``archive_hash`` as the newest archive of ``path``.

        ``signature`` (if given) is filed under the hash; ``fingerprint`` None records the
        archive without a usable quick check (a racy tree, or a signature received from the
        server).  An existing entry for the same hash keeps its fingerprint unless a new one
        is given.
        """
        if signature is not None:
            self._write_atomic(self._sig_file(archive_hash), signature)
        old = self.entries(path)
        previous = next((e for e in old if e.hash == archive_hash and e.exclude == exclude), None)
        if fingerprint is None and previous is not None:
            fingerprint = previous.fingerprint
        entry = CacheEntry(archive_hash, fingerprint, exclude, time.time())
        rest = [e for e in old if not (e.hash == archive_hash and e.exclude == exclude)]
        entries = [entry, *rest][: self.keep]
        doc = {"version": CACHE_VERSION, "path": path, "entries": [e.to_json() for e in entries]}
        self._write_atomic(self._path_file(path), json.dumps(doc, indent=1).encode())
        dropped = {e.hash for e in old} - {e.hash for e in entries}
        if dropped:
            self._collect(dropped)

    def _collect(self, candidates: set[bytes]) -> None:
        """Delete the signatures of ``candidates`` that no path refers to any more."""
        in_use: set[bytes] = set()
        for f in self._paths.glob("*.json"):
            try:
                obj = json.loads(f.read_bytes())
                in_use.update(bytes.fromhex(e["hash"]) for e in obj.get("entries", []))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
        for h in candidates - in_use:
            self._sig_file(h).unlink(missing_ok=True)

    def _write_atomic(self, target: Path, data: bytes) -> None:
        write_bytes_atomic(target, data, mode=0o600)

    def _sig_file(self, archive_hash: bytes) -> Path:
        return self._sigs / f"{archive_hash.hex()}.sig"

    def _path_file(self, path: str) -> Path:
        return self._paths / f"{blake3.blake3(path.encode('utf-8', 'surrogateescape')).hexdigest()[:32]}.json"


def _read_quietly(p: Path) -> bytes | None:
    """A cache file's bytes; None when it is missing or unreadable (the cache only saves work)."""
    try:
        return p.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cache: cannot read %s: %s", p, exc)
        return None
