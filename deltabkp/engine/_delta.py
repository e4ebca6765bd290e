"""Delta encoding: turn a new file into COPY/LITERAL/END ops against a base's signature.

Format v1 (docs/formats.md, section engine): a 49-byte header (magic ``DBKD``, version, block
size, base size, base blake3), then ops: ``C`` COPY(first block u32, count u32), ``L``
LITERAL(length u32 in 1..65536, bytes), and one final ``E`` END(new size u64, new blake3).

How the encoder stays fast in Python: weak sums of every offset of a stretch of the new data
come out of one vectorised prefix sum (``_rolling``); a bitmap indexed by the top bits
of the weak sum rejects almost every offset in one numpy gather, a second one indexed by the
low bits thins the survivors, the rest are checked against the exact sorted weak sums, and
only those get a strong sum.  After a match the encoder first tries the following base blocks
at the following offsets, 16 at a time (runs of matches are the common case), which costs one
XXH3 per block and no weak sums at all.

Invariants: the encoder does no I/O; its memory is the signature's lookup tables plus the
unscanned tail of the input (at most one scan window plus a block) and a pending literal of at
most 64 KiB; it never emits an op that later input could change.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import xxhash

from deltabkp.engine._rolling import WholeHash, hash_beside, weak_sums_all_offsets
from deltabkp.engine._signature import Signature, as_bytes_view
from deltabkp.errors import UsageError

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "DELTA_MAGIC",
    "DELTA_VERSION",
    "MAX_LITERAL",
    "DeltaEncoder",
    "delta",
]

DELTA_MAGIC = b"DBKD"
DELTA_VERSION = 1
MAX_LITERAL = 64 * 1024

# magic, version, block size, base size, base blake3
DELTA_HEADER = struct.Struct(">4sBIQ32s")
OP_COPY = 0x43  # "C"
OP_LITERAL = 0x4C  # "L"
OP_END = 0x45  # "E"
COPY_OP = struct.Struct(">BII")
LITERAL_OP = struct.Struct(">BI")
END_OP = struct.Struct(">BQ32s")

# Offsets scanned per vectorised step: small right after a run breaks (the next match is
# usually near), doubling while nothing matches, capped so temporaries stay in cache.
SCAN_MIN = 16 * 1024
SCAN_MAX = 256 * 1024
# Without the final flag, wait for this many scannable offsets: scanning a sliver costs a
# whole block of prefix sums, which would make tiny feeds quadratic.
SCAN_WAIT = 16 * 1024
# Stage-1 bitmap: ~16 slots per block, at most 2^20 bools (1 MiB, about the L2 size);
# stage-2 bitmap: 2^20 bools, touched only by stage-1 survivors.
LEVEL1_EXTRA_BITS = 4
LEVEL1_MAX_BITS = 20
LEVEL2_BITS = 20
# Blocks compared per step while extending a run of matches.
RUN_BATCH = 16
# Weak-sum groups bigger than this (repeated blocks) get a strong-sum dict.
_SMALL_GROUP = 8

_strong = xxhash.xxh3_128_digest


class _MatchIndex:
    """Lookup tables over the whole blocks of a signature, plus the scan's scratch arrays.

    Candidate filtering is two-staged so that the per-offset work is one gather into a
    cache-resident bitmap: stage 1 indexes a small bitmap by the weak sum's top bits (a few
    percent of offsets pass), stage 2 indexes a second bitmap by its low bits for those only,
    and the rare survivors are checked exactly against the sorted weak sums.
    """

    def __init__(self, sig: Signature, scan_max: int) -> None:
        nfull = sig.full_blocks
        weak = sig.weak_array()[:nfull]
        self.nfull = nfull
        self.weak = weak
        self.strong_len = sig.strong_len
        self.strongs = sig.strong_sums
        bits1 = min(LEVEL1_MAX_BITS, max(16, nfull.bit_length() + LEVEL1_EXTRA_BITS))
        self.shift = 32 - bits1
        self.bitmap1 = np.zeros(1 << bits1, np.bool_)
        self.bitmap1[weak >> self.shift] = True
        self.mask2 = (1 << LEVEL2_BITS) - 1
        self.bitmap2 = np.zeros(1 << LEVEL2_BITS, np.bool_)
        self.bitmap2[weak & self.mask2] = True
        self.order: npt.NDArray[np.intp] = np.argsort(weak, kind="stable")
        self.sorted_weak = weak[self.order]
        self._groups: dict[int, dict[bytes, int]] = {}
        bs = sig.block_size
        self.scratch = (
            np.empty(scan_max + bs + 1, np.uint32),
            np.empty(scan_max + bs + 1, np.uint32),
        )
        self._keys = np.empty(scan_max, np.intp)
        self._hits = np.empty(scan_max, np.bool_)

    def strong_of(self, block: int) -> bytes:
        sl = self.strong_len
        return self.strongs[block * sl : (block + 1) * sl]

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
        n = len(w)
        keys, hits = self._keys[:n], self._hits[:n]
        np.right_shift(w, self.shift, out=keys, casting="unsafe")
        np.take(self.bitmap1, keys, out=hits)
        cand = np.flatnonzero(hits)
        if not cand.size:
            return None
        vals = w[cand]
        keep = self.bitmap2[vals & self.mask2]
        if not keep.any():
            return None
        cand, vals = cand[keep], vals[keep]
        sw = self.sorted_weak
        lo = np.searchsorted(sw, vals, "left")
        hit = sw[np.minimum(lo, len(sw) - 1)] == vals
        if not hit.any():
            return None
        cand, lo, vals = cand[hit], lo[hit], vals[hit]
        hi = np.searchsorted(sw, vals, "right")
        sl = self.strong_len
        pref_weak = int(self.weak[prefer]) if 0 <= prefer < self.nfull else -1
        for rel, l, h, val in zip(cand.tolist(), lo.tolist(), hi.tolist(), vals.tolist()):
            j = start + rel
            digest = _strong(mv[j : j + bs])[:sl]
            if val == pref_weak and digest == self.strong_of(prefer):
                return j, prefer
            if h - l <= _SMALL_GROUP:
                for k in self.order[l:h].tolist():
                    if self.strong_of(k) == digest:
                        return j, k
            else:
                found = self._group(l, h).get(digest)
                if found is not None:
                    return j, found
        return None


class DeltaEncoder:
    """Streaming delta of a new file against a signature: ``feed()`` chunks, then ``finish()``.

    Both return delta bytes ready to send (``feed`` may return b"").  After ``finish()``,
    ``new_size`` and ``new_hash`` (blake3) describe the new file.
    """

    def __init__(self, signature: Buffer | Signature) -> None:
        sig = signature if isinstance(signature, Signature) else Signature.parse(signature)
        self.signature = sig
        self._index = _MatchIndex(sig, SCAN_MAX)
        self._bs = sig.block_size
        # Undecided input kept between feeds (the unscanned tail and the pending literal).
        # When it is empty, a feed is scanned in place in the caller's buffer.
        self._buf = bytearray()
        self._pos = 0  # next offset not yet decided, in the buffer being scanned
        self._lit = 0  # start of the pending literal; _lit <= _pos
        self._run_first = 0
        self._run_count = 0  # pending COPY run, not yet emitted
        self._expect = -1  # block expected at _pos right after a copy, or -1
        self._scan = SCAN_MIN
        self._out: list[bytes | memoryview] = [
            DELTA_HEADER.pack(
                DELTA_MAGIC, DELTA_VERSION, sig.block_size, sig.base_size, sig.base_hash
            )
        ]
        self._ready: list[bytes] = []
        self._hasher = WholeHash()
        self._size = 0
        self._done = False
        self.new_size = 0
        self.new_hash = b""

    def feed(self, data: Buffer) -> bytes:
        """Scan the next bytes of the new file; return the delta bytes decided so far.

        Undecided input (less than one scan span plus one block, and a pending literal under
        64 KiB) is kept until the next call.  Raises ``UsageError`` after ``finish()``.
        """
        if self._done:
            raise UsageError("DeltaEncoder.feed() called after finish()")
        mv = as_bytes_view(data)
        if mv:
            self._hasher.update(mv)
            self._size += len(mv)
            if self._buf:
                self._buf += mv
                if len(self._buf) - self._pos >= self._bs + SCAN_WAIT:
                    self._step_owned(final=False)
            elif len(mv) >= self._bs + SCAN_WAIT:
                self._step_view(mv, final=False)
            else:
                self._buf += mv
        return self._take_output()

    def finish(self) -> bytes:
        """End of the new file: return the rest of the delta, END record included."""
        if self._done:
            raise UsageError("DeltaEncoder.finish() called twice")
        self._done = True
        self.new_size = self._size
        self.new_hash = self._hasher.digest()
        self._step_owned(final=True)
        self._buf = bytearray()
        return self._take_output()

    def _encode_whole(self, mv: memoryview) -> bytes:
        """Delta of a whole new file in one buffer: scanned in place, joined once."""
        digest = hash_beside(mv)
        self._size = self.new_size = len(mv)
        self._done = True
        try:
            self._scan_view(mv, final=True)
        finally:
            self.new_hash = digest()
        self._collect(final=True)
        return self._take_output()

    def _take_output(self) -> bytes:
        ready = self._ready
        self._ready = []
        if len(ready) == 1:
            return ready[0]
        return b"".join(ready)

    def _collect(self, final: bool) -> None:
        """Join pending ops while the views they hold into the input are still valid."""
        if final:
            self._flush_copy()
            self._out.append(END_OP.pack(OP_END, self.new_size, self.new_hash))
        if self._out:
            self._ready.append(b"".join(self._out))
            self._out = []

    def _step_owned(self, final: bool) -> None:
        buf = self._buf
        mv = memoryview(buf)
        try:
            self._scan_view(mv, final)
            self._collect(final)
        finally:
            mv.release()
        # Everything before the pending literal is emitted: drop it.
        drop = self._lit
        if drop:
            del buf[:drop]
            self._pos -= drop
            self._lit = 0

    def _step_view(self, mv: memoryview, final: bool) -> None:
        self._pos = self._lit = 0
        self._scan_view(mv, final)
        self._collect(final)
        # Keep the undecided rest; the caller may reuse its buffer once we return.
        self._buf = bytearray(mv[self._lit :])
        self._pos -= self._lit
        self._lit = 0

    # --- op emission ---------------------------------------------------------------------

    def _flush_copy(self) -> None:
        if self._run_count:
            self._out.append(COPY_OP.pack(OP_COPY, self._run_first, self._run_count))
            self._run_count = 0

    def _copy(self, block: int) -> None:
        if self._run_count and block == self._run_first + self._run_count:
            self._run_count += 1
        else:
            self._flush_copy()
            self._run_first, self._run_count = block, 1

    def _copy_run(self, first: int, count: int) -> None:
        if self._run_count and first == self._run_first + self._run_count:
            self._run_count += count
        else:
            self._flush_copy()
            self._run_first, self._run_count = first, count

    def _literal(self, mv: memoryview, start: int, stop: int) -> None:
        if stop <= start:
            return
        self._flush_copy()
        out = self._out
        for a in range(start, stop, MAX_LITERAL):
            b = min(stop, a + MAX_LITERAL)
            out.append(LITERAL_OP.pack(OP_LITERAL, b - a))
            out.append(mv[a:b])

    # --- matching ----------------------------------------------------------------------

    def _scan_view(self, mv: memoryview, final: bool) -> None:
        arr = np.frombuffer(mv, np.uint8)
        idx = self._index
        bs = self._bs
        nfull = idx.nfull
        strong_of = idx.strong_of
        strongs = idx.strongs
        sl = idx.strong_len
        end = len(mv)
        last = end - bs  # last offset whose window is whole
        i, lit = self._pos, self._lit
        while True:
            expect = self._expect
            if expect >= 0 and lit == i:
                # Continue the run: the next base blocks at the next offsets, no weak sums,
                # a batch of blocks per comparison.
                start = expect
                while expect < nfull and i + bs <= end:
                    k = min(RUN_BATCH, nfull - expect, (end - i) // bs)
                    got = b"".join(
                        [_strong(mv[o : o + bs])[:sl] for o in range(i, i + k * bs, bs)]
                    )
                    want = strongs[expect * sl : (expect + k) * sl]
                    if got == want:
                        expect += k
                        i += k * bs
                        continue
                    t = 0
                    while got[t * sl : (t + 1) * sl] == want[t * sl : (t + 1) * sl]:
                        t += 1
                    expect += t
                    i += t * bs
                    break
                if expect > start:
                    self._copy_run(start, expect - start)
                lit = i
                if expect >= nfull:
                    expect = -1
                if i + bs > end:
                    self._expect = expect
                    break
                self._expect = -1
            if nfull == 0:
                # No whole blocks (empty or tiny base): all literal, except that the base's
                # only, short block may still match the very end.
                i = max(i, end - self.signature.base_size)
                if i - lit >= MAX_LITERAL:
                    whole = lit + (i - lit) // MAX_LITERAL * MAX_LITERAL
                    self._literal(mv, lit, whole)
                    lit = whole
                break
            if i > last:
                break
            avail = last - i + 1
            if not final and avail < SCAN_WAIT:
                break
            count = min(self._scan, avail)
            w = weak_sums_all_offsets(arr[i : i + count + bs - 1], bs, idx.scratch)
            prefer = self._run_first + self._run_count if self._run_count else -1
            found = idx.find(w, mv, i, bs, prefer)
            del w
            if found is not None:
                j, block = found
                self._literal(mv, lit, j)
                self._copy(block)
                i = lit = j + bs
                self._expect = block + 1 if block + 1 < nfull else -1
                self._scan = SCAN_MIN
            else:
                i += count
                self._scan = min(2 * self._scan, SCAN_MAX)
                if i - lit >= MAX_LITERAL:
                    whole = lit + (i - lit) // MAX_LITERAL * MAX_LITERAL
                    self._literal(mv, lit, whole)
                    lit = whole
        if final:
            sig = self.signature
            tail = sig.base_size - nfull * bs
            if tail and end - tail >= i and _strong(mv[end - tail : end])[:sl] == strong_of(nfull):
                self._literal(mv, lit, end - tail)
                self._copy(nfull)
            else:
                self._literal(mv, lit, end)
            i = lit = end
        self._pos, self._lit = i, lit


def delta(signature: Buffer | Signature, new: Buffer) -> bytes:
    """The delta (format v1) turning the signature's base into ``new``, all in memory."""
    return DeltaEncoder(signature)._encode_whole(as_bytes_view(new))
