"""The archive's deflate (``_gzip.compress_segments`` through ``_libz``, format 3): equal to
Python's zlib where untuned, the tuned bytes pinned by a golden digest, primed == continuing,
and every failure a ``DeflateError`` naming the library."""

from __future__ import annotations

import hashlib
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltabkp.archive import _gzip, _libz
from deltabkp.archive._gzip import DICT_SIZE, TUNE, compress_segments, deflater
from deltabkp.errors import ArchiveError, DeflateError, DeltabkpError

#: blake2b-256 of ``_libz.check_input()`` deflated at level 6 with format 3's tune, primed
#: (zlib 1.2.13): the library checks the same digest when it loads libz.
GOLDEN_TUNED = "41b7a19f24946b722e7c7509c1b2e57ee79a5292fd06e0eb24dec22c7789e6e5"


def compressobj_segments(data: bytes, cuts: list[int], level: int, final: bool, zdict: bytes) -> bytes:
    """Format 2's deflate: Python's zlib, ``compress`` + ``flush(Z_SYNC_FLUSH)`` per segment."""
    return _libz.compressobj_segments(data, cuts, level, final, zdict)


def test_tuned_output_is_the_golden_digest() -> None:
    data, cuts, zdict = _libz.check_input()
    out = compress_segments(data, cuts, 6, True, zdict)
    assert hashlib.blake2b(out, digest_size=32).hexdigest() == GOLDEN_TUNED == _gzip._TUNED_DIGEST
    assert zlib.decompressobj(-15, zdict=zdict).decompress(out) == data
    # The tune changes the bytes (else the digest would not pin it).
    assert out != compressobj_segments(data, cuts, 6, True, zdict)


def test_deflater_names_version_and_tune() -> None:
    z = _libz.library()
    assert deflater(6) == f"zlib {z.version} tune " + " ".join(map(str, TUNE[6]))
    assert deflater(9) == f"zlib {z.version}"


text = st.lists(st.sampled_from([b"abc", b"def ", b"the quick ", b"\n", b"xyzzy", b"\0" * 7]),
                max_size=3000).map(b"".join)


@settings(max_examples=60, deadline=None)
@given(data=st.one_of(text, st.binary(max_size=20_000)), zdict=st.one_of(st.just(b""), text),
       level=st.integers(1, 9), final=st.booleans(), cuts=st.lists(st.floats(0, 1), max_size=12))
def test_untuned_equals_pythons_zlib(data: bytes, zdict: bytes, level: int, final: bool,
                                     cuts: list[float]) -> None:
    """The binding without ``deflateTune`` is Python's zlib, byte for byte: empty segments,
    empty input, primed or not, any level, final or not."""
    at = sorted(int(f * len(data)) for f in cuts)
    if not final:
        at.append(len(data))
    zdict = zdict[-DICT_SIZE:]
    ends: list[int] = []
    got = _libz.library().deflate_segments(memoryview(data), at, level, None, final, zdict, ends)
    assert got == compressobj_segments(data, at, level, final, zdict)
    want_ends = [len(compressobj_segments(data[: c], at[: k + 1], level, False, zdict))
                 for k, c in enumerate(at)]
    assert ends == want_ends


def _long_text(seed: int) -> bytes:
    """100-300 KB of code-like lines from a seed: long hash chains and lazy matches, and
    more than the 32 KiB window before the split, as the archive's jobs have."""
    import random

    rng = random.Random(seed)
    words = [rng.randbytes(rng.randrange(1, 9)).hex().encode() for _ in range(300)]
    lines = (b" ".join(rng.choices(words, k=rng.randrange(2, 12))) + b"\n" for _ in range(40_000))
    return b"".join(lines)[: rng.randrange(100_000, 300_000)]


@settings(max_examples=25, deadline=None)
@given(data=st.integers(0, 2**32).map(_long_text), split=st.floats(0, 1),
       step=st.integers(2048, 65536))
def test_tuned_primed_equals_continuing(data: bytes, split: float, step: int) -> None:
    """A job primed with the 32 KiB before it emits what one compressor over both does
    (what the parallel and incremental builds and the layout patcher rely on), at a split
    past the first 32 KiB: the window has slid."""
    cuts = list(range(step, len(data), step)) + [len(data)]
    k = int(split * (len(cuts) - 1))
    whole = compress_segments(data, cuts, 6, False)
    a = compress_segments(data[: cuts[k]], cuts[: k + 1], 6, False)
    b = compress_segments(data[cuts[k] :], [c - cuts[k] for c in cuts[k + 1 :]], 6, False,
                          data[max(0, cuts[k] - DICT_SIZE) : cuts[k]])
    assert a + b == whole


def _ctypes_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deflate through the ctypes loop (the C loop's output never grows: its own test)."""
    import attrs

    monkeypatch.setattr(_gzip, "_checked", attrs.evolve(_gzip._deflate_library(), loop=None))


def test_output_buffer_grows(monkeypatch: pytest.MonkeyPatch) -> None:
    data, cuts, zdict = _libz.check_input()
    want = compress_segments(data, cuts, 6, True, zdict)
    _ctypes_loop(monkeypatch)
    monkeypatch.setattr(_libz, "_capacity", lambda n, cuts: 7)
    ends: list[int] = []
    assert compress_segments(data, cuts, 6, True, zdict, ends) == want
    assert ends == sorted(ends) and ends[-1] < len(want)


def test_an_output_buffer_filled_exactly_by_a_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    """Buffers that a sync flush would fill exactly: the ctypes loop makes room for a whole
    call first (a flush that filled the buffer would be repeated by the next call: a second
    marker), so the bytes are the same."""
    data, cuts, zdict = _libz.check_input()
    ends: list[int] = []
    want = compress_segments(data, cuts, 6, True, zdict, ends)
    _ctypes_loop(monkeypatch)
    for end in sorted(set(ends))[:4]:
        monkeypatch.setattr(_libz, "_capacity", lambda n, cuts, end=end: end)
        assert compress_segments(data, cuts, 6, True, zdict) == want


def test_failures_are_deflate_errors() -> None:
    with pytest.raises(DeflateError, match=r"zlib .* deflateInit2_ returned -2"):
        compress_segments(b"abc", [], 12, True)
    with pytest.raises(ValueError, match="not in order"):
        compress_segments(b"abcdef", [4, 2], 6, True)
    with pytest.raises(ValueError, match="must end at a cut"):
        compress_segments(b"abcdef", [2], 6, False)
    assert issubclass(DeflateError, ArchiveError) and issubclass(DeflateError, DeltabkpError)


def test_a_libz_with_other_bytes_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A libz whose tuned bytes are not format 3's (zlib-ng's compat library, another
    deflate) is refused with the library and version named, on every call."""
    monkeypatch.setattr(_gzip, "_checked", None)
    monkeypatch.setattr(_gzip, "_TUNED_DIGEST", "00" * 32)
    z = _libz.library()
    for _ in range(2):
        with pytest.raises(DeflateError, match=rf"{z.name} \(zlib {z.version}\) does not give archive format 3"):
            compress_segments(b"abc", [], 6, True)
    with pytest.raises(DeflateError):
        deflater(6)


def test_a_libz_unlike_pythons_zlib_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The load check: a library (or binding) whose untuned bytes are not Python's zlib's
    fails to load, and the failure is kept (no second load)."""
    monkeypatch.setattr(_libz, "_loaded", None)
    monkeypatch.setattr(_libz, "compressobj_segments", lambda *a: b"other")
    for _ in range(2):
        with pytest.raises(DeflateError, match=r"libz\.so\.1 \(zlib .*\) does not deflate as Python's zlib"):
            _libz.library()
    monkeypatch.undo()
    assert _libz.library().deflate_segments(b"x", [], 6, None, True) == zlib.compress(b"x")[2:-4]


def test_missing_libz(monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes.util

    monkeypatch.setattr(_libz, "_loaded", None)
    monkeypatch.setattr(_libz, "_SONAME", "libz-absent.so.9")
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    with pytest.raises(DeflateError, match="cannot load libz"):
        _libz.library()


def test_the_c_loop_is_built_and_used() -> None:
    """The test install builds the optional C module: a job is one ``deflate_job`` call
    (a missing or stale build fails here, it is not skipped)."""
    assert _libz.library().loop is not None


@settings(max_examples=60, deadline=None)
@given(data=st.one_of(text, st.binary(max_size=20_000)), zdict=st.one_of(st.just(b""), text),
       level=st.integers(1, 9), tuned=st.booleans(), final=st.booleans(),
       cuts=st.lists(st.floats(0, 1), max_size=12))
def test_the_c_loop_equals_the_ctypes_loop(data: bytes, zdict: bytes, level: int, tuned: bool,
                                           final: bool, cuts: list[float]) -> None:
    import attrs

    at = sorted(int(f * len(data)) for f in cuts)
    if not final:
        at.append(len(data))
    zdict = zdict[-DICT_SIZE:]
    z = _libz.library()
    tune = TUNE[6] if tuned else None
    want_ends: list[int] = []
    got_ends: list[int] = []
    want = attrs.evolve(z, loop=None).deflate_segments(data, at, level, tune, final, zdict, want_ends)
    assert z.deflate_segments(data, at, level, tune, final, zdict, got_ends) == want
    assert got_ends == want_ends


def test_the_c_loop_checks_its_arguments() -> None:
    from array import array

    from deltabkp.engine import _blockloop

    fn, out, ends = 1, bytearray(100), bytearray(16)
    stream = _libz._ZStream()  # never reached: every case is refused before a call
    sp = __import__("ctypes").addressof(stream)
    cases = [
        (0, sp, b"abcd", array("q", [2]), False, out, ends),  # no function
        (fn, 0, b"abcd", array("q", [4]), False, out, ends),  # no stream
        (fn, sp, b"abcd", b"\0" * 7, True, out, ends),  # cuts not int64s
        (fn, sp, b"abcd", array("q", [3, 2]), True, out, ends),  # out of order
        (fn, sp, b"abcd", array("q", [5]), True, out, ends),  # past the data
        (fn, sp, b"abcd", array("q", [-1]), True, out, ends),  # negative
        (fn, sp, b"abcd", array("q", [2]), False, out, ends),  # a non-final job not at a cut
        (fn, sp, b"abcd", array("q", [1, 2, 3]), True, out, ends),  # ends too short
        (fn, sp, b"abcd", array("q", [2]), True, bytearray(), ends),  # no room
    ]
    for args in cases:
        with pytest.raises(ValueError):
            _blockloop.deflate_job(*args)
    stream.total_out = 5  # a stream that has output already
    with pytest.raises(ValueError, match="output already"):
        _blockloop.deflate_job(fn, sp, b"abcd", array("q", [4]), False, out, ends)


def test_a_c_loop_failure_is_a_deflate_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """An output the bound said could not fill (``_capacity`` made wrong): the C loop stops
    at that segment and the job is a ``DeflateError``, never short bytes."""
    data, cuts, zdict = _libz.check_input()
    monkeypatch.setattr(_libz, "_capacity", lambda n, cuts: 100)
    with pytest.raises(DeflateError, match="filled its output"):
        compress_segments(data, cuts, 6, True, zdict)


def test_the_ctypes_loop_when_the_c_loop_is_turned_off() -> None:
    import subprocess
    import sys

    code = ("from deltabkp.archive import _libz, _gzip; d, c, z = _libz.check_input(); "
            "print(_libz.library().loop is None, _gzip.compress_segments(d, c, 6, True, z).hex())")
    env = {**__import__("os").environ, "DELTABKP_DEFLATE_LOOP": "ctypes"}
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    data, cuts, zdict = _libz.check_input()
    assert off == ["True", compress_segments(data, cuts, 6, True, zdict).hex()]
