"""deltabkp.rdiff on its own: golden files, streaming == one-shot, and malformed input.

The golden files in tests/golden/rdiff/ pin the librsync formats: signatures of all four
kinds and a delta written by deltabkp, and a delta written by ``rdiff`` 2.3.2 that must keep
patching.  Malformed signatures and deltas may only raise the library's typed errors.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
from functools import partial
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltabkp import FormatError, LimitExceeded, UsageError, rdiff
from deltabkp.engine import _rdiff_sums
from deltabkp.rdiff import SignatureKind

GOLDEN = Path(__file__).parent / "golden" / "rdiff"


def _inputs() -> tuple[bytes, bytes]:
    rng = random.Random(2026)
    base = rng.randbytes(1000)  # 15 whole blocks of 64 and a 40-byte tail
    new = base[:200] + b"golden insert" + base[300:900] + rng.randbytes(70) + base[960:]
    return base, new


def _golden(name: str, data: bytes) -> bytes:
    path = GOLDEN / name
    if os.environ.get("DELTABKP_REGEN_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return path.read_bytes()


@pytest.mark.parametrize("kind", list(SignatureKind))
def test_signature_golden(kind: SignatureKind) -> None:
    base, _new = _inputs()
    sig = rdiff.signature(base, 64, strong_len=8, kind=kind)
    assert sig == _golden(f"{kind.name.lower()}.sig", sig)
    assert int.from_bytes(sig[:4], "big") == kind
    parsed = rdiff.Signature.parse(sig)
    assert (parsed.kind, parsed.block_size, parsed.strong_len) == (kind, 64, 8)
    assert parsed.block_count == 16
    assert parsed.to_bytes() == sig
    assert len(sig) == 12 + 16 * (4 + 8)


def test_delta_golden() -> None:
    base, new = _inputs()
    sig = rdiff.signature(base, 64, strong_len=8)
    delta = rdiff.delta(sig, new)
    assert delta == _golden("delta.bin", delta)
    assert delta[:4] == b"rs\x026" and delta[-1] == 0
    assert rdiff.patch(base, delta) == new


def test_delta_by_rdiff_golden() -> None:
    """A delta ``rdiff delta`` 2.3.2 wrote for the same pair (rabinkarp + BLAKE2, -b 64)."""
    base, new = _inputs()
    assert rdiff.patch(base, (GOLDEN / "rdiff-2.3.2.delta").read_bytes()) == new


def test_defaults_are_rdiffs() -> None:
    assert rdiff.default_block_size(0) == 256
    assert rdiff.default_block_size(256 * 256) == 256
    assert rdiff.default_block_size(30_000_000) == 5376  # isqrt, down to a multiple of 128
    assert rdiff.default_block_size(None) == 2048
    sig = rdiff.Signature.parse(rdiff.signature(b"x" * 100_000))
    assert (sig.kind, sig.block_size, sig.strong_len) == (SignatureKind.RK_BLAKE2, 256, 32)


def test_op_widths() -> None:
    """Literal lengths and copy arguments take rdiff's narrowest encodings."""
    base = random.Random(1).randbytes(70_000)
    sig = rdiff.signature(base, 256)
    new = base[256 * 3 : 256 * 4] + bytes(65) + base[256 * 260 :]
    d = rdiff.delta(sig, new)
    # COPY_N2_N2 (0x4a) of 768/256, LITERAL_N1 (0x41) of 65, COPY_N4_N2 (0x4e)
    assert d[4:9] == bytes((0x4A, 0x03, 0x00, 0x01, 0x00))
    assert d[9:11] == bytes((0x41, 65))
    assert d[76] == 0x4E and d[-1] == 0
    assert rdiff.patch(base, d) == new


@settings(max_examples=25)
@given(
    base=st.binary(max_size=3000),
    new=st.binary(max_size=3000),
    block=st.integers(1, 300),
    kind=st.sampled_from(list(SignatureKind)),
    cut=st.integers(1, 700),
)
def test_streaming_equals_one_shot(
    base: bytes, new: bytes, block: int, kind: SignatureKind, cut: int
) -> None:
    new = base[: len(base) // 2] + new + base[len(base) // 3 :]
    sig = rdiff.signature(base, block, kind=kind)
    builder = rdiff.SignatureBuilder(block, kind=kind)
    for at in range(0, len(base), cut):
        builder.feed(base[at : at + cut])
    assert builder.finish() == sig
    delta = rdiff.delta(sig, new)
    enc = rdiff.DeltaEncoder(sig)
    parts = [enc.feed(new[at : at + cut]) for at in range(0, len(new), cut)]
    streamed = b"".join([*parts, enc.finish()])
    assert rdiff.patch(base, streamed) == new
    assert rdiff.patch(base, delta) == new
    patcher = rdiff.Patcher(base)
    out = [bytes(p) for at in range(len(delta)) for p in patcher.feed(delta[at : at + 1])]
    patcher.finish()
    assert b"".join(out) == new


def test_big_streaming_delta_finds_runs() -> None:
    rng = random.Random(7)
    base = rng.randbytes(3 << 20)
    new = base[:1_000_000] + b"x" * 100 + base[1_000_000:]
    sig = rdiff.signature(base)
    enc = rdiff.DeltaEncoder(sig)
    chunk = 1 << 20
    d = b"".join([*(enc.feed(new[i : i + chunk]) for i in range(0, len(new), chunk)),
                  enc.finish()])
    assert len(d) < 2000  # a few COPYs and one literal, not megabytes of literal
    assert rdiff.patch(base, d) == new
    assert rdiff.is_delta(d) and not rdiff.is_signature(d) and rdiff.is_signature(sig)


def test_run_needs_weak_and_strong_sums() -> None:
    """A block continues a run only if its weak sum matches too: with 1-byte strong sums a
    different block with the same strong byte turns up once in 256 tries, and taking it
    would make a delta that patches to the wrong file."""
    rng = random.Random(5)
    base = rng.randbytes(64 * 4)
    want = hashlib.blake2b(base[64:128], digest_size=32).digest()[:1]
    while True:
        impostor = rng.randbytes(64)
        if hashlib.blake2b(impostor, digest_size=32).digest()[:1] == want:
            break
    new = base[:64] + impostor + base[128:]
    sig = rdiff.signature(base, 64, strong_len=1)
    assert rdiff.patch(base, rdiff.delta(sig, new)) == new


@pytest.mark.parametrize("threads", [0, 1])
def test_long_blake2_sums_confirm_a_run_alone(threads: int) -> None:
    """With BLAKE2b sums of 16 bytes or more a run goes on by the strong sums alone: the
    weak sums past a run's first block are never computed, so a signature whose later weak
    sums are wrong (never one made from the base) still gives one COPY of the whole run.
    With 8-byte sums the weak sums are checked, and the run stops at the first wrong one."""
    base = random.Random(9).randbytes(40 * 4096)
    new = b"head" + base
    for strong_len, copies_all in ((16, True), (32, True), (8, False)):
        sig = rdiff.Signature.parse(rdiff.signature(base, 4096, strong_len=strong_len))
        weak = sig.weak_sums[:4] + bytes(4 * (sig.block_count - 1))  # block 0 findable
        doctored = rdiff.Signature(sig.kind, 4096, strong_len, weak, sig.strong_sums)
        delta = rdiff.delta(doctored, new, threads=threads)
        assert rdiff.patch(base, delta) == new
        assert (len(delta) < 100) == copies_all


@pytest.mark.parametrize(
    "kind", [SignatureKind.RK_BLAKE2, SignatureKind.MD4], ids=lambda k: str(k.name)
)
def test_threads_change_no_byte(kind: SignatureKind) -> None:
    """Blocks of 2 KiB and more are hashed in tasks spread over helper threads: the same
    signature and delta as in one thread, one-shot or streamed."""
    rng = random.Random(11)
    base = rng.randbytes(1_500_000)
    new = base[:300_000] + rng.randbytes(5000) + base[300_000:1_200_000] + base[1_250_000:]
    assert len(_rdiff_sums._cuts(len(base) // 4096, 4096, 2)) > 2  # really split in tasks
    one = rdiff.signature(base, 4096, kind=kind, threads=0)
    assert rdiff.signature(base, 4096, kind=kind, threads=2) == one
    builder = rdiff.SignatureBuilder(4096, kind=kind, threads=1)
    for at in range(0, len(base), 300_001):
        builder.feed(base[at : at + 300_001])
    assert builder.finish() == one
    delta = rdiff.delta(one, new, threads=0)
    assert rdiff.delta(one, new, threads=2) == delta
    assert len(delta) < 5000 + 4 * 4096 and rdiff.patch(base, delta) == new
    enc = rdiff.DeltaEncoder(one, threads=1)
    streamed = b"".join([*(enc.feed(new[i : i + 200_000]) for i in range(0, len(new), 200_000)),
                         enc.finish()])
    assert rdiff.patch(base, streamed) == new


def test_run_tasks_runs_helpers_beside_the_caller() -> None:
    both = threading.Barrier(2, timeout=30)  # breaks (a failure) unless two threads meet
    ran: list[str] = []

    def task(i: int) -> int:
        if i < 2:
            both.wait()
        ran.append(threading.current_thread().name)
        return i * i

    assert _rdiff_sums.run_tasks([partial(task, i) for i in range(6)], 1) == [
        i * i for i in range(6)
    ]
    assert len(set(ran)) == 2


def test_run_tasks_with_a_busy_pool_or_a_failing_helper() -> None:
    """A helper that cannot start is cancelled, not waited for; a task whose helper raised
    is redone by the caller."""
    release = threading.Event()
    pool = _rdiff_sums._get_pool()
    blockers = [pool.submit(release.wait, 30) for _ in range(_rdiff_sums.MAX_THREADS)]
    try:
        assert _rdiff_sums.run_tasks([partial(int, i) for i in range(5)], 2) == list(range(5))
        # Queued, cancelled helper jobs must not keep the streaming encoder's buffer
        # exported (it could not drop what it has emitted: BufferError).
        base = random.Random(3).randbytes(600_000)
        enc = rdiff.DeltaEncoder(rdiff.signature(base, 4096, threads=0), threads=2)
        parts = [enc.feed(base[i : i + 150_000]) for i in range(0, len(base), 150_000)]
        assert rdiff.patch(base, b"".join([*parts, enc.finish()])) == base
    finally:
        release.set()
        for b in blockers:
            b.result()
    caller = threading.current_thread()
    both = threading.Barrier(2, timeout=30)
    tried: set[int] = set()

    def flaky(i: int) -> str:
        if i < 2 and i not in tried:  # the first two tasks meet on two threads, once
            tried.add(i)
            both.wait()
            if threading.current_thread() is not caller:
                raise RuntimeError("helper failed")
        return f"r{i}"

    assert _rdiff_sums.run_tasks([partial(flaky, i) for i in range(4)], 1) == [
        "r0", "r1", "r2", "r3"
    ]


# --- malformed input --------------------------------------------------------------------

_SIG = rdiff.signature(b"0123456789" * 50, 64, strong_len=8)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "truncated"),
        (b"rs\x01", "truncated"),
        (b"DBKS\x01" + bytes(60), "not an rdiff signature"),
        (b"rs\x01\x99" + bytes(8), "not an rdiff signature"),
        (_SIG[:4] + (0).to_bytes(4, "big") + _SIG[8:], "block length 0"),
        (_SIG[:8] + (0).to_bytes(4, "big") + _SIG[12:], "strong sum length 0"),
        (_SIG[:8] + (33).to_bytes(4, "big") + _SIG[12:], "strong sum length 33"),
        (b"rs\x01\x46" + _SIG[4:8] + (17).to_bytes(4, "big"), "strong sum length 17"),
        (_SIG[:-1], "not the header plus whole blocks"),
        (_SIG + b"x", "not the header plus whole blocks"),
    ],
)
def test_malformed_signature(data: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        rdiff.Signature.parse(data)


def test_signature_size_limit() -> None:
    with pytest.raises(LimitExceeded):
        rdiff.Signature.parse(_SIG, max_size=len(_SIG) - 1)


_BASE = bytes(range(256)) * 4
_MAGIC = b"rs\x026"


@pytest.mark.parametrize(
    ("delta", "message"),
    [
        (b"", "no magic"),
        (b"rs\x02", "no magic"),
        (b"DBKD" + bytes(10), "not an rdiff delta"),
        (_MAGIC, "no END"),
        (_MAGIC + b"\x05abc", "2 literal bytes missing"),
        (_MAGIC + b"\x41", "no END"),
        (_MAGIC + b"\x41\x00\x00", "empty LITERAL"),
        (_MAGIC + b"\x55", "reserved op byte 0x55"),
        (_MAGIC + b"\xff", "reserved op byte 0xff"),
        (_MAGIC + b"\x45\x00\x00\x00", "is empty"),
        (_MAGIC + b"\x4a\x03\xff\x00\x02\x00", "outside the base's 1024 bytes"),
        (_MAGIC + b"\x54" + (2**63).to_bytes(8, "big") * 2, "outside the base"),
        (_MAGIC + b"\x00\x00", "trailing data after END"),
    ],
)
def test_malformed_delta(delta: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        rdiff.patch(_BASE, delta)


def test_patch_size_limit() -> None:
    delta = _MAGIC + b"\x4a\x00\x00\x04\x00" * 10 + b"\x00"  # ten copies of the whole base
    assert len(rdiff.patch(_BASE, delta)) == 10 * len(_BASE)
    with pytest.raises(LimitExceeded):
        rdiff.patch(_BASE, delta, max_size=5000)


@settings(max_examples=60)
@given(data=st.binary(max_size=200), at=st.integers(0, 400), junk=st.binary(min_size=1, max_size=8))
def test_fuzzed_inputs_raise_only_format_errors(data: bytes, at: int, junk: bytes) -> None:
    good_delta = rdiff.delta(_SIG, b"0123456789" * 20 + data)
    for blob in (data, _MAGIC + data, good_delta[:at] + junk + good_delta[at + len(junk) :]):
        try:
            rdiff.patch(b"0123456789" * 50, blob, max_size=1 << 20)
        except FormatError:
            pass
    for blob in (data, _SIG[:at] + junk + _SIG[at + len(junk) :]):
        try:
            sig = rdiff.Signature.parse(blob)
        except FormatError:
            continue
        rdiff.delta(sig, data)


def test_usage_errors() -> None:
    with pytest.raises(UsageError):
        rdiff.signature(b"abc", 0)
    for bad in (-1, True, 1.5):
        with pytest.raises(UsageError, match="threads"):
            rdiff.signature(b"abc", threads=bad)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        rdiff.signature(b"abc", 16, strong_len=17, kind=SignatureKind.MD4)
    enc = rdiff.DeltaEncoder(_SIG)
    enc.finish()
    with pytest.raises(UsageError):
        enc.feed(b"x")
