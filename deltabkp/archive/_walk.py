"""Walking a live directory tree in archive order, with exclude patterns; the tree fingerprint.

Invariants:
- the order is a pure function of the names: depth first, each directory's entries sorted by
  their raw bytes (like ``tar --sort=name``), a directory before its contents;
- the walk never follows a symlink and never opens anything but directories; it reaches
  every entry relative to its parent's fd, never by a full path, and checks each directory
  it opens is the one it listed: a directory swapped for a symlink mid-walk cannot lead it
  out of the tree (reported instead); open fds: one per level of the current path;
- an entry that vanishes or cannot be listed is reported through ``on_skip``, never raised;
- ``tree_fingerprint`` reads metadata only (``lstat`` of every entry), never file contents.
"""

from __future__ import annotations

import errno
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
    "ARCHIVE_VERSION",
    "FINGERPRINT_MAGIC",
    "RACY_NS",
    "Excluder",
    "Fingerprint",
    "open_dir",
    "open_root",
    "tree_fingerprint",
    "walk",
]

#: The archive format version (docs/formats.md "Archive"): 2 added PAX nanosecond mtimes and
#: FIFO entries; 3 tuned the deflate (``_gzip.TUNE``: other compressed bytes, the same tar).  Here rather than in ``_build`` because the fingerprint folds it in: equal
#: fingerprints must mean an identical archive, so an agent upgraded across a format change
#: rebuilds once instead of answering "unchanged" with an archive of the old format.
ARCHIVE_VERSION = 3

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


def _open_no_links(path: bytes) -> int:
    """Open an absolute path one component at a time, none of them followed if a symlink.

    For a path that was already resolved and checked (the agent's ``realpath`` under an
    allowed root): a component swapped for a symlink since then fails the open instead of
    leading the build out of the checked tree.
    """
    if not path.startswith(b"/"):
        raise ArchiveError(f"{os.fsdecode(path)}: must be an absolute, resolved path")
    fd = os.open(b"/", _O_DIR)
    try:
        for part in (p for p in path.split(b"/") if p):
            nxt = os.open(part, _O_DIR, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_root(root: str | os.PathLike[str], *, no_links: bool = False) -> tuple[bytes, int]:
    """The root as bytes and an open fd of it (close it), after checking it is a directory.

    The root itself must not be a symlink (pass its real path: the agent resolves and checks
    it); symlinks in the components above it are followed, as by any path lookup, unless
    ``no_links`` (then no component may be a symlink).
    """
    path = os.fsencode(root)
    try:
        fd = _open_no_links(path) if no_links else os.open(path, _O_DIR)
    except FileNotFoundError:
        raise ArchiveError(f"{os.fsdecode(path)}: no such directory") from None
    except OSError as exc:
        if no_links and exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise ArchiveError(
                f"{os.fsdecode(path)}: a component of the path is a symlink or not a "
                "directory (changed since it was checked?); not followed"
            ) from None
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            try:
                link = stat.S_ISLNK(os.lstat(path).st_mode)
            except OSError:
                link = False
            if link:
                raise ArchiveError(
                    f"{os.fsdecode(path)}: is a symlink (not followed: pass its real path)"
                ) from None
            if exc.errno == errno.ENOTDIR:
                raise ArchiveError(f"{os.fsdecode(path)}: not a directory") from None
        raise ArchiveError(f"{os.fsdecode(path)}: cannot read: {exc.strerror}") from None
    return path, fd


def open_dir(parent: int, name: str, seen: os.stat_result) -> int | str:
    """An fd of directory ``name`` in directory fd ``parent``, or why not (a short phrase).

    Opened without following a symlink, then checked to be the very directory ``seen`` by
    the listing (``lstat``): one swapped in since (for a symlink, a file, another
    directory) is refused, so the walk never leaves the tree it started in.
    """
    try:
        fd = os.open(name, _O_DIR, dir_fd=parent)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            return "replaced while read (by a symlink or a non-directory); not followed"
        raise
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISDIR(st.st_mode) or (st.st_dev, st.st_ino) != (seen.st_dev, seen.st_ino):
        os.close(fd)
        return "replaced while read (by another directory); not followed"
    return fd


def _listdir(fd: int) -> list[os.DirEntry[str]]:
    # scandir of an fd names in str (surrogateescape); sort by the raw bytes like tar.
    with os.scandir(fd) as it:
        return sorted(it, key=_raw_name)


def _raw_name(e: os.DirEntry[str]) -> bytes:
    return e.name.encode("utf-8", "surrogateescape")


def walk(
    root: bytes, root_fd: int, excluder: Excluder, on_skip: OnSkip
) -> Iterator[tuple[str, int, str, os.stat_result]]:
    """Yield ``(relative path, parent directory fd, name, lstat)`` for every entry under the
    directory ``root_fd`` (``open_root(root)``; ``root`` names it in messages).

    Everything is reached through directory fds (``*at`` calls), never by a full path, so a
    directory swapped for a symlink while the walk runs cannot lead it outside the tree.
    The parent fd is valid until the next step of the iteration; one fd is open per level
    of the current path (closed as soon as that directory is done, or when the iteration
    is closed).
    """
    try:
        top = _listdir(root_fd)
    except OSError as exc:
        raise ArchiveError(f"{os.fsdecode(root)}: cannot list: {exc.strerror}") from None
    stack: list[tuple[str, int, Iterator[os.DirEntry[str]]]] = [("", root_fd, iter(top))]
    excluding = bool(excluder)  # once: a method call per entry otherwise
    is_dir_mode = stat.S_ISDIR
    try:
        while stack:
            prefix, dfd, it = stack[-1]
            entry = next(it, None)
            if entry is None:
                stack.pop()
                if dfd != root_fd:
                    os.close(dfd)
                continue
            name = entry.name
            rel = prefix + name
            if excluding:
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
            if not is_dir_mode(st.st_mode):
                yield rel, dfd, name, st
                continue
            try:
                sub = open_dir(dfd, name, st)
            except FileNotFoundError:
                yield rel, dfd, name, st
                on_skip(rel + "/", "directory vanished before it was listed")
                continue
            except OSError as exc:
                yield rel, dfd, name, st
                on_skip(rel + "/", f"cannot list directory: {exc.strerror}")
                continue
            if isinstance(sub, str):
                on_skip(rel, sub)
                continue
            # On the stack before anything else can fail or stop: closed in every case.
            stack.append((rel + "/", sub, iter(())))
            try:
                children = _listdir(sub)
            except OSError as exc:
                yield rel, dfd, name, st
                on_skip(rel + "/", f"cannot list directory: {exc.strerror}")
                continue
            stack[-1] = (rel + "/", sub, iter(children))
            yield rel, dfd, name, st
    finally:
        for _prefix, dfd, _it in stack:
            if dfd != root_fd:
                os.close(dfd)


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
    root: str | os.PathLike[str], *, exclude: Sequence[str] = (), no_links: bool = False
) -> Fingerprint:
    """Fingerprint ``root`` from metadata alone (``lstat`` of each entry; no file is opened).

    Covered per entry: relative path, type and mode, uid, gid, size, mtime and ctime in ns,
    inode and link count; plus the exclude patterns.  Whatever would change the archive
    changes one of these (a content write changes mtime and ctime).
    """
    top, top_fd = open_root(root, no_links=no_links)
    excluder = Excluder(exclude)
    h = blake3.blake3()
    h.update(FINGERPRINT_MAGIC + bytes((_FP_VERSION,)))
    h.update(b"A%d\0" % ARCHIVE_VERSION)
    for p in excluder.patterns:
        h.update(b"X" + os.fsencode(p) + b"\0")
    start = time.time_ns()
    newest = 0
    pack = _FP_RECORD.pack
    # Not the archive's order (any fixed order will do): each directory's own records, then
    # its subdirectories, last name first.  Each is opened relative to its parent's fd (like
    # the walk: nothing swapped in mid-scan is followed), so the parent's fd stays open until
    # its subdirectories are done: one fd per level.  A tight loop: the agent's hot path.
    # Listing through a directory fd also makes each lstat a one-component lookup (fstatat),
    # ~12% faster than stat by full path on deep trees.
    todo: list[tuple[bytes, int, Iterator[tuple[str, os.stat_result]]]] = []
    try:
        todo.append((b"", top_fd, iter(())))  # owns the fd from here on
        subdirs, newest = _fingerprint_dir(h, b"", top_fd, excluder, pack, newest, top)
        todo[-1] = (b"", top_fd, reversed(subdirs))
        while todo:
            prefix, parent, it = todo[-1]
            nxt = next(it, None)
            if nxt is None:
                todo.pop()
                os.close(parent)
                continue
            name, seen = nxt
            prefix += os.fsencode(name) + b"/"
            try:
                sub = open_dir(parent, name, seen)
            except OSError:
                sub = "unreadable"
            if isinstance(sub, str):
                h.update(b"S%s\0" % prefix)
                continue
            todo.append((prefix, sub, iter(())))
            subdirs, newest = _fingerprint_dir(h, prefix, sub, excluder, pack, newest, top)
            todo[-1] = (prefix, sub, reversed(subdirs))
    finally:
        for _prefix, dfd, _it in todo:
            os.close(dfd)
    return Fingerprint(digest=h.digest(), racy=newest >= start - RACY_NS)


def _fingerprint_dir(
    h: blake3.blake3, prefix: bytes, fd: int, excluder: Excluder,
    pack: Callable[..., bytes], newest: int, top: bytes,
) -> tuple[list[tuple[str, os.stat_result]], int]:
    """Hash one directory's records; return its subdirectories (sorted) and the newest time."""
    try:
        with os.scandir(fd) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        if not prefix:
            raise ArchiveError(f"{os.fsdecode(top)}: cannot list") from None
        h.update(b"S%s\0" % prefix)
        return [], newest
    names: list[str] = []
    records: list[bytes] = []
    subdirs: list[tuple[str, os.stat_result]] = []
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
            subdirs.append((name, st))
    h.update(
        b"D%s\0%d\0%s\0%s" % (
            prefix, len(names), "\0".join(names).encode("utf-8", "surrogateescape"),
            b"".join(records),
        )
    )
    return subdirs, newest
