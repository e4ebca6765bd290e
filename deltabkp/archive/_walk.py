"""Walking a live directory tree in archive order, with exclude patterns; the tree fingerprint.

Invariants:
- the order is a pure function of the names: depth first, each directory's entries sorted by
  their raw bytes (like ``tar --sort=name``), a directory before its contents;
- the walk never follows a symlink and never opens anything but directories;
- an entry that vanishes or cannot be listed is reported through ``on_skip``, never raised;
- ``tree_fingerprint`` reads metadata only (``lstat`` of every entry), never file contents.
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat
import struct
import time
from collections.abc import Callable, Iterator, Sequence

import attrs
import blake3

from deltabkp.errors import ArchiveError, FormatError, UnsupportedVersion

__all__ = [
    "Excluder",
    "FINGERPRINT_MAGIC",
    "Fingerprint",
    "RACY_NS",
    "check_root",
    "tree_fingerprint",
    "walk",
]

OnSkip = Callable[[str, str], None]
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


class Excluder:
    """fnmatch patterns matched against the relative path and against the basename.

    A pattern ending in ``/`` matches directories only; excluding a directory excludes
    everything under it.  Matching is case-sensitive (``fnmatchcase``).
    """

    def __init__(self, patterns: Sequence[str]) -> None:
        if isinstance(patterns, (str, bytes)):
            raise ArchiveError(f"exclude must be a sequence of patterns, not the string {patterns!r}")
        self.patterns = tuple(str(p) for p in patterns)
        any_re: list[str] = []
        dir_re: list[str] = []
        for p in self.patterns:
            body = p[2:] if p.startswith("./") else p
            target = dir_re if body.endswith("/") else any_re
            body = body.rstrip("/")
            if body:
                target.append(fnmatch.translate(body))
        self._any = re.compile("|".join(any_re)) if any_re else None
        self._dir = re.compile("|".join(dir_re)) if dir_re else None

    def __bool__(self) -> bool:
        return self._any is not None or self._dir is not None

    def excluded(self, rel: str, name: str, is_dir: bool) -> bool:
        for rx in (self._any, self._dir if is_dir else None):
            if rx is not None and (rx.match(rel) or rx.match(name)):
                return True
        return False


def check_root(root: str | os.PathLike[str]) -> bytes:
    """The root as bytes, after checking it is a directory (a symlink to one is followed)."""
    path = os.fsencode(root)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ArchiveError(f"{os.fsdecode(path)}: no such directory") from None
    except OSError as exc:
        raise ArchiveError(f"{os.fsdecode(path)}: cannot read: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ArchiveError(f"{os.fsdecode(path)}: not a directory")
    return path


def _listdir(path: bytes) -> list[os.DirEntry[bytes]]:
    with os.scandir(path) as it:
        return sorted(it, key=lambda e: e.name)


def walk(
    root: bytes, excluder: Excluder, on_skip: OnSkip
) -> Iterator[tuple[str, bytes, os.stat_result]]:
    """Yield ``(relative path, absolute path, lstat)`` for every entry under ``root``."""
    try:
        top = _listdir(root)
    except OSError as exc:
        raise ArchiveError(f"{os.fsdecode(root)}: cannot list: {exc.strerror}") from None
    stack: list[tuple[str, Iterator[os.DirEntry[bytes]]]] = [("", iter(top))]
    while stack:
        prefix, it = stack[-1]
        entry = next(it, None)
        if entry is None:
            stack.pop()
            continue
        name = os.fsdecode(entry.name)
        rel = prefix + name
        if excluder:
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            if excluder.excluded(rel, name, is_dir):
                continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            on_skip(rel, "vanished before it was read")
            continue
        except OSError as exc:
            on_skip(rel, f"cannot stat: {exc.strerror}")
            continue
        yield rel, entry.path, st
        if stat.S_ISDIR(st.st_mode):
            try:
                children = _listdir(entry.path)
            except (FileNotFoundError, NotADirectoryError):
                on_skip(rel + "/", "directory vanished before it was listed")
                continue
            except OSError as exc:
                on_skip(rel + "/", f"cannot list directory: {exc.strerror}")
                continue
            stack.append((rel + "/", iter(children)))


# -- the quick "unchanged?" check -------------------------------------------------------------

#: Encoded fingerprint: magic, version byte, flags byte (bit 0: racy), 32-byte digest.
FINGERPRINT_MAGIC = b"DBKPFP"
_FP_VERSION = 1
_FP_RECORD = struct.Struct("<IIIIqqqQQ")
#: The record of an entry listed but not stat-able (mode 0 is no real entry's).
_UNREADABLE = bytes(_FP_RECORD.size)
#: An entry whose mtime or ctime is this close to (or after) the start of the scan cannot be
#: trusted: a later write in the same timestamp tick would leave its metadata unchanged (git's
#: racy-clean rule).  Generous, to cover coarse clocks and file systems (FAT: 2 s).
RACY_NS = 2_000_000_000


@attrs.frozen
class Fingerprint:
    """A digest of a tree's metadata; equal digests mean an identical archive would result.

    ``racy`` is True when some entry changed too recently to trust: such a fingerprint must
    not be used to claim "unchanged".
    """

    digest: bytes
    racy: bool

    def encode(self) -> bytes:
        return FINGERPRINT_MAGIC + bytes((_FP_VERSION, int(self.racy))) + self.digest

    @classmethod
    def parse(cls, data: bytes) -> Fingerprint:
        data = bytes(data)
        n = len(FINGERPRINT_MAGIC)
        if data[:n] != FINGERPRINT_MAGIC:
            raise FormatError("not a deltabkp fingerprint (bad magic)")
        if len(data) < n + 1:
            raise FormatError("fingerprint truncated before its version")
        if data[n] != _FP_VERSION:
            raise UnsupportedVersion(f"fingerprint version {data[n]} is not supported (only {_FP_VERSION})")
        if len(data) != n + 2 + 32:
            raise FormatError(f"fingerprint v1 is {n + 34} bytes, got {len(data)}")
        flags = data[n + 1]
        if flags & ~1:
            raise FormatError(f"fingerprint has unknown flags {flags:#x}")
        return cls(digest=data[n + 2 :], racy=bool(flags & 1))


def tree_fingerprint(
    root: str | os.PathLike[str], *, exclude: Sequence[str] = ()
) -> Fingerprint:
    """Fingerprint ``root`` from metadata alone (``lstat`` of each entry; no file is opened).

    Covered per entry: relative path, type and mode, uid, gid, size, mtime and ctime in ns,
    inode and link count; plus the exclude patterns.  Whatever would change the archive
    changes one of these (a content write changes mtime and ctime).
    """
    top = check_root(root)
    excluder = Excluder(exclude)
    h = blake3.blake3()
    h.update(FINGERPRINT_MAGIC + bytes((_FP_VERSION,)))
    for p in excluder.patterns:
        h.update(b"X" + os.fsencode(p) + b"\0")
    start = time.time_ns()
    newest = 0
    pack = _FP_RECORD.pack
    # Not the archive's order (any fixed order will do): one directory at a time, sorted,
    # its subdirectories afterwards.  A tight loop: this is the agent's hot path.
    todo: list[tuple[bytes, bytes]] = [(b"", top)]
    while todo:
        prefix, path = todo.pop()
        try:
            # Listing through a directory fd makes each lstat a one-component lookup
            # (fstatat), ~12% faster than stat by full path on deep trees.
            fd = os.open(path, _O_DIR)
        except OSError:
            if path == top:
                raise ArchiveError(f"{os.fsdecode(top)}: cannot list") from None
            h.update(b"S%s\0" % prefix)
            continue
        try:
            with os.scandir(fd) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            os.close(fd)
            h.update(b"S%s\0" % prefix)
            continue
        names: list[str] = []
        records: list[bytes] = []
        for e in entries:
            name = e.name  # str: scandir of an fd names in str (surrogateescape)
            if excluder:
                try:
                    is_dir = e.is_dir(follow_symlinks=False)
                except OSError:
                    is_dir = False
                if excluder.excluded(os.fsdecode(prefix) + name, name, is_dir):
                    continue
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                names.append(name)
                records.append(_UNREADABLE)
                continue
            m, c = st.st_mtime_ns, st.st_ctime_ns
            names.append(name)
            records.append(pack(
                st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_size, m, c, st.st_ino, 0
            ))
            if m > newest:
                newest = m
            if c > newest:
                newest = c
            if stat.S_ISDIR(st.st_mode):
                raw = os.fsencode(name)
                todo.append((prefix + raw + b"/", path + b"/" + raw))
        os.close(fd)
        h.update(
            b"D%s\0%d\0%s\0%s" % (
                prefix, len(names), "\0".join(names).encode("utf-8", "surrogateescape"),
                b"".join(records),
            )
        )
    return Fingerprint(digest=h.digest(), racy=newest >= start - RACY_NS)
