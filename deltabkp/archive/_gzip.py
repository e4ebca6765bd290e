"""Rsyncable gzip: content-defined cut points and a single-member gzip writer built on them.

Invariants:
- cut points are a pure function of the uncompressed stream (never of how it was split into
  buffers): a 64-byte windowed sum of a fixed random 16-bit table ("gear" values) is computed
  for every offset with numpy; a window whose sum is below ``_THRESHOLD`` ends a segment,
  subject to ``MIN_SEGMENT``/``MAX_SEGMENT``.  So an edit moves only the cuts within a window
  of it, and the compressed stream re-synchronises at the next cut (like gzip --rsyncable);
- at every cut the compressor ends its deflate block and byte-aligns (``Z_SYNC_FLUSH``): the
  Huffman codes restart and the compressed stream after a cut depends only on the bytes
  after it and on the 32 KiB before it (the match window, kept: a full reset costs ~20% of
  size on source trees, the sync flush ~0.4%).  That is what keeps a local change local;
- a job (a run of segments) may be compressed by its own compressor primed with the 32 KiB
  before it (``zdict``): zlib then produces exactly the bytes a single compressor would, so
  jobs run in parallel threads and the output depends neither on the grouping nor on the
  thread count (tests/test_archive.py checks it);
- the output is one standard gzip member (RFC 1952): fixed header (no name, mtime 0, OS 255),
  raw deflate at the given level, CRC-32 and ISIZE trailer.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = [
    "CutFinder",
    "DICT_SIZE",
    "GZIP_HEADER",
    "MAX_SEGMENT",
    "MIN_SEGMENT",
    "WINDOW",
    "compress_segments",
    "gzip_trailer",
]

#: Bytes of the rolling window; an edit moves cut points at most this far after it.
WINDOW = 64
#: No cut closer than this to the previous one (keeps runs of zeros from cutting every byte
#: and bounds the flush overhead).
MIN_SEGMENT = 4096
#: A forced cut after this many bytes without a natural one (bounds a job's size).
MAX_SEGMENT = 64 * 1024
#: A window ends a segment when its 16-bit sum is below this: probability 1/8192, so with
#: the minimum the mean segment is ~12 KiB of tar (chosen by measurement, docs/formats.md).
_THRESHOLD = 8

# Fixed forever for format version 1: changing the table moves every cut point.
_GEAR: npt.NDArray[np.uint16] = (
    np.random.Generator(np.random.PCG64(0x64626B70)).integers(0, 1 << 16, 256, dtype=np.uint16)
)

#: ID1 ID2 CM=deflate FLG=0 MTIME=0 XFL=0 OS=255 (unknown): nothing varies between runs.
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"


def gzip_trailer(crc: int, isize: int) -> bytes:
    return struct.pack("<II", crc & 0xFFFFFFFF, isize & 0xFFFFFFFF)


class CutFinder:
    """Streaming cut points of an uncompressed stream: ``feed`` returns absolute offsets.

    An offset ``c`` means "a segment ends after byte ``c - 1``".  Whatever the buffer sizes,
    the same stream gives the same offsets.
    """

    def __init__(self) -> None:
        self._tail = np.zeros(0, dtype=np.uint8)  # the last WINDOW-1 bytes seen
        self._pos = 0  # absolute offset of the end of what was fed
        self._last = 0  # absolute offset of the last cut

    def feed(self, buf: bytes | bytearray | memoryview) -> list[int]:
        new = np.frombuffer(buf, dtype=np.uint8)
        if not len(new):
            return []
        data = np.concatenate((self._tail, new)) if len(self._tail) else new
        base = self._pos - len(self._tail)
        self._pos += len(new)
        self._tail = data[-(WINDOW - 1) :].copy()
        cuts: list[int] = []
        last = self._last
        if len(data) >= WINDOW:
            s = _GEAR[data]
            # Windowed sums by doubling: after the steps s[j] = sum(gear[data[j : j + 64]]);
            # six vector adds instead of a cumulative sum (3x faster in numpy).
            for step in (1, 2, 4, 8, 16, 32):
                s = s[step:] + s[:-step]
            # window j ends at data[j + WINDOW - 1]: the cut is after it
            for j in np.flatnonzero(s < _THRESHOLD).tolist():
                c = base + j + WINDOW
                while c - last > MAX_SEGMENT:
                    last += MAX_SEGMENT
                    cuts.append(last)
                if c - last >= MIN_SEGMENT:
                    cuts.append(c)
                    last = c
        # A forced cut is only placed once every candidate before it is known.
        while self._pos - last >= MAX_SEGMENT:
            last += MAX_SEGMENT
            cuts.append(last)
        self._last = last
        return cuts


#: The deflate window: what a job's compressor is primed with.
DICT_SIZE = 32 * 1024


def compress_segments(
    data: bytes, cuts: Sequence[int], level: int, final: bool, zdict: bytes = b""
) -> bytes:
    """Raw deflate of ``data`` with a sync flush at each relative offset in ``cuts``.

    ``zdict`` is the (up to 32 KiB of) stream just before ``data``.  The last cut of a
    non-final job must be ``len(data)``; the final job ends with ``Z_FINISH`` instead (its
    last block is the only one with BFINAL set).
    """
    if zdict:
        comp = zlib.compressobj(level, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY, zdict)
    else:
        comp = zlib.compressobj(level, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY)
    view = memoryview(data)
    out: list[bytes] = []
    prev = 0
    for cut in cuts:
        out.append(comp.compress(view[prev:cut]))
        out.append(comp.flush(zlib.Z_SYNC_FLUSH))
        prev = cut
    if final:
        out.append(comp.compress(view[prev:]))
        out.append(comp.flush(zlib.Z_FINISH))
    return b"".join(out)
