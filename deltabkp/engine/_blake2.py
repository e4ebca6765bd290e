"""BLAKE2b-256 of many equal blocks of one buffer: the one home of the rdiff strong sum.

Three implementations give the same digests, the first available one is used:

* ``libsodium`` (``crypto_generichash_blake2b``, AVX2 code) and
* ``libb2`` (the BLAKE2 authors' optimised library, the one librsync itself links; SSE/AVX
  code), both loaded with ctypes (by their Debian sonames, else where
  ``ctypes.util.find_library`` finds them): ~1.4x and ~1.3x hashlib's speed on large
  inputs here (37, 41 and 53 ms for 30 MB).  Each call
  releases the GIL, and writes its 32-byte digest straight into one output array: no Python
  object per block.  A call costs ~1.2 us of Python and ctypes (hashlib's: about the same),
  so a 5376-byte block, rdiff's default for a 30 MB file, goes ~1.2x faster than hashlib.
* ``hashlib`` otherwise.

``DELTABKP_BLAKE2`` in the environment picks one: ``hashlib``, ``sodium`` or ``b2`` (a
library that is absent or fails its check falls back to hashlib).

The library is loaded on the first ``blake2b_blocks`` or ``implementation()`` call, not at
import: ``import deltabkp.rdiff`` (every CLI start) does no I/O here.  ``find_library`` runs
``ldconfig -p`` in a subprocess (~20 ms), so it is asked only when no library's known
soname opens and passes the check.
The first call may come from several rdiff helper threads at once; a lock makes one of them
load and the others wait for its answer.

Invariants: a library is used only if it gives hashlib's digests on the test vectors below
when loaded (libb2 0.98's argument order is ``blake2b(out, in, key, outlen, inlen,
keylen)``; the newer reference order ``(out, outlen, in, ...)`` sees a NULL input or an
``outlen`` over 64 in our arguments and returns an error without reading memory, so such a
library is not used); every call's status is checked too, so a digest the library did not
write never leaves (the output array is uninitialised); the caller's buffer is only read, and
only inside the blocks asked for, whose bounds are checked before any pointer is formed.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading
from collections.abc import Callable
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

__all__ = ["blake2b_256", "blake2b_blocks", "hashlib_blocks", "implementation", "library_blocks"]

U8 = npt.NDArray[np.uint8]
#: ``_blockloop.blocks(fn, order, data, start, count, size, out) -> (failed, status)``.
_Loop = Callable[[int, int, U8, int, int, int, U8], tuple[int, int]]
DIGEST = 32
#: Inputs of the load check: empty, one byte, one compression block and a bit, a long one.
_CHECK = (b"", b"a", bytes(range(256)) * 4 + b"xyz", bytes(range(251)) * 40)


def blake2b_256(data: bytes | bytearray | memoryview) -> bytes:
    """The BLAKE2b-256 of one buffer (hashlib: for one block a ctypes call saves nothing)."""
    return hashlib.blake2b(data, digest_size=DIGEST).digest()


def _truncated(out: U8, sl: int) -> bytes:
    return out.tobytes() if sl == DIGEST else out[:, :sl].tobytes()


def _check_range(data: U8, a: int, b: int, bs: int, sl: int) -> int:
    if not (data.ndim == 1 and data.flags.c_contiguous and 0 <= a <= b <= len(data) and bs > 0
            and (b - a) % bs == 0 and 1 <= sl <= DIGEST):
        raise ValueError(
            f"blocks {a}..{b} of {bs} B (strong length {sl}) do not fit a buffer of {len(data)} B"
        )
    return (b - a) // bs


def hashlib_blocks(data: U8, a: int, b: int, bs: int, sl: int) -> bytes:
    """The first ``sl`` bytes of the BLAKE2b-256 of every ``bs``-byte block of
    ``data[a:b]``, concatenated (hashlib)."""
    n = _check_range(data, a, b, bs, sl)
    b2 = hashlib.blake2b
    mv = memoryview(data)  # type: ignore[arg-type]
    digests = [b2(mv[o : o + bs], digest_size=DIGEST).digest() for o in range(a, a + n * bs, bs)]
    if sl == DIGEST:
        return b"".join(digests)
    return b"".join([d[:sl] for d in digests])


@attrs.frozen
class _Library:
    """How to call one library's BLAKE2b: its name for ``find_library``, the sonames to try
    first, the function, an init function to call first (or None), and the arguments around
    the two pointers (``out``, ``in``) and the input length, in the library's order, as ready
    ctypes objects."""

    name: str
    sonames: tuple[str, ...]
    symbol: str
    init: str | None
    args: Callable[[ctypes.c_void_p, ctypes.c_void_p, int], tuple[object, ...]]
    #: The argument order's number in the C loop (``_blockloop.c``).
    order: int


_LIBRARIES = (
    # libsodium: AVX2 code, ~10% faster than libb2's AVX here; int crypto_generichash_blake2b(
    # out, size_t outlen, in, unsigned long long inlen, key, size_t keylen).
    _Library("sodium", ("libsodium.so.23",), "crypto_generichash_blake2b", "sodium_init",
             lambda out, src, n: (
        out, ctypes.c_size_t(DIGEST), src, ctypes.c_ulonglong(n), None, ctypes.c_size_t(0)),
             0),
    # libb2 0.98.1 (Debian's libb2-1): int blake2b(out, in, key, size_t outlen, size_t inlen,
    # size_t keylen) (0.98: uint8_t, uint64_t, uint8_t; full-width arguments suit both on
    # 64-bit ABIs).  The newer reference order (out, outlen, in, ...) fails the check: it
    # sees a NULL input of 32 bytes (or an outlen > 64) and returns -1 without reading.
    _Library("b2", ("libb2.so.1",), "blake2b", None, lambda out, src, n: (
        out, src, None, ctypes.c_size_t(DIGEST), ctypes.c_size_t(n), ctypes.c_size_t(0)), 1),
)


@attrs.frozen
class _Loaded:
    """A library that passed its check: its BLAKE2b function (returns an int status), how
    to call it, and the C loop over blocks when it loaded and passed its own check."""

    fn: Any
    spec: _Library
    loop: _Loop | None
    #: ``fn``'s address for the C loop, 0 without one (ctypes.cast costs ~1 us: once, not
    #: per task).
    address: int = attrs.field(init=False)

    @address.default
    def _fn_address(self) -> int:
        return 0 if self.loop is None else _address(self.fn)


def _address(fn: Any) -> int:
    """The address of a ctypes function (a symbol ctypes found: never NULL)."""
    address = ctypes.cast(fn, ctypes.c_void_p).value
    assert address
    return address


def _find(spec: _Library) -> str | None:
    """Where ``find_library`` finds ``spec``'s library (it runs ``ldconfig -p``: asked only
    after the known sonames failed), unless that is one of the sonames already tried."""
    import ctypes.util  # here: only this fallback needs it

    name = ctypes.util.find_library(spec.name)
    return None if name in spec.sonames else name


def _checked(spec: _Library, name: str) -> _Loaded | None:
    """The library file ``name`` as ``spec``, if it opens, has the functions, and gives
    hashlib's digests of the test vectors."""
    try:
        lib = ctypes.CDLL(name)
        fn = lib[spec.symbol]
        if spec.init is not None:
            init = lib[spec.init]
            init.restype = ctypes.c_int
            if init() < 0:
                return None
    except (OSError, AttributeError):
        return None
    # No argtypes: every argument is passed as a ready ctypes object, which ctypes hands to
    # libffi as it is (argtypes would convert each one per call: ~0.7 us more per block).
    fn.restype = ctypes.c_int
    for vector in _CHECK:
        # 64 bytes, BLAKE2b's longest digest: a library that took another argument for the
        # output length still writes inside the buffer.
        out = ctypes.create_string_buffer(64)
        src = ctypes.create_string_buffer(vector, len(vector))
        args = spec.args(ctypes.c_void_p(ctypes.addressof(out)),
                         ctypes.c_void_p(ctypes.addressof(src)), len(vector))
        if fn(*args) != 0 or out.raw != blake2b_256(vector) + bytes(32):
            return None
    return _Loaded(fn, spec, _checked_loop(fn, spec))


def _checked_loop(fn: Any, spec: _Library) -> _Loop | None:
    """The C loop (``_blockloop``) for ``fn``, if it is built, not turned off
    (``DELTABKP_BLAKE2_LOOP=ctypes``) and gives hashlib's digests of blocks of the test
    vectors; else None (the ctypes loop is used)."""
    if os.environ.get("DELTABKP_BLAKE2_LOOP") == "ctypes":
        return None
    try:
        from deltabkp.engine import _blockloop
    except ImportError:  # built without a compiler: optional
        return None
    loop: _Loop = _blockloop.blocks
    vector = _CHECK[-1]
    data = np.frombuffer(vector, np.uint8)
    for bs in (1, 129, 1000):
        n = len(data) // bs
        out = np.zeros((n, DIGEST), np.uint8)
        want = b"".join(blake2b_256(vector[o : o + bs]) for o in range(0, n * bs, bs))
        try:
            got = loop(_address(fn), spec.order, data, 0, n, bs, out)
        except Exception:  # noqa: BLE001 - e.g. a stale build with another signature
            return None
        if got != (-1, 0) or out.tobytes() != want:
            return None
    return loop


def _by_soname(spec: _Library) -> _Loaded | None:
    for name in spec.sonames:
        found = _checked(spec, name)
        if found is not None:
            return found
    return None


def _by_search(spec: _Library) -> _Loaded | None:
    name = _find(spec)
    return None if name is None else _checked(spec, name)


def _load(spec: _Library) -> _Loaded | None:
    """``spec``'s library if a file of it passes the check (sonames first), or None."""
    return _by_soname(spec) or _by_search(spec)


def _load_first(choice: str | None) -> _Loaded | None:
    """The first library in ``_LIBRARIES`` order (or the one named ``choice``) that loads:
    every library's sonames are tried before any ``find_library`` search."""
    specs = [spec for spec in _LIBRARIES if choice in (None, "", spec.name)]
    for how in (_by_soname, _by_search):
        for spec in specs:
            found = how(spec)
            if found is not None:
                return found
    return None


_lock = threading.Lock()
_tried = False  # set (under _lock) only after _loaded holds the answer
_loaded: _Loaded | None = None


def _library() -> _Loaded | None:
    """The loaded library, loading it on the first call (once, whichever threads ask)."""
    global _tried, _loaded
    if _tried:
        return _loaded
    with _lock:
        if not _tried:
            _loaded = _load_first(os.environ.get("DELTABKP_BLAKE2"))
            _tried = True
    return _loaded


def implementation() -> str:
    """Which implementation ``blake2b_blocks`` uses: "libsodium", "libb2" or "hashlib"
    (loads the library if not done yet)."""
    loaded = _library()
    return "hashlib" if loaded is None else "lib" + loaded.spec.name


def loop() -> str:
    """How ``blake2b_blocks`` calls the library over many blocks: "C" (``_blockloop``, the
    GIL released for all of them), "ctypes" (a call per block) or "" (hashlib)."""
    loaded = _library()
    if loaded is None:
        return ""
    return "ctypes" if loaded.loop is None else "C"


def _blocks(loaded: _Loaded, data: U8, a: int, b: int, bs: int, sl: int) -> bytes:
    n = _check_range(data, a, b, bs, sl)
    out = np.empty((n, DIGEST), np.uint8)
    if n:
        if loaded.loop is not None:
            # One call for all the blocks, the GIL released (helper threads run side by side).
            failed, status = loaded.loop(loaded.address, loaded.spec.order, data, a, n, bs, out)
        else:
            failed, status = _ctypes_loop(loaded, data, a, n, bs, out)
        if failed >= 0:
            # Our arguments are checked, so a status other than 0 is the library's own
            # failure: its digest (and ``out``'s uninitialised bytes) must not become a sum.
            raise RuntimeError(
                f"lib{loaded.spec.name} {loaded.spec.symbol} returned {status} for block "
                f"{failed} of {n} ({bs} B)"
            )
    return _truncated(out, sl)


def _ctypes_loop(loaded: _Loaded, data: U8, a: int, n: int, bs: int, out: U8) -> tuple[int, int]:
    """The C loop's job through ctypes, a call per block (the GIL held ~1.2 us each):
    ``(-1, 0)``, or the first block whose call failed and its status."""
    # ``data`` and ``out`` keep the caller's buffer and the digests alive for the whole loop.
    fn = loaded.fn
    src, dst = data.ctypes.data + a, out.ctypes.data
    ps, pd = ctypes.c_void_p(src), ctypes.c_void_p(dst)
    args = loaded.spec.args(pd, ps, bs)
    for i in range(n):
        ps.value, pd.value = src, dst
        # The check costs ~0.1 us per call (~1 % of a 5376-byte block's hash).
        status = fn(*args)
        if status != 0:
            return i, status
        src += bs
        dst += DIGEST
    return -1, 0


def library_blocks(data: U8, a: int, b: int, bs: int, sl: int) -> bytes:
    """As ``hashlib_blocks``, through the loaded library (only when one loaded:
    ``implementation()``)."""
    loaded = _library()
    if loaded is None:
        _check_range(data, a, b, bs, sl)
        raise RuntimeError("no BLAKE2b library is loaded")
    return _blocks(loaded, data, a, b, bs, sl)


def blake2b_blocks(data: U8, a: int, b: int, bs: int, sl: int) -> bytes:
    """As ``hashlib_blocks``, through the library when one loads (``implementation()``)."""
    loaded = _library()
    if loaded is None:
        return hashlib_blocks(data, a, b, bs, sl)
    return _blocks(loaded, data, a, b, bs, sl)
