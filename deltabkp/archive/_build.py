"""The streaming, deterministic, rsyncable, hot-safe tgz writer over a live directory tree.

Invariants:
- same tree content and metadata => byte-identical output (sorted walk, GNU tar headers with
  numeric owners and empty owner names, mtimes in whole seconds plus a PAX ``mtime`` record
  with the nanoseconds when they are not zero, fixed gzip header, cut points and compression
  depending on the stream alone: docs/formats.md "Archive", version ``ARCHIVE_VERSION``);
- every tar header's size equals the data bytes that follow it, whatever the application
  does to the file meanwhile: a file is read completely (into memory up to ``mem_limit``,
  else into an unlinked spool file up to ``spool_limit``; re-read on change, a bounded
  number of times) before its header is written; past ``spool_limit`` it is streamed as
  exactly the size announced (cut or zero padded).  Every inconsistency lands in the report;
- memory is bounded whatever the tree: one file up to ``mem_limit``, plus a few compression
  jobs of ~``JOB_SIZE`` bytes in flight;
- no lock is ever taken on an application file; FIFOs, sockets and devices are never opened
  (a FIFO is stored as a metadata-only entry from its ``lstat``; sockets and devices are
  skipped and reported);
- nothing outside the tree is ever read: entries are opened relative to their directory's fd
  (``_walk.walk``) without following a symlink, so one swapped in mid-build is reported,
  never followed.

Two cores: the iterating thread walks, reads, writes tar headers and finds cut points;
worker threads deflate (``_gzip.RsyncableGzip``).

A long module on purpose: the hot-read loop, the spool and the tar header writer share one
file's state and its invariants (one consistent read or a reported change), which reads best
in one place.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import stat
import struct
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import BinaryIO, TypeVar

import attrs
import blake3

from deltabkp.archive._gzip import RsyncableGzip
from deltabkp.archive._walk import ARCHIVE_VERSION, Excluder, open_root, walk
from deltabkp.errors import ArchiveError

__all__ = ["ARCHIVE_VERSION", "ArchiveReport", "FileIssue", "TgzBuilder", "build_archive"]

#: Files up to this size are read whole into memory (and re-read on change); bigger ones
#: are streamed in ``_READ`` pieces with the size fixed by the header.
MEM_LIMIT = 8 * 1024 * 1024
_READ = 1024 * 1024
#: Files past ``mem_limit`` and up to this size are copied to an unlinked temporary file
#: (``spool_dir``) so that they too can be re-read before anything is emitted; bigger ones
#: are streamed with the size fixed by the header (truncated or zero padded, reported).
SPOOL_LIMIT = 4 * 1024**3
#: Reads of one file before giving up on a consistent copy.
RETRIES = 3
#: A file modified this recently may have been written within the same timestamp tick as
#: our read, unseen by stat; it must read the same twice in a row to count as consistent.
#: A whole second, not a tick: a writer descheduled inside one large ``write()`` has set
#: mtime at its start and leaves size and mtime still while it waits (seen under load ~10).
HOT_NS = 1_000_000_000
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_SPECIAL = {
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
}


@attrs.frozen
class FileIssue:
    """Something that happened to one entry: ``path`` relative to the root, ``what`` in words."""

    path: str
    what: str


@attrs.frozen
class ArchiveReport:
    """What a build did.

    ``files`` counts regular files stored with data (hard links to them are in
    ``hardlinks``); ``bytes_in`` is the uncompressed tar stream, ``bytes_out`` the tgz;
    ``content_bytes`` the file data in it.  ``changed`` lists files whose stored copy may
    not be a consistent snapshot (they kept changing while read); ``skipped`` entries that
    are not in the archive at all (sockets, devices, vanished, unreadable).  ``fifos``
    counts FIFOs stored (as entries without data).
    """

    files: int
    dirs: int
    symlinks: int
    hardlinks: int
    bytes_in: int
    bytes_out: int
    content_bytes: int
    changed: tuple[FileIssue, ...]
    skipped: tuple[FileIssue, ...]
    fifos: int = 0


@attrs.define
class _Counts:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    fifos: int = 0
    content: int = 0
    changed: list[FileIssue] = attrs.Factory(list)
    skipped: list[FileIssue] = attrs.Factory(list)
    #: The stat whose fields the last regular file's header was written from (the
    #: incremental build records it as that entry's identity).
    stored: os.stat_result | None = None

    def skip(self, rel: str, what: str) -> None:
        self.skipped.append(FileIssue(rel, what))

    def report(self, bytes_in: int, bytes_out: int) -> ArchiveReport:
        return ArchiveReport(
            files=self.files,
            dirs=self.dirs,
            symlinks=self.symlinks,
            hardlinks=self.hardlinks,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            content_bytes=self.content,
            changed=tuple(self.changed),
            skipped=tuple(self.skipped),
            fifos=self.fifos,
        )


# GNU header layout after the name field: mode, uid, gid, size, mtime, chksum placeholder,
# type, linkname, magic+version, uname, gname, devmajor, devminor (empty: no devices here),
# 167 bytes of zeros.
_HEAD = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s167x")


def _octal(n: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, n)


def _byte_sum(buf: bytes) -> int:
    """``sum(buf)`` of a 512-byte header, ~7x faster: adler32's low half is 1 + the byte
    sum mod 65521, exact for 256 bytes (at most 65,280)."""
    return (_adler32(buf[:256]) & 0xFFFF) + (_adler32(buf[256:]) & 0xFFFF) - 2


def _header(
    name: str, st: os.stat_result, type_: bytes, size: int = 0, linkname: str = ""
) -> bytes:
    """One GNU tar header (with a GNU longname/longlink entry before it when needed), after
    a PAX extended header carrying the exact mtime when it has a fraction of a second.

    The common case is packed here directly (~8x faster than ``tarfile``, which matters for
    trees of small files); anything unusual goes through ``tarfile`` itself.  Both give the
    same bytes (tests/test_archive.py checks it).
    """
    mode = st.st_mode & 0o7777  # stat.S_IMODE, without the call
    mtime, frac = divmod(st.st_mtime_ns, 1_000_000_000)
    pax = _pax_mtime(st.st_mtime_ns) if frac else b""
    uid, gid = st.st_uid, st.st_gid
    if type_ == tarfile.DIRTYPE and not name.endswith("/"):
        name += "/"
    raw = name.encode("utf-8", "surrogateescape")
    link = linkname.encode("utf-8", "surrogateescape") if linkname else b""
    if (
        len(raw) <= 100 and len(link) <= 100 and uid < 8**7 and gid < 8**7
        and size < 8**11 and 0 <= mtime < 8**11
    ):
        buf = _HEAD.pack(
            raw, b"%07o\0" % mode, b"%07o\0" % uid, b"%07o\0" % gid, b"%011o\0" % size,
            b"%011o\0" % mtime, b"        ", type_, link, tarfile.GNU_MAGIC, b"", b"", b"", b"",
        )
        return b"%s%s%06o\0%s" % (pax, buf[:148], _byte_sum(buf), buf[155:])
    return pax + _slow_header(name, mode, mtime, uid, gid, type_, size, linkname)


def _pax_mtime(ns: int) -> bytes:
    """A PAX extended header (type ``x``) whose one record is ``mtime`` to the nanosecond.

    Exactly what ``tarfile`` writes for the same record (tests/test_archive.py checks it):
    name ``././@PaxHeader``, ustar magic, every other field zero.  The value is written like
    GNU tar does: seconds, a dot, the fraction without trailing zeros (``-`` first for a time
    before 1970); the plain header keeps the floor in whole seconds for readers that ignore
    PAX records.
    """
    sec, frac = divmod(abs(ns), 1_000_000_000)
    value = b"%s%d.%s" % (b"-" if ns < 0 else b"", sec, (b"%09d" % frac).rstrip(b"0"))
    body = b" mtime=" + value + b"\n"
    # The record's length counts its own decimal digits.
    n = len(body) + 1
    while len(body) + len(str(n)) != n:
        n = len(body) + len(str(n))
    record = b"%d%s" % (n, body)
    # The header block depends on the record's length alone (a few distinct ones): kept.
    head = _PAX_HEADS.get(n)
    if head is None:
        buf = _HEAD.pack(
            b"././@PaxHeader", _octal(0, 8), _octal(0, 8), _octal(0, 8), _octal(n, 12),
            _octal(0, 12), b"        ", tarfile.XHDTYPE, b"", tarfile.POSIX_MAGIC, b"", b"", b"",
            b"",
        )
        head = _PAX_HEADS[n] = b"%s%06o\0%s" % (buf[:148], _byte_sum(buf), buf[155:])
    return head + record + _pad(n)


_PAX_HEADS: dict[int, bytes] = {}
_adler32 = zlib.adler32


def _slow_header(
    name: str, mode: int, mtime: int, uid: int, gid: int, type_: bytes, size: int, linkname: str
) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.size = size
    ti.mode = mode
    ti.mtime = mtime
    ti.uid = uid
    ti.gid = gid
    ti.uname = ti.gname = ""
    ti.linkname = linkname
    return ti.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


def _pad(n: int) -> bytes:
    return b"\0" * (-n % _BLOCK)


def _end_of_archive(total: int) -> bytes:
    """What follows the last entry of a tar stream of ``total`` bytes: like GNU tar, two
    zero blocks, then zeros up to a whole 10 KiB record."""
    end = 2 * _BLOCK
    return b"\0" * (end + (-(total + end) % _RECORD))


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (
        a.st_size == b.st_size
        and a.st_mtime_ns == b.st_mtime_ns
        and a.st_ctime_ns == b.st_ctime_ns
        and a.st_ino == b.st_ino
    )


def _describe(before: os.stat_result, after: os.stat_result, got: int) -> str:
    if after.st_size > before.st_size or got > before.st_size:
        return "grew while read"
    if after.st_size < before.st_size or got < before.st_size:
        return "shrank while read"
    return "modified while read"


_T = TypeVar("_T")


def _once_built(value: _T | None, what: str) -> _T:
    """``value``, set when a build's iteration ended; before that an ``ArchiveError``."""
    if value is None:
        raise ArchiveError(f"{what} only once the archive was iterated to its end")
    return value


class TgzBuilder:
    """Iterate to get the tgz of ``root`` as ``bytes`` chunks; then read ``report``.

    ``exclude``: fnmatch patterns, matched case-sensitively against each relative path and
    basename (a trailing ``/`` matches directories only, and everything under them is
    excluded too).  ``level``: deflate level (part of the
    output: keep the default for reproducible bytes).  ``threads``: compression worker
    threads (0 compresses in the iterating thread; the bytes are the same).  ``retries``:
    reads of a file before its last read is stored as "changed while read".  ``mem_limit``
    / ``spool_limit`` / ``spool_dir``: files up to ``mem_limit`` are read into memory, up
    to ``spool_limit`` into an unlinked temporary file in ``spool_dir`` (default: the
    system's), bigger ones streamed without re-reading.  May be iterated once, from any one
    thread.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        exclude: Sequence[str] = (),
        level: int = 6,
        threads: int = 2,
        retries: int = RETRIES,
        mem_limit: int = MEM_LIMIT,
        spool_limit: int = SPOOL_LIMIT,
        spool_dir: str | None = None,
        no_links: bool = False,
    ) -> None:
        self.root = root
        #: Refuse a root path with any symlinked component (see ``open_root``).
        self.no_links = no_links
        self.exclude = Excluder(exclude)
        if not 1 <= level <= 9:
            raise ArchiveError(f"deflate level must be 1..9, not {level}")
        self.level = level
        self.threads = max(0, threads)
        self.retries = max(1, retries)
        self.mem_limit = max(_READ, mem_limit)
        self.spool_limit = spool_limit
        self.spool_dir = spool_dir
        self._started = False
        self._report: ArchiveReport | None = None

    @property
    def report(self) -> ArchiveReport:
        """What the build did; an ``ArchiveError`` until the iteration has ended."""
        return _once_built(self._report, "the archive report exists")

    def __iter__(self) -> Generator[bytes, None, None]:  # closable: stops its threads
        if self._started:
            raise ArchiveError("a TgzBuilder can be iterated only once")
        self._started = True
        return self._generate()

    # -- compression pipeline -----------------------------------------------------------------

    def _generate(self) -> Generator[bytes, None, None]:
        top, top_fd = open_root(self.root, no_links=self.no_links)
        try:
            counts = _Counts()
            stream = RsyncableGzip(self.level, self.threads)
            yield from stream.compress(self._tar(top, top_fd, counts))
        finally:
            os.close(top_fd)
        self._report = counts.report(stream.bytes_in, stream.bytes_out)

    # -- the tar stream -------------------------------------------------------------------------

    def _tar(self, top: bytes, top_fd: int, counts: _Counts) -> Iterator[bytes]:
        links: dict[tuple[int, int], str] = {}
        total = 0
        for rel, dir_fd, name, st in walk(top, top_fd, self.exclude, counts.skip):
            for piece in self._entry(rel, dir_fd, name, st, counts, links):
                total += len(piece)
                yield piece
        yield _end_of_archive(total)

    def _entry(
        self, rel: str, dir_fd: int, name: str, st: os.stat_result, counts: _Counts,
        links: dict[tuple[int, int], str],
    ) -> Iterator[bytes]:
        """The tar bytes of one walked entry (nothing if it is skipped, then reported)."""
        skip = counts.skip
        kind = stat.S_IFMT(st.st_mode)
        if kind == stat.S_IFDIR:
            counts.dirs += 1
            yield _header(rel + "/", st, tarfile.DIRTYPE)
        elif kind == stat.S_IFLNK:
            try:
                target = os.readlink(name, dir_fd=dir_fd)
            except FileNotFoundError:
                skip(rel, "vanished before it was read")
                return
            except OSError as exc:
                if exc.errno == errno.EINVAL:  # no longer a symlink
                    skip(rel, "replaced while read (no longer a symlink)")
                else:
                    skip(rel, f"cannot read symlink: {exc.strerror}")
                return
            counts.symlinks += 1
            yield _header(rel, st, tarfile.SYMTYPE, linkname=target)
        elif kind == stat.S_IFREG:
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in links:
                counts.hardlinks += 1
                yield _header(rel, st, tarfile.LNKTYPE, linkname=links[key])
                return
            yield from self._file(rel, dir_fd, name, st, counts, links)
        elif kind == stat.S_IFIFO:
            # Metadata only, from the listing's lstat: a FIFO is never opened (a read
            # would block, and its "data" is another process's stream anyway).
            counts.fifos += 1
            yield _header(rel, st, tarfile.FIFOTYPE)
        else:
            skip(rel, f"{_SPECIAL.get(kind, 'special file')} not archived")

    def _file(
        self, rel: str, dir_fd: int, name: str, seen: os.stat_result, counts: _Counts,
        links: dict[tuple[int, int], str],
    ) -> Iterator[bytes]:
        """Tar header + data + padding of one regular file, or nothing (then reported).

        Each attempt reads the whole file (into memory, or past ``mem_limit`` into a spool
        file) between two ``fstat``s; nothing is emitted before an attempt is accepted or
        the attempts ran out, so the header always announces the bytes actually captured.
        ``name`` is opened in ``dir_fd`` without following a symlink: whatever is opened is
        an entry of that directory.  Another regular file there (an atomic save replacing
        the one ``seen`` by the listing) is read like any rewrite; anything else is skipped.
        """
        spool_box: list[BinaryIO | None] = [None]  # one spool per file, made on demand
        # (content, stat after the read, byte count, fingerprint of the content, no writer
        # had the file open just after the read)
        last: tuple[bytes | None, os.stat_result, int, bytes, bool] | None = None
        what = ""
        try:
            for _attempt in range(self.retries):
                t0 = time.time_ns()
                try:
                    fd = os.open(name, _O_READ, dir_fd=dir_fd)
                except FileNotFoundError:
                    if last is None:
                        counts.skipped.append(FileIssue(rel, "vanished before it was read"))
                        return
                    what += ", then vanished"
                    break
                except OSError as exc:
                    if last is not None:
                        what += f", then could not be reopened ({exc.strerror})"
                        break
                    if exc.errno == errno.ELOOP:
                        counts.skipped.append(
                            FileIssue(rel, "replaced while read (by a symlink); not followed")
                        )
                    else:
                        counts.skipped.append(FileIssue(rel, f"cannot open: {exc.strerror}"))
                    return
                try:
                    before = os.fstat(fd)
                    # Another device: something mounted over it, not this tree's file.
                    by = (
                        "another file system's file" if before.st_dev != seen.st_dev
                        else "" if stat.S_ISREG(before.st_mode) else "a non-regular file"
                    )
                    if by:
                        if last is not None:
                            what += f", then replaced by {by}"
                            break
                        counts.skipped.append(
                            FileIssue(rel, f"replaced while read (by {by}); not read")
                        )
                        return
                    data: bytes | None = None
                    spooling = False
                    if before.st_size <= self.mem_limit:
                        data, more = _read_small(fd, before.st_size)
                        got, digest = len(data), data
                    elif before.st_size <= self.spool_limit:
                        if spool_box[0] is None:
                            spool_box[0] = self._new_spool()
                        spool = spool_box[0]
                        if spool is None:  # no room for a spool: stream it instead
                            yield from self._stream(rel, fd, before, counts, links)
                            return
                        spooling = True
                        got, more, digest = _read_to_spool(fd, before.st_size, spool)
                    else:
                        yield from self._stream(rel, fd, before, counts, links)
                        return
                    after = os.fstat(fd)
                    # Only a file written just now needs it (below): one probe per hot file.
                    alone = (_no_writer(fd) if max(after.st_mtime_ns, after.st_ctime_ns)
                             >= t0 - HOT_NS else True)
                except _SpoolFailed as exc:
                    # The spool's disk failed, not the file: stream this one instead.
                    if spool_box[0] is not None:
                        spool_box[0].close()
                    spool_box[0] = None
                    os.lseek(fd, 0, os.SEEK_SET)
                    counts.changed.append(FileIssue(rel, f"spool failed ({exc}); streamed instead"))
                    yield from self._stream(rel, fd, os.fstat(fd), counts, links)
                    return
                except OSError as exc:
                    # A failed spool copy has overwritten the spool: a spooled earlier read
                    # is gone too.
                    if last is not None and not (spooling and last[0] is None):
                        what += f", then could not be read ({exc.strerror})"
                        break
                    counts.skipped.append(FileIssue(rel, f"cannot read: {exc.strerror}"))
                    return
                finally:
                    os.close(fd)
                consistent = _same(before, after) and got == after.st_size and not more
                if consistent and max(after.st_mtime_ns, after.st_ctime_ns) >= t0 - HOT_NS:
                    # Written just now: a write in the same clock tick leaves stat unchanged,
                    # and a writer paused inside one write() leaves it still for as long as
                    # it waits (mtime is set as the write starts).  Two identical reads in a
                    # row prove a consistent copy only with no writer open between them: a
                    # write in progress during the first read has then ended before the
                    # second, which would differ.
                    consistent = (last is not None and last[4] and last[3] == digest
                                  and _same(last[1], after))
                if not consistent:
                    if not _same(before, after) or more or got != after.st_size:
                        what = _describe(before, after, got + int(bool(more)))
                    elif not alone:
                        what = "open for writing while read"
                    else:
                        what = what or "modified while read"
                last = (data, after, got, digest, alone)
                if consistent:
                    what = ""
                    break
            if last is None:
                counts.skipped.append(FileIssue(rel, what or "could not be read"))
                return
            data, st, got, _digest, _alone = last
            if what:
                counts.changed.append(
                    FileIssue(rel, f"{what}; stored the last complete read ({got} bytes)")
                )
            counts.files += 1
            counts.content += got
            if st.st_nlink > 1:
                links[(st.st_dev, st.st_ino)] = rel
            counts.stored = st
            yield _header(rel, st, tarfile.REGTYPE, size=got)
            if data is not None:
                yield data
            else:
                spool = spool_box[0]
                assert spool is not None
                yield from _replay(spool, got)
            yield _pad(got)
        finally:
            spool = spool_box[0]
            if spool is not None:
                spool.close()
                spool_box[0] = None

    def _new_spool(self) -> BinaryIO | None:
        try:
            return tempfile.TemporaryFile(dir=self.spool_dir)  # unlinked at once: no leftovers
        except OSError:
            return None

    def _stream(
        self, rel: str, fd: int, before: os.stat_result, counts: _Counts,
        links: dict[tuple[int, int], str],
    ) -> Iterator[bytes]:
        """A large file, streamed: exactly ``before.st_size`` bytes follow the header."""
        size = before.st_size
        counts.stored = before
        yield _header(rel, before, tarfile.REGTYPE, size=size)
        got = 0
        error = ""
        while got < size:
            try:
                b = os.read(fd, min(_READ, size - got))
            except OSError as exc:
                error = f"read failed after {got} bytes ({exc.strerror})"
                break
            if not b:
                break
            got += len(b)
            yield b
        short = size - got
        while short > 0:
            n = min(short, _READ)
            short -= n
            yield b"\0" * n
        try:
            after = os.fstat(fd)
            more = os.read(fd, 1) if not error and got == size else b""
        except OSError:
            after, more = before, b""
        yield _pad(size)
        counts.files += 1
        counts.content += size
        if before.st_nlink > 1:
            links[(before.st_dev, before.st_ino)] = rel
        if error:
            what = f"{error}; zero padded to the {size} bytes announced"
        elif got < size:
            what = f"shrank while read; {size - got} missing bytes zero padded to {size}"
        elif more or after.st_size > size:
            what = f"grew while read; stored its first {size} bytes"
        elif not _same(before, after):
            what = f"modified while read; stored as read ({size} bytes, too large to re-read)"
        else:
            return
        counts.changed.append(FileIssue(rel, what))


class _SpoolFailed(Exception):
    """Writing or re-reading the spool file failed (its disk, not the application's file)."""


# Linux's F_SETSIG (not in Python's fcntl): a lease break is signalled to the lease's owner,
# SIGIO by default, whose default action ends the process.
_F_SETSIG = 10
_leases = sys.platform == "linux" and hasattr(fcntl, "F_SETLEASE")


def _no_writer(fd: int) -> bool:
    """False if some process has the file open for writing (or mapped shared-writable) at
    this instant; True if none has, or if that cannot be known here.

    The kernel refuses a read lease while any writable descriptor of the file exists, so
    taking one and dropping it at once is the probe (``fcntl(2)``, F_SETLEASE).  It needs the
    file's owner or CAP_LEASE and a file system with leases: elsewhere (EACCES, EINVAL,
    ENOLCK…) it cannot tell, and the copy is judged by the reads alone, as before.  An
    application opening the file for writing within the microseconds the lease exists waits
    that long (or, with O_NONBLOCK, gets EWOULDBLOCK once); the break's signal is set to
    SIGURG, ignored by default, so it cannot end the process.
    """
    if not _leases:
        return True
    try:
        fcntl.fcntl(fd, _F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        return exc.errno not in (errno.EAGAIN, errno.EBUSY)
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    except OSError:
        pass  # the descriptor is closed next, which drops the lease anyway
    return True


def _read_small(fd: int, size: int) -> tuple[bytes, bool]:
    """Up to ``size`` bytes of ``fd``; True too if there was more (it grew while read)."""
    if size < _READ:
        # The common case in one system call: a read of a regular file comes back short
        # only at its end, so asking for one byte more tells whether it grew.
        b = os.read(fd, size + 1)
        if len(b) > size:
            return b[:size], True
        if len(b) == size:
            return b, False
        chunks = [b]  # it shrank meanwhile (or a short read): finish as below
        got = len(b)
    else:
        chunks = []
        got = 0
    while got < size:
        # Ask for what stat announced: os.read allocates the whole request, and a 1 MiB
        # buffer per small file costs more than the read itself.
        b = os.read(fd, min(size - got, _READ))
        if not b:
            return b"".join(chunks), False
        chunks.append(b)
        got += len(b)
    return b"".join(chunks), bool(os.read(fd, 1))


def _read_to_spool(fd: int, size: int, spool: BinaryIO) -> tuple[int, bool, bytes]:
    """Copy up to ``size`` bytes of ``fd`` into ``spool`` (rewound and truncated first);
    return the count, whether there was more, and a blake3 digest of what was copied.

    Errors of the spool raise ``_SpoolFailed``; errors reading ``fd`` stay ``OSError``."""
    h = blake3.blake3()
    got = 0
    _spool(spool.seek, 0)
    _spool(spool.truncate)
    while got < size:
        b = os.read(fd, min(size - got, _READ))
        if not b:
            break
        h.update(b)
        _spool(spool.write, b)
        got += len(b)
    _spool(spool.flush)
    more = got == size and bool(os.read(fd, 1))
    return got, more, h.digest()


def _spool(op: Callable[..., object], *args: object) -> None:
    try:
        op(*args)
    except OSError as exc:
        raise _SpoolFailed(exc.strerror or str(exc)) from None


def _replay(spool: BinaryIO, size: int) -> Iterator[bytes]:
    """Exactly ``size`` bytes from the start of ``spool`` (zeros if the spool came up short:
    the header is already out)."""
    spool.seek(0)
    left = size
    while left > 0:
        try:
            b = spool.read(min(left, _READ))
        except OSError:
            b = b""
        if not b:
            yield bytes(left)
            return
        left -= len(b)
        yield b


def build_archive(
    root: str | os.PathLike[str],
    out: BinaryIO | str | os.PathLike[str],
    *,
    exclude: Sequence[str] = (),
) -> ArchiveReport:
    """Write the tgz of ``root`` to ``out`` (an open binary file, or a path written in place)."""
    builder = TgzBuilder(root, exclude=exclude)
    if isinstance(out, (str, os.PathLike)):
        try:
            with open(out, "wb") as f:
                for chunk in builder:
                    f.write(chunk)
        except OSError as exc:
            raise ArchiveError(f"{os.fsdecode(out)}: cannot write: {exc.strerror}") from None
    else:
        for chunk in builder:
            out.write(chunk)
    return builder.report
