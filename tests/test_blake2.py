"""The BLAKE2b of many blocks (deltabkp.engine._blake2): every library it may load gives
hashlib's digests, the hashlib path works alone, bad block ranges are refused, a library's
failing call is an error (never a digest), and the library is loaded on first use, once,
not at import.  The C loop over blocks (``_blockloop``) gives the same digests as the ctypes
loop, checks its bounds itself, and reports a failing call the same way."""

from __future__ import annotations

import ctypes.util
import hashlib
import os
import subprocess
import sys
import threading

import attrs
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltabkp import rdiff
from deltabkp.engine import _blake2, _rdiff_sums


def _direct(data: bytes, a: int, b: int, bs: int, sl: int) -> bytes:
    return b"".join(
        hashlib.blake2b(data[o : o + bs], digest_size=32).digest()[:sl] for o in range(a, b, bs)
    )


def _opens(name: str) -> bool:
    try:
        ctypes.CDLL(name)
    except OSError:
        return False
    return True


def _found(spec: _blake2._Library) -> bool:
    return any(map(_opens, spec.sonames)) or ctypes.util.find_library(spec.name) is not None


@pytest.mark.parametrize("spec", _blake2._LIBRARIES, ids=lambda s: s.name)
def test_a_library_found_loads_and_agrees(spec: _blake2._Library) -> None:
    """A library that is on the system must pass the load check (.ci/run installs libb2 so
    that CI runs this one for real)."""
    if not _found(spec):
        pytest.skip(f"lib{spec.name} is not installed")
    loaded = _blake2._load(spec)
    assert loaded is not None, f"lib{spec.name} is installed but failed the digest check"
    fn = loaded.fn
    data = np.frombuffer(os.urandom(3 * 700 + 5), np.uint8)
    out = np.zeros((3, 32), np.uint8)
    for i in range(3):
        fn(*spec.args(ctypes.c_void_p(out.ctypes.data + 32 * i),
                      ctypes.c_void_p(data.ctypes.data + 5 + 700 * i), 700))
    assert out.tobytes() == _direct(data.tobytes(), 5, 5 + 3 * 700, 700, 32)


def test_a_library_called_in_another_argument_order_is_refused() -> None:
    """libb2's argument order given to libsodium and the other way round (the two orders a
    libblake2 may have): the load check refuses the library, and nothing crashes."""
    sodium, b2 = _blake2._LIBRARIES
    swapped = [attrs.evolve(b2, args=sodium.args), attrs.evolve(sodium, args=b2.args)]
    found = [spec for spec in swapped if _found(spec)]
    if not found:
        pytest.skip("neither libb2 nor libsodium is installed")
    for spec in found:
        assert _blake2._load(spec) is None


@settings(max_examples=40)
@given(
    data=st.binary(max_size=5000),
    bs=st.integers(1, 1500),
    sl=st.integers(1, 32),
    skip=st.integers(0, 3),
)
def test_blocks_equal_hashlib_per_block(data: bytes, bs: int, sl: int, skip: int) -> None:
    arr = np.frombuffer(data, np.uint8)
    a = min(len(data), skip * bs) if skip < 3 else min(len(data), skip)  # aligned or not
    b = a + (len(data) - a) // bs * bs
    want = _direct(data, a, b, bs, sl)
    assert _blake2.hashlib_blocks(arr, a, b, bs, sl) == want
    assert _blake2.blake2b_blocks(arr, a, b, bs, sl) == want
    if _blake2.implementation() != "hashlib":
        assert _blake2.library_blocks(arr, a, b, bs, sl) == want
        for loop in (True, False):  # the C loop (when built) and the ctypes one
            assert _blake2._blocks(_loaded_with(loop), arr, a, b, bs, sl) == want


def test_bad_ranges_are_refused_before_reading() -> None:
    arr = np.frombuffer(bytes(1000), np.uint8)
    for a, b, bs, sl in ((0, 1100, 100, 32), (-100, 100, 100, 32), (0, 150, 100, 32),
                         (0, 100, 0, 32), (0, 100, 100, 0), (0, 100, 100, 33),
                         (200, 100, 100, 32)):
        for fn in (_blake2.hashlib_blocks, _blake2.blake2b_blocks):
            with pytest.raises(ValueError, match="do not fit"):
                fn(arr, a, b, bs, sl)
    with pytest.raises(ValueError, match="do not fit"):
        _blake2.blake2b_blocks(arr[::2], 0, 100, 100, 32)  # not contiguous


def test_hashlib_path_gives_the_same_signature_and_delta(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without a library (hashlib only) signatures and deltas are the same bytes, on one
    thread and several; DELTABKP_BLAKE2=hashlib selects that path."""
    base = os.urandom(400_000)
    new = base[:100_000] + b"edit" + base[100_000:]
    sig = rdiff.signature(base, 4096)
    dlt = rdiff.delta(sig, new)
    monkeypatch.setattr(_rdiff_sums, "blake2b_blocks", _blake2.hashlib_blocks)
    for threads in (0, 1):
        assert rdiff.signature(base, 4096, threads=threads) == sig
        assert rdiff.delta(sig, new, threads=threads) == dlt
    assert rdiff.patch(base, dlt) == new
    env = dict(os.environ, DELTABKP_BLAKE2="hashlib")
    r = subprocess.run(
        [sys.executable, "-c", "from deltabkp.engine import _blake2; print(_blake2.implementation())"],
        env=env, capture_output=True, text=True, check=True, timeout=60,
    )
    assert r.stdout.strip() == "hashlib"


_FIRST_USE = """
import sys
events = []
watched = ("subprocess.Popen", "os.posix_spawn", "os.exec", "os.system", "ctypes.dlopen")

def hook(event, args):
    # ctypes.dlopen(None) is ctypes' own pythonapi handle, not a library
    if event in watched and not (event == "ctypes.dlopen" and args[0] is None):
        events.append(f"{event} {args[0]}")

sys.addaudithook(hook)
import deltabkp.rdiff
from deltabkp.engine import _blake2
assert not events and not _blake2._tried and "ctypes.util" not in sys.modules, events
deltabkp.rdiff.signature(bytes(10_000))  # rk_blake2: the first use loads
assert _blake2._tried
print(_blake2.implementation(), *events, sep="\\n")
"""


def test_the_library_is_loaded_on_first_use_not_at_import() -> None:
    """``import deltabkp.rdiff`` opens no library and starts no process (no ``ldconfig -p``
    of ``find_library``); the first signature loads one, by its soname when that opens."""
    out = subprocess.run([sys.executable, "-c", _FIRST_USE], capture_output=True, text=True,
                         check=False, timeout=60)
    assert out.returncode == 0, out.stderr
    implementation, *events = out.stdout.splitlines()
    assert implementation == _blake2.implementation()
    if any(_opens(name) for spec in _blake2._LIBRARIES for name in spec.sonames):
        assert implementation != "hashlib"
        assert all(e.startswith("ctypes.dlopen lib") for e in events), events  # no ldconfig


def test_concurrent_first_calls_load_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """rdiff's helper threads may make the first call together: one load, one answer."""
    loads: list[str | None] = []
    real = _blake2._load_first

    def counted(choice: str | None) -> _blake2._Loaded | None:
        loads.append(choice)
        return real(choice)

    monkeypatch.setattr(_blake2, "_tried", False)
    monkeypatch.setattr(_blake2, "_loaded", None)
    monkeypatch.setattr(_blake2, "_load_first", counted)
    start = threading.Barrier(6)
    got: list[str] = []

    def first_call() -> None:
        start.wait()
        got.append(_blake2.implementation())

    threads = [threading.Thread(target=first_call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(loads) == 1 and len(got) == 6 and len(set(got)) == 1


def test_a_failing_library_call_is_an_error_not_a_digest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A call that returns a status other than 0 (here the 3rd of 5) leaves its digest
    unwritten: ``blake2b_blocks`` raises instead of returning the output array's bytes."""
    calls: list[int] = []

    def fails_third(*args: object) -> int:
        calls.append(1)
        return -1 if len(calls) == 3 else 0

    sodium = _blake2._LIBRARIES[0]
    monkeypatch.setattr(_blake2, "_tried", True)
    monkeypatch.setattr(_blake2, "_loaded", _blake2._Loaded(fails_third, sodium, None))
    arr = np.frombuffer(bytes(500), np.uint8)
    with pytest.raises(RuntimeError, match=r"libsodium .* returned -1 for block 2 of 5"):
        _blake2.blake2b_blocks(arr, 0, 500, 100, 32)
    assert len(calls) == 3


def _loaded_with(loop: bool) -> _blake2._Loaded:
    loaded = _blake2._library()
    if loaded is None:
        pytest.skip("no BLAKE2b library is installed")
    return attrs.evolve(loaded, loop=loaded.loop if loop else None)


def test_the_c_loop_is_built_and_used() -> None:
    """The test install (README's command, with a compiler: .ci/run) builds the C loop, and a
    library that loads uses it: a loop that is missing fails here, it is not skipped."""
    from deltabkp.engine import _blockloop

    assert callable(_blockloop.blocks)
    if _blake2.implementation() != "hashlib":
        assert _blake2.loop() == "C"


def test_the_c_loop_checks_its_own_bounds() -> None:
    """Called directly with ranges that do not fit, the C loop raises before reading."""
    loaded = _loaded_with(True)
    if loaded.loop is None:
        pytest.skip("the library did not pass the C loop's check")
    arr = np.frombuffer(bytes(1000), np.uint8)
    out = np.zeros((20, 32), np.uint8)
    fn, order = loaded.address, loaded.spec.order
    for start, count, size, dst in ((0, 11, 100, out), (-1, 1, 100, out), (1001, 0, 1, out),
                                    (1, 10, 100, out), (0, 1, 0, out), (0, 1, -5, out),
                                    (0, 10, 100, out[:9]), (0, 2**62, 2**62, out)):
        with pytest.raises(ValueError, match="do not fit"):
            loaded.loop(fn, order, arr, start, count, size, dst)
    for bad_fn, bad_order in ((0, 0), (fn, 2)):
        with pytest.raises(ValueError, match="no BLAKE2b function"):
            loaded.loop(bad_fn, bad_order, arr, 0, 1, 100, out)
    with pytest.raises(TypeError):  # digests are written: a read-only output is refused
        loaded.loop(loaded.address, order, arr, 0, 1, 100, arr)
    assert loaded.loop(loaded.address, order, arr, 1000, 0, 7, out[:0]) == (-1, 0)


def test_the_c_loop_stops_at_a_failing_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """A C function (here a ctypes callback in libsodium's argument order) that fails the 3rd
    of 5 calls: the loop stops there, and ``blake2b_blocks`` raises instead of returning."""
    loaded = _loaded_with(True)
    if loaded.loop is None:
        pytest.skip("the library did not pass the C loop's check")
    calls: list[int] = []
    proto = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                             ctypes.c_ulonglong, ctypes.c_void_p, ctypes.c_size_t)

    @proto  # type: ignore[untyped-decorator]
    def fails_third(out: int, outlen: int, src: int, n: int, key: int, keylen: int) -> int:
        calls.append(n)
        return -7 if len(calls) == 3 else 0

    sodium = _blake2._LIBRARIES[0]
    monkeypatch.setattr(_blake2, "_tried", True)
    monkeypatch.setattr(_blake2, "_loaded", _blake2._Loaded(fails_third, sodium, loaded.loop))
    arr = np.frombuffer(bytes(500), np.uint8)
    with pytest.raises(RuntimeError, match=r"libsodium .* returned -7 for block 2 of 5"):
        _blake2.blake2b_blocks(arr, 0, 500, 100, 32)
    assert calls == [100, 100, 100]


def test_the_ctypes_loop_can_be_chosen() -> None:
    """DELTABKP_BLAKE2_LOOP=ctypes turns the C loop off (same digests: the test above)."""
    env = dict(os.environ, DELTABKP_BLAKE2_LOOP="ctypes")
    r = subprocess.run(
        [sys.executable, "-c", "from deltabkp.engine import _blake2; print(_blake2.loop())"],
        env=env, capture_output=True, text=True, check=True, timeout=60,
    )
    assert r.stdout.strip() == ("" if _blake2.implementation() == "hashlib" else "ctypes")
