"""The layout delta (DBKPLD v1, and v2 streamed): a new archive described against the
previous one *by its layout*, for a sender that knows both archives' indexes
(``ArchiveIndex``) — or, v2 (``LayoutStreamer``), the old one's and the build making the new
one, which tells the streamer each copy and compression job as it goes out, so the receiver
rebuilds while the sender builds (its class docstring; docs/formats.md).

Why.  The rolling-checksum delta sees the compressed bytes only: after an edit, deflate
output differs until the next sync cut at least 32 KiB on (a changed window changes every
match), so each edited spot costs ~10-15 KB of literal.  The agent knows more: the index of
the archive the server holds (its kept build, checked by blake3) and of the new one.  So:

- a new segment whose compressed bytes equal an old segment's (found by tar length,
  deflate length and CRC-32, then compared) is a ``COPY`` of old archive bytes at a known
  offset: no rolling search;
- the segments compressed anew (a *fresh run*) are sent as their *tar* bytes: mostly
  references to old tar bytes (the unchanged files around the edit, the 32 KiB window
  that primes the compressor), the rest literal, compressed for the wire by one zlib stream;
  the receiver rebuilds the tar stretch and compresses it exactly as the builder did
  (``_gzip.compress_segments``: same cuts, same level, primed with the same window), so
  the wire carries about the compressed size of what changed;
- old tar bytes are inflated from the old archive's start, forward only (``TarStream``, by
  ISA-L: ~2x zlib's inflate), up to the last reference — or, given the old archive's
  ``SeekPoints`` (``_seek.py``: segment boundaries every ~1 MiB of tar with the 32 KiB
  window before each, kept beside the archive by agent and server), from the point before
  each read, so inflating costs about what changed; the receiver keeps 2 x ``KEEP``
  behind the furthest byte referenced so far, and the sender sends a reference further
  back than ``_reach()`` as literal instead (a rule on the references alone: the sender
  needs no copy of the receiver's stream).  What a read answers depends on the reads
  alone, so the delta is the same bytes with seek points or without.  (Without a window
  a sync cut cannot be entered: measured on the stdlib pair, a segment inflated from 64
  segments back with unknown windows still has a quarter of its bytes undetermined,
  docs/formats.md.)

Measured (2026-11-29, the stdlib bench pair: ~1% change, 29.6 MB archive; ``python
benchmarks/bench_layout.py --baseline DIR``, 2 cores shared, load 4-6): encode 0.41-0.57 s
CPU against 0.65-1.02 s before (1.6-2.0x), apply 0.34-0.47 s against 0.48-0.71 s (1.4-1.5x);
a full build is 5-6 s.  Inflating the old archive is ~0.25 s of each.  The delta is the same
30,312 bytes (0.10 % of the archive).  With seek points (``--seek``, same run, load ~5): encode
0.44 -> 0.21 s, apply 0.41 -> 0.17 s CPU (2.1x, 2.3x), the same 30,312 bytes; 21.7 MB of the
102.7 MB of old tar inflated on each side.  Before, zlib inflated, a Python loop compared each
segment's bytes, and an ``IndexEntry`` was made for every entry of both indexes.
Then (``--seek --repeat 5 --baseline``, alternating runs, load ~4): encode 0.18 -> 0.10 s CPU
best, 0.26 -> 0.13 median, the same bytes: runs checked by CRC-32 instead of compressed
again (~1/4 of the CPU), inflate calls stopping near what was asked (18.6 MB inflated, not
21.7; long steps also copied their unconsumed input at every call), old entries found by
position instead of a dict of every path, the per-segment loops of ``copies`` in numpy.
That left ~40 % inflating old tar (each fresh run's reads started at the seek point up to
1 MiB before it: 20.6 MB inflated) and ~15 % the literal stream at level 9.  Then the
build's hand-over (``BuildHandover``, from ``IncrementalBuilder.handover``): the tar each
compression job compressed and its 32 KiB window, and the old segments it copied.  A fresh
run's window, checked against the old index's CRC-32s, becomes an entry point of the old
stream right where the run's reads go (``TarStream.enter``: 2.2 MB inflated), the run's
tar is not inflated from the new archive, and the copied segments are not compared (~30
MB); a fresh run's entries read from their packed records (no ``IndexEntry``).  The same
delta bytes; ``_stream_layout``'s thread 142 -> 61 ms CPU median (3 runs each, alternating,
load ~2-3); the agent's layout phase in ``bench_system.sh`` ~210 -> ~90 ms CPU, median of 6
runs each, alternating (2 shared cores, load 2-8: its wall ~227 -> ~150 ms, noisy).  What is
left: ~45 % ``_parts`` (Python per entry of a fresh run), ~20 % ``copies`` (its candidate
keys, ``_choose``'s loop over repeated content), ~20 % the literal stream at level 9
(level 6: ~10 ms less, 30,868 bytes instead of 30,312 — but ``tests/golden/layout/
v1.dbkpld`` pins the encoder's bytes).

Invariants (of version 1; version 2, ``LayoutStreamer``, differs where its docstring says:
the sender checks nothing by recompressing or comparing archives — a COPY is the builder's
copy of old segments, a RUN the tar it compressed with that window — and size and blake3 are
checked against END, not the header):
- pure (bytes and buffers in, bytes out; no I/O), deterministic.  The receiver may rebuild
  RUN records in worker threads (``LayoutPatcher(threads=...)``): each reads its old tar
  in the records' order, in turn (one stream, whose answers depend on the reads before),
  then compresses beside the others (a run's output depends only on its tar and window),
  so the bytes, their order and the errors are the one-by-one path's; the threads end
  with the delta's END, an error or ``close`` (or, idle, with the patcher).  The sender
  checks what it
  sends: a COPY is of equal bytes (compared stretch by stretch, but for the segments the
  build says it copied verbatim: those are old bytes by construction), a RUN's tar is the
  one the builder compressed (each segment's CRC-32 as indexed; the final segment, which
  has none, compresses back to the archive's bytes; handed over or inflated alike), an
  old reference equals the bytes it stands for (an extra entry point's window checked
  against the old index's CRC-32s first).  That those tar bytes compress to the archive's is the builder's invariant (its
  output is a fresh build's, ``compress_segments`` primed with the window); recompressing
  every run to check it again was ~1/4 of an encode's CPU, and the receiver's blake3 catches it
  anyway (the server then retries the backup as a full transfer).  The sender
  reads the new archive only around fresh runs (inflated with their window, which is old
  tar bytes: a run whose window is not joins the run before), and not at all where the
  build handed their tar over.  The
  receiver checks size and blake3 of the result against the header: a wrong archive is
  never produced silently (``IntegrityError``);
- zlib's output at a level depends on its version and on the archive format's tune
  parameters: the capability string names both (``layout_capability()``: the deflater
  archives are made with here — the libz ``_libz`` loaded, not Python's own zlib — and
  ``ARCHIVE_VERSION``; empty, so never offered, where libz fails its checks), so a peer with
  another zlib or format never receives this form, and the header names the deflater
  exactly (``_gzip.deflater``), checked by the receiver (a deflater that cannot load here is
  an ``IntegrityError`` too: the server then retries with a full transfer);
- limits: a record ≤ ``MAX_RECORD`` bytes, a fresh run ≤ ``MAX_RUN_TAR`` tar bytes, old
  tar kept ≤ 2 x ``KEEP`` bytes (+ one ``_PIECE`` per inflate call), output ≤ the
  receiver's ``max_size``.
Format: docs/formats.md "Layout delta".

A long module on purpose: the encoder and the decoder are two halves of one format and of
one argument (why the receiver's stretch compresses to the sender's bytes), best read
side by side.
"""

from __future__ import annotations

import array
import bisect
import contextlib
import itertools
import struct
import zlib
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from typing import Any, NamedTuple

import attrs
import blake3
import numpy as np
import numpy.typing as npt
from isal import isal_zlib

from deltabkp.archive._gzip import DEFAULT_LEVEL, DICT_SIZE, compress_segments, deflater
from deltabkp.archive._incremental import (
    DATA,
    ArchiveIndex,
    BuildHandover,
    IndexEntry,
)
from deltabkp.archive._seek import _HDR, _INFLATE_ERRORS, SPACING, SeekPoints
from deltabkp.archive._walk import ARCHIVE_VERSION
from deltabkp.errors import (
    DeflateError,
    FormatError,
    IntegrityError,
    LimitExceeded,
    UnsupportedVersion,
)

__all__ = [
    "LAYOUT_MAGIC",
    "LAYOUT_STREAM_VERSION",
    "LAYOUT_VERSION",
    "LayoutPatcher",
    "LayoutStreamer",
    "encode_layout",
    "layout_capabilities",
    "layout_capability",
]

LAYOUT_MAGIC = b"DBKPLD"
LAYOUT_VERSION = 1
#: The streamed form (``LayoutStreamer``): made as the build goes, size and blake3 at the end.
LAYOUT_STREAM_VERSION = 2
#: Version 2's records, told before the sender compresses (``LayoutStreamer(version=3)``
#: beside ``IncrementalBuilder(stream_first=True)``): END carries the blake3 of the tar the
#: RUN records rebuild, not the new archive's, which the sender knows only later.
LAYOUT_EARLY_VERSION = 3


def layout_capability(version: int = LAYOUT_VERSION) -> str:
    """What an agent advertises and a server accepts: this format (``version``), with the
    deflate archives are made with here (``_gzip.deflater``: the loaded libz's version and
    format 3's tune, e.g. ``layout-1/zlib-1.2.13-tune-8-64-128-56/archive-3``); "" (offer
    nothing: the rolling delta) where libz fails its checks.  A function, not a constant:
    the name depends on the library ``_libz`` loads, and importing ``deltabkp.archive``
    loads none."""
    try:
        name = deflater(DEFAULT_LEVEL)
    except DeflateError:
        return ""
    return f"layout-{version}/{name.replace(' ', '-')}/archive-{ARCHIVE_VERSION}"


def layout_capabilities() -> tuple[str, ...]:
    """Every layout delta form made and read here, the preferred first (version 3, told
    before the sender compresses, then the streamed version 2, then version 1); empty
    where libz fails its checks."""
    got = tuple(layout_capability(v)
                for v in (LAYOUT_EARLY_VERSION, LAYOUT_STREAM_VERSION, LAYOUT_VERSION))
    return got if all(got) else ()

#: Largest record body (a fresh run's parts and literals).
MAX_RECORD = 4 << 20
#: A fresh run is cut into records of about this many tar bytes (window excluded).
MAX_RUN_TAR = 1 << 20
#: Most tar bytes one RUN record may rebuild: a run, the segment that took it past
#: ``MAX_RUN_TAR`` or the final segment (≤ 64 KiB + the end-of-archive blocks), the window.
_RUN_LIMIT = MAX_RUN_TAR + DICT_SIZE + (128 << 10)
#: COPY output is handed out in views of this size (a COPY may span the whole base).
_PIECE = 1 << 20
#: Old tar bytes the sender's stream keeps behind the furthest one asked for; its references
#: reach a little less far back (``_reach``), a receiver keeps twice as much.
KEEP = 8 << 20
#: Extra entry points a ``TarStream`` keeps (``enter``: one per fresh run; its 32 KiB
#: window and the ~32-96 KiB inflated after it, each): reads go around the current run.
_EXTRA = 16
#: Compressed bytes inflated at a time (each call's output is at most ``_PIECE``).
_STEP = 64 * 1024
#: Least tar bytes an inflate call may stop at: a read stops about where it asked (256 KiB
#: steps inflated ~20 % more than asked on the bench pair, and the long steps' unconsumed
#: input was copied again at every call, ~1/3 of the inflating CPU).
_MIN_OUT = 64 * 1024
#: Records a ``LayoutPatcher`` rebuilds ahead of the one it hands out next, per compressing
#: thread, and their tar and RAW bytes at most (memory stays bounded while runs compress).
_AHEAD = 2
_AHEAD_BYTES = 8 << 20
#: Most tar bytes of compression jobs a ``LayoutStreamer`` holds while the build's entries do
#: not cover them yet (a changed file's entry is placed once all of it is read: a job inside
#: a big one waits for its end).  Past it the oldest goes anyway, the part of it no entry
#: covers yet as literal (correct, only less small): the agent's memory stays bounded.
STREAM_WAITING = 8 << 20

_HEAD = struct.Struct("<6sBB32sQ32sBB")
#: Version 2's header: magic, version, flags, base blake3, level, deflater length.
_HEAD2 = struct.Struct("<6sBB32sBB")
_END2 = struct.Struct("<Q32s")  # version 2's END: the new archive's size, blake3
#: Version 3's END: blake3 of the RUN records' rebuilt tar (windows included), in order; of
#: the delta's bytes before END (its header and every record: which old bytes each COPY
#: takes, the gzip trailer).
_END3 = struct.Struct("<32s32s")
_REC = struct.Struct("<BI")  # type, body length
_COPY = struct.Struct("<QQ")  # old archive offset, length
_RUN = struct.Struct("<BIIII")  # flags, window, n_cuts, n_parts, literal bytes (uncompressed)
_CUT = struct.Struct("<I")
_OLD = struct.Struct("<BQI")  # 0, old tar offset, length
_LIT = struct.Struct("<BI")  # 1, length (taken from the record's literal stream)
T_COPY, T_RAW, T_RUN, T_END = 1, 2, 3, 0xFF
F_FINAL, F_CONTINUE = 1, 2


# -- old tar bytes from a compressed archive ------------------------------------------------


class TarStream:
    """The tar bytes of a gzip archive, inflated forward (exact: no window to guess) from
    its start or, given its ``SeekPoints``, from the nearest point at or before the first
    byte a read asks for.

    What a read answers depends only on the reads asked before it, never on how inflating
    went (chunk sizes, which inflater, seek points or none): a read ``[lo, hi)`` is answered
    unless ``lo`` is behind the *floor* — ``keep`` bytes before the furthest byte any earlier
    read asked for (failed or not) — or the stream ends before ``hi``.  So a sender with a
    seek table makes the same delta as one without (``_reach`` is a rule on references
    alone), and a receiver keeps at most ``keep`` bytes (+ one ``_PIECE``).

    With seek points a read far ahead of what is inflated starts again at the point before
    it, and a read behind what is kept (but not behind the floor: dropped by such a jump)
    starts again at the point before it; without them it inflates forward from the start.

    Inflated by ISA-L (``isal_zlib``, ~2x zlib's speed here): inflating is exact whatever
    the library, only *deflate* output must be zlib's.  Kept as a list of inflated pieces
    (~1 MB each), dropped whole from the front: no memmove of what is kept."""

    def __init__(self, archive: Any, keep: int | None = None, seek: SeekPoints | None = None
                 ) -> None:
        self.buf = memoryview(archive)
        self._keep = KEEP if keep is None else keep
        self._seek = seek
        # A denser table (the server's, ``deltabkp_server.seeks``) jumps at its own spacing:
        # entered ~1/2 of it before a read instead of ~1/2 MiB (the stdlib pair's apply,
        # 256 KiB points: 9.1 MB of old tar inflated instead of 13.1, 20.7 at 1 MiB).
        self._jump = min(SPACING, seek.gap) if seek is not None else SPACING
        self._d = isal_zlib.decompressobj(-15)
        self._in = _HDR
        self._pieces: list[bytes] = []
        self._starts: list[int] = []  # tar offset of each piece
        self._end = 0  # tar offset after the last byte inflated
        self._far = 0  # the furthest byte asked for
        self._floor = 0  # reads starting before it are refused
        # Extra entry points (``enter``), ascending: tar offset, where its window starts,
        # archive offset, window, and the tar inflated after it (with the archive offset
        # there).
        self._xt: list[int] = []
        self._xfrom: list[int] = []
        self._xa: list[int] = []
        self._xw: list[bytes] = []
        self._xh: list[tuple[bytes, int]] = []
        #: Seek points started from, tar bytes inflated (tests and benchmarks read them).
        self.seeks = self.inflated = 0

    def enter(self, archive_offset: int, tar_offset: int, window: bytes, ahead: bytes = b"",
              ahead_end: int = 0) -> None:
        """One more entry point: the deflate stream at ``archive_offset`` (a segment
        boundary) starts tar offset ``tar_offset``, which ``window`` (its
        ``min(32 KiB, tar_offset)`` tar bytes before) primes; ``ahead``: the tar from there
        already inflated (up to the segment boundary at archive offset ``ahead_end``), so
        not inflated again.  The caller vouches for them (the encoder checks them by
        CRC-32s); reads inside the window are answered from it.  What reads answer does
        not change, only what is inflated to answer them.  At most ``_EXTRA`` are kept (the
        lowest go first)."""
        if len(window) != min(DICT_SIZE, tar_offset):
            raise ValueError("an entry point's window is 32 KiB (or all the tar before it)")
        k = bisect.bisect_left(self._xt, tar_offset)
        if k < len(self._xt) and self._xt[k] == tar_offset:
            return
        self._xt.insert(k, tar_offset)
        self._xfrom.insert(k, tar_offset - len(window))
        self._xa.insert(k, archive_offset)
        self._xw.insert(k, window)
        self._xh.insert(k, (ahead, ahead_end))
        if len(self._xt) > _EXTRA:
            del self._xt[0], self._xfrom[0], self._xa[0], self._xw[0], self._xh[0]

    @property
    def floor(self) -> int:
        """Reads starting before this tar offset are refused (it only grows)."""
        return self._floor

    @property
    def _base(self) -> int:
        return self._starts[0] if self._starts else self._end

    def read(self, lo: int, hi: int) -> bytes | None:
        """Tar ``[lo, hi)``; None if ``lo`` is behind the floor or the stream ends first."""
        if hi < lo or lo < self._floor:
            return None
        self._far = max(self._far, hi)
        try:
            got = self._read(lo, hi)
        except (_INFLATE_ERRORS + (FormatError,)):
            got = None
        self._floor = max(self._floor, self._far - self._keep)
        self._drop(self._floor)
        return got

    def _read(self, lo: int, hi: int) -> bytes | None:
        if self._seek is not None or self._xt:
            seek = self._seek
            k = seek.at_or_before(lo) if seek is not None else -1
            at = seek.tar_offsets[k] if seek is not None and k >= 0 else 0
            # An extra point whose window starts at or before ``lo`` and nearer than ``k``.
            x = bisect.bisect_right(self._xfrom, lo) - 1
            if x >= 0 and self._xt[x] > at:
                # An extra point is where reads around a fresh run start: worth a jump from
                # further than an inflate call's least output.
                if lo < self._base or self._xt[x] > self._end + _MIN_OUT:
                    self._enter(x)
            # Forward, a jump pays only past a spacing (the table's, at most ``SPACING``):
            # inflating up to it costs ~1 ms a MiB, and a jump drops what is kept, which
            # reads going back and forth still need.
            elif lo < self._base or at > self._end + self._jump:
                self._restart(k)
        elif lo < self._base:  # cannot happen without seeking: pieces go at the floor
            return None
        # Dropped as we go (never [lo, hi)), or a read far ahead would hold everything
        # inflated on the way there.
        floor = min(lo, self._far - self._keep)
        while self._end < hi and not self._d.eof:
            self._drop(floor)
            chunk: bytes | memoryview = self._d.unconsumed_tail
            if not chunk and self._in < len(self.buf):
                chunk = self.buf[self._in : self._in + _STEP]
                self._in += len(chunk)
            # Bounded: a step of zeros would inflate ~1000-fold.  No more than asked for
            # (``_MIN_OUT`` at least): after a seek, a short read inflates little past it.
            # With all input fed, ISA-L may still hold output back (its unconsumed tail is
            # then empty): asked with no input, it gives it.
            out = self._d.decompress(chunk, min(_PIECE, max(_MIN_OUT, hi - self._end)))
            if not out and not chunk:
                break
            if out:
                self._pieces.append(out)
                self._starts.append(self._end)
                self._end += len(out)
                self.inflated += len(out)
        if self._end < hi:
            return None
        k = bisect.bisect_right(self._starts, lo) - 1
        got = []
        at = lo
        while at < hi:
            piece, start = self._pieces[k], self._starts[k]
            got.append(piece[at - start : hi - start])
            at = start + len(piece)
            k += 1
        return got[0] if len(got) == 1 else b"".join(got)

    def _enter(self, x: int) -> None:
        """Inflate from extra point ``x``, its window kept as the tar before it."""
        t, w = self._xt[x], self._xw[x]
        ahead, after = self._xh[x]
        self._pieces, self._starts = ([w], [t - len(w)]) if w else ([], [])
        self._in, self._end = self._xa[x], t
        if ahead:
            self._pieces.append(ahead)
            self._starts.append(t)
            self._in, self._end = after, t + len(ahead)
            w = (w + ahead)[-DICT_SIZE:]
        self._d = isal_zlib.decompressobj(-15, zdict=w) if w else isal_zlib.decompressobj(-15)
        self.seeks += 1

    def _restart(self, k: int) -> None:
        """Inflate from seek point ``k`` (-1: the stream's start), dropping what is kept."""
        self._pieces, self._starts = [], []
        if k < 0:
            self._d, self._in, self._end = isal_zlib.decompressobj(-15), _HDR, 0
        else:
            assert self._seek is not None
            self._d = isal_zlib.decompressobj(-15, zdict=self._seek.window(k))
            self._in, self._end = self._seek.archive_offsets[k], self._seek.tar_offsets[k]
        self.seeks += 1

    def _drop(self, floor: int) -> None:
        """Drop the whole pieces that end at or before tar offset ``floor``."""
        n = 0
        while n < len(self._pieces) and self._starts[n] + len(self._pieces[n]) <= floor:
            n += 1
        if n:
            del self._pieces[:n], self._starts[:n]


# -- encoding (the sender, who holds both archives and both indexes) -------------------------


def _pad(n: int) -> int:
    return -n % 512 + n


class _Parts:
    """The sender's half shared by both encoders: new tar bytes described as old tar
    references and literals (``_parts``, by the new entries' paths), packed into RUN
    records whose literals are one zlib stream across the delta; the old tar read forward
    (``TarStream``) and entered at an old segment boundary given its window (``_enter_at``)."""

    def __init__(self, old_index: ArchiveIndex, old: Any, new_entries: Any,
                 seek: SeekPoints | None) -> None:
        self.oi = old_index
        #: The new archive's entries (an ``EntryTable``; the streaming encoder's grows as
        #: the build goes): what ``_parts`` maps to old entries by path.
        self.new_entries = new_entries
        self.old = memoryview(old)
        self.old_tar = TarStream(old, seek=seek)
        # Starts (tar, deflate) of each old segment: packed (~170,000 segments on a 1 GB
        # tree, where a list of ints costs ~40 bytes an element, an array 8).
        self.ot = _starts(old_index.segments.tar_ends)
        self.od = _starts(old_index.segments.deflate_ends)
        self._old_crcs = array.array("I", old_index.segments.crcs.tobytes())
        # Entries are looked up for the fresh runs only: no IndexEntry made for the others
        # (making all of them cost ~0.3 s on the stdlib tree).
        self._shift = 0  # old entry index - new entry index, at the last entry found
        # References _data_pieces compared equal (new lo, old lo, length), in this _parts.
        self._checked: set[tuple[int, int, int]] = set()
        self.lit = zlib.compressobj(9, zlib.DEFLATED, -15)
        self._far = 0  # the furthest old tar byte referenced so far (see _reach)
        #: Extra entry points made (``_enter_at``).
        self.fresh_windows = 0

    def _run_record(self, flags: int, w: int, cuts: list[int],
                    parts: list[bytes | tuple[int, int]]) -> bytes:
        """A RUN record: its parts, and its literals as the next piece of the one stream."""
        lits = b"".join(p for p in parts if isinstance(p, bytes))
        blob = self.lit.compress(lits) + self.lit.flush(zlib.Z_SYNC_FLUSH)
        body = [_RUN.pack(flags, w, len(cuts), len(parts), len(lits))]
        body += [_CUT.pack(x) for x in cuts]
        for p in parts:
            body.append(_LIT.pack(1, len(p)) if isinstance(p, bytes) else _OLD.pack(0, *p))
        body.append(blob)
        return _record(T_RUN, b"".join(body))

    def _enter_at(self, k: int, window: bytes) -> None:
        """Give the old tar stream an entry point at old segment ``k`` with ``window`` (the
        tar the new stream holds before the fresh tar that follows the old segments up to
        ``k``, which the builder primed that compression with), so the reads around it are
        inflated from there instead of from the seek point before (~1/2 MiB further back
        on average).  Only if that window is the old tar there, checked by CRC-32s against
        the old index: its whole old segments, and the old stream entered there with it
        over the next 32 KiB of tar (all a later byte can refer back to).  Else nothing:
        the stream seeks as before.  Either way the same delta: what a read answers does
        not depend on where the stream was entered."""
        end, m = self.ot[k], len(self.oi.segments)
        w = len(window)
        if k <= 0 or k > m or w != min(DICT_SIZE, end):
            return
        lo = end - w
        view = memoryview(window)
        for x in range(bisect.bisect_left(self.ot, lo), k):
            if zlib.crc32(view[self.ot[x] - lo : self.ot[x + 1] - lo]) != self._old_crcs[x]:
                return
        # The old segments from ``k`` over the next 32 KiB (not into the final one, which
        # has no CRC-32).
        e = bisect.bisect_left(self.ot, end + DICT_SIZE, k)
        if e > m:
            return
        want = self.ot[e] - end
        try:
            d = isal_zlib.decompressobj(-15, zdict=window) if window else \
                isal_zlib.decompressobj(-15)
            out = d.decompress(self.old[_HDR + self.od[k] : _HDR + self.od[e]], want + 1)
        except _INFLATE_ERRORS:
            return
        if len(out) != want:
            return
        ov = memoryview(out)
        for x in range(k, e):
            if zlib.crc32(ov[self.ot[x] - end : self.ot[x + 1] - end]) != self._old_crcs[x]:
                return
        self.old_tar.enter(_HDR + self.od[k], end, window, out, _HDR + self.od[e])
        self.fresh_windows += 1


    def _old_entry(self, path: str, i: int) -> _Ent | None:
        """The old entry of new entry ``i`` (``path``), or None.  Entries are in the walk's
        order (``_walk``: depth first, names sorted by their bytes, a path once): looked for
        where the last one found says (the two indexes shifted by what was added or removed
        before), else by bisection.  A dict of all old paths cost ~0.01 s on the stdlib
        tree, ~60 % of looking up the entries of a ~1 % change.  (An index out of that order
        would only miss a path: its bytes sent as literal, never wrong.)"""
        entries = self.oi.entries
        for k in (i + self._shift, i + self._shift - 1, i + self._shift + 1):
            if 0 <= k < len(entries) and entries.path(k) == path:
                break
        else:
            key = _walk_key(path)
            k = bisect.bisect_left(range(len(entries)), key,
                                   key=lambda x: _walk_key(entries.path(x)))
            if k == len(entries) or entries.path(k) != path:
                return None
        self._shift = k - i
        return _ent(entries, k)

    def _parts(self, tar: bytes, at: int) -> list[bytes | tuple[int, int]]:
        """``tar`` (new tar bytes from offset ``at``) as old references and literals."""
        pieces: list[tuple[int, int, int | None]] = []  # new lo, new hi, old lo (None: literal)
        lo, hi = at, at + len(tar)
        entries = self.new_entries
        # Bisected on the raw records: no IndexEntry made per probe.
        i = max(0, bisect.bisect_right(range(len(entries)), lo,
                                       key=lambda k: entries.raw(k)[_RAW_TAR_START]) - 1)
        self._checked.clear()
        pos = lo
        while pos < hi:
            e = _ent(entries, i) if i < len(entries) else None
            if e is None or pos >= e.tar_end:
                if e is None:
                    pieces.append((pos, hi, None))  # end-of-archive zeros
                    break
                i += 1
                continue
            end = min(hi, e.tar_end)
            pieces += self._entry_pieces(e, i, pos, end, tar, at)
            pos = end
            i += 1
        # Merge; an old reference is kept only if the old stream still has it (and it is equal).
        out: list[bytes | tuple[int, int]] = []
        for s, t, o in pieces:
            if s == t:
                continue
            ref = None
            if o is not None and o >= max(self._far, o + t - s) - _reach():
                if (s, o, t - s) in self._checked:
                    # Compared equal by _data_pieces, within a read that asked as far: read
                    # again, it would answer those bytes unless behind the floor, and change
                    # nothing in the stream.
                    ok = o >= self.old_tar.floor
                else:
                    got = self.old_tar.read(o, o + t - s)
                    ok = got is not None and tar.startswith(got, s - at)  # len(got) == t - s
                if ok:
                    ref = (o, t - s)
                    self._far = max(self._far, o + t - s)
            prev = out[-1] if out else None
            if ref is None:
                data = tar[s - at : t - at]
                if isinstance(prev, bytes):
                    out[-1] = prev + data
                else:
                    out.append(data)
            elif isinstance(prev, tuple) and prev[0] + prev[1] == ref[0]:
                out[-1] = (prev[0], prev[1] + ref[1])
            else:
                out.append(ref)
        return out

    def _entry_pieces(
        self, e: _Ent, i: int, lo: int, hi: int, tar: bytes, at: int
    ) -> list[tuple[int, int, int | None]]:
        o = self._old_entry(self.new_entries.path(i), i)
        if o is None:
            return [(lo, hi, None)]
        n_len, o_len = e.tar_end - e.tar_start, o.tar_end - o.tar_start
        if e.kind != DATA or o.kind != DATA:
            return [(lo, hi, o.tar_start + lo - e.tar_start if n_len == o_len else None)]
        nh, oh = n_len - _pad(e.size), o_len - _pad(o.size)
        out: list[tuple[int, int, int | None]] = []
        # header | data | padding, each clipped to [lo, hi)
        hs, he = e.tar_start, e.tar_start + nh
        if lo < he:
            out.append((lo, min(hi, he), o.tar_start + lo - hs if nh == oh else None))
        ds, de = he, he + e.size
        s, t = max(lo, ds), min(hi, de)
        if s < t:
            out += self._data_pieces(e, o, oh, s, t, tar, at)
        if hi > de:
            out.append((max(lo, de), hi, None))
        return out

    def _data_pieces(
        self, e: _Ent, o: _Ent, oh: int, s: int, t: int, tar: bytes, at: int
    ) -> list[tuple[int, int, int | None]]:
        """New data ``[s, t)`` (tar offsets) against the old file: the longest run equal to
        the old data at the same offset from the start, then from the end; literal between."""
        ds = e.tar_start + (e.tar_end - e.tar_start - _pad(e.size))
        p, q = s - ds, t - ds  # offsets in the new file's data
        ods = o.tar_start + oh
        # Most files around an edit are unchanged: equal bytes are found by ``startswith``
        # (no copy); numpy looks for the first or last difference only where there is one.
        # from the start: old data [p, min(q, o.size))
        n1 = max(0, min(q, o.size) - p)
        pre = 0
        if n1:
            got = self.old_tar.read(ods + p, ods + p + n1)
            if got is not None:
                if tar.startswith(got, s - at):
                    pre = n1
                else:
                    diff = np.flatnonzero(np.frombuffer(tar, np.uint8, n1, s - at)
                                          != np.frombuffer(got, np.uint8))
                    pre = int(diff[0])
        if pre == t - s:
            self._checked.add((s, ods + p, t - s))
            return [(s, t, ods + p)]
        # from the end: old data aligned on the file's end
        shift = o.size - e.size
        a = max(p + pre, -shift, 0)
        suf = 0
        if a < q:
            got = self.old_tar.read(ods + a + shift, ods + q + shift)
            if got is not None:
                if tar.startswith(got, s - at + a - p):
                    suf = q - a
                else:
                    diff = np.flatnonzero(np.frombuffer(tar, np.uint8, q - a, s - at + a - p)
                                          != np.frombuffer(got, np.uint8))
                    suf = q - a - (int(diff[-1]) + 1)
        out: list[tuple[int, int, int | None]] = []
        if pre:
            out.append((s, s + pre, ods + p))
            self._checked.add((s, ods + p, pre))
        out.append((s + pre, t - suf, None))
        if suf:
            out.append((t - suf, t, ods + q - suf + shift))
            self._checked.add((t - suf, ods + q - suf + shift, suf))
        return out


class _Encoder(_Parts):
    #: Leading segments equal in both archives, compared by ``_lead`` (0 until it ran).
    _lead_segs = 0
    #: What the build of the new archive handed over (None: nothing, all is inflated).
    fresh: BuildHandover | None = None

    def __init__(self, old_index: ArchiveIndex, old: Any, new_index: ArchiveIndex, new: Any,
                 seek: SeekPoints | None = None, fresh: BuildHandover | None = None):
        super().__init__(old_index, old, new_index.entries, seek)
        self.ni = new_index
        self.fresh = fresh
        #: Fresh runs whose tar came from ``fresh``.
        self.fresh_runs = 0
        self.new = memoryview(new)
        self.nt = _starts(new_index.segments.tar_ends)
        self.nd = _starts(new_index.segments.deflate_ends)
        self._new_crcs = array.array("I", new_index.segments.crcs.tobytes())
        self._new_stream: TarStream | None = None

    def _new_tar(self) -> TarStream:
        """The new archive's tar, inflated forward only when first needed (rare: see _run)."""
        if self._new_stream is None:
            self._new_stream = TarStream(self.new)
        return self._new_stream

    def copies(self) -> array.array[int]:
        """Per new segment: the index of an old segment with equal compressed bytes, or -1."""
        # Candidates by (tar length, deflate length, CRC), as one sorted array of 64-bit mixes
        # of the three (a dict of tuples cost ~50 MB on a 1 GB tree); a mix can collide, so
        # the three are compared again, then the bytes.
        def keyed(segs: Any) -> tuple[Any, Any, Any, Any]:
            tl = np.diff(segs.tar_ends, prepend=np.uint64(0))
            cl = np.diff(segs.deflate_ends, prepend=np.uint64(0))
            crc = segs.crcs.astype(np.uint64)
            return tl, cl, crc, (tl << np.uint64(40)) ^ (cl << np.uint64(20)) ^ crc

        otl, ocl, ocrc, okey = keyed(self.oi.segments)
        order = np.argsort(okey, kind="stable")
        skey = okey[order]
        ntl, ncl, ncrc, nkey = keyed(self.ni.segments)
        los = np.searchsorted(skey, nkey, "left")
        his = np.searchsorted(skey, nkey, "right")
        # One candidate (nearly all segments): vectorised.  Several (repeated content): a
        # list each, in a dict.  -2 marks those in ``single``, -1 none.
        single = np.full(len(nkey), -1, np.int64)
        one = np.flatnonzero(his - los == 1)
        if len(one) and len(order):
            j1 = order[los[one]]
            same = (otl[j1] == ntl[one]) & (ocl[j1] == ncl[one]) & (ocrc[j1] == ncrc[one])
            single[one[same]] = j1[same]
        multi = _Multi()
        mi = np.flatnonzero(his - los > 1)
        if len(mi):  # every (new, old) candidate pair, in candidate order: vectorised
            cnt = (his - los)[mi]
            rows = np.repeat(mi, cnt)
            js = order[np.repeat(los[mi] - (np.cumsum(cnt) - cnt), cnt) + np.arange(cnt.sum())]
            ok = (otl[js] == ntl[rows]) & (ocl[js] == ncl[rows]) & (ocrc[js] == ncrc[rows])
            multi = _Multi.of(rows[ok], js[ok])
            single[multi.rows] = -2
        # Nearly always, the candidate tried first is the one taken: choose assuming equal
        # bytes, then compare those choices stretch by stretch (~100 compares of big
        # stretches, halved around a mismatch, where one per segment cost ~0.2 s on the
        # stdlib tree); then choose again, comparing only pairs not confirmed (the same
        # choices as comparing each pair, only cheaper).  Mismatches are common right after
        # an edit: the same tar bytes, compressed after a changed window, often compress to
        # the same length.
        guess = _choose(single, multi, lambda i, j: True, np.ones(len(single), bool))
        confirmed = array.array("q", bytes(8 * len(guess)))
        self._confirm(guess, confirmed)  # confirmed[i] = j + 1
        conf = np.frombuffer(confirmed, np.int64)
        return _choose(single, multi, lambda i, j: confirmed[i] == j + 1 or self._equal(i, j),
                       conf == single + 1)

    def _equal(self, i: int, j: int) -> bool:
        a, b, n = _HDR + self.nd[i], _HDR + self.od[j], self.nd[i + 1] - self.nd[i]
        return bytes(self.old[b : b + n]) == bytes(self.new[a : a + n])

    def _confirm(self, guess: array.array[int], confirmed: array.array[int]) -> None:
        """``confirmed[i] = j + 1`` where new segment ``i``'s compressed bytes are old ``j``'s."""
        old = np.frombuffer(self.old, np.uint8)
        new = np.frombuffer(self.new, np.uint8)

        g = np.frombuffer(guess, np.int64)
        n = len(g)
        # Known equal, not compared: the leading segments ``_lead`` compared (each guessed
        # as itself: its old twin is a candidate, the first and the continuation), and the
        # segments the build copied from the old one guessed (``handover.copies``).
        known = np.zeros(n, bool)
        lead = min(self._lead_segs, n)
        known[:lead] = g[:lead] == np.arange(lead)
        for n0, o0, cnt in self.fresh.copies if self.fresh is not None else ():
            if 0 <= n0 and n0 + cnt <= n:
                known[n0 : n0 + cnt] = g[n0 : n0 + cnt] == np.arange(o0, o0 + cnt)
        if known.any():
            np.frombuffer(confirmed, np.int64)[known] = g[known] + 1
            g = np.where(known, -1, g)
        # Stretches: consecutive new segments [i, k) of consecutive old ones [j, j + k - i),
        # found with numpy (a Python step per segment cost ~5 ms on the stdlib tree).
        cont = np.zeros(n, bool)  # segment k continues k - 1's stretch
        cont[1:] = (g[:-1] >= 0) & (g[1:] == g[:-1] + 1)
        breaks = np.append(np.flatnonzero(~cont), n)
        firsts = breaks[:-1][g[breaks[:-1]] >= 0]
        lasts = breaks[np.searchsorted(breaks, firsts, "right")]
        stretches: list[tuple[int, int, int]] = list(
            zip(firsts.tolist(), lasts.tolist(), g[firsts].tolist(), strict=True))
        while stretches:
            i, k, j = stretches.pop()
            a, b, length = _HDR + self.nd[i], _HDR + self.od[j], self.nd[k] - self.nd[i]
            # A block at a time: comparing arrays makes an array of bools as long (a stretch
            # of a 1 GB tree's archive is easily 300 MB, all anonymous memory).
            if all(np.array_equal(old[b + x : b + min(x + _PIECE, length)],
                                  new[a + x : a + min(x + _PIECE, length)])
                   for x in range(0, length, _PIECE)):
                confirmed[i:k] = array.array("q", range(j + 1, j + 1 + k - i))
            elif k - i > 1:  # halves, down to the segments that differ
                m = (i + k) // 2
                stretches += ((i, m, j), (m, k, j + m - i))

    def _window_ok(self, i0: int, copies: array.array[int]) -> bool:
        """Is the 32 KiB window before new segment ``i0`` one stretch of copied old
        segments (so its tar bytes are old tar bytes the sender can read)?"""
        need, k, prev = min(DICT_SIZE, self.nt[i0]), i0 - 1, None
        while need > 0:
            j = copies[k] if k >= 0 else -1
            if j < 0 or (prev is not None and j != prev - 1):
                return False
            need -= self.nt[k + 1] - self.nt[k]
            prev, k = j, k - 1
        return True

    def records(self) -> Generator[bytes, None, None]:
        ni, n = self.ni, len(self.ni.segments)
        yield _HEAD.pack(LAYOUT_MAGIC, LAYOUT_VERSION, 0, self.oi.archive_hash, ni.archive_size,
                         ni.archive_hash, ni.level, len(ni.deflater)) + ni.deflater.encode()
        # The leading segments both archives hold alike (same place, bounds and bytes) are
        # the plan's first COPY whatever the rest is (``_lead``): out before the plan (~30
        # ms of a ~1 % change's encode on the stdlib tree), so the receiver starts on them.
        lead = self._lead()
        if lead:
            yield _record(T_COPY, _COPY.pack(0, lead))
        copies = self.copies()
        # Fresh runs [i0, i1) of new segments; index n is the final (Z_FINISH) segment,
        # always compressed anew.  A run whose window is not copied old bytes joins the one
        # before it (the copied segments between are then rebuilt too).
        runs: list[list[int]] = []
        i = 0
        while i < n:
            if copies[i] < 0:
                j = i
                while j < n and copies[j] < 0:
                    j += 1
                runs.append([i, j])
                i = j
            else:
                i += 1
        if runs and runs[-1][1] == n:
            runs[-1][1] = n + 1
        else:
            runs.append([n, n + 1])
        merged: list[list[int]] = []
        for r in runs:
            if merged and not self._window_ok(r[0], copies):
                merged[-1][1] = r[1]
            else:
                merged.append(r)
        # Copied segments as COPY records, consecutive old bytes merged: breaks found with
        # numpy (a Python step per segment cost ~0.02 s on the stdlib tree).
        cp = np.frombuffer(copies, np.int64)
        nd = np.frombuffer(self.nd, np.int64)
        at = _HDR + np.frombuffer(self.od, np.int64)[np.maximum(cp, 0)]  # junk where cp < 0
        follows = np.zeros(n, bool)  # segment k's old bytes follow k - 1's
        follows[1:] = at[1:] == at[:-1] + np.diff(nd)[:-1]
        pos = 0
        copy = [0, _HDR]  # pending COPY: old offset, length (the gzip header first)
        for i0, i1 in merged:
            if pos < i0:
                assert int(cp[pos:i0].min()) >= 0
                starts = [pos, *(np.flatnonzero(~follows[pos + 1 : i0]) + pos + 1).tolist(), i0]
                for s, e in itertools.pairwise(starts):
                    length = int(nd[e] - nd[s])
                    if copy[1] and copy[0] + copy[1] == int(at[s]):
                        copy[1] += length
                    else:
                        if copy[1]:
                            yield from self._copy(copy, lead)
                            lead = 0
                        copy = [int(at[s]), length]
            if copy[1]:
                yield from self._copy(copy, lead)
                lead = 0
            copy = [0, 0]
            yield from self._run(i0, i1, copies)
            pos = i1
        yield _record(T_RAW, bytes(self.new[ni.archive_size - 8 : ni.archive_size]))
        yield _record(T_END, b"")

    def _lead(self) -> int:
        """Bytes of the plan's first COPY, known before the plan: the gzip header and the
        leading segments with the same bounds, CRC-32 and compressed bytes in both archives
        (0: none).  Each such segment ``k`` has old ``k`` as a candidate with equal bytes,
        which ``_choose`` takes (the single candidate; or, of several, the continuation of
        ``k - 1``, or for ``k = 0`` the first ahead); the first segment after them is not
        old bytes following on (those would be its own, equal: it would lead too).  So
        the plan's first COPY is ``(0, _HDR + nd[L])``, and ``_copy`` checks it is."""
        o, n = self.oi.segments, self.ni.segments
        m = min(len(o), len(n))
        same = ((np.asarray(o.tar_ends)[:m] == np.asarray(n.tar_ends)[:m])
                & (np.asarray(o.deflate_ends)[:m] == np.asarray(n.deflate_ends)[:m])
                & (np.asarray(o.crcs)[:m] == np.asarray(n.crcs)[:m]))
        bounds = int(np.argmin(same)) if m and not same.all() else m  # segments [0, bounds)
        end = _HDR + self.nd[bounds]
        old, new = np.frombuffer(self.old, np.uint8), np.frombuffer(self.new, np.uint8)
        # The first differing byte, a block at a time (the rest is never looked at here),
        # but for the stretches the build copied to the same place (equal: not compared).
        at = 0
        for a, b in [*self._copied_in_place(end), (end, end)]:
            for x in range(at, a, _PIECE):
                y = min(x + _PIECE, a)
                if not np.array_equal(old[x:y], new[x:y]):
                    end = x + int(np.argmax(old[x:y] != new[x:y]))
                    break
            else:
                at = b
                continue
            break
        # Whole segments before it.
        lead = bisect.bisect_right(self.nd, end - _HDR, 0, bounds + 1) - 1
        self._lead_segs = max(lead, 0)  # compared here: _confirm does not again
        return _HDR + self.nd[lead] if lead > 0 else 0

    def _copied_in_place(self, end: int) -> list[tuple[int, int]]:
        """The archive byte ranges before ``end`` the build copied from the same place in
        the old archive (``handover.copies``), ascending."""
        out: list[tuple[int, int]] = []
        for n0, o0, cnt in self.fresh.copies if self.fresh is not None else ():
            a = _HDR + self.nd[n0]
            if a >= end:
                break
            if n0 + cnt <= len(self.nd) - 1 and o0 + cnt <= len(self.od) - 1 and \
                    self.nd[n0] == self.od[o0] and self.nd[n0 + cnt] == self.od[o0 + cnt]:
                out.append((a, min(end, _HDR + self.nd[n0 + cnt])))
        return out

    def _copy(self, copy: list[int], lead: int) -> Iterator[bytes]:
        """The COPY record of ``copy`` (old offset, length), unless it is the plan's first
        and went out already (``lead`` bytes from 0, by ``_lead``)."""
        if not lead:
            yield _record(T_COPY, _COPY.pack(*copy))
        elif copy != [0, lead]:  # _lead's argument is wrong: never send a wrong delta
            raise IntegrityError(f"layout delta: the leading COPY sent was (0, {lead}), "
                                 f"the plan's is {tuple(copy)}")

    def _run(self, i0: int, i1: int, copies: array.array[int]) -> Iterator[bytes]:
        """RUN records rebuilding new segments ``[i0, i1)`` (``n``: the final one).  Their tar
        bytes are inflated from the new archive with the window they were compressed with
        (old tar bytes, ``_window_ok``) and checked against the index's CRC-32s: what the
        receiver compresses is what the builder compressed (module docstring)."""
        ni, n = self.ni, len(self.ni.segments)
        c = self.nt[i0]
        w = min(DICT_SIZE, c)
        window = b""
        if w:
            j = copies[i0 - 1]
            assert j >= 0
            end = self.ot[j + 1]
            if self.fresh is not None:
                self._enter_old(i0, j, w, copies)
            got = self.old_tar.read(end - w, end)
            if got is None:
                # The copied segment before this run lies behind the old tar still kept (the
                # content moved back): the same bytes are the new tar's there, read forward
                # (runs come in order, so that stream never goes back).
                got = self._new_tar().read(self.nt[i0] - w, self.nt[i0])
            if got is None:
                raise IntegrityError("layout delta: the window before a run cannot be read")
            window = got
        inflate: Any = None  # inflating the new archive, continuing from the last chunk
        cont = False
        chunk: list[int] = []
        for k in range(i0, i1):
            chunk.append(k)
            tar_end = self.nt[k + 1] if k < n else ni.tar_size
            if tar_end - self.nt[chunk[0]] < MAX_RUN_TAR and k != i1 - 1:
                continue
            final = k == n
            ds = self.nd[chunk[0]]
            de = self.nd[k + 1] if not final else ni.archive_size - 8 - _HDR
            comp = self.new[_HDR + ds : _HDR + de]
            start = self.nt[chunk[0]]
            # What the receiver compresses is checked, not recompressed here (that cost ~1/4
            # of an encode): each segment's tar by the CRC-32 the builder indexed (so the
            # window and the bytes are the ones it compressed), the final one, which has no
            # CRC, by compressing it back (<= ~64 KiB).  That the builder's bytes are
            # compress_segments' from the window is the builder's invariant (byte-identical
            # to a fresh build, property-tested) and the capability names zlib; should it
            # fail, the receiver's blake3 refuses the archive and the server retries the
            # backup as a full transfer: never a wrong archive.
            # The tar the builder compressed, if it handed it over (and it checks); else
            # inflated from the new archive with the window before.
            got = self.fresh.read(start, tar_end) if self.fresh is not None else None
            if got is not None and self._tar_problem(got, chunk, window, comp) is None:
                tar, inflate = got, None
                self.fresh_runs += 1
            else:
                if inflate is None:
                    # ISA-L inflates (exact, ~2x zlib): only deflate output must be zlib's.
                    # A chunk starts at a segment boundary: entered with the tar before it.
                    inflate = isal_zlib.decompressobj(-15, zdict=window) if window else \
                        isal_zlib.decompressobj(-15)
                try:
                    tar = inflate.decompress(comp) + (inflate.flush() if final else b"")
                except _INFLATE_ERRORS as exc:
                    raise IntegrityError(
                        f"layout delta: a new segment does not inflate: {exc}") from None
                if (why := self._tar_problem(tar, chunk, window, comp)) is not None:
                    raise IntegrityError(f"layout delta: {why}")
            cuts = [self.nt[x + 1] - self.nt[x] for x in chunk if x < n]
            parts = self._parts(tar, start) if cont else self._parts(window + tar, start - w)
            yield self._run_record((F_FINAL if final else 0) | (F_CONTINUE if cont else 0),
                                   0 if cont else w, cuts, parts)
            window = (window + tar)[-DICT_SIZE:]
            cont, chunk = True, []

    def _tar_problem(self, tar: bytes, chunk: list[int], window: bytes, comp: Any
                     ) -> str | None:
        """Why ``tar`` is not the tar of new segments ``chunk`` (compressed ``comp``, after
        ``window``), or None: its length, each segment's indexed CRC-32, and the final
        segment (which has none) compressed back to the archive's bytes."""
        ni, n = self.ni, len(self.ni.segments)
        start, last = self.nt[chunk[0]], chunk[-1]
        if len(tar) != (self.nt[last + 1] if last < n else ni.tar_size) - start:
            return "a new segment does not inflate to its length"
        view = memoryview(tar)
        for x in chunk:
            if x < n and zlib.crc32(view[self.nt[x] - start : self.nt[x + 1] - start]) \
                    != self._new_crcs[x]:
                return f"new segment {x} does not inflate to its CRC-32"
        if last == n:
            at = self.nt[n] - start
            fw = ((window + tar[:at]) if at < DICT_SIZE else tar[:at])[-DICT_SIZE:]
            if compress_segments(view[at:], [], ni.level, True, fw) != \
                    comp[self.nd[n] - self.nd[chunk[0]] :]:
                return "the final segment does not compress back to the archive"
        return None

    def _enter_old(self, i0: int, j: int, w: int, copies: array.array[int]) -> None:
        """``_enter_at`` old segment ``j + 1`` (the one after the copy that new segment
        ``i0``, a fresh run, follows) with the window the builder handed over (``fresh``:
        the new tar before ``i0``, which it primed that run's compressor with), if that
        window lies in new segments copied from consecutive old ones.  (The builder's
        windows are exactly 32 KiB: the first segment's head is not handed over.)"""
        assert self.fresh is not None
        if w != min(DICT_SIZE, self.ot[j + 1]):
            return
        lo = self.nt[i0] - w
        s = bisect.bisect_right(self.nt, lo) - 1  # the new segment holding the window's start
        window = self.fresh.read(lo, self.nt[i0])
        if window is None:
            return
        # The window lies in new segments copied from consecutive old ones ``..., j - 1, j``:
        # then it stands where the old tar before old segment ``j + 1`` does (checked there).
        for x in range(s, i0):
            if copies[x] != j - (i0 - 1 - x):
                return
        self._enter_at(j + 1, window)


def _in_place(parts: list[bytes | tuple[int, int]], at: int) -> bool:
    """Are ``parts`` (new tar from offset ``at``) the old tar at the same place as it was —
    old references to the same offsets, literals only zeros (a file's padding, sent as
    literal) — as when a file whose ctime alone changed is read and compressed again?  Then
    the archive may still be the old one (a guess: the archive's blake3 decides); anything
    else is a change."""
    for p in parts:
        if isinstance(p, tuple):
            if p[0] != at:
                return False
            at += p[1]
        else:
            if p.count(0) != len(p):
                return False
            at += len(p)
    return True


def _starts(ends: Any) -> array.array[int]:
    """0 then ``ends``, packed: the start of each segment and the end of the last."""
    out = array.array("q", [0])
    out.frombytes(np.ascontiguousarray(ends, np.int64).tobytes())
    return out


def _choose(
    cands: npt.NDArray[np.int64],
    multi: _Multi,
    equal: Callable[[int, int], bool],
    sure: npt.NDArray[np.bool_],
) -> array.array[int]:
    """Per new segment, the first of its candidates (``cands[i]``, or ``multi[i]`` where it
    is -2) whose bytes are ``equal``: the continuation of the previous choice first, then
    the nearest ahead (repeated content, e.g. several copies of one tree, would otherwise
    match the first copy, far behind); -1 for none.  ``sure[i]``: ``equal(i, cands[i])``
    is known true, not asked.

    Vectorised over the single candidates (nearly all segments; a Python step each cost
    ~0.05 s on the stdlib tree): only the unsure ones and the several-candidate ones are
    visited one by one, the latter in order, as each depends on the choice before it."""
    out = np.where(cands >= 0, cands, -1)
    for i in np.flatnonzero((cands >= 0) & ~sure).tolist():
        if not equal(i, int(cands[i])):
            out[i] = -1
    if len(multi.rows):
        idx = np.arange(len(out))
        # last_single[i]: the last segment at or before i whose single candidate was taken.
        last_single = np.maximum.accumulate(np.where(out >= 0, idx, -1)).tolist()
        last_multi = -1
        chosen = out.tolist()  # Python ints: indexing numpy per step cost more than the step
        for r, i in enumerate(multi.rows.tolist()):  # ascending
            before = max(last_single[i - 1] if i else -1, last_multi)
            expect = chosen[before] + 1 if before >= 0 else -1
            cs = multi.cands[multi.ptr[r] : multi.ptr[r + 1]].tolist()
            if expect in cs and equal(i, expect):  # nearly always: no sort
                chosen[i], last_multi = expect, i
                continue
            # then those ahead, then those behind, each ascending
            for j in sorted(j for j in cs if j > expect) + sorted(j for j in cs if j < expect):
                if equal(i, j):
                    chosen[i], last_multi = j, i
                    break
        return array.array("q", chosen)
    return array.array("q", out.astype(np.int64).tobytes())


class _Multi:
    """The new segments with several candidates (repeated content), packed: ``rows``
    ascending, row ``r``'s candidates ``cands[ptr[r]:ptr[r + 1]]`` in candidate order.  A
    dict of lists cost ~150 bytes a segment plus two lists of every pair while built: on a
    1 GB tree of five copies of one source tree (~140,000 such segments, ~700,000 pairs)
    that was ~65 MB of the agent's anonymous memory."""

    def __init__(self, rows: npt.NDArray[np.int64] | None = None,
                 cands: npt.NDArray[np.int64] | None = None,
                 ptr: npt.NDArray[np.int64] | None = None) -> None:
        self.rows = rows if rows is not None else np.zeros(0, np.int64)
        self.cands = cands if cands is not None else np.zeros(0, np.int64)
        self.ptr = ptr if ptr is not None else np.zeros(1, np.int64)

    @classmethod
    def of(cls, rows: npt.NDArray[np.int64], cands: npt.NDArray[np.int64]) -> _Multi:
        """From (row, candidate) pairs grouped by ascending row."""
        if not len(rows):
            return cls()
        starts = np.flatnonzero(np.diff(rows, prepend=rows[0] - 1))
        return cls(rows[starts], cands, np.append(starts, len(rows)).astype(np.int64))


def _reach() -> int:
    """How far behind the furthest old tar byte referenced so far a sender may reference
    (else: literal): a function of the references alone, so the sender knows what the
    receiver still has without running its stream.  ``KEEP`` less a margin: a receiver of
    the first release kept ``KEEP`` behind what it had *inflated*, which could run one input
    step (~0.3 MB of tar, rarely more) past the request."""
    return KEEP - KEEP // 8


def _walk_key(path: str) -> tuple[bytes, ...]:
    """A path's place in the walk's order: its components' bytes, compared in turn."""
    return tuple(c.encode("utf-8", "surrogateescape") for c in path.split("/"))


#: ``tar_start``'s place in an ``EntryTable.raw`` record.
_RAW_TAR_START = 12


class _Growing:
    """The build's entries as they are placed (its ``EntryTable``), and the one being fed
    (``placing``): the last until the table holds it.  What ``_parts`` reads of them."""

    def __init__(self, table: Any) -> None:
        self.table = table
        self._next: tuple[int, str, tuple[int, ...]] | None = None  # position, path, raw

    def placing(self, record: IndexEntry, start: int, end: int) -> None:
        raw = [0] * (_RAW_TAR_START + 2)
        raw[0], raw[9], raw[_RAW_TAR_START], raw[_RAW_TAR_START + 1] = \
            record.kind, record.size, start, end
        self._next = (len(self.table), record.path, tuple(raw))

    def _extra(self) -> tuple[int, str, tuple[int, ...]] | None:
        x = self._next
        if x is not None and len(self.table) != x[0]:  # placed (or given up): the table's
            self._next = x = None
        return x

    def __len__(self) -> int:
        return len(self.table) + (self._extra() is not None)

    def raw(self, i: int) -> tuple[Any, ...]:
        x = self._extra()
        return x[2] if x is not None and i == x[0] else self.table.raw(i)

    def path(self, i: int) -> str:
        x = self._extra()
        return x[1] if x is not None and i == x[0] else self.table.path(i)


class _Ent(NamedTuple):
    """The fields of an index entry the encoder uses, from its packed record: making an
    ``IndexEntry`` (15 fields, frozen) per entry of a fresh run, new and old, was ~1/10 of
    an encode with the build's hand-over."""

    kind: int
    size: int
    tar_start: int
    tar_end: int


def _ent(entries: Any, i: int) -> _Ent:
    r = entries.raw(i)  # (kind, flags, name length, mode, ..., size, ..., tar start, end, ...)
    return _Ent(r[0], r[9], r[_RAW_TAR_START], r[_RAW_TAR_START + 1])


def _record(kind: int, body: bytes) -> bytes:
    if len(body) > MAX_RECORD:
        raise LimitExceeded(f"layout delta record of {len(body)} bytes exceeds {MAX_RECORD}")
    return _REC.pack(kind, len(body)) + body


def encode_layout(
    old_index: ArchiveIndex, old_archive: Any, new_index: ArchiveIndex, new_archive: Any,
    *, seek: SeekPoints | None = None, fresh: BuildHandover | None = None,
) -> Generator[bytes, None, None]:
    """The layout delta turning ``old_archive`` into ``new_archive`` (buffers of the whole
    archives, e.g. mmaps), given the index of each; yields it record by record.  ``seek``:
    the old archive's seek points (used only if they name it), so old tar bytes are
    inflated around what changed instead of from the start; ``fresh``: what the incremental
    build of the new archive handed over (``IncrementalBuilder.handover``, used only if it
    names both archives: built from ``old_archive`` into ``new_archive``), so the encoder inflates little of either archive and compares only what the
    build did not copy; the same delta either way."""
    if old_index.archive_size != len(memoryview(old_archive)) or \
            new_index.archive_size != len(memoryview(new_archive)):
        raise IntegrityError("layout delta: an archive is not the size its index says")
    if seek is not None and not seek.matches(old_index.archive_hash, old_index.archive_size):
        seek = None
    # A hand-over is of one build: from the old archive it reused to the new one.  Against
    # another base its ``copies`` and windows would be taken as equal without being so.
    if fresh is not None and (fresh.archive_hash != new_index.archive_hash
                              or fresh.previous_hash != old_index.archive_hash):
        fresh = None
    return _Encoder(old_index, old_archive, new_index, new_archive, seek, fresh).records()



class LayoutStreamer(_Parts):
    """Sans-I/O: the layout delta *version 2*, made while the incremental build of the new
    archive from ``old_index`` / ``old_archive`` runs (``IncrementalBuilder(stream=...)``
    calls it), so the receiver rebuilds the archive while the sender still builds it.

    Why: version 1 is made from both finished archives, so its receiver waits for the
    whole build and then decodes after it (after the ~1 % change on the stdlib tree: a
    build of ~150 ms, then ~100 ms of apply on the server).  Here the builder reports, in
    its output order, each stretch of old segments it copied (a ``COPY`` of old archive
    bytes: those bytes are old ones by construction) and each compression job (a ``RUN``:
    the job's tar bytes and the window it was primed with, described as old tar references
    and literals by the new entries' paths, ``_parts``, with the job's cuts), then the gzip
    trailer; the new archive's size and blake3, known only at the end, are in the END
    record instead of the header.  A job's tar is described once the build's entries cover
    it (``bind``: the builder's growing ``EntryTable``; before, its bytes would go as
    literal).  Segments a job compressed that came out equal to old ones are rebuilt by
    the receiver too (version 1 would COPY them): the wire grows by their cut lengths and
    references, the receiver compresses a little more, and nothing waits for the agent's
    compression.  What the receiver rebuilds is the builder's own input (jobs are the tar
    it compressed with that window, copies its old segments), so the same archive; the
    receiver's blake3 against END (and the server's against ``backup-done``) stands
    behind it, as in version 1.

    Use: ``header()`` first, then ``take()`` after each chunk of the build (the records
    made so far), and ``end(size, blake3)`` once it ended (the rest, RAW trailer and END).
    ``failed``: why the build did not use the old archive (not reused at all, or given up
    midway): the records made are then no delta of this build (the caller sends none, or
    fails the backup if some went out)."""

    def __init__(self, old_index: ArchiveIndex, old_archive: Any, *,
                 seek: SeekPoints | None = None, level: int = DEFAULT_LEVEL,
                 version: int = LAYOUT_STREAM_VERSION) -> None:
        if version not in (LAYOUT_STREAM_VERSION, LAYOUT_EARLY_VERSION):
            raise ValueError(f"LayoutStreamer makes versions 2 and 3, not {version}")
        if old_index.archive_size != len(memoryview(old_archive)):
            raise IntegrityError("layout delta: the old archive is not the size its index says")
        if seek is not None and not seek.matches(old_index.archive_hash, old_index.archive_size):
            seek = None
        super().__init__(old_index, old_archive, None, seek)
        # Level 6, not version 1's 9: this runs in the build's own thread (stdlib pair's
        # ~1 % change: 259 KB of literals, 11.8 ms at 9, 4.4 ms at 6, for 527 bytes more).
        self.lit = zlib.compressobj(6, zlib.DEFLATED, -15)
        self.level = level
        self.deflater = deflater(level)  # DeflateError where libz cannot make the bytes
        self.version = version
        # Version 3: what its END vouches for (each RUN record's window and tar, in order).
        self._runs_hash = blake3.blake3() if version == LAYOUT_EARLY_VERSION else None
        self._sent_hash = blake3.blake3()
        #: The builder told the trailer: every event is in (version 3's ``end`` may come).
        self.told_all = False
        # Builder events in output order: (COPY, start, length, k) | (RUN, at, prime, data,
        # ends, final) | (RAW, bytes).
        self._events: deque[tuple[Any, ...]] = deque()
        self._waiting = 0  # tar bytes of the RUN events queued (data and window)
        self._copy = [0, _HDR]  # pending COPY (old archive offset, length): the gzip header first
        self._tail_end = -1  # tar offset after the last RUN record (-1: the last was no RUN)
        self._tail = b""  # its last 32 KiB of tar (window included)
        self._enter = -1  # old segment after the last COPY (an entry point for the next RUN)
        self._out: list[bytes] = []
        self._ended = False
        self._bound = False
        #: Why the build did not use the old archive ("": it did, as far as it went).
        self.failed = ""
        #: Jobs described before the final one (0: nothing compressed anew but the end).
        self.runs = 0
        #: A RUN was made of other than the old tar at the same place, or a COPY of old
        #: bytes from elsewhere: the new archive is not the old one (False: it may be).
        self.changed = False

    # -- what the sender's caller uses

    def header(self) -> bytes:
        """The delta's first bytes (once)."""
        head = _HEAD2.pack(LAYOUT_MAGIC, self.version, 0, self.oi.archive_hash,
                           self.level, len(self.deflater)) + self.deflater.encode()
        if self._runs_hash is not None:  # version 3: what its END vouches for
            self._sent_hash.update(head)
        return head

    def take(self) -> list[bytes]:
        """The records made since the last call (the jobs the entries cover so far)."""
        self._pump(final=False)
        return self._taken()

    def _taken(self) -> list[bytes]:
        out, self._out = self._out, []
        if self._runs_hash is not None:
            for r in out:
                self._sent_hash.update(r)
        return out

    def end(self, size: int | None = None, digest: bytes | None = None) -> list[bytes]:
        """The last records: version 2 once the build ended (the new archive is ``size``
        bytes with blake3 ``digest``), version 3 once ``told_all`` (no arguments)."""
        if self.failed:
            raise IntegrityError(f"layout delta: the build did not reuse the old archive ({self.failed})")
        if (self._runs_hash is None) != (size is not None and digest is not None):
            raise ValueError("version 2's END takes the archive's size and blake3, version 3's not")
        self._pump(final=True)
        if not self._ended:
            raise IntegrityError("layout delta: the build did not end with its trailer")
        out = self._taken()
        if self._runs_hash is not None:
            return [*out, _record(T_END, _END3.pack(self._runs_hash.digest(),
                                                    self._sent_hash.digest()))]
        assert size is not None and digest is not None
        return [*out, _record(T_END, _END2.pack(size, digest))]

    def close(self) -> None:
        """Let go of the old archive's buffer (views of it), e.g. before its map closes."""
        self._events.clear()
        self.new_entries = None
        self.old = memoryview(b"")
        self.old_tar = TarStream(b"")

    # -- what the builder calls (``_incremental.BuildStream``)

    def bind(self, entries: Any, previous_hash: bytes) -> None:
        """The build reuses ``previous_hash``'s archive; ``entries``: its growing index."""
        if previous_hash != self.oi.archive_hash:
            self.fail("the build reuses another archive than the old one")
            return
        self.new_entries = _Growing(entries)
        self._bound = True

    def placing(self, record: IndexEntry, start: int, end: int) -> None:
        """The entry whose bytes are being fed, to be placed at ``[start, end)``: its jobs
        are described as they come (a big file's, by the time it is placed, would be many)."""
        if self._bound:
            self.new_entries.placing(record, start, end)

    def fail(self, why: str) -> None:
        self.failed = self.failed or why
        self._events.clear()

    def copy(self, start: int, length: int, k: int) -> None:
        """Old deflate bytes ``[start, start + length)`` (after the gzip header) are the
        next ones of the new archive: old segments up to ``k`` (exclusive)."""
        if self._bound and not self.failed:
            self._events.append((T_COPY, start, length, k))

    def job(self, at: int, prime: bytes, data: bytes, ends: list[int], final: bool) -> None:
        """A compression job: tar ``data`` from ``at``, primed with ``prime`` (the tar before
        it), cut at ``ends`` (absolute; a final job's last one is its end)."""
        if self._bound and not self.failed:
            self._events.append((T_RUN, at, prime, data, ends, final))
            self._waiting += len(prime) + len(data)

    def trailer(self, raw: bytes) -> None:
        if self._bound and not self.failed:
            self._events.append((T_RAW, raw))
            self.told_all = True

    # -- making records

    def _covered(self) -> int:
        e = self.new_entries
        return int(e.raw(len(e) - 1)[_RAW_TAR_START + 1]) if e is not None and len(e) else 0

    def _pump(self, final: bool) -> None:
        if self.failed or not self._bound:
            return
        covered = -1 if final else self._covered()
        events = self._events
        while events:
            ev = events[0]
            if ev[0] == T_RUN and not final and (ev[5] or ev[1] + len(ev[3]) > covered) \
                    and self._waiting <= STREAM_WAITING:
                return  # its entries are not all in yet (the final job's: at the end)
            events.popleft()
            if ev[0] == T_COPY:
                _, start, length, k = ev
                if self._copy[0] + self._copy[1] == _HDR + start:
                    self._copy[1] += length
                else:
                    if self._copy[1]:
                        self.changed = True  # not where the pending copy's old bytes go on
                    self._flush_copy()
                    self._copy = [_HDR + start, length]
                self._enter = k
                self._tail_end = -1
            elif ev[0] == T_RUN:
                self._waiting -= len(ev[2]) + len(ev[3])
                self._flush_copy()
                self._job(*ev[1:])
            else:
                self._flush_copy()
                self._out.append(_record(T_RAW, ev[1]))
                self._ended = True

    def _flush_copy(self) -> None:
        if self._copy[1]:
            self._out.append(_record(T_COPY, _COPY.pack(*self._copy)))
        self._copy = [0, 0]

    def _job(self, at: int, prime: bytes, data: bytes, ends: list[int], final: bool) -> None:
        # Continuing the RUN before (its receiver's window is the last 32 KiB of that RUN's
        # tar) only where that is this job's window (the builder's is, for a job following
        # a job; checked all the same: else the window goes as parts).
        cont = self._tail_end == at and prime == self._tail
        if not cont and self._enter >= 0:
            self._enter_at(self._enter, prime)
        self._enter = -1
        # Segment lengths; a final job's last segment is its final one (no cut).
        segs = [b - a for a, b in itertools.pairwise([at, *ends])]
        # (A final job's last segment may be empty: a cut at the very end of the tar.)
        if sum(segs) != len(data) or any(x <= 0 for x in (segs[:-1] if final else segs)):
            raise IntegrityError("layout delta: a compression job's cuts do not fit its tar")
        # Records of ~MAX_RUN_TAR tar each, cut at segment ends (one ends at the segment
        # that takes it past the limit, as version 1's), each continuing the one before.
        lo = k = 0
        while k < len(segs):
            first, hi = k, lo
            while k < len(segs) and hi - lo < MAX_RUN_TAR:
                hi += segs[k]
                k += 1
            last = k == len(segs)
            tar = data[lo:hi]
            if cont:
                parts, w = self._parts(tar, at + lo), 0
            else:
                parts, w = self._parts(prime + tar, at - len(prime)), len(prime)
            if self._runs_hash is not None:  # what the receiver rebuilds: window, then tar
                if not cont:
                    self._runs_hash.update(prime)
                self._runs_hash.update(tar)
            flags = (F_FINAL if final and last else 0) | (F_CONTINUE if cont else 0)
            cuts = segs[first : k - 1] if final and last else segs[first:k]
            # (The final job holds the end-of-archive blocks, in no entry: not a change.)
            if not final and not self.changed and not _in_place(parts, at + lo - w):
                self.changed = True
            self._out.append(self._run_record(flags, w, cuts, parts))
            cont, lo = True, hi
        self._tail_end = at + len(data)
        self._tail = (prime + data)[-DICT_SIZE:] if len(data) < DICT_SIZE else data[-DICT_SIZE:]
        if not final:
            self.runs += 1


# -- decoding (the receiver, who holds the old archive) --------------------------------------


class _Run(NamedTuple):
    """A RUN record as read (``LayoutPatcher._parse_run``), its old tar not read yet."""

    #: Each part: literal bytes, or an old tar reference (offset, length).
    pieces: list[memoryview | tuple[int, int]]
    tar_len: int
    w: int
    cont: bool
    final: bool
    ends: list[int]
    #: The error found after the reads in the record's order (raised after them).
    later: FormatError | None


class _Turns:
    """Whose turn it is to read old tar: RUN records rebuilt in worker threads read it in
    the records' order (``TarStream`` is one forward stream, and what a read answers
    depends on the reads before it), then compress side by side.  ``take`` gives a run
    the turn before its own (None: the first) and its own: a future each, resolved once
    that run is done reading, to whether it or one before it failed (``settle`` waits
    for the last one taken: a failed run's error is then raised in the call that read
    it, as one by one).  ``abandon`` (``close``) cancels those not resolved, so a run
    waiting for one that never ran ends."""

    def __init__(self) -> None:
        self._last: Future[bool] | None = None
        self._open: list[Future[bool]] = []

    def take(self) -> tuple[Future[bool] | None, Future[bool]]:
        prev, mine = self._last, Future[bool]()
        self._last = mine
        self._open = [f for f in self._open if not f.done()]
        self._open.append(mine)
        return prev, mine

    @staticmethod
    def wait(turn: tuple[Future[bool] | None, Future[bool]]) -> bool:
        """Until the run before has read (CancelledError: abandoned); did any fail?"""
        return turn[0].result() if turn[0] is not None else False

    @staticmethod
    def done(turn: tuple[Future[bool] | None, Future[bool]], failed: bool) -> None:
        with contextlib.suppress(InvalidStateError):  # abandoned meanwhile
            turn[1].set_result(failed)

    def settle(self) -> bool:
        """Wait until every run taken is done reading; has one failed?"""
        return self._last.result() if self._last is not None else False

    def abandon(self) -> None:
        for f in self._open:
            f.cancel()
        self._open = []


@attrs.frozen
class _Waiting:
    """A record's output waiting its turn in ``LayoutPatcher.pieces``: its pieces, or the
    compression of a RUN's tar in a worker; ``copy``: a COPY's (base offset, length), noted in
    ``copies`` when handed out; ``weight``: the bytes it holds (tar being compressed, RAW)."""

    out: list[bytes | memoryview] | Future[bytes]
    copy: tuple[int, int] | None
    weight: int


class LayoutPatcher:
    """Sans-I/O: the old archive (a buffer) + a layout delta fed in pieces → the new
    archive's bytes.  Same interface as ``engine.Patcher``: ``feed`` returns output pieces,
    ``finish`` checks size and blake3 against the header (``IntegrityError``); then
    ``new_size`` and ``new_hash`` hold the verified values.  ``seek``: the base's seek
    points, used only if they name ``base_hash`` (old tar bytes are then inflated from the
    point before each reference instead of from the start; the same output).

    ``threads``: RUN records are rebuilt by that many worker threads (1, the default: all
    in the calling thread).  The calling thread parses the records (literals included) and
    hands each RUN to the pool; a worker reads the run's old tar once the run before has
    read its own (``_Turns``: ``TarStream`` is one stream, and what a read answers depends
    on the reads before it), then compresses it while the next run reads; the calling
    thread hashes (blake3) and hands out the pieces meanwhile, so inflating, compressing
    and writing overlap.  A run's output depends only on its own tar bytes and window (the
    previous run's *tar* tail, which that run's worker leaves before the next one reads),
    so pieces still come out in the records' order, the same bytes, the same errors after
    the same pieces (a run whose tar could not be rebuilt fails the call that read it;
    fewer pieces before a truncated delta's: runs still compressing wait for more).  At
    most ``_AHEAD`` x ``threads`` + 1 records (≤ ``_AHEAD_BYTES`` of tar and RAW bytes)
    wait; runs still compressing when a ``pieces`` call returns come out at the next one
    (all by the call that reads END).  The threads end with the call that reads END, with
    an error, when a ``pieces`` generator is closed, or by ``close`` (``finish`` calls it).

    Measured (``benchmarks/bench_layout.py --seek 256 1024 --threads 1 2 --repeat 5``, the
    stdlib pair, 2 cores shared at load ~5): with 2 threads the calling thread spends
    0.04-0.05 s CPU of an apply's 0.15-0.20 s (before, when workers only compressed:
    ~0.10 s); the whole costs about the same CPU (median 0.196 against 0.183 s one by one),
    and wall follows only where a core is free (at that load the medians were 0.219 and
    0.227 s)."""

    def __init__(
        self, base: Any, *, base_hash: bytes | None = None, max_size: int | None = None,
        seek: SeekPoints | None = None, threads: int = 1,
    ) -> None:
        self._base = memoryview(base)
        self._want_base_hash = base_hash
        self._max_size = max_size
        self._threads = max(1, threads)
        # Each record's output in order: ready pieces, or a run compressing; a COPY's
        # (base offset, length) is noted in ``copies`` when handed out (its offset in the
        # new archive is known only once the runs before it are compressed).
        self._waiting: deque[_Waiting] = deque()
        self._pool: ThreadPoolExecutor | None = None
        self._turns = _Turns()
        self._buf = bytearray()
        self._head: tuple[int, bytes, int] | None = None  # new size, new hash, level
        #: The delta's format version (1, or 2: streamed, size and blake3 in END).
        self.version = 0
        # Twice the sender's reach: a sender of the first release referenced as far back as
        # its own stream kept (KEEP to 2 x KEEP behind what it had inflated).
        if seek is not None and not seek.matches(base_hash, len(self._base)):
            seek = None
        #: The base's seek points used (None: none), and where COPY records put base bytes:
        #: ``(new archive offset, base offset, length)``, contiguous ones merged — with them
        #: ``SeekPoints.carry`` makes the new archive's table at the cost of what changed.
        self.seek = seek
        self.copies: list[tuple[int, int, int]] = []
        self._old_tar = TarStream(base, 2 * KEEP, seek)
        self._lit = zlib.decompressobj(-15)
        self._tail = b""  # the last 32 KiB of tar of the previous run record
        self._tail_ok = False
        self._hash = blake3.blake3()
        self._size = 0
        # Version 3: the RUN records' rebuilt tar, in order; the delta's bytes before END.
        self._runs_hash = blake3.blake3()
        self._got_hash = blake3.blake3()
        self._end3 = (b"", b"")
        self._ended = False
        self.new_size = 0
        self.new_hash = b""

    def feed(self, data: Any) -> list[bytes | memoryview]:
        """Output pieces for the records completed by ``data`` (COPY output is views of
        the base: use them before the base closes)."""
        return list(self.pieces(data))

    def pieces(self, data: Any) -> Generator[bytes | memoryview, None, None]:
        """``feed`` as it goes: each piece as soon as its record is rebuilt.  A small delta
        arrives in one chunk, so a caller that writes pieces as they come writes (and the
        kernel flushes) the new archive while the old tar is still being inflated, instead
        of all of it at the end.  Consume it to the end before the next call (or close it:
        the patcher is then unusable).  With ``threads`` > 1, the pieces of runs still
        compressing may come out at the next call instead (every piece by the call that
        reads the END record)."""
        self._buf += data
        if self._head is None and not self._parse_header():
            return
        assert self._head is not None
        level = self._head[2]
        waiting = self._waiting
        ahead = _AHEAD * self._threads if self._threads > 1 else 0
        keep_going = False
        try:
            while len(self._buf) >= _REC.size:
                try:
                    kind, n = _REC.unpack_from(self._buf)
                    if n > MAX_RECORD:
                        raise LimitExceeded(
                            f"layout delta record of {n} bytes exceeds {MAX_RECORD}")
                    if len(self._buf) < _REC.size + n:
                        break
                    body = bytes(self._buf[_REC.size : _REC.size + n])
                    if kind != T_END and self.version == LAYOUT_EARLY_VERSION:
                        self._got_hash.update(self._buf[: _REC.size + n])
                    del self._buf[: _REC.size + n]
                    if self._ended:
                        raise FormatError("layout delta has bytes after its END record")
                    if kind == T_RUN:
                        run = self._parse_run(body)
                        if self._threads > 1:
                            if self._pool is None:
                                self._pool = ThreadPoolExecutor(self._threads, "deltabkp-layout")
                                self._turns = _Turns()
                            turn = self._turns.take()
                            waiting.append(_Waiting(
                                self._pool.submit(self._rebuild, run, level, turn), None,
                                run.tar_len))
                        else:
                            waiting.append(_Waiting([self._rebuild(run, level)], None, 0))
                    else:
                        waiting.append(self._record(kind, body))
                except Exception:
                    # What the one-by-one path hands out before this error, first (a run
                    # before it failing in a worker raises its own error there, first).
                    yield from self._ready(waiting, 0)
                    raise
                yield from self._ready(waiting, ahead)
            # Runs still compressing come out at the next call (the workers go on while the
            # delta's next chunk arrives: the agent streams it in ~20 ms frames), all of
            # them once the END record is read; but a run whose tar could not be rebuilt
            # fails this call, as one by one (the pieces before it first).
            if self._threads > 1 and not self._ended and self._turns.settle():
                yield from self._ready(waiting, 0)
            yield from self._ready(waiting, ahead if not self._ended else 0)
            keep_going = not self._ended
        finally:
            if not keep_going:  # the end, an error, or the caller closed the generator
                self.close()

    def close(self) -> None:
        """End the worker threads, dropping the runs still compressing (the patcher is then
        unusable unless the END record was handed out): for a caller giving up before the
        delta's end.  ``finish`` calls it; an error in ``pieces`` or closing it too."""
        for w in self._waiting:
            if isinstance(w.out, Future):
                w.out.cancel()
        self._waiting.clear()
        self._turns.abandon()  # a started run waiting for a cancelled one's turn goes
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _ready(self, waiting: deque[_Waiting], keep: int) -> Iterator[bytes | memoryview]:
        """Hand out the waiting records' pieces, oldest first: every ready one, and waiting
        for the oldest while more than ``keep`` records (or ``_AHEAD_BYTES``) wait."""
        while waiting:
            w = waiting[0]
            if isinstance(w.out, Future) and not w.out.done() and len(waiting) <= keep and \
                    sum(x.weight for x in waiting) <= _AHEAD_BYTES:
                return
            waiting.popleft()
            if w.copy is not None:
                off, n = w.copy
                c = self.copies
                if c and c[-1][0] + c[-1][2] == self._size and c[-1][1] + c[-1][2] == off:
                    c[-1] = (c[-1][0], c[-1][1], c[-1][2] + n)
                elif n:
                    c.append((self._size, off, n))
            for piece in [w.out.result()] if isinstance(w.out, Future) else w.out:
                self._size += len(piece)
                if self._max_size is not None and self._size > self._max_size:
                    raise LimitExceeded(f"layout delta output exceeds {self._max_size} bytes")
                self._hash.update(piece)
                yield piece

    def _parse_header(self) -> bool:
        b = self._buf
        if len(b) >= len(LAYOUT_MAGIC) and b[: len(LAYOUT_MAGIC)] != LAYOUT_MAGIC:
            raise FormatError("not a layout delta (bad magic)")
        if len(b) <= len(LAYOUT_MAGIC):
            return False
        version = b[len(LAYOUT_MAGIC)]
        if version not in (LAYOUT_VERSION, LAYOUT_STREAM_VERSION, LAYOUT_EARLY_VERSION):
            raise UnsupportedVersion(f"layout delta version {version} is not supported")
        head = _HEAD if version == LAYOUT_VERSION else _HEAD2
        if len(b) < head.size:
            return False
        if version == LAYOUT_VERSION:
            _m, _v, flags, base_hash, new_size, new_hash, level, zlen = _HEAD.unpack_from(b)
        else:  # size and blake3 come with END (the sender did not know them yet)
            _m, _v, flags, base_hash, level, zlen = _HEAD2.unpack_from(b)
            new_size, new_hash = -1, b""
        if len(b) < head.size + zlen:
            return False
        zv = bytes(b[head.size : head.size + zlen]).decode("ascii", "replace")
        if version == LAYOUT_EARLY_VERSION:  # what its END vouches for
            self._got_hash.update(b[: head.size + zlen])
        del b[: head.size + zlen]
        self.version = version
        if flags:
            raise FormatError(f"layout delta has unknown flags {flags:#x}")
        if self._want_base_hash is not None and base_hash != self._want_base_hash:
            raise IntegrityError("layout delta was made against another base archive")
        if not 1 <= level <= 9:
            raise FormatError(f"layout delta has deflate level {level}")
        try:
            here = deflater(level)
        except DeflateError as exc:  # this machine cannot make those bytes: a full transfer
            raise IntegrityError(f"layout delta needs {zv}; here: {exc.reason}") from exc
        if zv != here:
            raise IntegrityError(f"layout delta needs {zv}, this is {here}")
        if self._max_size is not None and new_size > self._max_size:
            raise LimitExceeded(f"layout delta announces {new_size} bytes, over {self._max_size}")
        self._head = (new_size, new_hash, level)
        return True

    def _record(self, kind: int, body: bytes) -> _Waiting:
        if kind == T_COPY:
            if len(body) != _COPY.size:
                raise FormatError("layout delta COPY record has the wrong size")
            off, n = _COPY.unpack(body)
            if off + n > len(self._base):
                raise FormatError(f"layout delta COPY [{off}, {off + n}) is outside the base")
            self._tail_ok = False
            return _Waiting([self._base[a : min(a + _PIECE, off + n)]
                             for a in range(off, off + n, _PIECE)], (off, n), 0)
        if kind == T_RAW:
            self._tail_ok = False
            return _Waiting([body], None, len(body))
        if kind == T_END:
            if self.version == LAYOUT_VERSION:
                if body:
                    raise FormatError("layout delta END record has a body")
            elif self.version == LAYOUT_EARLY_VERSION:
                if len(body) != _END3.size:
                    raise FormatError("layout delta END record has the wrong size")
                self._end3 = _END3.unpack(body)
            else:
                if len(body) != _END2.size:
                    raise FormatError("layout delta END record has the wrong size")
                new_size, new_hash = _END2.unpack(body)
                assert self._head is not None
                self._head = (new_size, new_hash, self._head[2])
            self._ended = True
            return _Waiting([], None, 0)
        raise FormatError(f"layout delta has an unknown record type {kind}")

    def _parse_run(self, body: bytes) -> _Run:
        """A RUN record read and checked as far as its bytes go without the old tar: all
        but its old tar reads (``_rebuild``).  The checks that follow the reads in the
        record's order (the literals used up, the window, the cuts: known from lengths
        alone) are found here and raised by ``_rebuild`` after the reads, whose failure
        comes first."""
        assert self._head is not None
        if len(body) < _RUN.size:
            raise FormatError("layout delta RUN record is truncated")
        flags, w, n_cuts, n_parts, n_lit = _RUN.unpack_from(body)
        if flags & ~(F_FINAL | F_CONTINUE) or w > DICT_SIZE or n_lit > _RUN_LIMIT:
            raise FormatError("layout delta RUN record has bad flags, window or sizes")
        at = _RUN.size
        if at + n_cuts * _CUT.size > len(body):
            raise FormatError("layout delta RUN record is truncated in its cuts")
        cuts = [c for (c,) in _CUT.iter_unpack(body[at : at + n_cuts * _CUT.size])]
        at += n_cuts * _CUT.size
        parts: list[tuple[int, ...]] = []
        for _ in range(n_parts):
            if at >= len(body):
                raise FormatError("layout delta RUN record is truncated in its parts")
            if body[at] == 0:
                if at + _OLD.size > len(body):
                    raise FormatError("layout delta RUN record is truncated in a part")
                parts.append(_OLD.unpack_from(body, at))
                at += _OLD.size
            elif body[at] == 1:
                if at + _LIT.size > len(body):
                    raise FormatError("layout delta RUN record is truncated in a part")
                parts.append(_LIT.unpack_from(body, at))
                at += _LIT.size
            else:
                raise FormatError(f"layout delta RUN part of unknown kind {body[at]}")
        try:
            lits = self._lit.decompress(body[at:], n_lit + 1)
        except zlib.error as exc:
            raise FormatError(f"layout delta literals are corrupt: {exc}") from None
        if len(lits) != n_lit or self._lit.unconsumed_tail:
            raise FormatError("layout delta literals are not the length the record says")
        # Each part as what it adds: literal bytes (views of ``lits``), or an old tar
        # reference (offset, length); and the tar length, as the reads would make it.
        pieces: list[memoryview | tuple[int, int]] = []
        lp = tar_len = 0
        lit_view = memoryview(lits)
        for p in parts:
            if p[0] == 1:
                piece = lit_view[lp : lp + p[1]]
                pieces.append(piece)
                tar_len += len(piece)
                lp += p[1]
            else:
                pieces.append((p[1], p[2]))
                tar_len += p[2]
        later: FormatError | None = None
        data_len = tar_len
        if lp != n_lit:
            later = FormatError("layout delta RUN parts do not use all literal bytes")
        elif flags & F_CONTINUE:
            if w or not self._tail_ok:
                later = FormatError("layout delta RUN continues no previous run")
        elif w > tar_len:
            later = FormatError("layout delta RUN window is longer than its tar bytes")
        else:
            data_len -= w
        final = bool(flags & F_FINAL)
        ends, prev = [], 0
        for c in cuts:
            prev += c
            ends.append(prev)
        if later is None and (prev > data_len or (not final and prev != data_len)
                              or any(c <= 0 for c in cuts)):
            later = FormatError("layout delta RUN cuts do not fit its tar bytes")
        self._tail_ok = True  # what follows sees a run before it (an error ends all anyway)
        return _Run(pieces, tar_len, w, bool(flags & F_CONTINUE), final, ends, later)

    def _rebuild(self, run: _Run, level: int,
                 turn: tuple[Future[bool] | None, Future[bool]] | None = None) -> bytes:
        """A RUN record's output: its tar rebuilt (old tar read, in the records' order:
        given its ``turn``, in a worker, after the run before it has read), checked, then
        compressed as the builder did (``compress_segments``, primed with its window)."""
        failed = _Turns.wait(turn) if turn is not None else False
        ok = False
        try:
            tar = bytearray()
            for p in run.pieces:
                if isinstance(p, memoryview):
                    tar += p
                else:
                    lo, n = p
                    got = self._old_tar.read(lo, lo + n)
                    if got is None:
                        raise IntegrityError(
                            f"layout delta: old tar [{lo}, {lo + n}) is not in the base "
                            "(or dropped)")
                    tar += got
                if len(tar) > _RUN_LIMIT:
                    raise LimitExceeded("layout delta RUN record rebuilds too many tar bytes")
            if run.later is not None:
                raise run.later
            if self.version == LAYOUT_EARLY_VERSION:
                self._runs_hash.update(tar)  # in the records' order: under the read turn
            # Views of ``tar`` (never changed again): no copies of the run's bytes.
            view = memoryview(tar)
            if run.cont:
                zdict, data = self._tail, view
            else:
                zdict, data = bytes(view[: run.w]), view[run.w :]
            # The next run's window: the last 32 KiB of tar up to here (zdict + data).
            if len(data) >= DICT_SIZE:
                self._tail = bytes(data[-DICT_SIZE:])
            else:
                self._tail = (zdict + bytes(data))[-DICT_SIZE:]
            ok = True
        finally:
            if turn is not None:
                _Turns.done(turn, failed or not ok)
        return compress_segments(data, run.ends, level, run.final, zdict)

    def finish(self) -> None:
        self.close()  # nothing waits once END was read; else the delta is truncated
        if self._head is None or not self._ended:
            raise FormatError("layout delta is truncated (no END record)")
        if self._buf:
            raise FormatError("layout delta has bytes after its END record")
        new_size, new_hash, _level = self._head
        if self.version == LAYOUT_EARLY_VERSION:
            # The sender had not compressed yet: its RUN records' tar is what it vouches
            # for; the archive is this rebuild's (the same bytes where the deflater is the
            # same, which the header checked).
            runs, sent = self._end3
            if self._got_hash.digest() != sent:
                raise IntegrityError("layout delta is not the one its sender made")
            if self._runs_hash.digest() != runs:
                raise IntegrityError("layout delta rebuilt other tar than its sender made")
            new_size, new_hash = self._size, self._hash.digest()
        if self._size != new_size:
            raise IntegrityError(f"layout delta rebuilt {self._size} bytes, its header says {new_size}")
        if self._hash.digest() != new_hash:
            raise IntegrityError(
                f"layout delta rebuilt an archive whose blake3 is not {new_hash.hex()[:16]}"
            )
        self.new_size, self.new_hash = new_size, new_hash
