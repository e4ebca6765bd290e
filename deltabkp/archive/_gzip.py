"""Rsyncable gzip: content-defined cut points and a single-member gzip writer built on them.

Invariants:
- cut points are a pure function of the uncompressed stream (never of how it was split into
  buffers): a 64-byte windowed sum of a fixed random 16-bit table ("gear" values) is computed
  for every offset (by ``_blockloop.gear_cuts`` in C where built, else numpy: the same cuts,
  checked at first use); a window whose sum is below ``_THRESHOLD`` ends a segment,
  subject to ``MIN_SEGMENT``/``MAX_SEGMENT``.  So an edit moves only the cuts within a window
  of it, and the compressed stream re-synchronises at the next cut (like gzip --rsyncable);
- at every cut the compressor ends its deflate block and byte-aligns (``Z_SYNC_FLUSH``): the
  Huffman codes restart and the compressed stream after a cut depends only on the bytes
  after it and on the 32 KiB before it (the match window, kept: a full reset costs ~20% of
  size on source trees, the sync flushes ~1% with ~6 KiB segments).  That is what keeps a local change local;
- a job (a run of segments) may be compressed by its own compressor primed with the 32 KiB
  before it (``zdict``): zlib then produces exactly the bytes a single compressor would
  (level 6 tuned too: still ``deflate_slow``, every string inserted), so
  jobs run in parallel threads and the output depends neither on the grouping nor on the
  thread count (tests/test_archive.py checks it);
- the output is one standard gzip member (RFC 1952): fixed header (no name, mtime 0, OS 255),
  raw deflate at the given level (format 3: level 6 tuned, ``TUNE``; libz through
  ``_libz``, its bytes checked against a golden digest when it loads), CRC-32 and ISIZE
  trailer.

Long because the format's three parts live together: the cut rule (both finders and
their load check), the deflate parameters with their check, and the threaded writer.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import logging
import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import numpy.typing as npt
from isal import isal_zlib

from deltabkp.archive import _libz
from deltabkp.archive._libz import Libz, Tune
from deltabkp.errors import DeflateError

__all__ = [
    "CutFinder",
    "DEFAULT_LEVEL",
    "DICT_SIZE",
    "GZIP_HEADER",
    "MAX_SEGMENT",
    "MIN_SEGMENT",
    "RsyncableGzip",
    "TUNE",
    "WINDOW",
    "compress_segments",
    "cut_finder",
    "deflater",
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


#: Gear values of byte pairs: the 16 low bits of ``_GEAR2[v]`` are ``_GEAR[v & 0xFF]``, the
#: 16 high ones ``_GEAR[v >> 8]``.  Looked up with a stream's bytes read as little-endian
#: 16-bit words, the result read as little-endian 16-bit words is the gear value of every
#: byte: one gather per two bytes (256 KiB table) instead of one per byte.
_GEAR2: npt.NDArray[np.uint32] = (
    _GEAR[np.arange(65536) & 0xFF].astype("<u4") | (_GEAR[np.arange(65536) >> 8].astype("<u4") << 16)
)
#: Bytes searched per numpy pass: the working arrays (~5 bytes a byte) stay in the CPU's
#: cache, and a big ``feed`` costs no big temporaries.
_CHUNK = 128 * 1024


#: The gear table as the C scan takes it: 256 little-endian 16-bit words.
_GEAR_BYTES = _GEAR.astype("<u2").tobytes()
#: ``_blockloop.gear_cuts(table, window, threshold, min, max, tail, data, pos, last)
#: -> (cuts, tail, pos, last)``.
_Scan = Callable[
    [bytes, int, int, int, int, bytes, bytes | bytearray | memoryview, int, int],
    tuple[list[int], bytes, int, int],
]


class CutFinder:
    """Streaming cut points of an uncompressed stream: ``feed`` returns absolute offsets.

    An offset ``c`` means "a segment ends after byte ``c - 1``".  Whatever the buffer sizes,
    the same stream gives the same offsets.

    Two implementations give the same cuts (``implementation``: "C" or "numpy"; by default
    ``cut_finder()``'s choice):

    * "C": ``deltabkp.engine._blockloop.gear_cuts``, one rolling sum per byte, the GIL
      released for the whole buffer (~0.5–1 ns a byte);
    * "numpy": ~1.5–3 ns a byte: gear values by pairs of bytes (``_GEAR2``), windowed sums
      by doubling (six adds, each into the other of two reused buffers), no temporaries;
      numpy releases the GIL inside these loops, not between them.
    """

    def __init__(self, implementation: str | None = None) -> None:
        self._scan = _scan_for(implementation)
        # The stream's last WINDOW-1 bytes (fewer at its start): the state both share.
        self._tail = b""
        self._pos = 0  # absolute offset of the end of what was fed
        self._last = 0  # absolute offset of the last cut
        # numpy's working arrays, made on first use: the gear values (tail first, at offsets
        # [WINDOW - len(tail), WINDOW), then the chunk's from WINDOW on: an even offset, so
        # the pair lookup writes whole 32-bit words), the other doubling buffer, the hits.
        self._a = self._b = np.zeros(0, dtype="<u2")
        self._hits = np.zeros(0, dtype=np.bool_)

    @property
    def implementation(self) -> str:
        return "numpy" if self._scan is None else "C"

    @classmethod
    def at_cut(cls, pos: int, before: bytes, implementation: str | None = None) -> CutFinder:
        """The finder's state right after a cut at ``pos``, ``before`` ending there (at least
        its last ``WINDOW - 1`` bytes, or all of the stream if shorter): what it would be
        had it been fed the whole stream up to ``pos`` (the incremental build resumes here
        after copying compressed segments it did not scan)."""
        f = cls(implementation)
        f._tail = bytes(before[-(WINDOW - 1) :])
        f._pos = f._last = pos
        return f

    def feed(self, buf: bytes | bytearray | memoryview) -> list[int]:
        if self._scan is not None:
            cuts, self._tail, self._pos, self._last = self._scan(
                _GEAR_BYTES, WINDOW, _THRESHOLD, MIN_SEGMENT, MAX_SEGMENT, self._tail, buf,
                self._pos, self._last)
            return cuts
        new = np.frombuffer(buf, dtype=np.uint8)
        cuts = []
        for at in range(0, len(new), _CHUNK):
            self._feed(new[at : at + _CHUNK], cuts)
        return cuts

    def _feed(self, new: npt.NDArray[np.uint8], cuts: list[int]) -> None:
        n = len(new)
        t = len(self._tail)
        if len(self._a) < WINDOW + n:
            size = WINDOW + max(n + (n & 1), 4096)  # even: viewed as 32-bit words
            self._a, self._b = np.empty(size, dtype="<u2"), np.empty(size, dtype="<u2")
            self._hits = np.empty(size, dtype=np.bool_)
        a, b = self._a, self._b
        a[WINDOW - t : WINDOW] = _GEAR[np.frombuffer(self._tail, dtype=np.uint8)]
        even = n & ~1
        np.take(_GEAR2, new[:even].view("<u2"), out=a.view("<u4")[WINDOW // 2 : (WINDOW + even) // 2])
        if n & 1:
            a[WINDOW + n - 1] = _GEAR[new[-1]]
        base = self._pos - t  # absolute offset of the first byte with a gear value in a
        self._pos += n
        self._tail = (new[-(WINDOW - 1) :].tobytes() if n >= WINDOW - 1
                      else (self._tail + new.tobytes())[-(WINDOW - 1) :])
        last = self._last
        m = t + n
        if m >= WINDOW:
            # Windowed sums by doubling: after the steps x[j] = sum of the 64 gear values
            # from the j-th on (mod 2^16).
            x, y = a[WINDOW - t : WINDOW + n], b
            for step in (1, 2, 4, 8, 16, 32):
                np.add(x[step:m], x[: m - step], out=y[: m - step])
                m -= step
                x, y = y, x
            hits = self._hits[:m]
            np.less(x[:m], _THRESHOLD, out=hits)
            # window j ends at byte base + j + WINDOW - 1: the cut is after it
            for j in np.flatnonzero(hits).tolist():
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


def _check_input() -> bytes:
    """The load check's stream: random bytes (a candidate every ~4 KiB), zeros (no
    candidate: forced cuts), a short repeated line (many candidates inside the minimum)."""
    rand = hashlib.shake_128(b"deltabkp-cut-check").digest(200_003)
    return rand[:150_001] + bytes(140_000) + b"ab\n" * 9_001 + rand[150_001:]


def _checked_scan() -> _Scan | None:
    """The C scan (``_blockloop.gear_cuts``) if it is built, not turned off
    (``DELTABKP_CUT_FINDER=numpy``) and gives numpy's cuts on ``_check_input()`` fed whole
    and in odd pieces (some shorter than the window, one empty); else None."""
    if os.environ.get("DELTABKP_CUT_FINDER") == "numpy":
        return None
    try:
        from deltabkp.engine import _blockloop

        scan: _Scan = _blockloop.gear_cuts
        data = _check_input()
        want = _numpy_cuts(data)
        for sizes in ([len(data)], [1, 0, 62, 63, 64, 65, 4095, 70_001]):
            finder = CutFinder("numpy")
            finder._scan = scan
            got: list[int] = []
            at = 0
            for i in itertools.count():
                if at >= len(data):
                    break
                n = sizes[i % len(sizes)]
                got += finder.feed(data[at : at + n])
                at += n
            if got != want:
                logging.getLogger(__name__).warning(
                    "the C cut finder (%s) gives other cuts than numpy's: not used",
                    _blockloop.__file__)
                return None
    except ImportError:  # built without a compiler: optional
        return None
    except Exception as exc:  # noqa: BLE001 - e.g. a stale build without gear_cuts
        logging.getLogger(__name__).warning("the C cut finder fails its check (%s): not used", exc)
        return None
    return scan


def _numpy_cuts(data: bytes) -> list[int]:
    return CutFinder("numpy").feed(data)


_scan_lock = threading.Lock()
_scan_tried = False  # set (under _scan_lock) only after _scan holds the answer
_scan: _Scan | None = None


def _default_scan() -> _Scan | None:
    """The checked C scan or None (numpy), decided on the first call (once, whichever
    threads ask)."""
    global _scan_tried, _scan
    if _scan_tried:
        return _scan
    with _scan_lock:
        if not _scan_tried:
            _scan = _checked_scan()
            _scan_tried = True
    return _scan


def _scan_for(implementation: str | None) -> _Scan | None:
    if implementation is None:
        return _default_scan()
    if implementation == "numpy":
        return None
    if implementation == "C":
        scan = _default_scan()
        if scan is None:
            raise RuntimeError("the C cut finder is not available (not built, turned off or failed its check)")
        return scan
    raise ValueError(f"no cut finder {implementation!r} (C or numpy)")


def cut_finder() -> str:
    """Which implementation ``CutFinder()`` uses: "C" (``_blockloop.gear_cuts``, checked
    against numpy on first use) or "numpy" (not built, ``DELTABKP_CUT_FINDER=numpy``, or the
    check failed)."""
    return "numpy" if _default_scan() is None else "C"


#: The stream's CRC-32 on the iterating thread: ISA-L's (a dependency already, for inflate)
#: is ~3x zlib's speed here (0.009 s against 0.029 s for the 102.7 MB bench tar), the same
#: function.
_crc32 = isal_zlib.crc32

#: The deflate window: what a job's compressor is primed with.
DICT_SIZE = 32 * 1024


#: The format's deflate level (``TgzBuilder``'s default).
DEFAULT_LEVEL = 6
#: Archive format 3's deflate at a level: zlib's parameters for it, changed by
#: ``deflateTune(good_length, max_lazy, nice_length, max_chain)`` (docs/formats.md, the
#: sweep: ~20% less deflate CPU than zlib -6 for ~0.3% more bytes, still ≤ 1.01x pigz
#: --rsyncable).  Still zlib's deflate_slow with every string inserted, so a compressor
#: primed with the 32 KiB before a cut emits what a continuing one does.  Other levels
#: are zlib's own, untuned.  Fixed forever for format 3: changing it changes every byte.
TUNE: dict[int, Tune] = {6: (8, 64, 128, 56)}
#: blake2b-256 of ``_libz.check_input()`` deflated at level 6, tuned, primed: the bytes
#: format 3 needs (tests/test_gzip_deflate.py pins it too).  A libz that gives other bytes
#: (another version's deflate, zlib-ng's compat library) is refused: its archives would
#: differ from every other machine's.
_TUNED_DIGEST = "41b7a19f24946b722e7c7509c1b2e57ee79a5292fd06e0eb24dec22c7789e6e5"


def deflater(level: int) -> str:
    """What the deflate bytes at ``level`` depend on, as the archive index records it:
    the zlib version, and the tune parameters if any (e.g. ``zlib 1.2.13 tune 8 64 128
    56``).  Loads libz (``DeflateError`` if it does not load or check)."""
    tune = TUNE.get(level)
    return f"zlib {_deflate_library().version}" + ("" if tune is None else " tune " + " ".join(map(str, tune)))


_checked: Libz | None = None


def _deflate_library() -> Libz:
    """libz, loaded, checked against Python's zlib (``_libz``) and against the golden
    digest of format 3's tuned deflate (once)."""
    global _checked
    if _checked is not None:
        return _checked
    z = _libz.library()
    data, cuts, zdict = _libz.check_input()
    got = hashlib.blake2b(z.deflate_segments(data, cuts, DEFAULT_LEVEL, TUNE[DEFAULT_LEVEL], True, zdict),
                          digest_size=32).hexdigest()
    if got != _TUNED_DIGEST:
        raise DeflateError(
            f"{z.name} (zlib {z.version}) does not give archive format 3's deflate bytes (its "
            f"tuned level {DEFAULT_LEVEL} output has digest {got[:16]}..., not {_TUNED_DIGEST[:16]}...): "
            "archives made with it would differ from other machines'; use a stock zlib "
            "(1.2.x) as libz.so.1")
    _checked = z
    return z


def compress_segments(
    data: bytes | memoryview, cuts: Sequence[int], level: int, final: bool,
    zdict: bytes | memoryview = b"", ends: list[int] | None = None,
) -> bytes:
    """Raw deflate of ``data`` with a sync flush at each relative offset in ``cuts``: the one
    place archive bytes are deflated (builder, incremental build, layout patcher).

    zlib at ``level``, tuned as ``TUNE`` says (format 3), through ``_libz`` (the job in
    one C call where the optional module is built, else one ctypes ``deflate`` call per
    segment; the GIL released during each).  ``zdict`` is the (up to
    32 KiB of) stream just before ``data``.  The last cut of a non-final job must be
    ``len(data)``; the final job ends with ``Z_FINISH`` instead (its last block is the only
    one with BFINAL set).  ``ends``, if given, receives the offset in the output where each
    cut's segment ends (the incremental build's index).  ``DeflateError`` if libz fails.
    """
    z = _checked if _checked is not None else _deflate_library()
    return z.deflate_segments(data, cuts, level, TUNE.get(level), final, zdict, ends)


#: Uncompressed bytes gathered before cut points are searched and a job is handed out.
JOB_SIZE = 512 * 1024
#: Jobs handed out per worker thread before the iterating thread waits for the oldest.
_AHEAD = 2


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
    the iterating thread).  At most ``2 * threads + 1`` jobs wait (< 1 MiB each with their
    output), so memory stays bounded and a slow consumer slows the producer.  ``bytes_in`` /
    ``bytes_out`` are final once the iteration ended.
    """

    def __init__(self, level: int = 6, threads: int = 2) -> None:
        self.level = level
        self.threads = threads
        self.bytes_in = 0
        self.bytes_out = 0

    def compress(self, pieces: Iterable[bytes]) -> Iterator[bytes]:
        finder = CutFinder()
        crc = 0
        pending: bytes | memoryview = b""  # stream bytes after the last cut (already scanned)
        pending_at = 0  # absolute offset of pending[0]
        gathered: list[bytes | memoryview] = []
        gathered_len = 0
        zdict = b""
        head = GZIP_HEADER
        pool = ThreadPoolExecutor(self.threads, "deltabkp-gzip") if self.threads > 0 else None
        inflight: collections.deque[Future[bytes]] = collections.deque()
        # Jobs waiting before the iterating thread waits for the oldest: jobs finish out of
        # order (content, scheduling), and a worker done early must find the next job queued.
        ahead = _AHEAD * self.threads

        def submit(data: bytes | memoryview, cuts: list[int], final: bool) -> None:
            nonlocal zdict
            prime = zdict
            zdict = bytes(data[-DICT_SIZE:]) if len(data) >= DICT_SIZE else (zdict + data)[-DICT_SIZE:]
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
                # One copy of the stream: the rest after the last cut, then the new bytes;
                # jobs and the next rest are views of it.
                data = memoryview(b"".join([pending, *gathered]))
                block = data[len(pending) :]
                gathered.clear()
                gathered_len = 0
                crc = _crc32(block, crc)
                self.bytes_in += len(block)
                cuts = finder.feed(block)
                if not cuts:
                    pending = data
                    continue
                end = cuts[-1] - pending_at
                submit(data[:end], [c - pending_at for c in cuts], False)
                pending, pending_at = data[end:], cuts[-1]
                yield from ready(ahead)
            data = memoryview(b"".join([pending, *gathered]))
            block = data[len(pending) :]
            crc = _crc32(block, crc)
            self.bytes_in += len(block)
            cuts = finder.feed(block)
            submit(data, [c - pending_at for c in cuts], True)
            rest = list(ready(0))  # at most ahead + 1 chunks; the final job is last
            rest[-1] += gzip_trailer(crc, self.bytes_in)
            self.bytes_out += 8
            yield from rest
        finally:
            for f in inflight:
                f.cancel()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
