"""Seek points (DBKPSK v1): where an archive's deflate stream can be entered without
inflating it from its start, zran-style.

Why.  A segment of our archives starts byte-aligned after a sync flush (docs/formats.md
"Gzip member"), but its deflate bytes refer back up to 32 KiB into the tar before it, so it
can only be inflated with that window.  A ``SeekPoints`` table keeps, every ``SPACING`` tar
bytes or so, a segment boundary (archive offset, tar offset) and the 32 KiB of tar before
it, so a reader (``_layout.TarStream``) inflates from the nearest point at or before the
first byte it wants: reading old tar bytes around a change costs about ``SPACING`` of
inflate, not the whole archive's.

Spacing: 1 MiB of tar (~300 KB of deflate on source trees) by default (``SPACING``: the
agent's tables).  Each point costs its window, ~10 KB compressed on disk (~1 % of the
archive; a parsed table's windows are views of the buffer it came from: of a mapped file,
page cache); a read inflates on average half a spacing it does not need (~1.5 ms with
ISA-L), and ``TarStream`` jumps at the table's own spacing (``gap``).  The server makes its
tables at 256 KiB (``deltabkp_server.seeks.SPACING``: its apply enters the old archive
before every run's window, docs/formats.md "Seek points").

How a table is made (``SeekPoints.build``): one inflate of the whole archive (ISA-L), fed
from boundary to boundary.  With the archive's ``ArchiveIndex`` the boundaries are its
segment ends (trusted: the index names the archive by blake3), and each one's tar offset is
checked against the index.  Without one (the server), the boundaries are the sync markers
``00 00 ff ff`` found in the compressed bytes, and a marker can occur by chance inside
compressed data: a candidate becomes a point only if a fresh inflater started there with
its window gives the main stream's bytes for ``_VERIFY`` tar bytes (compared).
``SeekPoints.derive`` makes the next archive's table from this one's at the cost of what
changed (the agent, after each backup, with both indexes); ``SeekPoints.carry`` does it
from a layout patch's COPY records instead (the server, which has no index): see their
docstrings.

Invariants:
- pure: bytes and buffers in, bytes or values out; deterministic (the same archive and
  index give the same table; a derived or carried one depends on the table it came from
  too);
- entered at a point with its window, the deflate stream inflates to exactly the tar from
  there (a built window is the 32 KiB of tar before the point; a derived one is checked to
  decode the next 32 KiB and more, which is all a dictionary is used for);
- a table names its archive (blake3 and size): ``matches`` is checked by every user, a
  table of another archive is never used; parsing checks magic, version, size limit
  (``MAX_SEEK_FILE``), the trailing blake3, counts, and that offsets increase within the
  archive (``FormatError``): a seek file is a cache, whatever fails means "no table";
- a wrong point cannot produce a wrong archive: readers of old tar bytes (the layout
  delta's) are checked downstream (the sender compares, the receiver checks blake3).
Format: docs/formats.md "Seek points".

A long module on purpose: the four ways a table is made (from an index, from the markers,
derived from the last table, carried through a patch) rest on one argument — when a window decodes a stream — best
kept beside the format that states it.
"""

from __future__ import annotations

import bisect
import struct
import zlib
from collections.abc import Iterator, Sequence
from typing import Any, cast

import attrs
import blake3
import numpy as np
from isal import isal_zlib

from deltabkp.archive._gzip import DICT_SIZE, GZIP_HEADER
from deltabkp.archive._incremental import ArchiveIndex
from deltabkp.errors import FormatError, LimitExceeded, UnsupportedVersion

__all__ = ["MAX_SEEK_FILE", "SEEK_MAGIC", "SEEK_VERSION", "SPACING", "SeekPoints"]

SEEK_MAGIC = b"DBKPSK"
SEEK_VERSION = 1
#: Tar bytes between seek points (at least: a point is the first boundary this far on).
SPACING = 1 << 20
#: Largest seek file parsed (a 1 TB tar at ~10 KB a point is ~10 MB).
MAX_SEEK_FILE = 256 << 20
#: A chance marker is rejected unless a fresh inflater started there agrees with the
#: stream for this many tar bytes.
_VERIFY = 8192
#: Compressed bytes inflated per call while building (each call's output is bounded).
_STEP = 256 * 1024
_OUT = 1 << 20

_HEAD = struct.Struct("<6sBB32sQQI")  # magic, version, flags, blake3, archive, tar, count
_POINT = struct.Struct("<QQI")  # archive offset, tar offset, compressed window length
_HDR = len(GZIP_HEADER)
_MARKER = b"\x00\x00\xff\xff"
_INFLATE_ERRORS = (zlib.error, cast("type[Exception]", isal_zlib.error))


@attrs.frozen
class SeekPoints:
    """Entry points of one archive: ``archive_offsets[k]`` (the byte after a sync marker,
    an offset in the gzip file) starts tar offset ``tar_offsets[k]``, whose preceding
    ``min(32 KiB, tar offset)`` tar bytes ``window(k)`` returns.  The start of the stream
    (after the gzip header, no window) is implicit, not listed."""

    archive_hash: bytes
    archive_size: int
    tar_size: int
    archive_offsets: tuple[int, ...]
    tar_offsets: tuple[int, ...]
    #: Each window, raw deflate (level 6), as stored: views of the buffer a parsed table
    #: came from (a mapped seek file's pages, not anonymous memory: ``parse``).
    windows: tuple[bytes | memoryview, ...] = attrs.field(repr=False)

    def __len__(self) -> int:
        return len(self.tar_offsets)

    @property
    def gap(self) -> int:
        """The mean tar bytes between points (the whole tar without any): about the
        spacing the table was made with, for a reader deciding whether a jump pays."""
        return self.tar_size // (len(self.tar_offsets) + 1)

    def matches(self, archive_hash: bytes | None, archive_size: int) -> bool:
        """Is this the table of that archive?  (None: the caller cannot tell: no.)"""
        return archive_hash == self.archive_hash and archive_size == self.archive_size

    def at_or_before(self, tar_offset: int) -> int:
        """The last point starting at or before ``tar_offset``; -1: the stream's start."""
        return bisect.bisect_right(self.tar_offsets, tar_offset) - 1

    def window(self, k: int) -> bytes:
        """The tar bytes before point ``k``."""
        want = min(DICT_SIZE, self.tar_offsets[k])
        try:
            d = zlib.decompressobj(-15)
            out = d.decompress(self.windows[k], want + 1)
        except zlib.error as exc:
            raise FormatError(f"seek point {k}: corrupt window ({exc})") from None
        if len(out) != want or not d.eof:
            raise FormatError(f"seek point {k}: window is not {want} bytes")
        return out

    # -- making one ----------------------------------------------------------------------

    @classmethod
    def build(
        cls, archive: Any, archive_hash: bytes, *, index: ArchiveIndex | None = None,
        spacing: int = SPACING,
    ) -> SeekPoints:
        """The table of ``archive`` (a buffer of the whole gzip file, e.g. an mmap) whose
        blake3 the caller knows (checked by whoever read it: not recomputed here).  With
        ``index`` (that archive's, ``FormatError`` if it is another's) its segment ends are
        the candidates; else the sync markers, each verified.  ``FormatError`` if the
        archive does not inflate."""
        buf = memoryview(archive)
        size = len(buf)
        if size < _HDR + 8 or bytes(buf[:_HDR]) != GZIP_HEADER:
            raise FormatError("seek points: not one of our gzip archives")
        if index is not None:
            if index.archive_hash != archive_hash or index.archive_size != size:
                raise FormatError("seek points: the index is another archive's")
            return cls._from_index(buf, archive_hash, index, spacing)
        return cls._from_markers(buf, archive_hash, spacing)

    @classmethod
    def _from_index(
        cls, buf: memoryview, archive_hash: bytes, index: ArchiveIndex, spacing: int
    ) -> SeekPoints:
        # Greedy: the first boundary at least ``spacing`` after the previous point.
        chosen: list[tuple[int, int]] = []
        last = 0
        for t, d in zip(index.segments.tar_ends.tolist(), index.segments.deflate_ends.tolist(),
                        strict=True):
            if t - last >= spacing:
                chosen.append((_HDR + d, t))
                last = t
        inf = _Inflater(buf)
        offs, tars, wins = [], [], []
        for c, t in chosen:
            inf.feed_to(c)
            if inf.out != t:
                raise FormatError(f"seek points: archive offset {c} is not tar {t} as indexed")
            offs.append(c)
            tars.append(t)
            wins.append(_pack(inf.tail))
        inf.feed_to(len(buf) - 8)
        return cls(archive_hash, len(buf), inf.finish(index.tar_size), tuple(offs), tuple(tars),
                   tuple(wins))

    @classmethod
    def _from_markers(cls, buf: memoryview, archive_hash: bytes, spacing: int) -> SeekPoints:
        inf = _Inflater(buf)
        points: list[tuple[int, int, bytes | memoryview]] = []
        _scan(buf, inf, 0, len(buf) - 8, spacing, points)
        tar_size = int.from_bytes(buf[len(buf) - 4 :], "little")
        return cls(archive_hash, len(buf), inf.finish(None, tar_size),
                   tuple(p[0] for p in points), tuple(p[1] for p in points),
                   tuple(p[2] for p in points))

    @classmethod
    def carry(
        cls, prior: SeekPoints, copies: Sequence[tuple[int, int, int]], archive: Any,
        archive_hash: bytes, *, spacing: int = SPACING,
    ) -> SeekPoints:
        """The table of ``archive`` (blake3 ``archive_hash``, known to the caller) made by a
        layout patch from the archive ``prior`` is the table of: ``copies`` are its COPY
        records, ``(new archive offset, prior archive offset, length)`` in order (as
        ``LayoutPatcher.copies`` lists them).  The cost of what changed, not of an inflate of
        the whole archive (the server, after each layout backup; no index needed).

        The archive is marker-scanned as ``build`` does from its start up to the first prior
        point inside a copy (its *anchor*); there the stream's last 32 KiB of tar must equal
        that point's window and a fresh inflater started there with it must agree with the
        stream (as a chance marker is checked).  Then the stream there is the prior stream
        at that point (same state, same bytes for the rest of the copy), so every prior
        point of the copy is a point of this archive, tar offsets shifted by the same amount,
        windows as stored (not inflated, not recompressed); the scan resumes at the copy's
        last one.  A copy whose anchor fails is scanned through like the rest.  The stream's
        end checks the tar offsets kept on the way (the trailer's size, mod 2**32).

        So every point is exact (enters the stream at a boundary, its window the tar before
        it) but the table is not ``build``'s: spacing is ``build``'s rule around changes and
        the prior table's within copies (points of a copy closer than ``spacing`` to the one
        before are left out).  ``FormatError``: the archive does not inflate or ``copies``
        do not fit it."""
        buf = memoryview(archive)
        if len(buf) < _HDR + 8 or bytes(buf[:_HDR]) != GZIP_HEADER:
            raise FormatError("seek points: not one of our gzip archives")
        end = len(buf) - 8
        po, pt = prior.archive_offsets, prior.tar_offsets
        inf = _Inflater(buf)
        points: list[tuple[int, int, bytes | memoryview]] = []
        last = 0
        for new_off, old_off, n in copies:
            lo = bisect.bisect_left(po, old_off)
            hi = bisect.bisect_right(po, old_off + n)
            b = new_off + (po[lo] - old_off if lo < hi else 0)
            if lo >= hi or b < inf.fed or b > end:
                continue  # no prior point in it, or behind a check that read past it
            last = _scan(buf, inf, last, b, spacing, points)
            window = prior.window(lo)
            t_b = inf.out
            if inf.fed != b or inf.tail != window or not _agrees(buf, inf, window, end):
                continue
            shift = t_b - pt[lo]
            for k in range(lo, hi):
                if pt[k] + shift - last >= spacing:
                    points.append((new_off + po[k] - old_off, pt[k] + shift, prior.windows[k]))
                    last = pt[k] + shift
            k = hi - 1
            at = new_off + po[k] - old_off
            inf = _Inflater(buf, at, pt[k] + shift, window if k == lo else prior.window(k))
        _scan(buf, inf, last, end, spacing, points)
        tar_size = int.from_bytes(buf[len(buf) - 4 :], "little")
        return cls(archive_hash, len(buf), inf.finish(None, tar_size),
                   tuple(p[0] for p in points), tuple(p[1] for p in points),
                   tuple(p[2] for p in points))

    @classmethod
    def derive(
        cls, prior: SeekPoints, prior_index: ArchiveIndex, archive: Any,
        index: ArchiveIndex, *, spacing: int = SPACING,
    ) -> SeekPoints:
        """The table of ``archive`` (``index`` its index) from ``prior``, the table of an
        earlier archive (``prior_index``) of the same tree: the cost of what changed, not
        of an inflate of the whole archive.

        A prior point ends a segment; a new segment with the same tar length, deflate
        length and CRC-32 ending near the same place (the shift of the points before it
        followed) is a candidate for the same point with the same window.  It is taken only
        if, entered there with that window, the new archive inflates to its index's
        segment lengths and CRC-32s for 32 KiB of tar and more (past that, nothing can
        refer back into the window: the rest is decoded from bytes checked).  So a derived
        window decodes the stream exactly from its point, but bytes of it that nothing
        there refers to may differ from the tar's (a reader uses a window only as the
        inflater's dictionary, never as tar bytes).  Where two
        points are more than ``2 x spacing`` apart (around changes, or failed candidates),
        the stretch is inflated from the point before it and points placed as ``build``
        does.  ``FormatError``: the tables or indexes are not of the archives given."""
        buf = memoryview(archive)
        if index.archive_size != len(buf) or not prior.matches(
                prior_index.archive_hash, prior_index.archive_size):
            raise FormatError("seek points: a table or index is not of the archive given")
        nt = index.segments.tar_ends.astype(np.int64)
        nd = index.segments.deflate_ends.astype(np.int64)
        ncrc = index.segments.crcs
        pt = prior_index.segments.tar_ends.astype(np.int64)
        pd = prior_index.segments.deflate_ends.astype(np.int64)
        pcrc = prior_index.segments.crcs
        n_len_t = np.diff(nt, prepend=0)
        n_len_d = np.diff(nd, prepend=0)
        got: list[tuple[int, int, bytes | memoryview]] = []  # archive offset, tar offset, packed window
        shift = 0
        for k, t in enumerate(prior.tar_offsets):
            j = int(np.searchsorted(pt, t))
            if j >= len(pt) or int(pt[j]) != t:
                continue
            lt = t - (int(pt[j - 1]) if j else 0)
            ld = int(pd[j]) - (int(pd[j - 1]) if j else 0)
            same = np.flatnonzero((n_len_t == lt) & (n_len_d == ld) & (ncrc == pcrc[j]))
            if not len(same):
                continue
            i = int(same[np.argmin(np.abs(nt[same] - (t + shift)))])
            if (got and int(nt[i]) <= got[-1][1]) or min(DICT_SIZE, int(nt[i])) != min(DICT_SIZE, t):
                continue  # out of order, or a window of another length
            window = prior.window(k)
            if _enters(buf, index, i, window):
                got.append((_HDR + int(nd[i]), int(nt[i]), prior.windows[k]))
                shift = int(nt[i]) - t
        # Fill the gaps: from the start, and between points too far apart.
        out: list[tuple[int, int, bytes | memoryview]] = []
        ends = [*got, (len(buf) - 8, index.tar_size, b"")]
        prev: tuple[int, int, bytes | memoryview] = (_HDR, 0, b"")
        for nxt in ends:
            if nxt[1] - prev[1] > 2 * spacing:
                window = b"" if prev[1] == 0 else _unpack(prev[2], prev[1])
                inf = _Inflater(buf, prev[0], prev[1], window)
                last = prev[1]
                for x in range(int(np.searchsorted(nt, prev[1], "right")), len(nt)):
                    t = int(nt[x])
                    if t > nxt[1] - spacing:
                        break
                    if t - last >= spacing:
                        inf.feed_to(_HDR + int(nd[x]))
                        if inf.out != t:
                            raise FormatError(f"seek points: tar {t} is not where indexed")
                        out.append((_HDR + int(nd[x]), t, _pack(inf.tail)))
                        last = t
            if nxt[2]:
                out.append(nxt)
            prev = nxt
        return cls(index.archive_hash, len(buf), index.tar_size, tuple(o[0] for o in out),
                   tuple(o[1] for o in out), tuple(o[2] for o in out))

    # -- byte form -----------------------------------------------------------------------

    def encode(self) -> bytes:
        return b"".join(self.encoded())

    def encoded(self) -> Iterator[bytes | memoryview]:
        """``encode`` in pieces (the windows as they are held, then the blake3): a table
        of many points is written without a copy of all its windows in memory."""
        h = blake3.blake3()
        head = b"".join([_HEAD.pack(SEEK_MAGIC, SEEK_VERSION, 0, self.archive_hash,
                                    self.archive_size, self.tar_size, len(self)),
                         *(_POINT.pack(c, t, len(w)) for c, t, w in zip(
                             self.archive_offsets, self.tar_offsets, self.windows,
                             strict=True))])
        h.update(head)
        yield head
        for w in self.windows:
            h.update(w)
            yield w
        yield h.digest()

    @classmethod
    def parse(cls, data: Any) -> SeekPoints:
        """The table in ``data`` (any buffer: a mapped file's windows stay views of its
        pages, not copies; the buffer stays alive while the table does)."""
        b = memoryview(data)
        if len(b) < len(SEEK_MAGIC) or bytes(b[: len(SEEK_MAGIC)]) != SEEK_MAGIC:
            raise FormatError("not a seek file (bad magic)")
        if len(b) > len(SEEK_MAGIC) and b[len(SEEK_MAGIC)] != SEEK_VERSION:
            raise UnsupportedVersion(f"seek file version {b[len(SEEK_MAGIC)]} is not supported")
        if len(b) > MAX_SEEK_FILE:
            raise LimitExceeded(f"seek file of {len(b)} bytes exceeds {MAX_SEEK_FILE}")
        if len(b) < _HEAD.size + 32:
            raise FormatError("seek file is truncated")
        body = b[:-32]
        if blake3.blake3(body).digest() != bytes(b[-32:]):
            raise FormatError("seek file is corrupt (checksum)")
        _m, _v, flags, ahash, asize, tsize, n = _HEAD.unpack_from(body)
        if flags:
            raise FormatError(f"seek file has unknown flags {flags:#x}")
        at = _HEAD.size
        if at + n * _POINT.size > len(body):
            raise FormatError("seek file is truncated in its points")
        offs, tars, lens = [], [], []
        prev_c, prev_t = _HDR, 0
        for c, t, wl in _POINT.iter_unpack(body[at : at + n * _POINT.size]):
            if not (prev_c < c <= asize - 8 and prev_t < t <= tsize) or wl > 2 * DICT_SIZE:
                raise FormatError("seek file has points out of order or outside the archive")
            offs.append(c)
            tars.append(t)
            lens.append(wl)
            prev_c, prev_t = c, t
        at += n * _POINT.size
        if at + sum(lens) != len(body):
            raise FormatError("seek file windows do not add up to its size")
        wins: list[bytes | memoryview] = []
        for wl in lens:
            wins.append(body[at : at + wl])
            at += wl
        return cls(bytes(ahash), asize, tsize, tuple(offs), tuple(tars), tuple(wins))


class _Inflater:
    """The archive's deflate stream inflated forward, fed up to chosen offsets; keeps the
    last 32 KiB of tar (``tail``) and counts the tar bytes (``out``)."""

    def __init__(self, buf: memoryview, fed: int = _HDR, out: int = 0, window: bytes = b""
                 ) -> None:
        self.buf = buf
        self.fed = fed
        self.out = out
        self._tail = bytearray(window)
        self._d = (isal_zlib.decompressobj(-15, zdict=window) if window
                   else isal_zlib.decompressobj(-15))

    @property
    def tail(self) -> bytes:
        return bytes(self._tail[-DICT_SIZE:])

    def feed_to(self, end: int, want: bool = False) -> bytes:
        """Inflate the compressed bytes up to archive offset ``end``; with ``want``, what
        they gave (the last ``_OUT`` bytes at most: only the short stretches between
        markers are compared)."""
        last = b""
        try:
            while self.fed < end or self._d.unconsumed_tail:
                chunk: bytes | memoryview = self._d.unconsumed_tail
                if not chunk:
                    chunk = self.buf[self.fed : min(end, self.fed + _STEP)]
                    self.fed += len(chunk)
                # Bounded: a step of zeros would inflate ~1000-fold.
                out = self._d.decompress(chunk, _OUT)
                self.out += len(out)
                # Trimmed now and then, not per call: a scan calls this at every marker.
                if len(out) >= DICT_SIZE:
                    self._tail = bytearray(out[-DICT_SIZE:])
                else:
                    self._tail += out
                    if len(self._tail) > 8 * DICT_SIZE:
                        del self._tail[: -DICT_SIZE]
                if want:
                    last = out if len(out) >= _OUT else (last + out)[-_OUT:]
                if self._d.eof:
                    break
        except _INFLATE_ERRORS as exc:
            raise FormatError(f"seek points: the archive does not inflate ({exc})") from None
        return last

    def finish(self, tar_size: int | None, trailer_size: int | None = None) -> int:
        if not self._d.eof:
            raise FormatError("seek points: the archive's deflate stream does not end")
        want = tar_size if tar_size is not None else trailer_size
        if want is not None and self.out & 0xFFFFFFFF != want & 0xFFFFFFFF:
            raise FormatError(f"seek points: the archive inflates to {self.out} bytes, not {want}")
        return self.out


def _markers(buf: memoryview, end: int, start: int = _HDR) -> Iterator[int]:
    """Offsets of the sync markers in ``buf[start:end]``, not overlapping, in order; searched
    a step at a time (bytes.find is C-fast, and a copy of the whole archive would cost its
    size in memory)."""
    at, n = start, len(_MARKER)
    while at < end:
        hi = min(end, at + _STEP)
        chunk = bytes(buf[at : min(end, hi + n - 1)])
        k = chunk.find(_MARKER)
        while 0 <= k < hi - at:
            yield at + k
            k = chunk.find(_MARKER, k + n)
        # The next step starts after the last marker if it overlaps this one's end.
        at = max(hi, at + k) if k >= 0 else hi
    return


def _scan(buf: memoryview, inf: _Inflater, last: int, stop: int, spacing: int,
          points: list[tuple[int, int, bytes | memoryview]]) -> int:
    """Inflate with ``inf`` up to archive offset ``stop``, placing points (appended to
    ``points``) at the sync markers on the way that prove boundaries, each the first at least
    ``spacing`` of tar after the one before (``last``, returned updated): the same points as
    the index's boundaries would give.  ``stop`` at the deflate stream's end (the trailer's
    offset) closes the last candidates; before it, candidates still unproven there are
    dropped (a valid subset)."""
    end = len(buf) - 8  # the trailer is no deflate data
    final = stop >= end
    # Before ``stop``: only markers wholly before it (the stream is entered at ``stop``).
    markers = _markers(buf, stop if final else stop - len(_MARKER) + 1, inf.fed)
    # Candidates being verified, in order: every marker at least ``spacing`` after the
    # last point, until the first of them proves a boundary (then those closer than
    # ``spacing`` to it go).
    pends: list[_Candidate] = []
    at = next(markers, -1)
    while at >= 0:
        c = at + len(_MARKER) if at < stop else at
        start = inf.fed
        if c > start:
            piece = inf.feed_to(c, bool(pends))
            for p in pends:
                p.step(buf[start:c], piece, final and at == stop)
            while pends and pends[0].ok is not None:
                p = pends.pop(0)
                if p.ok:
                    points.append((p.c, p.t, _pack(p.window)))
                    last = p.t
                    pends = [q for q in pends if q.t - last >= spacing]
            if inf.out - last >= spacing and c < stop:
                pends.append(_Candidate(c, inf.out, inf.tail))
        # The stream's end (or ``stop``) closes the last candidates.
        at = next(markers, -1) if at < stop else -1
        if at < 0 < len(pends) and inf.fed < stop:
            at = stop
    inf.feed_to(stop)
    return last


def _agrees(buf: memoryview, inf: _Inflater, window: bytes, end: int) -> bool:
    """Does a fresh inflater started where ``inf`` is, with ``window``, give what the
    stream gives (``_VERIFY`` tar bytes, or to the stream's end)?  Advances ``inf``."""
    cand = _Candidate(inf.fed, inf.out, window)
    while cand.ok is None:
        start = inf.fed
        stop = min(end, start + 4096)
        piece = inf.feed_to(stop, True)
        cand.step(buf[start:stop], piece, stop >= end)
    return bool(cand.ok)


class _Candidate:
    """A sync marker at archive offset ``c`` that may be a segment boundary (tar offset
    ``t``, window ``window``): ``ok`` once a fresh inflater started there agrees with the
    main stream for ``_VERIFY`` tar bytes (True) or disagrees or fails (False).  Inflaters
    may hold back a few bytes at a chance marker: the two are compared on their common
    prefix."""

    def __init__(self, c: int, t: int, window: bytes) -> None:
        self.c, self.t, self.window = c, t, window
        self.ok: bool | None = None
        self._d = isal_zlib.decompressobj(-15, zdict=window)
        self._main, self._mine = bytearray(), bytearray()

    def step(self, compressed: memoryview, main: bytes, end: bool = False) -> None:
        """The next compressed bytes and what the main stream gave for them (``end``: the
        deflate stream's last ones)."""
        if self.ok is not None:
            return
        self._main += main
        try:
            # Bounded: more than the stream gave is a mismatch anyway.
            self._mine += self._d.decompress(compressed, len(main) + _VERIFY)
        except _INFLATE_ERRORS:
            self.ok = False
            return
        n = min(len(self._main), len(self._mine))
        if self._main[:n] != self._mine[:n]:
            self.ok = False
        elif n >= _VERIFY or (end and self._d.eof and self._main == self._mine):
            self.ok = True
        elif end:
            self.ok = False
        if self.ok is not None:
            self._main = self._mine = bytearray()


def _enters(buf: memoryview, index: ArchiveIndex, i: int, window: bytes) -> bool:
    """Does the archive, entered after segment ``i`` with ``window``, inflate to the next
    segments' indexed lengths and CRC-32s for at least 32 KiB of tar?"""
    segs = index.segments
    nt, nd, crcs = segs.tar_ends, segs.deflate_ends, segs.crcs
    d = isal_zlib.decompressobj(-15, zdict=window)
    x, done = i + 1, 0
    try:
        while x < len(nt) and done < DICT_SIZE:
            want = int(nt[x]) - int(nt[x - 1])
            # A sync-flushed segment inflates whole from its own bytes.
            out = d.decompress(buf[_HDR + int(nd[x - 1]) : _HDR + int(nd[x])], want + 1)
            if len(out) != want or zlib.crc32(out) != int(crcs[x]):
                return False
            done += want
            x += 1
    except _INFLATE_ERRORS:
        return False
    # Short of 32 KiB before the last listed segment: the final one (not indexed) could still
    # refer to the window unchecked; no point so near the end.
    return done >= DICT_SIZE


def _unpack(packed: bytes | memoryview, tar_offset: int) -> bytes:
    want = min(DICT_SIZE, tar_offset)
    out = zlib.decompressobj(-15).decompress(packed, want + 1)
    if len(out) != want:
        raise FormatError("seek points: a window is not its length")
    return out


def _pack(window: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(window) + c.flush()
