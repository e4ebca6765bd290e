"""zlib's deflate through ctypes: the one binding of libz, for ``_gzip.compress_segments``.

Why not Python's ``zlib`` module: it has no ``deflateTune``, which archive format 3 uses
(docs/formats.md "Archive", the deflate parameters).  Calling libz itself also makes one
``deflate(Z_SYNC_FLUSH)`` call per segment where ``compressobj`` needed two
(``compress`` + ``flush``); ctypes releases the GIL during each call, so the build's deflate
worker threads run side by side as before.  Where the optional C module is built, a whole job
is one call (``_blockloop.deflate_job``: the same deflate calls, the GIL released once): under
load a worker that must take the GIL back after every segment also waits for its holder to
be scheduled.

Loading: on the first ``library()`` call (not at import: ``import deltabkp.archive`` does no
I/O here), once whichever threads ask (a lock); by the soname ``libz.so.1``, else where
``ctypes.util.find_library("z")`` finds it (it runs ``ldconfig -p``: asked only after the
soname failed).

Invariants:
- a library is used only if, at load, its untuned output equals Python's
  ``zlib.compressobj`` on a fixed input (sync flushes, a primed compressor, an empty
  segment, ``Z_FINISH``): the binding (``z_stream``'s layout, the calls, the flush
  sequence) is checked, not trusted.  Whether the *tuned* bytes are the format's is the
  caller's check (``_gzip``: a golden digest);
- every return code is checked: a failure raises ``DeflateError`` (an ``ArchiveError``)
  naming the call, the code and zlib's message; ``deflateEnd`` always runs (``finally``);
- the caller's buffers are only read (input, dictionary), inside their bounds; output goes
  to a buffer made here, grown if ever full (never written past ``avail_out``).
"""

from __future__ import annotations

import array
import ctypes
import logging
import os
import threading
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import numpy as np

from deltabkp.errors import DeflateError

__all__ = ["Libz", "Tune", "library"]

#: deflate's parameters a level leaves to ``deflateTune``: ``(good_length, max_lazy,
#: nice_length, max_chain)``.
Tune = tuple[int, int, int, int]

Z_OK, Z_STREAM_END, Z_BUF_ERROR = 0, 1, -5
Z_NO_FLUSH, Z_SYNC_FLUSH, Z_FINISH = 0, 2, 4
Z_DEFLATED, Z_DEFAULT_STRATEGY = 8, 0
#: Raw deflate with a 32 KiB window, and zlib's default memLevel (what ``compressobj`` used).
WBITS, MEM_LEVEL = -15, 8
#: Most bytes handed to one ``deflate`` call (``avail_in`` is a C ``unsigned int``).
_MAX_IN = 1 << 30

_SONAME = "libz.so.1"


class _ZStream(ctypes.Structure):
    """``z_stream`` (zlib.h), every field in order; zlib checks its size at init."""

    _fields_ = [
        ("next_in", ctypes.c_void_p),
        ("avail_in", ctypes.c_uint),
        ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p),
        ("avail_out", ctypes.c_uint),
        ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p),
        ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p),
        ("zfree", ctypes.c_void_p),
        ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int),
        ("adler", ctypes.c_ulong),
        ("reserved", ctypes.c_ulong),
    ]


_PStream = ctypes.POINTER(_ZStream)


@attrs.frozen
class Libz:
    """A loaded libz that passed the load check: its file name, version, and functions."""

    name: str
    version: str
    lib: ctypes.CDLL = attrs.field(repr=False)
    #: ``_blockloop.deflate_job`` (the whole job in one call, the GIL released once) when
    #: built, not turned off (``DELTABKP_DEFLATE_LOOP=ctypes``) and passing the load check
    #: with this library; else None: one ctypes call per segment.
    loop: Callable[..., tuple[int, int, int]] | None = attrs.field(default=None, repr=False)

    def deflate_segments(
        self, data: bytes | memoryview, cuts: Sequence[int], level: int, tune: Tune | None,
        final: bool, zdict: bytes | memoryview = b"", ends: list[int] | None = None,
    ) -> bytes:
        """Raw deflate of ``data`` at ``level`` (then ``deflateTune(*tune)`` if given), primed
        with ``zdict``, a ``Z_SYNC_FLUSH`` after each relative offset in ``cuts`` (in order,
        within ``data``), then ``Z_FINISH`` of the rest if ``final``; ``ends`` receives the
        output offset where each cut's segment ends.  The bytes ``zlib.compressobj`` would
        give (``compress`` + ``flush`` per segment) for the same parameters."""
        n = len(data)
        prev = 0
        for cut in cuts:
            if not prev <= cut <= n:
                raise ValueError(f"cut points {list(cuts)[:8]}... are not in order within {n} bytes")
            prev = cut
        if not final and prev != n:
            raise ValueError(f"a non-final job must end at a cut: {n - prev} bytes after the last")
        lib = self.lib
        src = np.frombuffer(data, np.uint8)  # kept alive (and the caller's buffer) to the end
        base = src.ctypes.data if n else 0
        s = _ZStream()
        ps = ctypes.byref(s)
        self._check("deflateInit2_", lib.deflateInit2_(
            ps, level, Z_DEFLATED, WBITS, MEM_LEVEL, Z_DEFAULT_STRATEGY, lib.zlibVersion(),
            ctypes.sizeof(_ZStream)), s)
        try:
            if tune is not None:
                self._check("deflateTune", lib.deflateTune(ps, *tune), s)
            if zdict:
                zd = np.frombuffer(zdict, np.uint8)
                self._check("deflateSetDictionary",
                            lib.deflateSetDictionary(ps, zd.ctypes.data, len(zd)), s)
            if self.loop is not None and _capacity(n, len(cuts)) <= 0xFFFF_FFFF:
                return self._job(s, data, cuts, final, ends)
            cap = _capacity(n, len(cuts))
            out = ctypes.create_string_buffer(cap)
            s.next_out, s.avail_out = ctypes.addressof(out), cap

            def grow(size: int) -> None:
                nonlocal out, cap
                size = max(size, 2 * cap)
                grown = ctypes.create_string_buffer(size)
                ctypes.memmove(grown, out, s.total_out)
                out, cap = grown, size
                s.next_out = ctypes.addressof(out) + s.total_out
                s.avail_out = cap - s.total_out

            def run(a: int, b: int, flush: int) -> None:
                """deflate ``data[a:b]`` then ``flush``, growing ``out`` while it fills."""
                if a == b and flush == Z_SYNC_FLUSH:
                    # An empty segment: compressobj's ``compress(b"")`` leaves zlib's last
                    # flush at Z_NO_FLUSH (Z_BUF_ERROR: nothing to do), so its sync flush is
                    # not a repeat and emits an empty stored block.  Do the same.
                    s.next_in, s.avail_in = None, 0
                    rc = lib.deflate(ps, Z_NO_FLUSH)
                    if rc not in (Z_OK, Z_BUF_ERROR):
                        self._check("deflate", rc, s)
                while True:
                    step = min(b - a, _MAX_IN)
                    last = a + step == b
                    s.next_in, s.avail_in = (base + a if step else None), step
                    # Room for all this call can give (``_bound``) before it runs: a flush
                    # that fills ``out`` exactly returns with avail_out == 0, undone as far
                    # as zlib knows, and the repeated call would add a second flush marker
                    # (zlib.h, deflate: "avail_out greater than six") — other bytes.
                    need = _bound(step)
                    if s.avail_out < need:
                        grow(s.total_out + need)
                    while True:
                        rc = lib.deflate(ps, flush if last else Z_NO_FLUSH)
                        if not (rc == Z_OK or (rc == Z_STREAM_END and last and flush == Z_FINISH)):
                            self._check("deflate", rc, s)
                        if s.avail_out:
                            break
                        # Not reached while ``_bound`` holds (then with Z_NO_FLUSH only, or
                        # a flush zlib has yet to finish): zlib.h's way to go on.
                        grow(2 * cap)
                    if s.avail_in:  # zlib took less than it was given with room left
                        raise DeflateError(f"zlib {self.version} ({self.name}) deflate left "
                                           f"{s.avail_in} input bytes unread")
                    a += step
                    if last:
                        break
                if flush == Z_FINISH and rc != Z_STREAM_END:
                    raise DeflateError(f"zlib {self.version} ({self.name}) deflate did not "
                                       f"finish the stream ({rc})")

            prev = 0
            for cut in cuts:
                run(prev, cut, Z_SYNC_FLUSH)
                prev = cut
                if ends is not None:
                    ends.append(s.total_out)
            if final:
                run(prev, n, Z_FINISH)
            return ctypes.string_at(out, s.total_out)
        finally:
            lib.deflateEnd(ps)  # its code only says whether the stream was finished

    def _job(self, s: _ZStream, data: bytes | memoryview, cuts: Sequence[int], final: bool,
             ends: list[int] | None) -> bytes:
        """``deflate_segments``' loop in C (``_blockloop.deflate_job``) on the stream set up:
        the same calls, the GIL released once for the job.  ``_capacity`` is more than every
        segment's ``_bound`` together, so the output never fills (checked there)."""
        assert self.loop is not None
        out = bytearray(_capacity(len(data), len(cuts)))
        at = array.array("q", cuts)
        got = array.array("q", bytes(8 * len(cuts)))
        fn = ctypes.cast(self.lib.deflate, ctypes.c_void_p).value or 0
        status, failed, total = self.loop(fn, ctypes.addressof(s), data, at, final, out, got)
        if failed != -1:
            what = {-100: "filled its output", -101: "left input unread"}.get(status)
            raise DeflateError(f"zlib {self.version} ({self.name}) deflate of segment {failed} "
                               + (what or f"returned {status}")
                               + (f": {s.msg.decode('ascii', 'replace')}" if s.msg else ""))
        if ends is not None:
            ends.extend(got)
        return bytes(memoryview(out)[:total])

    def _check(self, call: str, rc: int, s: _ZStream) -> None:
        if rc != Z_OK:
            msg = s.msg.decode("ascii", "replace") if s.msg else ""
            raise DeflateError(f"zlib {self.version} ({self.name}) {call} returned {rc}"
                               + (f": {msg}" if msg else ""))


def _bound(n: int) -> int:
    """More than one ``deflate`` call of ``n`` bytes and its flush can output after a sync
    flush (nothing pending): zlib's ``deflateBound`` for raw deflate plus a flush marker
    and the bits of an open block, with room to spare."""
    return n + (n >> 12) + (n >> 14) + (n >> 25) + 64


def _capacity(n: int, cuts: int) -> int:
    """The output buffer first made for ``n`` input bytes and ``cuts`` sync flushes: more
    than deflate ever makes of them (stored blocks add 5 bytes per 16 KiB or more, a flush
    at most ~10), so it is grown only if that were ever wrong."""
    return n + (n >> 3) + 64 * (cuts + 2) + 1024


def _declare(lib: ctypes.CDLL) -> None:
    lib.zlibVersion.argtypes = []
    lib.zlibVersion.restype = ctypes.c_char_p
    lib.deflateInit2_.argtypes = [_PStream, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.deflateInit2_.restype = ctypes.c_int
    lib.deflateTune.argtypes = [_PStream, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.deflateTune.restype = ctypes.c_int
    lib.deflateSetDictionary.argtypes = [_PStream, ctypes.c_void_p, ctypes.c_uint]
    lib.deflateSetDictionary.restype = ctypes.c_int
    lib.deflate.argtypes = [_PStream, ctypes.c_int]
    lib.deflate.restype = ctypes.c_int
    lib.deflateEnd.argtypes = [_PStream]
    lib.deflateEnd.restype = ctypes.c_int


def check_input() -> tuple[bytes, list[int], bytes]:
    """A fixed input for load checks: ~100 KB of code-like lines (long hash chains, lazy
    matches: the tune parameters change its bytes), random bytes and zeros, its cut points
    (an empty segment among them) and a 32 KiB dictionary."""
    import random

    rng = random.Random(20261130)
    text = b"".join(
        b"%s %d = %s(%s);\n" % (
            rng.choice([b"x", b"value", b"self.total", b"out[i]"]), i % 977,
            rng.choice([b"len", b"sum", b"max", b"int", b"compress"]),
            rng.choice([b"a", b"b[i]", b"data", b"view[prev:cut]"]))
        for i in range(6000))
    data = text[:60_000] + rng.randbytes(9_000) + bytes(4_000) + text[20_000:50_000]
    cuts = [0, 5_000, 5_000, 17_321, 40_000, 69_000, 73_000, 90_000]
    return data, cuts, text[-32768:]


def compressobj_segments(data: bytes | memoryview, cuts: Sequence[int], level: int, final: bool,
                         zdict: bytes = b"", mod: Any = zlib) -> bytes:
    """``deflate_segments``' bytes (untuned) the way format 2 made them, through a zlib-like
    module's ``compressobj`` (``compress`` + ``flush(Z_SYNC_FLUSH)`` per segment): Python's
    zlib for the load check and the tests, zlib-ng or ISA-L in the benchmark."""
    args = (level, mod.DEFLATED, WBITS, MEM_LEVEL, mod.Z_DEFAULT_STRATEGY)
    comp = mod.compressobj(*args, zdict) if zdict else mod.compressobj(*args)
    view = memoryview(data)
    out, prev = [], 0
    for cut in cuts:
        out += [comp.compress(view[prev:cut]), comp.flush(mod.Z_SYNC_FLUSH)]
        prev = cut
    if final:
        out += [comp.compress(view[prev:]), comp.flush(mod.Z_FINISH)]
    return b"".join(out)


def _open(name: str) -> Libz | None:
    try:
        lib = ctypes.CDLL(name)
        _declare(lib)
        version = lib.zlibVersion().decode("ascii", "replace")
    except (OSError, AttributeError):
        return None
    return Libz(name, version, lib)


def _checked(z: Libz) -> None:
    """Raise ``DeflateError`` unless ``z``'s untuned output is Python's zlib's on the fixed
    input, at levels 1 and 6, primed and not."""
    data, cuts, zdict = check_input()
    for level in (1, 6):
        for prime in (b"", zdict):
            want = compressobj_segments(data, cuts, level, True, prime)
            got = z.deflate_segments(data, cuts, level, None, True, prime)
            if got != want:
                raise DeflateError(
                    f"{z.name} (zlib {z.version}) does not deflate as Python's zlib "
                    f"{zlib.ZLIB_RUNTIME_VERSION} does (level {level}, "
                    f"{'primed' if prime else 'not primed'}): not usable for archives")


def _c_loop() -> Callable[..., tuple[int, int, int]] | None:
    if os.environ.get("DELTABKP_DEFLATE_LOOP") == "ctypes":
        return None
    try:
        from deltabkp.engine import _blockloop
    except ImportError:  # built without a compiler: optional
        return None
    return getattr(_blockloop, "deflate_job", None)  # None from a stale build


def _load() -> Libz:
    tried: list[str] = []
    z = _open(_SONAME)
    if z is None:
        import ctypes.util  # here: only this fallback needs it (it runs ldconfig)

        found = ctypes.util.find_library("z")
        z = None if found is None else _open(found)
        tried.append(f"{_SONAME} and {found}" if found else f"{_SONAME} (find_library found none)")
    if z is None:
        raise DeflateError(f"cannot load libz (tried {', '.join(tried)}): archives need zlib")
    loop = _c_loop()
    if loop is not None:
        with_loop = attrs.evolve(z, loop=loop)
        try:
            _checked(with_loop)
            return with_loop
        except Exception as exc:  # noqa: BLE001 - the C loop is optional: ctypes' is checked next
            logging.getLogger(__name__).warning(
                "the C deflate loop fails its check with %s (%s): one ctypes call a segment", z.name, exc)
    _checked(z)
    return z


_lock = threading.Lock()
_loaded: Libz | DeflateError | None = None


def library() -> Libz:
    """The loaded libz (loaded and checked on the first call); ``DeflateError`` if it does
    not load or fails its check (raised again on every call)."""
    global _loaded
    got = _loaded
    if got is None:
        with _lock:
            if _loaded is None:
                try:
                    _loaded = _load()
                except DeflateError as exc:
                    _loaded = exc
            got = _loaded
    if isinstance(got, DeflateError):
        raise DeflateError(got.reason)
    return got
