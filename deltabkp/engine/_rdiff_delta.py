"""librsync (rdiff) deltas: the op encoding and an encoder against an rdiff signature.

Format (librsync doc/formats.md, src/prototab.h; docs/formats.md, section rdiff): the u32
big-endian magic ``0x72730236`` (``rs\\x026``), then commands, each one op byte and its
big-endian arguments: ``0x00`` END; ``0x01..0x40`` LITERAL of 1..64 bytes (the length is the
op byte); ``0x41..0x44`` LITERAL with a 1/2/4/8-byte length; ``0x45..0x54`` COPY(start,
length) of base bytes, with 1/2/4/8-byte start and length (op ``0x45 + 4*i + j`` for widths
``2**i``, ``2**j``); ``0x55..0xff`` are reserved.  Like rdiff, the encoder uses the narrowest
width that holds each number.  The format has no checksum: a patch cannot tell a wrong base
from the right one, except when a COPY reaches past its end.

The encoder works as the engine's (``_delta``): the weak sums of every offset of a stretch
of input come from one vectorised prefix sum, two bitmaps and a sorted array reject almost
every offset before any strong sum, and after a match the following blocks are confirmed
in tasks spread over several threads (``_rdiff_sums.matching_blocks``).  A block continues
a run only if both its sums match, as in librsync; with BLAKE2b sums of 16 bytes and more
the strong sum alone decides (it matches only the block it was made from, whose weak sum is
then the signature's if the signature was made from the base: the same ops, one vectorised
pass less), shorter or MD4 sums check the weak sums first.  Adjacent COPYs merge, so a run
of matched blocks is one op.  The base's last block may be short and its length is not in
the signature: it is looked for only at the very end of the new file, among the suffixes
shorter than a block (as librsync does).

Invariants: no I/O; the encoder holds the signature's tables, the unscanned input (at most one
scan window plus a block) and a pending literal below 64 KiB, and never emits an op that later
input could change.  The patcher is ``_rdiff_patch``.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from deltabkp.engine._rdiff_sig import DELTA_MAGIC, RdiffSignature
from deltabkp.engine._rdiff_sums import (
    check_threads,
    matching_blocks,
    strong_fn,
    weak_sums_all_offsets,
    weak_sums_of_suffixes,
)
from deltabkp.engine._signature import as_bytes_view
from deltabkp.errors import UsageError

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["MAGIC_BYTES", "OP_RESERVED", "RdiffDeltaEncoder", "copy_op", "delta", "literal_op"]

MAGIC_BYTES = DELTA_MAGIC.to_bytes(4, "big")
OP_END = 0x00
OP_LITERAL_N1 = 0x41
OP_COPY_N1_N1 = 0x45
OP_RESERVED = 0x55
MAX_LITERAL = 64 * 1024

_WIDTH_INDEX = {1: 0, 2: 1, 4: 2, 8: 3}
_PACK = {1: struct.Struct(">B"), 2: struct.Struct(">H"), 4: struct.Struct(">I"),
         8: struct.Struct(">Q")}

# Offsets scanned per vectorised step (small after a match, doubling while nothing matches),
# and how many must be waiting before a non-final feed scans (see _delta.SCAN_WAIT).
SCAN_MIN = 16 * 1024
SCAN_MAX = 256 * 1024
SCAN_WAIT = 16 * 1024
LEVEL1_EXTRA_BITS = 4
LEVEL1_MAX_BITS = 20
LEVEL2_BITS = 20
# Weak-sum groups bigger than this (repeated blocks) get a strong-sum dict.
_SMALL_GROUP = 8


def _width(value: int) -> int:
    return 1 if value < 1 << 8 else 2 if value < 1 << 16 else 4 if value < 1 << 32 else 8


def literal_op(length: int) -> bytes:
    """The op byte (and length) of a LITERAL of ``length`` >= 1 bytes, as rdiff writes it."""
    if length <= 64:
        return bytes((length,))
    w = _width(length)
    return bytes((OP_LITERAL_N1 + _WIDTH_INDEX[w],)) + _PACK[w].pack(length)


def copy_op(start: int, length: int) -> bytes:
    """A COPY of ``length`` >= 1 base bytes from ``start``, as rdiff writes it."""
    ws, wl = _width(start), _width(length)
    op = OP_COPY_N1_N1 + 4 * _WIDTH_INDEX[ws] + _WIDTH_INDEX[wl]
    return bytes((op,)) + _PACK[ws].pack(start) + _PACK[wl].pack(length)


class _Index:
    """Lookup tables over a signature's blocks: bitmaps by top and low weak-sum bits, then
    the exact sorted weak sums; survivors are confirmed by a strong sum."""

    def __init__(self, sig: RdiffSignature) -> None:
        weak = sig.weak_array()
        self.n = len(weak)
        self.weak = weak
        self.sl = sig.strong_len
        self.strongs = sig.strong_sums
        self.strongs_view = memoryview(sig.strong_sums)
        self.strong = strong_fn(sig.kind)
        bits1 = min(LEVEL1_MAX_BITS, max(16, self.n.bit_length() + LEVEL1_EXTRA_BITS))
        self.shift = 32 - bits1
        self.bitmap1 = np.zeros(1 << bits1, np.bool_)
        self.bitmap1[weak >> self.shift] = True
        self.mask2 = (1 << LEVEL2_BITS) - 1
        self.bitmap2 = np.zeros(1 << LEVEL2_BITS, np.bool_)
        self.bitmap2[weak & self.mask2] = True
        self.order: npt.NDArray[np.intp] = np.argsort(weak, kind="stable")
        self.sorted_weak = weak[self.order]
        self._groups: dict[int, dict[bytes, int]] = {}

    def strong_of(self, block: int) -> bytes:
        return self.strongs[block * self.sl : (block + 1) * self.sl]

    def _group(self, lo: int, hi: int) -> dict[bytes, int]:
        table = self._groups.get(lo)
        if table is None:
            table = {}
            for k in self.order[lo:hi].tolist():
                table.setdefault(self.strong_of(k), k)
            self._groups[lo] = table
        return table

    def find(
        self, w: npt.NDArray[np.uint32], mv: memoryview, start: int, bs: int, prefer: int
    ) -> tuple[int, int] | None:
        """First offset ``start + i`` whose window matches a block: (offset, block) or None."""
        cand = np.flatnonzero(self.bitmap1[w >> self.shift])
        if not cand.size:
            return None
        vals = w[cand]
        keep = self.bitmap2[vals & self.mask2]
        cand, vals = cand[keep], vals[keep]
        if not cand.size:
            return None
        sw = self.sorted_weak
        lo = np.searchsorted(sw, vals, "left")
        hit = sw[np.minimum(lo, len(sw) - 1)] == vals
        cand, lo, vals = cand[hit], lo[hit], vals[hit]
        hi = np.searchsorted(sw, vals, "right")
        pref_weak = int(self.weak[prefer]) if 0 <= prefer < self.n else -1
        for rel, a, b, val in zip(cand.tolist(), lo.tolist(), hi.tolist(), vals.tolist()):
            j = start + rel
            digest = self.strong(mv[j : j + bs])[: self.sl]
            if val == pref_weak and digest == self.strong_of(prefer):
                return j, prefer
            if b - a <= _SMALL_GROUP:
                for k in self.order[a:b].tolist():
                    if self.strong_of(k) == digest:
                        return j, k
            else:
                found = self._group(a, b).get(digest)
                if found is not None:
                    return j, found
        return None


class RdiffDeltaEncoder:
    """Streaming rdiff delta of a new file: ``feed()`` chunks, then ``finish()``.

    Both return delta bytes ready to write (``feed`` may return b"").  The signature is an
    ``RdiffSignature`` or its bytes (parsed with the default size limit).  ``threads``:
    helper threads hashing beside the caller (None: one per further core, at most 3; 0: all
    in the calling thread); the delta is the same.
    """

    def __init__(
        self, signature: Buffer | RdiffSignature, *, threads: int | None = None
    ) -> None:
        sig = signature if isinstance(signature, RdiffSignature) else RdiffSignature.parse(
            signature
        )
        self.signature = sig
        self.threads = check_threads(threads)
        self._index = _Index(sig)
        self._kind = sig.kind
        self._bs = sig.block_size
        self._buf = bytearray()
        self._pos = 0  # next offset not yet decided, in _buf
        self._lit = 0  # start of the pending literal; _lit <= _pos
        self._copy_start = 0
        self._copy_len = 0  # pending COPY, not yet emitted
        self._expect = -1  # block expected at _pos right after a match, or -1
        self._scan = SCAN_MIN
        self._out: list[bytes | memoryview] = [MAGIC_BYTES]
        self._ready: list[bytes] = []
        self._done = False
        self.new_size = 0

    def feed(self, data: Buffer) -> bytes:
        if self._done:
            raise UsageError("RdiffDeltaEncoder.feed() called after finish()")
        mv = as_bytes_view(data)
        self.new_size += len(mv)
        self._buf += mv
        if len(self._buf) - self._pos >= self._bs + SCAN_WAIT:
            self._step(final=False)
        return self._take()

    def finish(self) -> bytes:
        if self._done:
            raise UsageError("RdiffDeltaEncoder.finish() called twice")
        self._done = True
        self._step(final=True)
        self._buf = bytearray()
        return self._take()

    def _take(self) -> bytes:
        ready, self._ready = self._ready, []
        return ready[0] if len(ready) == 1 else b"".join(ready)

    def _collect(self, final: bool) -> None:
        """Join pending ops while the views they hold into the input are still valid."""
        if final:
            self._flush_copy()
            self._out.append(b"\x00")
        if self._out:
            self._ready.append(b"".join(self._out))
            self._out = []

    def _step(self, final: bool) -> None:
        mv = memoryview(self._buf)
        try:
            self._scan_view(mv, final)
            self._collect(final)
        finally:
            mv.release()
        drop = self._lit  # everything before the pending literal is emitted
        if drop:
            del self._buf[:drop]
            self._pos -= drop
            self._lit = 0

    def _encode_whole(self, mv: memoryview) -> bytes:
        self.new_size = len(mv)
        self._done = True
        self._scan_view(mv, final=True)
        self._collect(final=True)
        return self._take()

    # --- op emission -----------------------------------------------------------------------

    def _flush_copy(self) -> None:
        if self._copy_len:
            self._out.append(copy_op(self._copy_start, self._copy_len))
            self._copy_len = 0

    def _copy(self, start: int, length: int) -> None:
        if self._copy_len and start == self._copy_start + self._copy_len:
            self._copy_len += length
        else:
            self._flush_copy()
            self._copy_start, self._copy_len = start, length

    def _literal(self, mv: memoryview, start: int, stop: int) -> None:
        if stop <= start:
            return
        self._flush_copy()
        for a in range(start, stop, MAX_LITERAL):
            b = min(stop, a + MAX_LITERAL)
            self._out.append(literal_op(b - a))
            self._out.append(mv[a:b])

    # --- matching ----------------------------------------------------------------------------

    def _scan_view(self, mv: memoryview, final: bool) -> None:
        arr = np.frombuffer(mv, np.uint8)
        idx, kind, bs, threads = self._index, self._kind, self._bs, self.threads
        n, sl = idx.n, idx.sl
        end = len(mv)
        last = end - bs  # last offset whose window is whole
        i, lit = self._pos, self._lit
        while n:
            expect = self._expect
            if expect >= 0 and lit == i:
                # Continue the run: the next blocks at the next offsets, as far as the input
                # goes, weak sums before strong ones, in tasks spread over the threads.
                first = expect
                t = matching_blocks(
                    kind, arr[i:], mv[i:], bs, sl, idx.weak[expect:],
                    idx.strongs_view[expect * sl :], threads,
                )
                expect += t
                i += t * bs
                if expect > first:
                    self._copy(first * bs, (expect - first) * bs)
                lit = i
                if expect >= n:
                    expect = -1
                if i + bs > end:
                    self._expect = expect
                    break
                self._expect = -1
            if i > last:
                break
            avail = last - i + 1
            if not final and avail < SCAN_WAIT:
                break
            count = min(self._scan, avail)
            w = weak_sums_all_offsets(kind, arr[i : i + count + bs - 1], bs)
            prefer = self._copy_start // bs + self._copy_len // bs if self._copy_len else -1
            found = idx.find(w, mv, i, bs, prefer)
            del w
            if found is not None:
                j, block = found
                self._literal(mv, lit, j)
                self._copy(block * bs, bs)
                i = lit = j + bs
                self._expect = block + 1 if block + 1 < n else -1
                self._scan = SCAN_MIN
            else:
                i += count
                self._scan = min(2 * self._scan, SCAN_MAX)
            if i - lit >= MAX_LITERAL:
                whole = lit + (i - lit) // MAX_LITERAL * MAX_LITERAL
                self._literal(mv, lit, whole)
                lit = whole
        if not final:
            if not n:  # nothing can match: all of it is literal but the last partial piece
                whole = lit + (end - lit) // MAX_LITERAL * MAX_LITERAL
                self._literal(mv, lit, whole)
                i = lit = whole
            self._pos, self._lit = i, lit
            return
        if n:
            i = max(i, last + 1)
            at = self._short_tail(arr, mv, i, end)
            if at is not None:
                self._literal(mv, lit, at)
                self._copy((n - 1) * bs, end - at)
                lit = end
        self._literal(mv, lit, end)
        self._pos = self._lit = end

    def _short_tail(self, arr: npt.NDArray[np.uint8], mv: memoryview, i: int, end: int) -> int | None:
        """Where the longest suffix of the input from ``i`` on equals the base's last block
        taken as short (its length is not in the signature), or None."""
        if end <= i:
            return None
        idx = self._index
        want = idx.weak[idx.n - 1]
        sums = weak_sums_of_suffixes(self._kind, arr[i:end])
        t: int
        for t in np.flatnonzero(sums == want)[::-1].tolist():
            at = end - (t + 1)
            if idx.strong(mv[at:end])[: idx.sl] == idx.strong_of(idx.n - 1):
                return at
        return None


def delta(
    signature: Buffer | RdiffSignature, new: Buffer, *, threads: int | None = None
) -> bytes:
    """The rdiff delta turning the signature's base into ``new``, all in memory (``threads``
    as for ``RdiffDeltaEncoder``)."""
    return RdiffDeltaEncoder(signature, threads=threads)._encode_whole(as_bytes_view(new))
