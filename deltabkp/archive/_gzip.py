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
  size on source trees, the sync flushes ~1% with ~6 KiB segments).  That is what keeps a local change local;
- a job (a run of segments) may be compressed by its own compressor primed with the 32 KiB
  before it (``zdict``): zlib then produces exactly the bytes a single compressor would, so
  jobs run in parallel threads and the output depends neither on the grouping nor on the
  thread count (tests/test_archive.py checks it);
- the output is one standard gzip member (RFC 1952): fixed header (no name, mtime 0, OS 255),
  raw deflate at the given level, CRC-32 and ISIZE trailer.
"""

from __future__ import annotations

import collections
import hashlib
import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import numpy.typing as npt

__all__ = [
    "CutFinder",
    "DICT_SIZE",
    "GZIP_HEADER",
    "MAX_SEGMENT",
    "MIN_SEGMENT",
    "RsyncableGzip",
    "WINDOW",
    "compress_segments",
    "gzip_trailer",
]

#: Bytes of the rolling window; an edit moves cut points at most this far after it.
WINDOW = 64
#: No cut closer than this to the previous one (keeps runs of zeros from cutting every byte
#: and bounds the flush overhead).
MIN_SEGMENT = 2048
#: A forced cut after this many bytes without a natural one (bounds a job's size).
MAX_SEGMENT = 64 * 1024
#: A window ends a segment when its 16-bit sum is below this: probability 1/4096, so with
#: the minimum the mean segment is ~6 KiB of tar (chosen by measurement, docs/formats.md:
#: smaller segments keep deltas smaller, each sync flush costs ~20 bytes of output).
_THRESHOLD = 16

# Fixed forever for format version 1 (changing it moves every cut point): 16-bit values
# from a hash, so that no library's random generator can change them under us.
_GEAR: npt.NDArray[np.uint16] = np.array(
    [int.from_bytes(hashlib.blake2b(b"deltabkp-gear-v1" + bytes([i]), digest_size=2).digest(), "little")
     for i in range(256)],
    dtype=np.uint16,
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

    @classmethod
    def at_cut(cls, pos: int, before: bytes) -> CutFinder:
        """The finder's state right after a cut at ``pos``, ``before`` ending there (at least
        its last ``WINDOW - 1`` bytes, or all of the stream if shorter): what it would be
        had it been fed the whole stream up to ``pos`` (the incremental build resumes here
        after copying compressed segments it did not scan)."""
        f = cls()
        f._tail = np.frombuffer(before[-(WINDOW - 1) :], dtype=np.uint8).copy()
        f._pos = f._last = pos
        return f

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
    data: bytes, cuts: Sequence[int], level: int, final: bool, zdict: bytes = b"",
    ends: list[int] | None = None,
) -> bytes:
    """Raw deflate of ``data`` with a sync flush at each relative offset in ``cuts``.

    ``zdict`` is the (up to 32 KiB of) stream just before ``data``.  The last cut of a
    non-final job must be ``len(data)``; the final job ends with ``Z_FINISH`` instead (its
    last block is the only one with BFINAL set).  ``ends``, if given, receives the offset in
    the output where each cut's segment ends (the incremental build's index).
    """
    if zdict:
        comp = zlib.compressobj(level, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY, zdict)
    else:
        comp = zlib.compressobj(level, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY)
    view = memoryview(data)
    out: list[bytes] = []
    prev = 0
    size = 0
    for cut in cuts:
        out.append(comp.compress(view[prev:cut]))
        out.append(comp.flush(zlib.Z_SYNC_FLUSH))
        prev = cut
        if ends is not None:
            size += len(out[-2]) + len(out[-1])
            ends.append(size)
    if final:
        out.append(comp.compress(view[prev:]))
        out.append(comp.flush(zlib.Z_FINISH))
    return b"".join(out)


#: Uncompressed bytes gathered before cut points are searched and a job is handed out.
JOB_SIZE = 512 * 1024


def _split(pieces: Iterable[bytes]) -> Iterator[bytes | memoryview]:
    """The pieces, big ones (a file read whole) cut to JOB_SIZE: jobs and chunks stay small."""
    for whole in pieces:
        if len(whole) <= JOB_SIZE:
            yield whole
        else:
            view = memoryview(whole)
            for at in range(0, len(whole), JOB_SIZE):
                yield view[at : at + JOB_SIZE]


class RsyncableGzip:
    """Compress a stream of byte pieces into one rsyncable gzip member, as ``bytes`` chunks.

    The iterating thread gathers ~``JOB_SIZE`` bytes, finds the cut points and the CRC, and
    hands the run of whole segments to one of ``threads`` worker threads (0: compress in
    the iterating thread).  At most ``threads + 1`` jobs wait, so memory stays bounded and a
    slow consumer slows the producer.  ``bytes_in`` / ``bytes_out`` are final once the
    iteration ended.
    """

    def __init__(self, level: int = 6, threads: int = 2) -> None:
        self.level = level
        self.threads = threads
        self.bytes_in = 0
        self.bytes_out = 0

    def compress(self, pieces: Iterable[bytes]) -> Iterator[bytes]:
        finder = CutFinder()
        crc = 0
        pending = b""  # stream bytes after the last cut (already scanned)
        pending_at = 0  # absolute offset of pending[0]
        gathered: list[bytes | memoryview] = []
        gathered_len = 0
        zdict = b""
        head = GZIP_HEADER
        pool = ThreadPoolExecutor(self.threads, "deltabkp-gzip") if self.threads > 0 else None
        inflight: collections.deque[Future[bytes]] = collections.deque()

        def submit(data: bytes, cuts: list[int], final: bool) -> None:
            nonlocal zdict
            prime = zdict
            zdict = data[-DICT_SIZE:] if len(data) >= DICT_SIZE else (zdict + data)[-DICT_SIZE:]
            if pool is None:
                done: Future[bytes] = Future()
                done.set_result(compress_segments(data, cuts, self.level, final, prime))
                inflight.append(done)
            else:
                inflight.append(pool.submit(compress_segments, data, cuts, self.level, final, prime))

        def ready(keep: int) -> Iterator[bytes]:
            """Finished jobs' output, oldest first, one chunk per job (~JOB_SIZE of input);
            waits only while more than ``keep`` jobs are queued."""
            nonlocal head
            while inflight and (len(inflight) > keep or inflight[0].done()):
                out = head + inflight.popleft().result()
                head = b""
                self.bytes_out += len(out)
                yield out

        try:
            for piece in _split(pieces):
                gathered.append(piece)
                gathered_len += len(piece)
                if gathered_len < JOB_SIZE:
                    continue
                block = b"".join(gathered)
                gathered.clear()
                gathered_len = 0
                crc = zlib.crc32(block, crc)
                self.bytes_in += len(block)
                cuts = finder.feed(block)
                data = pending + block
                if not cuts:
                    pending = data
                    continue
                end = cuts[-1] - pending_at
                submit(data[:end], [c - pending_at for c in cuts], False)
                pending, pending_at = data[end:], cuts[-1]
                yield from ready(self.threads)
            block = b"".join(gathered)
            crc = zlib.crc32(block, crc)
            self.bytes_in += len(block)
            cuts = finder.feed(block)
            submit(pending + block, [c - pending_at for c in cuts], True)
            rest = list(ready(0))  # at most threads + 1 chunks; the final job is last
            rest[-1] += gzip_trailer(crc, self.bytes_in)
            self.bytes_out += 8
            yield from rest
        finally:
            for f in inflight:
                f.cancel()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
