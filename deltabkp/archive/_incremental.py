"""Incremental archive build: the next tgz of a tree from the last one, byte-identical to a
fresh ``TgzBuilder`` of the same tree state, reading only what changed.

The idea.  The archive is header + deflate segments + trailer (``_gzip``): a segment
``[c, d)`` of the tar stream is sync-flushed at both cuts and compressed by a compressor
primed with the 32 KiB before ``c``, so its compressed bytes depend only on the tar bytes
``[c - 32768, d)`` and on ``c`` and ``d`` being cuts; a cut depends only on the 64 bytes
before it and on the distance from the previous cut.  And the tar bytes of an entry are a
pure function of its name and ``lstat`` plus, for a file with data, its content.  So:

- the **index** of a build (``ArchiveIndex``, docs/formats.md "Archive index") keeps, per
  entry, its identity and tar range, and per segment its tar end, compressed end and CRC-32;
- the next build walks the tree; an entry whose identity is unchanged has the bytes it had
  (a file: same dev, ino, size, mtime_ns, ctime_ns, mode, owner, link count, and it was
  read consistently and not *racy* — modified within ``racy_ns`` of its read — last time;
  a header-only entry — directory, symlink, hard link, FIFO — by a digest of its header,
  which is cheap to make).  Consecutive such entries that were consecutive before form a
  *run*: a stretch of the new tar stream equal to a stretch of the old one;
- at the start of a run the bytes are compressed as usual until the new stream's cut finder
  places a cut at least 32 KiB into the run at a position that was a cut in the old stream
  too: from there on the compressor's state (window, cut finder) is the old one's, so the
  old compressed segments are copied verbatim up to the run's last old cut, without opening
  those files.  The files of that *first stretch* are read with a fresh build's hot-read
  rules (~470 small files after the ~1% change set: inflating their bytes from the old
  archive instead, onward from the previous run's last cut, was measured at ~20 ms less
  CPU but ~10 MB more peak RssAnon in the agent on bench_memory's 1 GB tree, at its
  150 MB bound: not kept).  A run that starts the stream in both builds is in step from
  its first byte (no window, the cut finder fresh): it has no first stretch;
- the tail of the run (the bytes after that last cut, and the 32 KiB before it that prime
  the compressor: ≤ 96 KiB) is read again from the run's last files, each checked before
  and after the read to still have the identity the walk saw.  If one changed since the
  walk, the tail is inflated from the old archive instead, from the sync cut on with the
  window the new stream has there: that always yields the old bytes (the file as the walk
  saw it, which is what the copied segments hold).  Inflating the whole run would cost
  ~1/15 of compressing it (measured: 0.9 s for the 103 MB stdlib tree, against ~0.1 s for
  the tail reads), so it is only the fallback;
- the trailer's CRC-32 is combined from the segments' CRC-32s (``_crc``); the last segment
  (``Z_FINISH``) is always compressed anew;
- a file that was racy when the previous build read it (its identity cannot vouch for its
  bytes; the index keeps a digest of them) and has that identity again is read again and
  hashed, one by one: equal, it stays in its run (its old compressed bytes are reused, its
  last 96 KiB kept for the run's tail); else it is compressed like a changed file.  A tree
  backed up right after it was written (a copy, an rsync) so costs a read of its files at
  the next build, not a recompression — and only one: those the quick check just before
  the build (``unchanged`` of the same index, the agent's check after a racy build) read
  so, consistently and not racy then, the build reuses unread, as reusable files
  (``_Old.trust_verified``; on ``bench_agent.py --racy-first`` ~400 of the ~800 files it
  opened).  ``settled(index)`` does that read ahead of time, for the racy files alone
  (reached by path, no walk), and returns the index with those found equal and settled
  recorded as reusable: the agent runs it once a racy build's answer went, so the next
  backup reads none of them;
- a *changed* file whose old entry at the same path (a file both times, ≤ ``mem_limit``)
  directly follows a run in sync is read as usual (hot-read rules), and what was read is
  compared, byte for byte, with the old entry's bytes at the same in-file offsets (the
  headers before them may differ in length: a PAX mtime record comes and goes with the
  mtime's fraction of a second), inflated from the old archive from the run's last cut
  with the window ``copy_run`` has just rebuilt (``_splice_changed``): each stretch proven equal, ≥ 96 KiB, becomes a run
  of its own, so an edit in place, an append or a truncation of a big file costs the
  read, ~64 KiB compressed per change and an inflate of the old entry, not the whole file
  recompressed.  Exact, never a CRC alone: a collision would store wrong bytes silently.
  (A strong per-segment digest in the index would avoid the inflate, ~6 ms with ISA-L for
  the benchmark's 1.7 MB file against ~110 ms to compress it, at the cost of an index
  format change and of hashing every build's segments: not worth it.)  The layout delta
  then finds the copied segments as COPY records, so the server does not recompress them
  either;
- ``unchanged(index)`` answers "would a build now give that archive?" from the same walk,
  reading again only the files that were racy when it was built (the index keeps a digest
  of their bytes): the quick check after a racy build.

Measured again after the racy re-reads and the packed-entry reuse
(``benchmarks/bench_agent.py``, the agent's whole request; docstring of
``deltabkp_agent.backup``): after the ~1% change 0.58 s CPU where it was 0.78, and 0.67 s
where it was 2.03 when the previous build had found ~1,000 files racy.
Measured (``benchmarks/bench_archive.py --incremental`` / ``--racy``; the 103 MB stdlib
tree, 4,828 files, 2 shared cores): after the ~1% change set the build costs 0.11 of a
fresh one (1.0 s against 8.8 s wall, 0.6 s against 5.7 s CPU; 477 files read, 4.2 MB of tar
compressed, 28.4 MB of deflate copied); an unchanged tree 0.04; a tree with a log appended
every 100 ms 0.04-0.07 per build.  What remains is ~64 KiB compressed per change
(the changed entry, then 32 KiB of window and up to a segment to get back in step; a
directory whose mtime moved costs the same), plus the walk.  A build without a previous
one costs ~7% more CPU than ``TgzBuilder`` (per-segment CRCs, the index, the archive's hash).
Measured again (2026-11-30; the same tree and change set, builds from the same previous
index, the package before this round and this one alternating, 3 processes x 5 builds
each, load 0.9): after the ~1% change 0.41 s CPU where it was 0.55 (medians), 0.33 s wall
where 0.47; 2.46 MB of tar compressed where 4.17 — the format's minimum for that change
set is 2.44 MB (docs/formats.md) — since the 1.7 MB file whose header grew a PAX record is
spliced (1.64 MB matched) and the first run is in step from the start (495 files opened
where 508).  What is left on the iterating thread (py-spy, the same
build looped): the walk's ``lstat``s and listings ~19%, hashing the previous archive ~15%
(only when the caller does not vouch for it: the agent does), cut finding ~8%, copying
~3%, the CRC combination ~2%; the deflate of 2.46 MB in the workers.

Invariants:
- the output is byte-identical to ``TgzBuilder`` of the same tree state, with or without a
  previous build (tests/test_archive_incremental.py: random trees, random edits, several
  generations);
- an entry is reused only when identity, ``ARCHIVE_VERSION``, level and deflater (zlib
  version and tune parameters: ``_gzip.deflater``) all match, and the previous archive's
  blake3 is the one its index names (checked before use: a corrupt cache would otherwise
  be copied into every later archive; not re-hashed when the caller vouches for the file
  by the ``stat`` it took when it wrote it: the agent's cache, for the archive it kept
  itself in this process); anything else falls back to
  compressing (never an error: the previous build is only a cache);
- the previous archive failing *during* the build (EIO, truncated, bad deflate: ``_OldFailed``)
  is no error either: a changed file's compare does without it (compressed anew,
  ``IncrementalStats.old_failed``); a copy or a run's tail that needs it makes the rest of
  the archive a fresh build's, from the byte already made on (the bytes so far are a fresh
  build's prefix, checked by blake3: a tree that changed meanwhile is an ``ArchiveError``),
  and ``stats.previous`` says why;
- a stretch of a changed file is copied only when the bytes read now equal, compared
  exactly, the old archive's bytes it replaces;
- a reused file is not opened, unless it lies in the first stretch of a run (32–96 KiB
  after each change, until the sync cut), where it is read with the fresh build's
  hot-read rules and kept in the run only if what was read has the old identity, or in
  the last ≤ 96 KiB of a run (read by path, no symlink followed, identity checked before
  and after), or it was racy when the previous build read it (read
  once, kept only if its digest matches; never read a second time for a run's tail) and
  the quick check before the build did not read it so, not racy then;
- per entry, a reused file that continues a run already in sync costs its ``lstat``, a
  dict lookup and one compare of its identity packed as the index packs it (the previous
  build's identities are slices of its index, gathered once: ``_Old``); such files are
  handed to the splicer in batches (``_Reused``: no ``_Item``, no ``IndexEntry``; their
  records are copied in one slice, ``EntryTable.append_reused``).  Other entries take the
  general path, one ``_Item`` each (~10 µs more); ``unchanged`` does the same compare
  inline without making an item.  Measured (``benchmarks/bench_agent.py``, ~1% change on
  the stdlib tree, 5,047 entries, 2 shared and busy cores): ~10-25% less CPU for the
  build than with an item per entry; what remains is ~2.1 MB compressed (~60-80 ms), the
  walk's ``lstat``s, the new archive's blake3, the cut search and I/O;
- the new archive's blake3 and the caller's ``sink`` (the agent's kept-archive write) run
  in one worker thread beside the iterating one (``_Beside``: chunks in order, at most
  ``_BESIDE`` waiting): ~30 MB of mostly copied deflate a build after a ~1 % change, hashed
  and written off the thread that walks and splices, which is the build's serial part
  (``benchmarks/bench_agent.py``, "its own thread's cpu": 299 -> 253 ms median of 5, with
  the tar header checksum from two adler32s, ``_build._byte_sum``; 2 cores at load 12-17);
- the previous archive is hashed before use unless the caller vouches for the very file
  (``previous_hashed``: the agent, for the archive it kept itself since it started);
- memory: as ``TgzBuilder`` (a job in flight per thread, ``_BESIDE`` + 1 output chunks
  waiting to be hashed, each ≤ ``_COPY`` or a job's deflate, one file up to ``mem_limit``: a
  racy file is re-verified only up to that size, else compressed anew), plus
  the index of the previous and of the new build, kept packed in their file layout
  (``EntryTable``: ~150 bytes per entry, plus a path -> position dict for the previous one;
  ``SegmentTable``: 20 bytes per segment, ~170,000 for a 1 GB tree — as Python objects the
  two indexes cost ~100 MB there), plus one run's tail (≤ 96 KiB).

A long module on purpose: the index's fields, the run bookkeeping and the splicing
compressor are one argument (why a copied segment is the byte a fresh build would write),
which reads best in one place.
"""

from __future__ import annotations

import array
import bisect
import collections
import itertools
import os
import stat
import struct
import tarfile
import time
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO, Generic, Protocol, TypeVar, cast, overload

import attrs
import blake3
import numpy as np
import numpy.typing as npt
from isal import isal_zlib

from deltabkp.archive._build import (
    _O_READ,
    ArchiveReport,
    TgzBuilder,
    _Counts,
    _end_of_archive,
    _header,
    _once_built,
)
from deltabkp.archive._crc import crc32_concat
from deltabkp.archive._gzip import (
    DICT_SIZE,
    GZIP_HEADER,
    JOB_SIZE,
    MAX_SEGMENT,
    CutFinder,
    compress_segments,
    deflater,
    gzip_trailer,
)
from deltabkp.archive._walk import _O_DIR, ARCHIVE_VERSION, RACY_NS, open_root, walk
from deltabkp.errors import ArchiveError, FormatError, LimitExceeded, UnsupportedVersion

#: What ``IncrementalBuilder.settled`` reads at most, in bytes and seconds, after a racy build.
SETTLE_BUDGET = 256 << 20
SETTLE_S = 5.0

__all__ = [
    "INDEX_MAGIC",
    "INDEX_VERSION",
    "ArchiveIndex",
    "EntryTable",
    "IncrementalBuilder",
    "IncrementalStats",
    "IndexEntry",
    "SegmentTable",
]

INDEX_MAGIC = b"DBKPIX"
INDEX_VERSION = 1
#: Lowest deflate level whose output does not depend on where compression jobs start.
MIN_LEVEL = 4
#: Largest index ``ArchiveIndex.parse`` accepts (~10 million entries).
INDEX_LIMIT = 1 << 30
#: An entry whose bytes are the tar header(s) alone (directory, symlink, hard link, FIFO).
HEADER_ONLY = 0
#: A regular file stored with its data.
DATA = 1

_HEAD = struct.Struct("<6sBBHBB32sQQIIB")
_ENTRY = struct.Struct("<BBHIIIIQQQqqQQ16s")
_SEGMENT = struct.Struct("<QQI")
# Parts of _ENTRY read without unpacking it all: kind, flags, name length; tar start, end.
_ENTRY_HEAD = struct.Struct("<BBH")
_NAME_LEN = struct.Struct("<H")
_ENTRY_TAR_AT = 60
_ENTRY_TAR = struct.Struct("<QQ")
_DIGEST_AT = _ENTRY.size - 16
#: ``_SEGMENT`` as a numpy record: the table is kept in memory in its on-disk form.
_SEGMENT_DTYPE = np.dtype({
    "names": ["tar_end", "deflate_end", "crc"], "formats": ["<u8", "<u8", "<u4"],
    "offsets": [0, 8, 16], "itemsize": _SEGMENT.size,
})
#: ``_ENTRY_HEAD`` as a numpy record.
_ENTRY_HEAD_DTYPE = np.dtype([("kind", "u1"), ("flags", "u1"), ("nlen", "<u2")])
#: A file's identity as ``_ENTRY`` packs it: bytes 4-60 of an entry's record, so the
#: previous build's identities are slices of its index, compared with ``_identity``'s.
_IDENTITY = struct.Struct("<IIIIQQQqq")
_IDENTITY_AT = 4


def _identity(st: os.stat_result) -> bytes:
    """``st``'s identity packed as in an index entry (b"" if it cannot be: equal to none)."""
    try:
        return _IDENTITY.pack(st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_dev,
                              st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    except struct.error:
        return b""


_U64 = npt.NDArray[np.uint64]
_DIGEST = 32
_FLAG_REUSABLE = 1
#: Pieces of a run's first stretch are fed (and searched for cuts) this much at a time, so
#: the sync cut is seen before the compressor runs past it; smaller pieces (tar headers,
#: small files) are gathered to this size first: each search costs ~20 numpy calls.
_FEED = 16 * 1024
_COPY = 1 << 20
#: Bytes gathered before the cut finder runs over them (outside the first stretch of a run).
_SCAN = 256 * 1024


@attrs.frozen
class IndexEntry:
    """One entry of a build: its identity and where its bytes are in the tar stream."""

    path: str
    kind: int  # HEADER_ONLY | DATA
    #: DATA only: read consistently and not racy, so the identity vouches for the content.
    reusable: bool
    mode: int = 0
    uid: int = 0
    gid: int = 0
    nlink: int = 0
    dev: int = 0
    ino: int = 0
    size: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    tar_start: int = 0
    tar_end: int = 0
    #: HEADER_ONLY only: blake3 (16 bytes) of the entry's tar bytes.
    digest: bytes = bytes(16)

    def placed(self, tar_start: int, tar_end: int) -> IndexEntry:
        """This entry at another place in the tar stream (``attrs.evolve``, 5x faster)."""
        return IndexEntry(
            self.path, self.kind, self.reusable, self.mode, self.uid, self.gid, self.nlink,
            self.dev, self.ino, self.size, self.mtime_ns, self.ctime_ns, tar_start, tar_end,
            self.digest,
        )

    def identity(self) -> tuple[int, ...]:
        return (self.mode, self.uid, self.gid, self.nlink, self.dev, self.ino, self.size,
                self.mtime_ns, self.ctime_ns)

    def same_file(self, st: os.stat_result) -> bool:
        return (
            self.size == st.st_size and self.mtime_ns == st.st_mtime_ns
            and self.ctime_ns == st.st_ctime_ns and self.ino == st.st_ino
            and self.dev == st.st_dev and self.mode == st.st_mode and self.uid == st.st_uid
            and self.gid == st.st_gid and self.nlink == st.st_nlink
        )


class SegmentTable(Sequence[tuple[int, int, int]]):
    """The segments of an index, ``(tar_end, deflate_end, crc32)`` each, packed as in the
    index file (20 bytes a segment; a tuple of three ints costs ~150, and a 1 GB tree has
    ~170,000 segments).  Reads as a tuple of tuples (indexing, slicing, iteration,
    equality with one); the columns come as numpy arrays for vectorised lookups."""

    __slots__ = ("_a",)

    def __init__(self, packed: np.ndarray[tuple[int], np.dtype[np.void]]) -> None:
        self._a = packed

    @classmethod
    def of(cls, value: Iterable[tuple[int, int, int]]) -> SegmentTable:
        """A table from rows (or the table itself)."""
        if isinstance(value, SegmentTable):
            return value
        rows = list(value)
        if not rows:
            return cls.from_columns([], [], [])
        t, c, k = zip(*rows, strict=True)
        return cls.from_columns(t, c, k)

    @classmethod
    def from_columns(
        cls, tar_ends: Sequence[int] | npt.ArrayLike, deflate_ends: Sequence[int] | npt.ArrayLike,
        crcs: Sequence[int] | npt.ArrayLike,
    ) -> SegmentTable:
        t = np.asarray(tar_ends, np.uint64)
        a = np.zeros(len(t), _SEGMENT_DTYPE)
        a["tar_end"] = t
        a["deflate_end"] = np.asarray(deflate_ends, np.uint64)
        a["crc"] = np.asarray(crcs, np.uint32)
        return cls(a)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> SegmentTable:
        """Records in the index file's ``<QQI`` layout (``len(data)`` a multiple of 20)."""
        return cls(np.frombuffer(data, _SEGMENT_DTYPE).copy())

    def to_bytes(self) -> bytes:
        return self._a.tobytes()

    @property
    def tar_ends(self) -> _U64:
        return np.ascontiguousarray(self._a["tar_end"], np.uint64)

    @property
    def deflate_ends(self) -> _U64:
        return np.ascontiguousarray(self._a["deflate_end"], np.uint64)

    @property
    def crcs(self) -> npt.NDArray[np.uint32]:
        return np.ascontiguousarray(self._a["crc"], np.uint32)

    def __len__(self) -> int:
        return len(self._a)

    @overload
    def __getitem__(self, i: int) -> tuple[int, int, int]: ...
    @overload
    def __getitem__(self, i: slice) -> SegmentTable: ...
    def __getitem__(self, i: int | slice) -> tuple[int, int, int] | SegmentTable:
        if isinstance(i, slice):
            return SegmentTable(self._a[i])
        r = self._a[i]
        return (int(r["tar_end"]), int(r["deflate_end"]), int(r["crc"]))

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        step = 1 << 14  # converted a slice at a time: no full list of ints at once
        for at in range(0, len(self._a), step):
            a = self._a[at : at + step]
            yield from zip(a["tar_end"].tolist(), a["deflate_end"].tolist(), a["crc"].tolist(),
                           strict=True)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SegmentTable):
            return len(self) == len(other) and self.to_bytes() == other.to_bytes()
        if isinstance(other, (tuple, list)):
            return len(self) == len(other) and all(a == tuple(b) for a, b in zip(self, other, strict=True))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.to_bytes())

    def __repr__(self) -> str:
        return f"SegmentTable({len(self)} segments)"


class EntryTable(Sequence[IndexEntry]):
    """The entries of an index, packed as in the index file (a 92-byte record and the name
    each: ~150 bytes an entry where an ``IndexEntry`` object costs ~550) plus an offset
    each.  Reads as a tuple of ``IndexEntry`` (made on access); ``append`` packs one."""

    __slots__ = ("_data", "_offsets")

    def __init__(self, data: bytes | bytearray = b"", offsets: array.array[int] | None = None) -> None:
        self._data = data
        self._offsets = offsets if offsets is not None else array.array("Q")

    @classmethod
    def of(cls, value: Iterable[IndexEntry]) -> EntryTable:
        """A table from entries (or the table itself)."""
        if isinstance(value, EntryTable):
            return value
        table = cls(bytearray())
        for e in value:
            table.append(e)
        return table

    def append(self, e: IndexEntry) -> None:
        assert isinstance(self._data, bytearray), "a parsed table is read-only"
        name = e.path.encode("utf-8", "surrogateescape")
        self._offsets.append(len(self._data))
        self._data += _ENTRY.pack(
            e.kind, _FLAG_REUSABLE if e.reusable else 0, len(name), e.mode, e.uid, e.gid,
            e.nlink, e.dev, e.ino, e.size, e.mtime_ns, e.ctime_ns, e.tar_start, e.tar_end,
            e.digest,
        )
        self._data += name

    def append_moved(self, src: EntryTable, i: int, tar_start: int, tar_end: int) -> None:
        """Append entry ``i`` of ``src`` at another place in the tar stream: its packed
        bytes copied, the tar range patched (what ``append(src[i].placed(...))`` packs,
        without making the two ``IndexEntry`` objects: ~5,000 an incremental build)."""
        assert isinstance(self._data, bytearray), "a parsed table is read-only"
        at = src._offsets[i]
        n = _NAME_LEN.unpack_from(src._data, at + 2)[0]
        here = len(self._data)
        self._offsets.append(here)
        self._data += src._data[at : at + _ENTRY.size + n]
        _ENTRY_TAR.pack_into(self._data, here + _ENTRY_TAR_AT, tar_start, tar_end)

    def append_reused(self, src: EntryTable, first: int, last: int, shift: int) -> None:
        """``append_moved`` of entries ``first..last`` of ``src`` (consecutive there), each
        moved ``shift`` bytes back in the tar stream: their records copied in one slice."""
        assert isinstance(self._data, bytearray), "a parsed table is read-only"
        a = src._offsets[first]
        b = src._offsets[last + 1] if last + 1 < len(src._offsets) else len(src._data)
        here = len(self._data)
        self._data += src._data[a:b]
        move = here - a
        offsets = [o + move for o in src._offsets[first : last + 1]]
        self._offsets.extend(offsets)
        unpack, pack, data = _ENTRY_TAR.unpack_from, _ENTRY_TAR.pack_into, self._data
        for o in offsets:
            s, e = unpack(data, o + _ENTRY_TAR_AT)
            pack(data, o + _ENTRY_TAR_AT, s - shift, e - shift)

    def mark_reusable(self, i: int) -> None:
        """Entry ``i`` (appended here) as a file read consistently and not racy: the
        reusable flag set, no digest — the record ``_read_file`` makes of such a read."""
        assert isinstance(self._data, bytearray), "a parsed table is read-only"
        at = self._offsets[i]
        self._data[at + 1] |= _FLAG_REUSABLE
        self._data[at + _DIGEST_AT : at + _ENTRY.size] = bytes(16)

    def with_reusable(self, positions: Iterable[int]) -> EntryTable:
        """A copy with the entries at ``positions`` marked reusable (``mark_reusable``)."""
        t = EntryTable(bytearray(self._data), array.array("Q", self._offsets))
        for i in positions:
            t.mark_reusable(i)
        return t

    def raw(self, i: int) -> tuple[Any, ...]:
        """Entry ``i``'s record fields as ``_ENTRY`` unpacks them (no name, no object)."""
        return _ENTRY.unpack_from(self._data, self._offsets[i])

    def to_bytes(self) -> bytes:
        """The records and names, in the index file's layout."""
        return bytes(self._data)

    def path(self, i: int) -> str:
        at = self._offsets[i]
        n = _NAME_LEN.unpack_from(self._data, at + 2)[0]
        return bytes(self._data[at + _ENTRY.size : at + _ENTRY.size + n]).decode(
            "utf-8", "surrogateescape"
        )

    def __len__(self) -> int:
        return len(self._offsets)

    @overload
    def __getitem__(self, i: int) -> IndexEntry: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[IndexEntry, ...]: ...
    def __getitem__(self, i: int | slice) -> IndexEntry | tuple[IndexEntry, ...]:
        if isinstance(i, slice):
            return tuple(self[k] for k in range(*i.indices(len(self))))
        at = self._offsets[i]
        (kind, eflags, nlen, mode, uid, gid, nlink, dev, ino, size, mtime_ns, ctime_ns,
         tar_start, tar_end, digest) = _ENTRY.unpack_from(self._data, at)
        name = bytes(self._data[at + _ENTRY.size : at + _ENTRY.size + nlen])
        return IndexEntry(
            name.decode("utf-8", "surrogateescape"), kind, bool(eflags & _FLAG_REUSABLE), mode,
            uid, gid, nlink, dev, ino, size, mtime_ns, ctime_ns, tar_start, tar_end, digest,
        )

    def __iter__(self) -> Iterator[IndexEntry]:
        for i in range(len(self)):
            yield self[i]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, EntryTable):
            return self._offsets == other._offsets and self._data == other._data
        if isinstance(other, (tuple, list)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(bytes(self._data))

    def __repr__(self) -> str:
        return f"EntryTable({len(self)} entries)"


def _segment_table(value: Iterable[tuple[int, int, int]]) -> SegmentTable:
    return SegmentTable.of(value)


def _entry_table(value: Iterable[IndexEntry]) -> EntryTable:
    return EntryTable.of(value)


@attrs.frozen
class ArchiveIndex:
    """What the next incremental build needs to know about an archive (format: docs/formats.md
    "Archive index").  ``segments`` are ``(tar_end, deflate_end, crc32)`` of every
    sync-flushed segment in order (the final ``Z_FINISH`` segment is not one): ends are
    offsets in the tar stream and in the raw deflate data (which starts after the 10-byte
    gzip header); the CRC is of the segment's own tar bytes."""

    archive_hash: bytes
    archive_size: int
    tar_size: int
    level: int
    #: What the deflate bytes depend on besides the level (``_gzip.deflater``: zlib's
    #: version and format 3's tune parameters), ASCII.
    deflater: str
    entries: EntryTable = attrs.field(converter=_entry_table)
    segments: SegmentTable = attrs.field(converter=_segment_table)
    archive_version: int = ARCHIVE_VERSION

    def encode(self) -> bytes:
        zv = self.deflater.encode("ascii")
        out = [_HEAD.pack(
            INDEX_MAGIC, INDEX_VERSION, 0, self.archive_version, self.level, len(zv),
            self.archive_hash, self.archive_size, self.tar_size, len(self.entries),
            len(self.segments), 0,
        ), zv]
        out.append(self.entries.to_bytes())
        out.append(self.segments.to_bytes())
        body = b"".join(out)
        return body + blake3.blake3(body).digest()

    @classmethod
    def parse(cls, data: bytes, *, limit: int = INDEX_LIMIT) -> ArchiveIndex:
        data = bytes(data)
        if data[: len(INDEX_MAGIC)] != INDEX_MAGIC:
            raise FormatError("not a deltabkp archive index (bad magic)")
        if len(data) <= len(INDEX_MAGIC):
            raise FormatError("archive index truncated before its version")
        if data[len(INDEX_MAGIC)] != INDEX_VERSION:
            raise UnsupportedVersion(
                f"archive index version {data[len(INDEX_MAGIC)]} is not supported (only {INDEX_VERSION})"
            )
        if len(data) > limit:
            raise LimitExceeded(f"archive index of {len(data)} bytes exceeds the limit of {limit}")
        if len(data) < _HEAD.size + _DIGEST:
            raise FormatError("archive index truncated in its header")
        # Views, not copies: the index of a 1 GB tree is ~7 MB, parsed on every backup.
        body, digest = memoryview(data)[:-_DIGEST], data[-_DIGEST:]
        if blake3.blake3(body).digest() != digest:
            raise FormatError("archive index is corrupt (its blake3 does not match)")
        (_m, _v, flags, archive_version, level, zlen, archive_hash, archive_size, tar_size,
         n_entries, n_segments, reserved) = _HEAD.unpack_from(body)
        if flags or reserved:
            raise FormatError(f"archive index has unknown flags {flags:#x}/{reserved:#x}")
        at = _HEAD.size
        zv = bytes(body[at : at + zlen])
        at += zlen
        # Counts are checked against the bytes present before anything is allocated.
        if n_entries * _ENTRY.size + n_segments * _SEGMENT.size > len(body) - at:
            raise FormatError("archive index truncated (fewer bytes than its counts announce)")
        # Checked record by record, kept packed (an EntryTable over these bytes).
        first = at
        offsets = array.array("Q")
        for n in range(n_entries):
            if at + _ENTRY.size > len(body):
                raise FormatError("archive index truncated in an entry")
            kind, eflags, nlen = _ENTRY_HEAD.unpack_from(body, at)
            tar_start, tar_end = _ENTRY_TAR.unpack_from(body, at + _ENTRY_TAR_AT)
            offsets.append(at - first)
            at += _ENTRY.size
            if kind not in (HEADER_ONLY, DATA) or eflags & ~_FLAG_REUSABLE:
                raise FormatError(f"archive index entry {n} has unknown kind/flags")
            if at + nlen > len(body) or not 0 <= tar_start <= tar_end <= tar_size:
                raise FormatError(f"archive index entry {n} is out of bounds")
            at += nlen
        entries = EntryTable(bytes(body[first:at]), offsets)
        if len(body) - at != n_segments * _SEGMENT.size:
            raise FormatError("archive index has the wrong number of segment bytes")
        segments = SegmentTable.from_bytes(memoryview(body)[at:])
        ts, cs = segments.tar_ends, segments.deflate_ends
        if len(segments) and not (
            ts[0] > 0 and cs[0] > 0 and ts[-1] <= tar_size and cs[-1] <= archive_size
            and bool(np.all(ts[1:] > ts[:-1])) and bool(np.all(cs[1:] > cs[:-1]))
        ):
            raise FormatError("archive index segments are not increasing within the archive")
        try:
            deflater = zv.decode("ascii")
        except UnicodeDecodeError:
            raise FormatError("archive index has a non-ASCII deflater") from None
        return cls(
            archive_hash=archive_hash, archive_size=archive_size, tar_size=tar_size,
            level=level, deflater=deflater, entries=entries,
            segments=segments, archive_version=archive_version,
        )


@attrs.frozen
class IncrementalStats:
    """What the incremental build reused.  ``previous`` says why the previous build was
    not used at all ("" when it was, "none" when there was none)."""

    previous: str
    entries_reused: int  # entries whose bytes equal the previous archive's
    files_opened: int  # regular files opened and read
    bytes_compressed: int  # tar bytes that went through the compressor
    bytes_copied: int  # compressed bytes copied verbatim from the previous archive
    bytes_inflated: int  # tar bytes inflated from the previous archive (run tails)
    files_peeked: int = 0  # reused files opened to read a run's tail (≤ 96 KiB per run)
    bytes_peeked: int = 0  # tar bytes of run tails read again from the tree
    #: tar bytes of changed files found unchanged at the same in-file offsets and copied
    #: (from where the splicer got back in step: ``_splice_changed``)
    bytes_matched: int = 0
    #: Why the previous archive failed for a changed file's compare (its bytes then
    #: compressed anew, as with no previous entry); "" if it never did.  Kept when the
    #: build later went on afresh (``previous`` then says why).
    old_failed: str = ""


# -- the previous build -------------------------------------------------------------------------


class _Old:
    """The previous build, checked and opened."""

    #: Path -> position; per position: tar start and end; for a reusable file (read
    #: consistently, not racy) its identity as ``_identity`` makes it from an lstat, else
    #: None; the segments' tar and deflate ends (sorted: searched, never a dict of ints).
    at_path: dict[str, int]
    starts: list[int]
    ends: list[int]
    ident: list[bytes | None]
    cut_ends: _U64
    deflate_ends: _U64

    def __init__(self, index: ArchiveIndex, f: BinaryIO | None) -> None:
        self.index = index
        self.f = f
        #: Why the archive failed a read that the build could do without (``_old_tar``).
        self.failed = ""
        # The lookups the quick check just made of this very index (the agent's check, then
        # its build, on the same object): taken over, not made again (~8 ms for 5,000
        # entries, on the build's serial path).  Taken once: nothing stays behind the build.
        checked = _Old._checked
        #: Positions of files racy when that build read them that a quick check read again
        #: (``_unchanged``): same bytes, and not racy then for ``verified_ns``.
        self.verified: list[int] = []
        self.verified_ns = 0
        #: Those the build trusts as reusable (``trust_verified``), sorted.
        self.trusted: list[int] = []
        if checked is not None and checked.index is index:
            _Old._checked = None
            self.at_path, self.starts, self.ends = checked.at_path, checked.starts, checked.ends
            self.ident, self.cut_ends = checked.ident, checked.cut_ends
            self.deflate_ends = checked.deflate_ends
            self.verified, self.verified_ns = checked.verified, checked.verified_ns
            return
        # The packed records' fixed part gathered into columns in one numpy pass (per-entry
        # unpacking cost ~2 µs an entry, a third of an unchanged entry's whole cost).
        # Only the fields needed (kind, flags, name length; tar range): 20 of a record's
        # 92 bytes gathered, ~4x less than the whole record.
        t = index.entries
        offs = np.frombuffer(t._offsets, np.uint64).astype(np.int64)
        raw = np.frombuffer(t._data, np.uint8)
        head = raw[offs[:, None] + np.arange(_ENTRY_HEAD.size)].view(_ENTRY_HEAD_DTYPE).ravel()
        tar = raw[offs[:, None] + np.arange(_ENTRY_TAR_AT, _ENTRY_TAR_AT + _ENTRY_TAR.size)]
        tar = tar.view("<u8")
        del raw  # a view of a bytearray would pin its size
        name_at = offs + _ENTRY.size
        data = bytes(t._data)
        # Path -> position: the entries stay packed, one is made when looked up.  The names
        # decoded in one call (joined by NUL, which no path holds), not one call each.
        names = b"\0".join([
            data[a:b] for a, b in zip(
                name_at.tolist(), (name_at + head["nlen"].astype(np.int64)).tolist(),
                strict=True,
            )
        ]).decode("utf-8", "surrogateescape").split("\0")
        self.at_path = dict(zip(names, range(len(names)), strict=True))
        #: Per position: tar start and end; for a reusable file (read consistently, not
        #: racy) its identity as ``_identity`` makes it from an lstat, else None.
        self.starts = tar[:, 0].tolist()
        self.ends = tar[:, 1].tolist()
        reusable = ((head["kind"] == DATA) & ((head["flags"] & _FLAG_REUSABLE) != 0)).tolist()
        at = _IDENTITY_AT
        end = at + _IDENTITY.size
        self.ident = [
            data[o + at : o + end] if ok else None
            for o, ok in zip(offs.tolist(), reusable, strict=True)
        ]
        self.cut_ends = index.segments.tar_ends  # sorted: searched, never a dict of ints
        self.deflate_ends = index.segments.deflate_ends

    #: The last ``unchanged`` check's lookups (``__init__``); one slot, checked by identity.
    _checked: _Old | None = None

    def find(self, path: str) -> int:
        """The position of ``path``'s entry, or -1."""
        return self.at_path.get(path, -1)

    def same_file(self, i: int, st: os.stat_result) -> bool:
        """``IndexEntry.same_file`` of entry ``i``, on its packed fields."""
        (_k, _f, _n, mode, uid, gid, nlink, dev, ino, size, mtime_ns, ctime_ns,
         *_rest) = self.index.entries.raw(i)
        return bool(
            size == st.st_size and mtime_ns == st.st_mtime_ns and ctime_ns == st.st_ctime_ns
            and ino == st.st_ino and dev == st.st_dev and mode == st.st_mode
            and uid == st.st_uid and gid == st.st_gid and nlink == st.st_nlink
        )

    def trust_verified(self, racy_ns: int) -> None:
        """Files racy when the previous build read them, read again by the quick check just
        before this build (``_unchanged``), consistently, with their old identity and bytes,
        and not racy then (for at least this build's ``racy_ns``): reusable from here on, as
        after the build's own re-read (``_verify``) — that read vouches for the bytes of this
        identity as any build's read of a settled file does (a later write moves mtime and
        ctime).  So the build does not read them a second time: their old identity is
        matched like a reusable file's (its lstat now; a run's tail checked before and after
        its read) and their records become reusable ones (``mark``)."""
        if not self.verified or self.verified_ns < racy_ns:
            return
        t = self.index.entries
        at, end = _IDENTITY_AT, _IDENTITY_AT + _IDENTITY.size
        self.trusted = sorted(set(self.verified))
        for p in self.trusted:
            o = t._offsets[p]
            self.ident[p] = bytes(t._data[o + at : o + end])

    def mark(self, entries: EntryTable, first: int, last: int) -> None:
        """Old entries ``first..last`` were just appended to ``entries`` (the last ones, in
        order): those trusted (``trust_verified``) get a reusable file's record."""
        trusted = self.trusted
        lo = bisect.bisect_left(trusted, first)
        if lo == len(trusted) or trusted[lo] > last:
            return
        base = len(entries) - 1 - last
        for p in trusted[lo : bisect.bisect_right(trusted, last)]:
            entries.mark_reusable(base + p)

    def reusable_file(self, i: int, st: os.stat_result) -> bool:
        """Entry ``i`` is a file read consistently and not racy, with ``st``'s identity."""
        return self.ident[i] == _identity(st)

    def racy_file(self, i: int, st: os.stat_result) -> bool:
        """Entry ``i`` is a file that was racy when read (its digest kept), with ``st``'s
        identity: its bytes are the old ones if a read now hashes to that digest."""
        r = self.index.entries.raw(i)
        return bool(
            r[0] == DATA and not r[1] & _FLAG_REUSABLE and r[14] != bytes(16)
            and self.same_file(i, st)
        )

    def digest(self, i: int) -> bytes:
        return bytes(self.index.entries.raw(i)[14])

    def header_digest(self, i: int) -> bytes | None:
        """The digest of header-only entry ``i`` (None for a file)."""
        r = self.index.entries.raw(i)
        return bytes(r[14]) if r[0] == HEADER_ONLY else None

    def span(self, i: int) -> tuple[int, int]:
        """Entry ``i``'s tar range."""
        return self.starts[i], self.ends[i]

    def cut_index(self, cut: int) -> int:
        """The segment ending at tar offset ``cut``, or -1 if none does."""
        i = int(np.searchsorted(self.cut_ends, cut))
        return i if i < len(self.cut_ends) and int(self.cut_ends[i]) == cut else -1

    def last_cut_upto(self, at: int) -> int:
        """The last segment ending at or before tar offset ``at`` (-1 if none)."""
        return int(np.searchsorted(self.cut_ends, at, "right")) - 1

    def comp_start(self, i: int) -> int:
        """Deflate offset where segment ``i`` starts."""
        return int(self.deflate_ends[i - 1]) if i > 0 else 0

    def read(self, start: int, length: int) -> bytes:
        """Raw deflate bytes ``[start, start + length)``; ``_OldFailed`` if the file no
        longer gives them (EIO, truncated since it was checked)."""
        assert self.f is not None
        try:
            self.f.seek(len(GZIP_HEADER) + start)
            data = self.f.read(length)
        except OSError as exc:
            raise _OldFailed(f"cannot read the previous archive: {exc.strerror}") from None
        if len(data) != length:
            raise _OldFailed("the previous archive shrank while it was being reused")
        return data


class _OldFailed(ArchiveError):
    """The previous archive failed while the build used it (unreadable, truncated, not the
    deflate its index describes): only a cache, so the build goes on without it — the entry
    compressed anew (``_old_tar``), or the whole archive built afresh (``_generate``)."""


def _file_identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _open_previous(
    index: ArchiveIndex | None, archive: str | os.PathLike[str] | None, level: int,
    hashed: os.stat_result | None = None,
) -> tuple[_Old | None, str]:
    if index is None or archive is None:
        return None, "none"
    if index.archive_version != ARCHIVE_VERSION:
        return None, f"previous archive is format {index.archive_version}, not {ARCHIVE_VERSION}"
    if index.level != level:
        return None, f"previous archive has deflate level {index.level}, not {level}"
    if index.deflater != (now := deflater(level)):
        return None, f"previous archive was made by {index.deflater}, not {now}"
    try:
        f = open(archive, "rb")  # noqa: SIM115 (kept open for the whole build, closed by it)
    except OSError as exc:
        return None, f"cannot open the previous archive: {exc.strerror}"
    try:
        st = os.fstat(f.fileno())
        if (hashed is not None and st.st_size == index.archive_size
                and _file_identity(st) == _file_identity(hashed)):
            # The very file whose bytes were hashed to ``index.archive_hash`` (the caller
            # wrote it, and ctime moves with any change since): not read and hashed again.
            return _Old(index, f), ""
        h = blake3.blake3()
        size = 0
        while chunk := f.read(_COPY):
            h.update(chunk)
            size += len(chunk)
    except OSError as exc:
        f.close()
        return None, f"cannot read the previous archive: {exc.strerror}"
    if size != index.archive_size or h.digest() != index.archive_hash:
        f.close()
        return None, "the previous archive is not the one its index describes"
    return _Old(index, f), ""


# -- items: the walk, entry by entry --------------------------------------------------------------


@attrs.define
class _Item:
    """One entry's tar bytes, lazily: iterating ``pieces`` reads the file (if any)."""

    pieces: Iterator[bytes]
    #: The position of the previous build's entry these bytes equal, if the identity says
    #: so (to be confirmed by ``record`` for a file that ends up being read); -1 if none.
    #: A position, not an ``IndexEntry``: most entries are reused without ever making one.
    old: int
    #: The entry as stored: known once ``pieces`` yielded its first piece (None: skipped).
    record: IndexEntry | None = None
    #: For a read file: whether what was read is the old entry's bytes (identity checked).
    equal: bool = False
    #: ``old`` was racy when read: to be read now and compared with its digest (``_verify``).
    verify: bool = False
    read: bool = False
    rel: str = ""
    #: The walk's lstat of a file (its tar header is made from it).
    st: os.stat_result | None = None
    #: The tar bytes of a header-only entry; of a verified file, the last ones from
    #: ``data_at`` on.
    data: bytes = b""
    data_at: int = 0
    #: A changed file's old entry at the same path (a file both times, both ≤ ``mem_limit``),
    #: -1 if none: its unchanged stretches may still be reused (``_splice_changed``).
    prior: int = -1


@attrs.define
class _Reused:
    """Files that continue a run already in sync (``_items``' fast path): entries
    ``first..first + len(rels) - 1`` of the previous build, each with its old identity
    and none read.  One item for them all: per entry, the walk's ``lstat``, a dict lookup
    and a bytes compare are all the Python an unchanged file costs."""

    first: int
    rels: list[str]
    sts: list[os.stat_result]


# -- compression with splicing -----------------------------------------------------------------


def _job(
    data: bytes, cuts: list[int], level: int, final: bool, zdict: bytes
) -> tuple[bytes, list[int], list[int]]:
    """Worker thread: compress, and the compressed end and CRC-32 of every segment (plus,
    for the final job, the CRC of the rest)."""
    ends: list[int] = []
    out = compress_segments(data, cuts, level, final, zdict, ends)
    view = memoryview(data)
    crcs = []
    prev = 0
    for c in [*cuts, len(data)] if final else cuts:
        crcs.append(zlib.crc32(view[prev:c]))
        prev = c
    return out, ends, crcs


@attrs.define
class _Run:
    new_start: int
    old_start: int
    old_end: int
    #: The sync cut (new stream offset) and the 32 KiB before it, once found.
    sync: int | None = None
    sync_window: bytes = b""
    #: (new start, new end, item) of the run's last entries: enough to cover its tail.
    members: collections.deque[tuple[int, int, _Item]] = attrs.Factory(collections.deque)

    def add(self, start: int, end: int, item: _Item) -> None:
        self.members.append((start, end, item))
        # The tail is at most the 32 KiB window plus one segment before the run's end.
        while self.members and self.members[0][1] < end - DICT_SIZE - MAX_SEGMENT:
            self.members.popleft()


#: Reads tar bytes ``[a, b)`` of a run member (relative to its start) from the tree, or
#: None if it is no longer what the walk saw.
Peek = Callable[[_Item, int, int], "bytes | None"]


class BuildStream(Protocol):
    """What an incremental build tells as it goes (``IncrementalBuilder(stream=...)``; the
    layout encoder's streamed form, ``_layout.LayoutStreamer``), from the building thread:
    ``bind`` once the previous archive is open and checked (its blake3; the build's
    ``EntryTable``, which grows as entries are placed), or ``fail`` if it is not used; then
    ``placing`` an entry whose bytes are about to be fed (its record known, its tar range
    ``[start, end)``: placed in the table once all of it is fed), and in the archive's
    order each stretch of old segments copied (old deflate offset after
    the gzip header, length, the old segment after them) and each compression job (tar
    offset, the window it was primed with, its tar, its cut ends, final?); then the gzip
    trailer.  ``fail`` again if the build gives the previous archive up midway."""

    def bind(self, entries: Any, previous_hash: bytes) -> None: ...
    def placing(self, record: IndexEntry, start: int, end: int) -> None: ...
    def fail(self, why: str) -> None: ...
    def copy(self, start: int, length: int, k: int) -> None: ...
    def job(self, at: int, prime: bytes, data: bytes, ends: list[int], final: bool) -> None: ...
    def trailer(self, raw: bytes) -> None: ...


class _Splicer:
    """The new stream's compressor: feeds bytes like ``RsyncableGzip``, and copies old
    segments inside runs once in sync.  Output chunks come out in stream order."""

    def __init__(self, level: int, threads: int, old: _Old | None, peek: Peek) -> None:
        self.peek = peek
        self.level = level
        self.threads = threads
        self.old = old
        self.finder = CutFinder()
        self.pos = 0  # tar offset of the end of what was fed
        self.buf = bytearray()  # fed bytes not yet handed to a job, from buf_at
        self.buf_at = 0
        self.cuts: list[int] = []  # cuts in buf (absolute)
        self.window = b""  # the DICT_SIZE bytes before buf_at
        self.unscanned: list[bytes | memoryview] = []  # fed after buf, not searched yet
        self.unscanned_len = 0
        self.pool = ThreadPoolExecutor(threads, "deltabkp-gzip") if threads > 0 else None
        # ("job", future, tar offsets of its cuts (+ end if final), final) | ("copy", ...)
        self.queue: collections.deque[tuple[object, ...]] = collections.deque()
        # Its "job" items: what ``_ready(keep)`` bounds.  Copies wait in the queue at no
        # cost (their bytes are read as they go out), so the iterating thread no longer
        # waits for the oldest job just because copies queued behind it.
        self.jobs = 0
        self.comp_pos = 0  # deflate bytes handed out
        # Packed (8 or 4 bytes a value): ~170,000 segments for a 1 GB tree.  The segments'
        # CRCs are the first len(seg_tar) of crc_parts (the final segment is not one).
        self.seg_tar = array.array("Q")
        self.seg_deflate = array.array("Q")
        self.crc_parts = array.array("I")
        self.crc_lens = array.array("Q")
        self.compressed = 0
        self.copied = 0
        self.inflated = 0
        self.peeked = 0
        self.matched = 0  # tar bytes of changed files copied as unchanged (_splice_changed)
        # The tar bytes compressed (and each job's window), for the layout encoder: only
        # with a previous build (no layout delta follows a full one), ≤ FRESH_LIMIT bytes.
        self.fresh = _FreshKeeper() if old is not None else None
        #: Told each job and copy as it goes out, in order (``BuildStream``), or None.
        self.stream: BuildStream | None = None
        #: The stream is told each job and copy as it is queued, not as it goes out, and
        #: the jobs wait uncompressed (up to ``DEFER_LIMIT`` bytes of tar, then they are
        #: compressed as they come) until it was told the trailer (``stream_first``).
        self.early = False
        self.deferred = 0  # tar bytes (data and windows) of the jobs waiting uncompressed
        self._told = False  # the stream was told something since the last chunk out

    # -- feeding

    def feed(self, data: bytes | memoryview, scan: bool = True, batch: int = 0) -> list[int]:
        """Feed bytes; the new cuts found (no job is started: call ``spill``).

        With ``scan`` False the bytes may wait (up to ``_SCAN``) to be searched for cuts
        with later ones: one numpy pass per small file costs more than the search itself
        on trees of small files; with ``batch``, until that many are waiting."""
        if len(data):
            self.unscanned.append(data)
            self.unscanned_len += len(data)
            self.pos += len(data)
        if not self.unscanned_len or self.unscanned_len < (batch if scan else _SCAN):
            return []
        block = b"".join(self.unscanned)
        self.unscanned.clear()
        self.unscanned_len = 0
        self.buf += block
        cuts = self.finder.feed(block)
        self.cuts += cuts
        return cuts

    def spill(self) -> Iterator[bytes]:
        """Hand a job out when enough is gathered, and what finished comes out."""
        if len(self.buf) >= JOB_SIZE and self.cuts:
            self._submit(self.cuts[-1])
        yield from self._ready(self.threads)

    def _submit(self, upto: int, final: bool = False) -> None:
        n = upto - self.buf_at
        data = bytes(self.buf[:n])
        cuts = [c for c in self.cuts if c <= upto] if not final else list(self.cuts)
        rel = [c - self.buf_at for c in cuts]
        prime = self.window
        if self.fresh is not None:
            self.fresh.add(self.buf_at, prime, data)
        self.window = (self.window + data)[-DICT_SIZE:]
        ends = cuts + [upto] if final else cuts
        fut: Future[tuple[bytes, list[int], list[int]]] | None = None
        if self.early:
            self._tell_job(self.buf_at, prime, data, ends, final)
        if self.early and self.deferred >= 0:
            self.deferred += len(prime) + n
        else:
            fut = self._compress(data, rel, final, prime)
        self.queue.append(("job", fut, ends, final, self.buf_at, prime, data, rel))
        self.jobs += 1
        self.compressed += n
        del self.buf[:n]
        self.buf_at = upto
        self.cuts = [c for c in self.cuts if c > upto]

    def _compress(
        self, data: bytes, rel: list[int], final: bool, prime: bytes
    ) -> Future[tuple[bytes, list[int], list[int]]]:
        if self.pool is None:
            fut: Future[tuple[bytes, list[int], list[int]]] = Future()
            fut.set_result(_job(data, rel, self.level, final, prime))
            return fut
        return self.pool.submit(_job, data, rel, self.level, final, prime)

    def _undefer(self) -> None:
        """Compress the jobs waiting, and from now on each as it comes (``deferred`` -1)."""
        q = self.queue
        for i, item in enumerate(q):
            if item[0] == "job" and item[1] is None:
                _, _, ends, final, at, prime, data, rel = item
                q[i] = ("job", self._compress(data, rel, final, prime),  # type: ignore[arg-type]
                        ends, final, at, prime, data, rel)
        self.deferred = -1

    def _tell_job(self, at: int, prime: bytes, data: bytes, ends: list[int], final: bool) -> None:
        # The CRC-32s the job would give, for the trailer the stream is told before it runs.
        view = memoryview(data)
        prev = at
        for end in ends:
            self.crc_parts.append(zlib.crc32(view[prev - at : end - at]))
            self.crc_lens.append(end - prev)
            prev = end
        assert self.stream is not None
        self.stream.job(at, prime, data, ends, final)
        self._told = True

    def _tell_copy(self, start: int, length: int, first: int, stop: int, delta: int) -> None:
        old = self.old
        assert old is not None
        # Vectorised: a run may copy tens of thousands of segments.
        ts = old.cut_ends[first:stop].astype(np.int64)
        prev_t = int(old.cut_ends[first - 1]) if first > 0 else 0
        self.crc_parts.extend(old.index.segments[first:stop].crcs.tolist())
        self.crc_lens.extend(np.diff(ts, prepend=prev_t).tolist())
        if self.stream is not None:
            self.stream.copy(start, length, stop)
            self._told = True

    def flush_to(self, cut: int) -> bytes:
        """Compress up to ``cut`` (a cut fed already), forget what was fed after it; return
        the 32 KiB before it."""
        assert not self.unscanned_len
        del self.buf[cut - self.buf_at :]
        self.cuts = [c for c in self.cuts if c <= cut]
        self.pos = cut
        if cut > self.buf_at:
            self._submit(cut)
        return self.window

    def copy_run(self, run: _Run) -> None:
        """Copy the old segments of a synced run, then resume compressing at its last old
        cut with the tail of the run read again from the files (or, if one changed since
        the walk, inflated from the old archive)."""
        old = self.old
        assert old is not None and run.sync is not None
        delta = run.old_start - run.new_start
        c = run.sync + delta
        first = old.cut_index(c) + 1  # the first segment after the sync cut
        last = old.last_cut_upto(run.old_end)  # the last cut in the run
        # (None, in a run in step from the stream's start that is shorter than a segment.)
        e = int(old.cut_ends[last]) if last >= 0 else 0
        if last >= first:
            start = old.comp_start(first)
            end = int(old.deflate_ends[last])
            self.queue.append(("copy", start, end - start, (first, last + 1), delta))
            self.copied += end - start
            if self.early:
                self._tell_copy(start, end - start, first, last + 1, delta)
        want_from = max(0, e - DICT_SIZE)
        have = bytearray(run.sync_window[max(0, want_from - (c - DICT_SIZE)) :] if want_from < c else b"")
        tail = self._tail_from_files(run, max(want_from, c) - delta, run.old_end - delta)
        if tail is not None:
            have += tail
        else:
            self._inflate(run, c, want_from, have)
        # have = old[max(0, e - 32768), old_end)
        new_e = e - delta
        before, rest = bytes(have[: e - want_from]), bytes(have[e - want_from :])
        self.finder = CutFinder.at_cut(new_e, before)
        self.window = before
        self.buf = bytearray()
        self.buf_at = self.pos = new_e
        self.cuts = []
        self.feed(rest)

    def _tail_from_files(self, run: _Run, a: int, b: int) -> bytes | None:
        """The new stream's bytes ``[a, b)`` (inside the run), read again from the run's
        last members; None if one of them changed since the walk."""
        out = []
        for start, end, item in run.members:
            if end <= a or start >= b:
                continue
            got = self.peek(item, max(a, start) - start, min(b, end) - start)
            if got is None:
                return None
            out.append(got)
        data = b"".join(out)
        if len(data) != b - a:
            return None
        self.peeked += len(data)
        return data

    def _inflate(self, run: _Run, c: int, want_from: int, have: bytearray) -> None:
        """Append the old stream's bytes ``[max(want_from, c), run.old_end)`` to ``have``,
        inflated from the old archive from the sync cut ``c`` on (old offsets)."""
        old = self.old
        assert old is not None
        at = c  # old tar offset reached by the inflater
        d = zlib.decompressobj(-15, zdict=run.sync_window)
        src = old.comp_start(old.cut_index(c) + 1)
        while at < run.old_end:
            chunk = old.read(src, min(_COPY, old.index.archive_size - len(GZIP_HEADER) - 8 - src))
            if not chunk:
                raise _OldFailed("the previous archive ended before a run it indexes")
            src += len(chunk)
            try:
                out = d.decompress(chunk, run.old_end - at)
                while d.unconsumed_tail and at + len(out) < run.old_end:
                    out += d.decompress(d.unconsumed_tail, run.old_end - at - len(out))
            except zlib.error as exc:
                raise _OldFailed(f"the previous archive does not inflate: {exc}") from None
            self.inflated += len(out)
            if at + len(out) > want_from:
                have += out[max(0, want_from - at) :]
            at += len(out)
            if not out and not d.unconsumed_tail and d.eof:
                raise _OldFailed("the previous archive ended before a run it indexes")

    def finish(self) -> Iterator[bytes]:
        self.feed(b"")
        self._submit(self.pos, final=True)
        if not self.early:
            yield from self._ready(0)
        trailer = gzip_trailer(crc32_concat(self.crc_parts, self.crc_lens), self.pos)
        if self.stream is not None:
            self.stream.trailer(trailer)
        if self.early:
            yield b""  # the stream has everything: the caller takes it before the jobs run
            yield from self._ready(0)
        yield trailer

    def _ready(self, keep: int) -> Iterator[bytes]:
        if self.deferred > 0:
            if keep and self.deferred <= DEFER_LIMIT:
                if self._told:
                    self._told = False
                    yield b""  # nothing goes out yet: the caller takes the stream's records
                return
            self._undefer()
        while self.queue and (self.jobs > keep or self._done(self.queue[0])):
            item = self.queue.popleft()
            if item[0] == "job":
                self.jobs -= 1
                _, fut, ends, final, at, prime, data, _rel = item
                assert isinstance(fut, Future) and isinstance(ends, list) and isinstance(at, int)
                out, comp_ends, crcs = fut.result()
                if self.stream is not None and not self.early:
                    self.stream.job(at, prime, data, ends, bool(final))  # type: ignore[arg-type]
                prev = at
                for i, end in enumerate(ends):
                    if not self.early:
                        self.crc_parts.append(crcs[i])
                        self.crc_lens.append(end - prev)
                    if i < len(comp_ends):
                        self.seg_tar.append(end)
                        self.seg_deflate.append(self.comp_pos + comp_ends[i])
                    prev = end
                self.comp_pos += len(out)
                if out:
                    yield out
            else:
                _, start, length, span, delta = item
                assert self.old is not None and isinstance(start, int) and isinstance(length, int)
                assert isinstance(span, tuple) and isinstance(delta, int)
                first, stop = span
                if self.fresh is not None:
                    self.fresh.copied(len(self.seg_tar), first, stop - first)
                if not self.early:
                    self._tell_copy(start, length, first, stop, delta)
                old = self.old
                ts = old.cut_ends[first:stop].astype(np.int64)
                self.seg_tar.extend((ts - delta).tolist())
                self.seg_deflate.extend(
                    (old.deflate_ends[first:stop].astype(np.int64) + (self.comp_pos - start)).tolist()
                )
                for off in range(0, length, _COPY):
                    n = min(_COPY, length - off)
                    yield self.old.read(start + off, n)
                self.comp_pos += length

    @staticmethod
    def _done(item: tuple[object, ...]) -> bool:
        return item[0] != "job" or bool(item[1].done())  # type: ignore[attr-defined]

    def close(self) -> None:
        if self.pool is not None:
            for item in self.queue:
                if item[0] == "job" and item[1] is not None:
                    item[1].cancel()  # type: ignore[attr-defined]
            self.pool.shutdown(wait=True, cancel_futures=True)


def _pread_checked(
    top_fd: int, rel: str, same: Callable[[os.stat_result], bool], lo: int, hi: int
) -> bytes | None:
    """Bytes ``[lo, hi)`` of the file ``rel`` under ``top_fd`` if it is still the file
    ``same`` vouches for."""
    fds: list[int] = []
    try:
        at = top_fd
        *dirs, name = rel.split("/")
        for d in dirs:
            at = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=at)
            fds.append(at)
        fd = os.open(name, _O_READ, dir_fd=at)
        fds.append(fd)
        if not same(os.fstat(fd)):
            return None
        chunks = []
        pos = lo
        while pos < hi:
            got = os.pread(fd, hi - pos, pos)
            if not got:
                return None
            chunks.append(got)
            pos += len(got)
        if not same(os.fstat(fd)):
            return None
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        for fd in fds:
            os.close(fd)


_T = TypeVar("_T")
#: Output chunks (≤ ``_COPY`` or a job's deflate each) that may wait for ``_Beside``.
_BESIDE = 2


class _Beside(Generic[_T]):
    """``fn(chunk)`` for each chunk handed over, in their order, in one worker thread beside
    the iterating one: the archive's blake3 and the caller's ``sink`` (a file write)
    release the GIL, so ~30 MB of copied deflate a build is hashed and written on the other
    core while this one walks and splices.  At most ``_BESIDE`` chunks wait (memory stays
    bounded); ``inline`` (a builder with no threads): at once, in the caller.  ``wait``:
    until every chunk is done (its error raised there); ``close``: the thread ends, chunks
    not taken yet are dropped (after an error, or a consumer that stopped iterating)."""

    def __init__(
        self, fn: Callable[[_T], object], inline: bool, name: str = "deltabkp-archive-out"
    ) -> None:
        self._fn = fn
        self._pool = None if inline else ThreadPoolExecutor(1, name)
        self._todo: collections.deque[Future[object]] = collections.deque()

    def put(self, chunk: _T) -> None:
        if self._pool is None:
            self._fn(chunk)
            return
        self._todo.append(self._pool.submit(self._fn, chunk))
        while len(self._todo) > _BESIDE or (self._todo and self._todo[0].done()):
            self._todo.popleft().result()

    def wait(self) -> None:
        while self._todo:
            self._todo.popleft().result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


# -- changed files: their unchanged stretches -------------------------------------------------

#: A changed file's stretch equal to its old bytes is reused only from this long on: the
#: splicer needs 32 KiB to get back in step, then at least a segment (≤ 64 KiB) to copy.
_MATCH_MIN = DICT_SIZE + MAX_SEGMENT
#: Granularity of the compare of a changed file's bytes with its old ones (a multiple of 8).
_MATCH_BLOCK = 4096
#: Header bytes (with PAX records) and padding beyond a file's data in its tar entry, at most.
_ENTRY_SLACK = 1 << 20
_INFLATE_ERRORS = (zlib.error, cast("type[Exception]", isal_zlib.error), ArchiveError)


def _changed_prior(old: _Old, prev: int, st: os.stat_result, mem_limit: int) -> int:
    """``prev`` if the old entry at a changed file's path is a file whose unchanged
    stretches are worth looking for (both sizes in ``[_MATCH_MIN, mem_limit]``), else -1."""
    r = old.index.entries.raw(prev)
    kind, size = r[0], r[9]
    if kind != DATA or not _MATCH_MIN <= min(size, st.st_size) <= max(size, st.st_size) <= mem_limit:
        return -1
    return prev


def _old_tar(old: _Old, cut: int, window: bytes, hi: int) -> bytes | None:
    """The old tar bytes ``[cut, hi)``, inflated from the old archive at its segment
    boundary ``cut`` with ``window`` (the 32 KiB of tar before it); None if the archive
    does not give them (it is only a cache).  Inflating is exact whatever the library:
    ISA-L, ~2x zlib's speed."""
    k = old.cut_index(cut)
    if k < 0:
        return None
    src = int(old.deflate_ends[k])
    end = old.index.archive_size - len(GZIP_HEADER) - 8
    want = hi - cut
    d = isal_zlib.decompressobj(-15, zdict=window)
    out: list[bytes] = []
    n = 0
    try:
        while n < want:
            if d.eof:
                return None
            chunk = d.unconsumed_tail
            if not chunk:
                if src >= end:
                    return None
                chunk = old.read(src, min(_COPY, end - src))
                src += len(chunk)
            got = d.decompress(chunk, want - n)
            out.append(got)
            n += len(got)
    except _OldFailed as exc:
        old.failed = str(exc)
        return None
    except _INFLATE_ERRORS:
        return None
    return b"".join(out)


def _equal_stretches(new: bytes | memoryview, old: bytes | memoryview) -> list[tuple[int, int]]:
    """The stretches ``[a, b)`` where ``new`` and ``old`` hold the same bytes at the same
    offsets (compared exactly, a block at a time), at least ``_MATCH_MIN`` long."""
    m = min(len(new), len(old))
    n = m // _MATCH_BLOCK
    if n == 0:
        return []
    w = _MATCH_BLOCK // 8
    a = np.frombuffer(new, np.uint64, n * w).reshape(n, w)
    b = np.frombuffer(old, np.uint64, n * w).reshape(n, w)
    same = (a == b).all(axis=1).astype(np.int8)
    edges = np.diff(np.concatenate(([0], same, [0])))
    out = []
    for s, e in zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(),
                    strict=True):
        lo, hi = s * _MATCH_BLOCK, e * _MATCH_BLOCK
        if e == n and new[hi:m] == old[hi:m]:
            hi = m  # the last partial block: a same-size file's run goes on into the next entry
        if hi - lo >= _MATCH_MIN:
            out.append((lo, hi))
    return out


def _padded(n: int) -> int:
    return n + (-n % 512)


def _splice_changed(
    sp: _Splicer, old: _Old, item: _Item, run: _Run | None, total: int, entries: EntryTable,
    mem_limit: int,
) -> Generator[bytes, None, tuple[_Run | None, int] | None]:
    """Splice a changed file whose old entry (``item.prior``) directly follows the run in
    sync that ends here, reusing the stretches of it that are unchanged at the same in-file
    offsets (an edit in place, an append): each becomes a run of its own (new tar offset <->
    old tar offset), so the splicer gets back in step 32 KiB into it and copies the old
    segments, exactly as for a run of unchanged entries.  Returns the run and tar offset to
    go on with, or None (nothing done) when the old entry does not follow such a run.

    Why it is exact: the file is read once, with the fresh build's hot-read rules, and what
    was read is what is stored; the old bytes are inflated from the old archive (exact),
    from the run's last cut with the 32 KiB before it, which ``copy_run`` has just made the
    compressor's window; the two are compared byte for byte (a CRC would not do: a
    collision would store wrong bytes, silently).  Measured on the 1.7 MB file of the
    benchmark's change set: see the module docstring."""
    o_start, o_end = old.span(item.prior)
    if run is None or run.sync is None or run.old_end != o_start:
        return None
    delta = run.old_start - run.new_start
    # Read whole: the walk saw it ≤ ``mem_limit`` (``_changed_prior``).  One that grew past
    # it since goes the ordinary way (spooled or streamed), the pieces read so far first.
    head: list[bytes] = []
    n = 0
    rest = item.pieces
    for piece in rest:
        head.append(piece)
        n += len(piece)
        if n > mem_limit + _ENTRY_SLACK:
            item.pieces = itertools.chain(head, rest)
            return None
    sp.copy_run(run)
    # ``copy_run`` resumed compressing at the run's last old cut, this window before it.
    cut, window = sp.buf_at + delta, sp.window
    start = total
    new = b"".join(head)
    r = item.record
    if sp.stream is not None and r is not None:
        sp.stream.placing(r, start, start + len(new))
    stretches: list[tuple[int, int]] = []
    old_size = old.index.entries.raw(item.prior)[9]
    # The data is compared at the same in-file offsets; the headers before it may differ
    # in length (a PAX mtime record appears when an mtime gains a fraction of a second: a
    # file extracted or copied with whole-second times, then written in place).
    new_head = len(new) - _padded(r.size) if r is not None else -1
    old_head = o_end - o_start - _padded(old_size)
    if new_head >= 0 and old_head >= 0:
        got = _old_tar(old, cut, window, o_end)
        if got is not None:
            stretches = [
                (new_head + a, new_head + b) for a, b in _equal_stretches(
                    memoryview(new)[new_head:], memoryview(got)[o_start - cut + old_head :]
                )
            ]
    # Old tar offset - new tar offset, in every stretch (all of them lie in the data).
    shift = o_start + old_head - start - new_head
    run = None
    at = 0
    view = memoryview(new)
    for a, b in [*stretches, (len(new), len(new))]:
        if a > at:  # changed bytes: compressed (ending the stretch before)
            if run is not None and run.sync is not None:
                sp.copy_run(run)
            run = None
            sp.feed(view[at:a], scan=False)
            yield from sp.spill()
        if b > a:  # the first stretch of a run, as ``_splice`` feeds one
            run = _Run(start + a, start + a + shift, start + a + shift)
            for off in range(a, b, _FEED):
                for c in sp.feed(view[off : min(b, off + _FEED)], batch=_FEED):
                    if c - run.new_start >= DICT_SIZE and old.cut_index(c + shift) >= 0:
                        run.sync = c
                        run.sync_window = sp.flush_to(c)
                        break
                if run.sync is not None:
                    sp.matched += start + b - c
                    break
                yield from sp.spill()
            run.add(start + a, start + b, _Item(iter(()), -1, data=new[a:b]))
            run.old_end = start + b + shift
        at = b
    total = start + len(new)
    if r is not None:
        entries.append(r.placed(start, total))
    yield from sp._ready(sp.threads)
    return run, total


def _after(build: IncrementalBuilder, sent: int, digest: bytes, why: str) -> Iterator[bytes]:
    """``build``'s bytes after its first ``sent``, which must hash to ``digest``: the
    previous archive failed midway, after ``sent`` bytes of a build that are a fresh
    build's first ``sent`` (the module's invariant), so a fresh build goes on from there.
    Unless the tree changed since the first walk: then its prefix differs (``ArchiveError``,
    nothing more is made of a tree that moved under a failing cache)."""
    h = blake3.blake3()
    for chunk in build:
        if sent > 0:
            head, chunk = chunk[:sent], chunk[sent:]
            h.update(head)
            sent -= len(head)
            if sent == 0 and h.digest() != digest:
                raise ArchiveError(f"{why}, but the tree changed meanwhile: the bytes already "
                                   "made are not the fresh build's")
            if not chunk:
                continue
        yield chunk
    if sent > 0:
        raise ArchiveError(f"{why}, but the tree changed meanwhile: the fresh build is shorter")


# -- the builder ------------------------------------------------------------------------------


class IncrementalBuilder(TgzBuilder):
    """``TgzBuilder`` that reuses a previous build of the same tree: give it the previous
    build's ``index`` and the path of that archive (both may be None: a full build).  After
    iteration, ``index`` is this build's index (keep it with the archive for the next one)
    and ``stats`` what was reused.  ``previous_hashed``: the ``stat`` of the previous
    archive's file taken when its caller last hashed it (wrote it): the same file again
    (device, inode, size, mtime and ctime) is not hashed again before use; else it is.
    ``racy_ns``: a file modified this close to its read is
    never reused by the next build (default 2 s, generous for coarse clocks: git's racy-clean
    rule).  ``sink``: called with every chunk of the archive, in order, in a worker thread
    (with the archive's blake3, beside the build; done when the iteration ends): e.g. a
    file's ``write``, off the building thread; the chunks are still yielded as well.
    ``stream``: told each copy and compression job as it goes out (``BuildStream``), from
    the iterating thread: the layout delta made while the archive is built.
    ``stream_first``: the stream is told each copy and job as it is queued, and the whole
    tar (its trailer included) before the jobs are compressed (the build yields empty
    chunks meanwhile, for its caller to take what the stream made): a layout delta whose
    receiver compresses the jobs itself need not wait for this build's compression (the
    jobs wait, up to ``DEFER_LIMIT`` bytes of tar; past it they are compressed as they
    come).  The archive is the same bytes either way."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        previous: ArchiveIndex | None = None,
        previous_archive: str | os.PathLike[str] | None = None,
        previous_hashed: os.stat_result | None = None,
        racy_ns: int = RACY_NS,
        exclude: Sequence[str] = (),
        level: int = 6,
        threads: int = 2,
        sink: Callable[[bytes], object] | None = None,
        stream: BuildStream | None = None,
        stream_first: bool = False,
        **kw: object,
    ) -> None:
        super().__init__(root, exclude=exclude, level=level, threads=threads, **kw)  # type: ignore[arg-type]
        if level < MIN_LEVEL:
            # zlib's fast levels (deflate_fast) skip hash insertions inside long matches, so
            # a compressor primed by zdict is not in the state of one that compressed the
            # stream: their bytes depend on where jobs start (measured), and a spliced
            # archive would differ from a fresh one.
            raise ArchiveError(f"incremental builds need a deflate level of {MIN_LEVEL}..9, not {level}")
        self.previous = previous
        self.previous_archive = previous_archive
        self.previous_hashed = previous_hashed
        self.racy_ns = racy_ns
        self.sink = sink
        self.stream = stream
        self.stream_first = stream_first
        self._index: ArchiveIndex | None = None
        self._stats: IncrementalStats | None = None
        #: For a build afresh if the previous archive fails midway (``_afresh``).
        self._args: dict[str, Any] = dict(exclude=exclude, level=level, threads=threads,
                                          racy_ns=racy_ns, **kw)
        self._fresh: BuildHandover | None = None
        self._walk: tuple[_Counts, _Splicer] | None = None

    @property
    def walked(self) -> ArchiveReport:
        """``report`` as far as the walk went (``bytes_out`` 0): all of it once the stream
        was told the trailer (``stream_first``: before the archive is compressed)."""
        if self._walk is None:
            raise ArchiveError("the build has not started")
        counts, splicer = self._walk
        return counts.report(splicer.pos, 0)

    @property
    def index(self) -> ArchiveIndex:
        """This build's index, for the next build; an ``ArchiveError`` until the end."""
        return _once_built(self._index, "the archive index exists")

    @property
    def stats(self) -> IncrementalStats:
        """What this build reused; an ``ArchiveError`` until the iteration has ended."""
        return _once_built(self._stats, "the build stats exist")

    @property
    def handover(self) -> BuildHandover | None:
        """What this build compressed (its tar) and copied (which old segments), for
        ``encode_layout``; None until the iteration has ended, for a build without a
        previous one, and for one that went on afresh when the previous archive failed
        midway (``stats.previous`` says why)."""
        return self._fresh

    def _generate(self) -> Generator[bytes, None, None]:
        top, top_fd = open_root(self.root, no_links=self.no_links)
        old, why = _open_previous(
            self.previous, self.previous_archive, self.level, self.previous_hashed
        )
        _Old._checked = None  # taken over by ``old`` above, or another index's: let go
        if old is not None:
            old.trust_verified(self.racy_ns)
        opened = [0]
        peeked = [0]

        def peek(item: _Item, a: int, b: int) -> bytes | None:
            assert old is not None  # peeks are of run members: there is a previous build
            return self._peek(top_fd, old, item, a, b, peeked)

        splicer = _Splicer(self.level, self.threads, old, peek)
        counts = _Counts()
        self._walk = (counts, splicer)
        entries = EntryTable(bytearray())
        if self.stream is not None:
            if old is None:
                self.stream.fail(why or "no previous build")
            else:
                self.stream.bind(entries, old.index.archive_hash)
                splicer.stream = self.stream
                splicer.early = self.stream_first
                splicer.fresh = None  # the stream takes what a hand-over would keep
        reused = [0]
        h = blake3.blake3()
        sink = self.sink

        def take(chunk: bytes) -> None:
            h.update(chunk)
            if sink is not None:
                sink(chunk)

        beside = _Beside(take, inline=self.threads <= 0)
        size = 0
        try:
            beside.put(GZIP_HEADER)
            size = len(GZIP_HEADER)
            yield GZIP_HEADER
            sync = [-1]
            try:
                for chunk in self._splice(
                    splicer, self._items(top, top_fd, counts, old, opened, sync), entries,
                    reused, sync,
                ):
                    if chunk:
                        beside.put(chunk)
                        size += len(chunk)
                    yield chunk
            except _OldFailed as exc:
                why = f"{exc}: built afresh"
                if self.stream is not None:
                    self.stream.fail(why)
                splicer.close()
                beside.wait()  # ``h`` now holds what went out
                afresh = IncrementalBuilder(self.root, **self._args)
                for chunk in _after(afresh, size, h.digest(), why):
                    beside.put(chunk)
                    size += len(chunk)
                    yield chunk
                beside.wait()
                self._report, self._index = afresh.report, afresh.index
                # The fresh build had no previous one to fail: what the first attempt's
                # compares met is kept (the agent logs it: the kept archive may be going bad).
                self._stats = attrs.evolve(
                    afresh.stats, previous=why, old_failed=old.failed if old is not None else ""
                )
                return
            beside.wait()
        finally:
            beside.close()
            os.close(top_fd)
            splicer.close()
            if old is not None and old.f is not None:
                old.f.close()
        self._report = counts.report(splicer.pos, size)
        self._index = ArchiveIndex(
            archive_hash=h.digest(), archive_size=size, tar_size=splicer.pos,
            level=self.level, deflater=deflater(self.level), entries=entries,
            segments=SegmentTable.from_columns(
                splicer.seg_tar, splicer.seg_deflate, splicer.crc_parts[: len(splicer.seg_tar)]
            ),
        )
        if splicer.fresh is not None and not why:
            assert old is not None  # a keeper is made only with a previous build
            self._fresh = splicer.fresh.value(self._index.archive_hash, old.index.archive_hash)
        self._stats = IncrementalStats(
            previous=why, entries_reused=reused[0], files_opened=opened[0],
            bytes_compressed=splicer.compressed, bytes_copied=splicer.copied,
            bytes_inflated=splicer.inflated, files_peeked=peeked[0],
            bytes_peeked=splicer.peeked, bytes_matched=splicer.matched,
            old_failed=old.failed if old is not None else "",
        )

    def _items(
        self, top: bytes, top_fd: int, counts: _Counts, old: _Old | None, opened: list[int],
        sync: list[int],
    ) -> Iterator[_Item | _Reused]:
        links: dict[tuple[int, int], str] = {}
        batch: _Reused | None = None
        expect = -1  # old tar offset the next file of ``batch`` must start at
        at_path = old.at_path if old is not None else {}
        limit = self.spool_limit
        for rel, dir_fd, name, st in walk(top, top_fd, self.exclude, counts.skip):
            # Fast path: a file with its old identity, next in a run already in sync
            # (``sync[0]``: the old offset where that run goes on; -1 when none is).  No
            # hard link (``links`` bookkeeping), nothing read: gathered, then handed over
            # as one ``_Reused`` before any other item (the splicer is waiting meanwhile,
            # so the run stays in sync until then).
            if old is not None and st.st_nlink == 1 and (batch is not None or sync[0] >= 0):
                p = at_path.get(rel, -1)
                if (p >= 0 and old.starts[p] == (expect if batch is not None else sync[0])
                        and st.st_size <= limit and old.ident[p] == _identity(st)):
                    if batch is None:
                        batch = _Reused(p, [], [])
                    batch.rels.append(rel)
                    batch.sts.append(st)
                    counts.files += 1
                    counts.content += st.st_size
                    expect = old.ends[p]
                    continue
            if batch is not None:
                yield batch
                batch = None
            item = self._item(rel, dir_fd, name, st, counts, old, opened, links)
            if item is None:
                continue
            yield item
            if item.st is not None and not item.read:
                self._reused_unread(rel, st, counts, links)
        if batch is not None:
            yield batch

    @staticmethod
    def _reused_unread(
        rel: str, st: os.stat_result, counts: _Counts, links: dict[tuple[int, int], str]
    ) -> None:
        """A file reused without being read: what ``_file`` would have counted."""
        counts.files += 1
        counts.content += st.st_size
        if st.st_nlink > 1:
            links[(st.st_dev, st.st_ino)] = rel

    def _item(
        self, rel: str, dir_fd: int, name: str, st: os.stat_result, counts: _Counts,
        old: _Old | None, opened: list[int], links: dict[tuple[int, int], str],
    ) -> _Item | None:
        """One walked entry as an item (None: nothing stored, e.g. a skipped socket)."""
        prev = old.find(rel) if old is not None else -1
        if stat.S_ISREG(st.st_mode) and not (st.st_nlink > 1 and (st.st_dev, st.st_ino) in links):
            candidate, verify = -1, False
            if prev >= 0 and old is not None and st.st_size <= self.spool_limit:
                if old.reusable_file(prev, st):
                    candidate = prev
                elif st.st_size <= self.mem_limit and old.racy_file(prev, st):
                    # Racy last time: read again, one by one, not recompressed (``_verify``).
                    candidate, verify = prev, True
            item = _Item(iter(()), candidate, rel=rel, st=st, verify=verify)
            if candidate < 0 and prev >= 0 and old is not None:
                item.prior = _changed_prior(old, prev, st, self.mem_limit)
            item.pieces = self._read_file(item, rel, dir_fd, name, st, counts, links, opened, old)
            return item
        pieces = list(self._entry(rel, dir_fd, name, st, counts, links))
        if not pieces:
            return None
        digest = blake3.blake3(b"".join(pieces)).digest(length=16)
        record = IndexEntry(rel, HEADER_ONLY, True, digest=digest)
        same = prev if prev >= 0 and old is not None and old.header_digest(prev) == digest else -1
        data = b"".join(pieces)
        return _Item(iter([data]), same, record, equal=same >= 0, rel=rel, data=data)

    def _peek(
        self, top_fd: int, old: _Old, item: _Item, a: int, b: int, peeked: list[int]
    ) -> bytes | None:
        """Tar bytes ``[a, b)`` of a reused entry (relative to its start), the file read
        again by its path (no symlink followed) and checked, before and after the read,
        to still have the identity the walk saw; None otherwise."""
        st = item.st
        if st is None:
            return item.data[a:b]
        if item.verify:
            # Its identity cannot vouch for a second read: the bytes verified are kept
            # (the last ``DICT_SIZE + MAX_SEGMENT``: all a run's tail can need of one entry).
            at = item.data_at
            return item.data[a - at : b - at] if a >= at and item.old >= 0 else None
        i = item.old
        assert i >= 0
        hdr = _header(item.rel, st, tarfile.REGTYPE, size=st.st_size)
        end = len(hdr) + st.st_size
        out = [hdr[a:b]] if a < len(hdr) else []
        lo, hi = max(a, len(hdr)) - len(hdr), min(b, end) - len(hdr)
        if lo < hi:
            peeked[0] += 1
            data = _pread_checked(top_fd, item.rel, lambda s: old.same_file(i, s), lo, hi)
            if data is None:
                return None
            out.append(data)
        if b > max(a, end):
            out.append(bytes(b - max(a, end)))
        return b"".join(out)

    def _read_file(
        self, item: _Item, rel: str, dir_fd: int, name: str, st: os.stat_result,
        counts: _Counts, links: dict[tuple[int, int], str], opened: list[int],
        old: _Old | None,
    ) -> Iterator[bytes]:
        """The file's tar bytes, read like a fresh build; fills ``item.record``/``equal``."""
        item.read = True
        opened[0] += 1
        n_changed = len(counts.changed)
        counts.stored = None
        t0 = time.time_ns()
        first = True
        # A racy file's bytes are hashed: its identity cannot vouch for its content later,
        # but the digest lets ``unchanged`` check it by reading that one file again.
        h: blake3.blake3 | None = None
        for piece in self._entry(rel, dir_fd, name, st, counts, links):
            if first:
                first = False
                s = counts.stored
                assert s is not None
                consistent = len(counts.changed) == n_changed and s.st_size <= self.spool_limit
                racy = max(s.st_mtime_ns, s.st_ctime_ns) >= t0 - self.racy_ns
                item.record = IndexEntry(
                    rel, DATA, consistent and not racy, s.st_mode, s.st_uid, s.st_gid,
                    s.st_nlink, s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns,
                )
                item.equal = (
                    consistent and item.old >= 0 and old is not None
                    and old.same_file(item.old, s)
                )
                if consistent and racy:
                    h = blake3.blake3()
            if h is not None:
                h.update(piece)
            yield piece
        if h is not None and item.record is not None and len(counts.changed) == n_changed:
            item.record = attrs.evolve(item.record, digest=h.digest(length=16))

    def unchanged(self, index: ArchiveIndex) -> bool:
        """Would a build now give exactly the archive ``index`` describes?  Answered from
        metadata (a walk and an ``lstat`` of each entry, like ``tree_fingerprint``), except that files that
        were racy when that archive was built are read again, one by one, and compared
        with the digest of the bytes it stored.  Nothing is compressed.  False whenever it
        cannot be sure (any entry added, removed, changed, or a racy one unreadable)."""
        old = _Old(index, None)
        # (Positions another check of this index verified, taken over: vouched for as far
        # as both checks' racy windows allow.)
        old.verified_ns = min(old.verified_ns, self.racy_ns) if old.verified else self.racy_ns
        same = self._unchanged(index, old)
        # Changed: a build from this index follows (the agent's), and takes these lookups
        # over; unchanged: none does, and nothing is kept.
        _Old._checked = None if same else old
        return same

    def settled(
        self, index: ArchiveIndex, *, budget: int = SETTLE_BUDGET, seconds: float = SETTLE_S
    ) -> ArchiveIndex | None:
        """``index`` with the files that were racy when its archive was built read again
        now (hot-safe, as a build reads), one by one, and those equal to what it stored,
        with the same identity and not racy now, recorded as reusable files (the records
        a build's own re-read stores); None if there is none such.  The archive is not
        touched: its bytes are those of that index either way.  For after a racy build
        (the agent, once its answer went, off the next backup's path): the next build
        reuses them unread where it would have read each again, and the quick check
        before it reads none.  Only those files are looked at (no walk: each reached by
        its path from the root, no symlink followed, then ``lstat``), so a tree with one
        racy log costs that log; none racy (one gather of the index's flags): nothing.
        A file changed since, racy still, or with other links is left as it was.  It stops
        once it read ``budget`` bytes or ran ``seconds`` (the agent holds the path's lock
        meanwhile: a tree that was all racy must not keep the next backup waiting); files
        not reached stay racy, read by the next build as before."""
        t = index.entries
        if not len(t):
            return None
        offs = np.frombuffer(t._offsets, np.uint64).astype(np.int64)
        raw = np.frombuffer(t._data, np.uint8)
        kind, flags = raw[offs], raw[offs + 1]
        del raw
        racy = np.flatnonzero((kind == DATA) & ((flags & _FLAG_REUSABLE) == 0)).tolist()
        if not racy:
            return None
        top, top_fd = open_root(self.root, no_links=self.no_links)
        deadline = time.monotonic() + seconds
        counts = _Counts()
        links: dict[tuple[int, int], str] = {}
        found: list[int] = []
        here: str | None = None  # the directory ``fds`` lead to (index order: by directory)
        fds: list[int] = []
        try:
            for p in racy:
                if budget <= 0 or time.monotonic() >= deadline:
                    break
                r = t.raw(p)
                digest = bytes(r[14])
                if digest == bytes(16):  # not read consistently then: nothing to compare
                    continue
                rel = t.path(p)
                d, _, name = rel.rpartition("/")
                if d != here:
                    for fd in fds:
                        if fd >= 0:
                            os.close(fd)
                    fds, here = [], d
                    try:
                        for part in d.split("/") if d else ():
                            fds.append(os.open(part, _O_DIR, dir_fd=fds[-1] if fds else top_fd))
                    except OSError:
                        fds.append(-1)  # gone or replaced: none of its files is read
                if fds and fds[-1] < 0:
                    continue
                dfd = fds[-1] if fds else top_fd
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except OSError:
                    continue
                o = t._offsets[p]
                if (not stat.S_ISREG(st.st_mode) or st.st_nlink != 1
                        or st.st_size > self.mem_limit
                        or _identity(st) != t._data[o + _IDENTITY_AT : o + _IDENTITY_AT + _IDENTITY.size]):
                    continue
                if max(st.st_mtime_ns, st.st_ctime_ns) >= time.time_ns() - self.racy_ns:
                    continue  # racy still: a read now could not settle it (the next build reads it)
                item = _Item(iter(()), p, rel=rel, st=st, verify=True)
                h = blake3.blake3()
                for piece in self._read_file(item, rel, dfd, name, st, counts, links, [0], None):
                    h.update(piece)
                    budget -= len(piece)
                rec = item.record
                if (rec is not None and rec.reusable and h.digest(length=16) == digest
                        and rec.identity() == tuple(r[3:12])):
                    found.append(p)
        finally:
            for fd in fds:
                if fd >= 0:
                    os.close(fd)
            os.close(top_fd)
        if not found:
            return None
        return attrs.evolve(index, entries=t.with_reusable(found))

    def _unchanged(self, index: ArchiveIndex, old: _Old) -> bool:
        top, top_fd = open_root(self.root, no_links=self.no_links)
        counts = _Counts()
        n = 0  # position in the index: a walk of an unchanged tree meets its entries in order
        links: dict[tuple[int, int], str] = {}
        at_path, ident, limit = old.at_path, old.ident, self.spool_limit
        try:
            for rel, dir_fd, name, st in walk(top, top_fd, self.exclude, counts.skip):
                # The common case without making an item (an agent's every quick check): a
                # file with that entry's identity (a reusable file's: its mode says regular
                # file), at that entry's place; inline, it is most of the check's Python.
                if (n < len(ident) and ident[n] == _identity(st) and at_path.get(rel) == n
                        and st.st_size <= limit
                        and not (st.st_nlink > 1 and (st.st_dev, st.st_ino) in links)):
                    counts.files += 1
                    counts.content += st.st_size
                    if st.st_nlink > 1:
                        links[(st.st_dev, st.st_ino)] = rel
                    n += 1
                    continue
                item = self._item(rel, dir_fd, name, st, counts, old, [0], links)
                if item is None:
                    continue
                n += 1
                if item.old == n - 1 and not item.verify:  # that identity: same bytes, unread
                    continue
                if n > len(index.entries):
                    return False
                e = index.entries[n - 1]
                if e.kind != DATA or e.digest == bytes(16) or item.rel != e.path:
                    return False
                # The walk's lstat already differs from the entry's identity (a ctime never
                # goes back, so no read can match it): changed, and not read here — a log
                # appended to all the time would otherwise be read twice per backup, here
                # and by the build that follows.
                if item.st is not None and not old.same_file(n - 1, item.st):
                    return False
                # Racy when built: read it again (hot-safe, as a build would).
                h = blake3.blake3()
                for piece in item.pieces:
                    h.update(piece)
                r = item.record
                if r is None or h.digest(length=16) != e.digest or r.identity() != e.identity():
                    return False
                if r.reusable:  # read consistently, not racy now: the build need not again
                    old.verified.append(n - 1)
            return n == len(index.entries) and not counts.changed
        finally:
            os.close(top_fd)

    @staticmethod
    def _verify(item: _Item, old: _Old) -> None:
        """A file racy when the previous build read it, with that identity again: read now
        (hot-safe, as a build reads) and kept as the old entry only if its tar bytes hash
        to the digest kept for them (a racy file costs a read, not a recompression)."""
        pieces = list(item.pieces)  # ≤ mem_limit: read whole into memory by ``_file`` anyway
        item.pieces = iter(pieces)
        o_start, o_end = old.span(item.old)
        h = blake3.blake3()
        for piece in pieces:
            h.update(piece)
        if not (item.equal and sum(map(len, pieces)) == o_end - o_start
                and h.digest(length=16) == old.digest(item.old)):
            item.old, item.equal = -1, False
            return
        keep = DICT_SIZE + MAX_SEGMENT
        tail = b"".join(pieces)[-keep:]  # for a run's tail (``_peek``): never read twice
        item.data, item.data_at = tail, o_end - o_start - len(tail)

    def _splice(
        self, sp: _Splicer, items: Iterator[_Item | _Reused], entries: EntryTable,
        reused: list[int], sync: list[int],
    ) -> Iterator[bytes]:
        old = sp.old
        run: _Run | None = None
        total = 0  # tar offset of the next entry

        def end_run() -> None:
            nonlocal run
            if run is not None and run.sync is not None:
                sp.copy_run(run)
            run = None

        while True:
            # Where a run in sync goes on in the old stream: ``_items`` batches what follows.
            sync[0] = run.old_end if run is not None and run.sync is not None else -1
            item = next(items, None)
            if item is None:
                break
            if isinstance(item, _Reused):
                assert old is not None and run is not None and run.sync is not None
                first, n = item.first, len(item.rels)
                last = first + n - 1
                assert old.starts[first] == run.old_end
                shift = run.old_start - run.new_start
                entries.append_reused(old.index.entries, first, last, shift)
                old.mark(entries, first, last)
                # Members for the run's tail: only the last ones can be in it.
                run_end = old.ends[last] - shift
                k = n - 1
                while k > 0 and old.ends[first + k - 1] - shift >= run_end - DICT_SIZE - MAX_SEGMENT:
                    k -= 1
                for j in range(k, n):
                    p = first + j
                    run.add(old.starts[p] - shift, old.ends[p] - shift,
                            _Item(iter(()), p, rel=item.rels[j], st=item.sts[j]))
                total = run_end
                run.old_end = old.ends[last]
                reused[0] += n
                continue
            if item.verify and old is not None:
                self._verify(item, old)
            if item.old < 0 and item.prior >= 0 and old is not None:
                done = yield from _splice_changed(sp, old, item, run, total, entries,
                                                  self.mem_limit)
                if done is not None:
                    run, total = done
                    continue
            o = item.old
            if o < 0 or old is None:
                end_run()
                start = total
                for piece in item.pieces:
                    if total == start and sp.stream is not None and item.record is not None:
                        # The header (the record is known with it): where the entry will lie.
                        sp.stream.placing(item.record, start,
                                          start + len(piece) + _padded(item.record.size))
                    total += len(piece)
                    sp.feed(piece, scan=False)
                    yield from sp.spill()
                if item.record is not None:
                    entries.append(item.record.placed(start, total))
                continue
            o_start, o_end = old.span(o)
            if run is None or o_start != run.old_end:
                end_run()
                assert sp.pos == total
                run = _Run(total, o_start, o_start)
                if total == 0 and o_start == 0:
                    # Both streams start with this entry: in step from the first byte (no
                    # window, the cut finder fresh), so the old segments are copied from
                    # the first one, and nothing of the run is read or compressed.
                    run.sync = 0
            if run.sync is not None:
                # In sync: the old compressed bytes cover it; nothing is read (but a racy
                # file, verified).  Its record is the old one moved (a header-only entry's
                # new record equals it), or the verified file's new one.
                if item.read and item.record is not None:
                    entries.append(item.record.placed(total, total + o_end - o_start))
                else:
                    entries.append_moved(old.index.entries, o, total, total + o_end - o_start)
                    old.mark(entries, o, o)
                run.add(total, total + o_end - o_start, item)
                total += o_end - o_start
                run.old_end = o_end
                reused[0] += 1
                continue
            # The first stretch of a run: read and compressed, watching for the sync cut.
            start = total
            delta = run.old_start - run.new_start
            checked = False
            for piece in item.pieces:
                if total == start and sp.stream is not None and item.record is not None:
                    sp.stream.placing(item.record, start,
                                      start + len(piece) + _padded(item.record.size))
                if not checked:
                    checked = True
                    if not item.equal:
                        # Changed after all (seen by the read): not part of the run.
                        end_run()
                        o = -1
                if o < 0 or run is None or run.sync is not None:
                    total += len(piece)
                    if o < 0:
                        sp.feed(piece, scan=False)
                        yield from sp.spill()
                    continue
                view = memoryview(piece)
                for at in range(0, len(piece), _FEED):
                    if run.sync is not None:
                        break
                    for c in sp.feed(view[at : at + _FEED], batch=_FEED):
                        if c - run.new_start >= DICT_SIZE and old.cut_index(c + delta) >= 0:
                            run.sync = c
                            run.sync_window = sp.flush_to(c)
                            break
                    if run.sync is None:
                        yield from sp.spill()
                total += len(piece)
            if not checked:  # nothing stored (vanished, unreadable): the run ends here
                end_run()
                o = -1
            if item.record is not None:
                entries.append(item.record.placed(start, total))
            if o >= 0 and run is not None:
                run.add(start, total, item)
                run.old_end = o_end
                reused[0] += 1
            yield from sp._ready(sp.threads)
        end_run()
        end = _end_of_archive(total)
        sp.feed(end)
        yield from sp.finish()


# -- what a build compressed and copied, for the layout encoder -----------------------------

#: Most tar bytes (jobs' data and windows) a build whose stream comes first
#: (``IncrementalBuilder(stream_first=True)``) holds uncompressed until the stream has all
#: of it: ~3.4 MB after the ~1 % change on the stdlib tree.  Past it, the jobs are
#: compressed as they come (anonymous memory of the agent, as ``FRESH_LIMIT``).
DEFER_LIMIT = 8 << 20

#: Most tar bytes a build keeps for ``BuildHandover`` (~3.4 MB after the ~1 % change on the
#: stdlib tree): past it, the stretches compressed later are not kept (the encoder inflates
#: those).  They are anonymous memory of the agent: on the 1 GB tree of
#: ``benchmarks/bench_memory.py`` (62 MB of tar compressed after its ~1 % change) 16 MiB
#: took its peak from 141 to 158 MB, over the 150 MB goal.
FRESH_LIMIT = 4 << 20


@attrs.frozen
class BuildHandover:
    """What the incremental build of the archive ``archive_hash`` knows that its layout
    delta needs: the tar it compressed (not copied), with the 32 KiB window each compression
    job was primed with — ``chunks[k]`` is the tar from offset ``offsets[k]``, in order, not
    overlapping (adjacent where contiguous) — and which old segments it copied verbatim.

    Why: the layout encoder (``_layout``) needs the tar of the segments compressed anew,
    the 32 KiB of tar before each (the window: old tar bytes, which locate the old stream
    there), and which new segments are old ones.  The builder had all of it in hand a
    moment before; without it the encoder inflates the new archive, seeks into the old one
    from the nearest seek point (~1/2 MiB of inflate per fresh run) and compares the two
    archives' compressed bytes (~30 MB after the ~1 % change on the stdlib tree).  A value,
    its tar bounded by ``FRESH_LIMIT`` (what it lacks is inflated as before; ``copies`` is
    one triple per copied stretch).  The encoder checks the tar and windows it takes
    (CRC-32s against the indexes); ``copies`` it takes as stated — those bytes are old
    archive bytes by construction, and a receiver rebuilds them from its own base — but
    only against the archive the build reused, ``previous_hash``: of another base (a library
    user encoding A' -> B with the hand-over of A -> B) they say nothing, so the encoder
    ignores a hand-over that names another."""

    archive_hash: bytes
    #: The blake3 of the previous archive the build reused (its index's ``archive_hash``):
    #: ``copies`` and the windows (old tar bytes) are of that archive only.
    previous_hash: bytes
    offsets: tuple[int, ...]
    chunks: tuple[bytes, ...] = attrs.field(repr=False)
    #: The old segments the build copied verbatim: ``(new segment, old segment, count)``
    #: runs, new segment ``n + k`` holding old segment ``o + k``'s compressed bytes.
    copies: tuple[tuple[int, int, int], ...] = ()

    def read(self, lo: int, hi: int) -> bytes | None:
        """Tar ``[lo, hi)`` if held whole, else None."""
        k = bisect.bisect_right(self.offsets, lo) - 1
        if k < 0 or hi < lo:
            return None
        got: list[bytes] = []
        at = lo
        while at < hi:
            if k >= len(self.chunks) or self.offsets[k] > at:
                return None  # a gap
            c, o = self.chunks[k], self.offsets[k]
            if at >= o + len(c):
                return None
            got.append(c[at - o : hi - o])
            at = min(hi, o + len(c))
            k += 1
        return got[0] if len(got) == 1 else b"".join(got)


class _FreshKeeper:
    """Collects ``BuildHandover`` as the splicer hands out jobs (up to ``FRESH_LIMIT`` bytes)."""

    def __init__(self) -> None:
        self.offsets: list[int] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.end = -1  # tar offset after the last chunk
        self.full = False
        self.copies: list[tuple[int, int, int]] = []

    def copied(self, new: int, old: int, count: int) -> None:
        """New segments ``[new, new + count)`` are old ``[old, old + count)``, copied."""
        if count > 0:
            self.copies.append((new, old, count))

    def add(self, at: int, prime: bytes, data: bytes) -> None:
        """A job's ``data`` from tar offset ``at``, compressed primed with ``prime`` (the
        tar before ``at``)."""
        if self.full or at < self.end:
            return
        if self.size + len(prime) + len(data) > FRESH_LIMIT:
            self.full = True  # nothing more: what is kept stays consistent
            return
        lo = max(at - len(prime), self.end)
        if lo < at:
            self.offsets.append(lo)
            self.chunks.append(prime[lo - at :])
            self.size += at - lo
        if data:
            self.offsets.append(at)
            self.chunks.append(data)
            self.size += len(data)
            self.end = at + len(data)

    def value(self, archive_hash: bytes, previous_hash: bytes) -> BuildHandover:
        return BuildHandover(archive_hash, previous_hash, tuple(self.offsets),
                             tuple(self.chunks), tuple(self.copies))
