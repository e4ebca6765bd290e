"""Delta engine: round trips (whole and streamed), op choice, and typed errors on bad input."""

from __future__ import annotations

import os
import random

import pytest

import deltabkp
from deltabkp import (
    DeltaEncoder,
    FormatError,
    IntegrityError,
    LimitExceeded,
    Patcher,
    Signature,
    SignatureBuilder,
    UnsupportedVersion,
    UsageError,
)
from deltabkp.engine._delta import (
    COPY_OP,
    DELTA_HEADER,
    END_OP,
    LITERAL_OP,
    OP_COPY,
    OP_END,
    OP_LITERAL,
)
from deltabkp.engine._rolling import (
    strong_sum,
    weak_sum,
    weak_sums_all_offsets,
    weak_sums_of_blocks,
)


def ops_of(delta: bytes) -> list[tuple[str, int, int]]:
    """Decode a delta into (kind, a, b) tuples: ("C", first, count), ("L", length, 0)."""
    p = DELTA_HEADER.size
    ops: list[tuple[str, int, int]] = []
    while p < len(delta):
        tag = delta[p]
        if tag == OP_COPY:
            _t, first, count = COPY_OP.unpack_from(delta, p)
            ops.append(("C", first, count))
            p += COPY_OP.size
        elif tag == OP_LITERAL:
            _t, length = LITERAL_OP.unpack_from(delta, p)
            ops.append(("L", length, 0))
            p += LITERAL_OP.size + length
        else:
            assert tag == OP_END
            _t, size, _h = END_OP.unpack_from(delta, p)
            ops.append(("E", size, 0))
            p += END_OP.size
    assert p == len(delta)
    return ops


def roundtrip(base: bytes, new: bytes, block_size: int | None = None) -> bytes:
    sig = deltabkp.signature(base, block_size)
    dlt = deltabkp.delta(sig, new)
    assert bytes(deltabkp.patch(base, dlt)) == new
    return dlt


# --- checksums ------------------------------------------------------------------------------


def test_weak_sums_agree_across_methods() -> None:
    import numpy as np

    rng = random.Random(5)
    data = bytes(rng.getrandbits(8) for _ in range(3000))
    arr = np.frombuffer(data, np.uint8)
    for bs in (16, 100, 1024):
        every = weak_sums_all_offsets(arr, bs)
        assert len(every) == len(data) - bs + 1
        for i in (0, 1, 17, len(data) - bs):
            assert int(every[i]) == weak_sum(data[i : i + bs])
        whole = len(data) // bs * bs
        blocks = weak_sums_of_blocks(arr[:whole], bs)
        assert blocks.tolist() == [int(every[i]) for i in range(0, whole, bs)]


def test_weak_sum_is_the_documented_polynomial() -> None:
    data = b"deltabkp"
    expected = sum(b * pow(0x9E3779B1, t, 1 << 32) for t, b in enumerate(data)) % (1 << 32)
    assert weak_sum(data) == expected
    import xxhash

    assert strong_sum(data, 8) == xxhash.xxh3_128(data).digest()[:8]


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 1023, 1024, 1025, 100_000])
def test_identical_is_all_copies(size: int) -> None:
    base = os.urandom(size)
    dlt = roundtrip(base, base, 16 if size < 2000 else None)
    ops = ops_of(dlt)
    if size == 0:
        assert ops == [("E", 0, 0)]
    else:
        sig = Signature.parse(deltabkp.signature(base, 16 if size < 2000 else None))
        assert ops == [("C", 0, sig.block_count), ("E", size, 0)]


def test_empty_and_unrelated() -> None:
    roundtrip(b"", b"")
    roundtrip(b"", b"new data")
    roundtrip(b"old data", b"")
    base, new = os.urandom(300_000), os.urandom(250_000)
    dlt = roundtrip(base, new, 1024)
    assert all(kind in "LE" for kind, _a, _b in ops_of(dlt))
    assert all(a <= 64 * 1024 for kind, a, _b in ops_of(dlt) if kind == "L")


def test_small_edit_costs_about_one_block() -> None:
    base = os.urandom(1 << 20)
    new = base[:300_000] + b"inserted!" + base[300_000:700_000] + base[701_000:]
    dlt = roundtrip(base, new, 1024)
    assert len(dlt) < 3 * 1024 + 200
    sig = Signature.parse(deltabkp.signature(base, 1024))
    copied = sum(b for kind, _a, b in ops_of(dlt) if kind == "C")
    assert copied >= sig.block_count - 4


def test_shifted_and_repeated_blocks() -> None:
    block = os.urandom(64)
    base = block * 50 + os.urandom(100) + block * 3
    roundtrip(base, os.urandom(5) + base, 64)
    roundtrip(base, base[:-7], 64)
    roundtrip(base, block * 200, 64)
    roundtrip(b"\0" * 10_000, b"\0" * 30_001, 64)
    dlt = roundtrip(block * 4, block * 400, 64)
    assert len(dlt) < 2000


def test_short_last_block_matches_at_the_end() -> None:
    base = os.urandom(1000 + 37)
    new = os.urandom(10) + base
    dlt = roundtrip(base, new, 100)
    assert [op for op in ops_of(dlt) if op[0] != "E"] == [("L", 10, 0), ("C", 0, 11)]


def test_streaming_in_random_chunks_matches_whole() -> None:
    rng = random.Random(7)
    base = os.urandom(400_000)
    new = bytearray(base)
    for _ in range(20):
        at = rng.randrange(len(new))
        new[at : at + rng.randrange(3000)] = os.urandom(rng.randrange(3000))
    new = bytes(new)
    sig = deltabkp.signature(base, 512)
    enc = DeltaEncoder(sig)
    parts: list[bytes] = []
    at = 0
    while at < len(new):
        step = rng.choice([1, 7, 100, 4096, 70_000, 300_000])
        parts.append(enc.feed(new[at : at + step]))
        at += step
    parts.append(enc.finish())
    dlt = b"".join(parts)
    assert enc.new_size == len(new)
    assert bytes(deltabkp.patch(base, dlt)) == new
    patcher = Patcher(base)
    out: list[bytes | memoryview] = []
    for i in range(0, len(dlt), 333):
        out += patcher.feed(dlt[i : i + 333])
    patcher.finish()
    assert b"".join(bytes(p) for p in out) == new
    assert patcher.new_size == len(new) and patcher.new_hash == enc.new_hash


def test_builder_in_chunks_equals_whole() -> None:
    data = os.urandom(100_003)
    whole = deltabkp.signature(data, 1000)
    builder = SignatureBuilder(1000)
    for i in range(0, len(data), 777):
        builder.feed(data[i : i + 777])
    assert builder.finish() == whole
    derived = SignatureBuilder(base_size=len(data))
    derived.feed(bytearray(data))
    sig = Signature.parse(derived.finish())
    assert sig.block_size == deltabkp.default_block_size(len(data))
    assert sig.base_size == len(data)
    import blake3

    assert sig.base_hash == blake3.blake3(data).digest()


def test_copy_pieces_are_zero_copy_views() -> None:
    base = os.urandom(10_000)
    dlt = deltabkp.delta(deltabkp.signature(base, 1000), base[:5000] + b"x" + base[5000:])
    pieces = Patcher(base).feed(dlt)
    views = [p for p in pieces if isinstance(p, memoryview)]
    # COPY pieces view the base; literal pieces may view the (immutable) delta
    assert {id(v.obj) for v in views} == {id(base), id(dlt)}
    # ... but never a buffer the caller could change afterwards.
    mutable = bytearray(dlt)
    pieces = Patcher(base).feed(mutable)
    assert all(p.obj is base for p in pieces if isinstance(p, memoryview))


# --- errors -----------------------------------------------------------------------------------


def test_builder_argument_errors() -> None:
    with pytest.raises(UsageError):
        SignatureBuilder()
    with pytest.raises(UsageError):
        SignatureBuilder(3)
    b = SignatureBuilder(16)
    b.finish()
    with pytest.raises(UsageError):
        b.feed(b"x")


def test_signature_errors_are_typed() -> None:
    sig = deltabkp.signature(os.urandom(5000), 1000)
    with pytest.raises(FormatError, match="magic"):
        Signature.parse(b"XXXX" + sig[4:])
    with pytest.raises(UnsupportedVersion):
        Signature.parse(sig[:4] + b"\x02" + sig[5:])
    with pytest.raises(FormatError, match="truncated"):
        Signature.parse(sig[:-1])
    with pytest.raises(FormatError, match="trailing"):
        Signature.parse(sig + b"\0")
    with pytest.raises(FormatError, match="truncated"):
        Signature.parse(sig[:20])
    with pytest.raises(LimitExceeded):
        Signature.parse(sig, max_size=100)


def test_patch_errors_are_typed() -> None:
    base = os.urandom(5000)
    new = base[:2000] + b"zz" + base[2000:]
    dlt = deltabkp.delta(deltabkp.signature(base, 100), new)
    with pytest.raises(IntegrityError, match="5000 bytes"):
        deltabkp.patch(base[:-1], dlt)
    other = bytearray(base)
    other[10] ^= 1
    with pytest.raises(IntegrityError, match="blake3"):
        deltabkp.patch(bytes(other), dlt)
    with pytest.raises(FormatError, match="truncated"):
        deltabkp.patch(base, dlt[:-1])
    with pytest.raises(FormatError, match="trailing"):
        deltabkp.patch(base, dlt + b"E")
    with pytest.raises(FormatError, match="magic"):
        deltabkp.patch(base, b"DBKS" + dlt[4:])
    with pytest.raises(UnsupportedVersion):
        deltabkp.patch(base, dlt[:4] + b"\x09" + dlt[5:])
    bad_copy = dlt[: DELTA_HEADER.size] + COPY_OP.pack(OP_COPY, 49, 2) + dlt[-END_OP.size :]
    with pytest.raises(FormatError, match="outside"):
        deltabkp.patch(base, bad_copy)
    big_lit = dlt[: DELTA_HEADER.size] + LITERAL_OP.pack(OP_LITERAL, 70_000)
    with pytest.raises(FormatError, match="LITERAL"):
        deltabkp.patch(base, big_lit)
    with pytest.raises(IntegrityError):
        Patcher(base, base_hash=b"\0" * 32).feed(dlt)


def test_patch_large_output_and_caller_buffer() -> None:
    base = os.urandom(6 << 20)
    new = base[:1 << 20] + b"edit" + base[(1 << 20) + 100 :] + b"tail"
    dlt = deltabkp.delta(deltabkp.signature(base), new)
    out = deltabkp.patch(base, dlt)  # big: copied and hashed in parallel, a numpy buffer
    assert isinstance(out, memoryview) and out == new and out.format == "B"
    small_new = base[:50_000] + b"x" + base[50_000:100_000]
    small_dlt = deltabkp.delta(deltabkp.signature(base[:100_000]), small_new)
    small = deltabkp.patch(base[:100_000], small_dlt)
    assert isinstance(small, bytes) and small == small_new
    buf = bytearray(len(new) + 10)
    into = deltabkp.patch(base, dlt, out=buf)
    assert isinstance(into, memoryview) and into.obj is buf and into == new
    with pytest.raises(UsageError, match="at least"):
        deltabkp.patch(base, dlt, out=bytearray(10))
    with pytest.raises(UsageError, match="read-only"):
        deltabkp.patch(base, dlt, out=bytes(len(new)))
    # One COPY run: the result is a view into the base itself.
    same = deltabkp.patch(base, deltabkp.delta(deltabkp.signature(base), base))
    assert isinstance(same, memoryview) and same.obj is base


@pytest.mark.parametrize("strong_len", [4, 16])
def test_strong_len_is_recorded_and_used(strong_len: int) -> None:
    base = os.urandom(50_000)
    builder = SignatureBuilder(256, strong_len=strong_len)
    builder.feed(base)
    sig = builder.finish()
    parsed = Signature.parse(sig)
    assert parsed.strong_len == strong_len
    assert len(sig) == 52 + parsed.block_count * (4 + strong_len)
    new = base[:10_000] + b"!" + base[10_000:]
    assert bytes(deltabkp.patch(base, deltabkp.delta(sig, new))) == new
    with pytest.raises(UsageError):
        SignatureBuilder(256, strong_len=3)


def test_encoder_memory_is_bounded_and_output_streams() -> None:
    from deltabkp.engine._delta import SCAN_WAIT

    rng = random.Random(3)
    base = rng.randbytes(2 << 20)
    sig = deltabkp.signature(base, 4096)
    enc = DeltaEncoder(sig)
    bound = 4096 + SCAN_WAIT + 64 * 1024 + 64 * 1024  # block + scan wait + literal + one feed
    emitted = 0
    for i in range(300):  # ~19 MiB of new data: unrelated chunks with copied stretches between
        chunk = rng.randbytes(64 * 1024) if i % 3 else base[(i % 30) * 65536 : (i % 30 + 1) * 65536]
        emitted += len(enc.feed(chunk))
        assert len(enc._buf) <= bound
    assert emitted > 10 << 20  # the delta left as the data came in, not at finish()
    enc.finish()


@pytest.mark.parametrize("base", [b"", b"tiny base"])
def test_first_backup_streams_with_bounded_memory(base: bytes) -> None:
    """Against an empty (or one short block) base every byte is literal, yet it streams."""
    enc = DeltaEncoder(deltabkp.signature(base, 1024))
    rng = random.Random(9)
    parts, data = [], []
    for _ in range(100):
        chunk = rng.randbytes(100_000)
        data.append(chunk)
        parts.append(enc.feed(chunk))
        assert len(enc._buf) < 2 * 64 * 1024 + 100_000
    parts.append(enc.finish())
    assert sum(map(len, parts[:-1])) > 9_000_000
    new = b"".join(data) + base
    assert bytes(deltabkp.patch(base, b"".join(parts))) == b"".join(data)
    # ... and a new file that ends with the short base block still copies it.
    dlt = deltabkp.delta(deltabkp.signature(base, 1024), new)
    assert bytes(deltabkp.patch(base, dlt)) == new
    if base:
        assert dlt[-41 - 9 :].startswith(COPY_OP.pack(OP_COPY, 0, 1))


def test_signature_value_and_base_hash_check() -> None:
    base = os.urandom(20_000)
    raw = deltabkp.signature(base, 512)
    sig = Signature.parse(raw)
    assert sig == Signature.parse(bytearray(raw)) and hash(sig) == hash(Signature.parse(raw))
    assert "weak_sums" not in repr(sig)  # no multi-kilobyte reprs
    new = base[5000:] + base[:5000]
    dlt = deltabkp.delta(sig, new)  # a parsed Signature works as well as bytes
    assert dlt == deltabkp.delta(raw, new)
    patcher = Patcher(memoryview(base), base_hash=sig.base_hash)
    out = patcher.feed(dlt)
    patcher.finish()
    assert patcher.base_hash == sig.base_hash
    assert b"".join(bytes(p) for p in out) == new


def test_output_limit_stops_a_copy_bomb() -> None:
    base = os.urandom(64 * 1024)
    sig = Signature.parse(deltabkp.signature(base, 1024))
    header = DELTA_HEADER.pack(b"DBKD", 1, 1024, len(base), sig.base_hash)
    bomb = header + COPY_OP.pack(OP_COPY, 0, sig.block_count) * 1000  # 64 MiB from 9 KB
    with pytest.raises(LimitExceeded, match="limit of 1000000"):
        deltabkp.patch(base, bomb, max_size=1_000_000)
    patcher = Patcher(base, max_size=len(base))
    patcher.feed(header + COPY_OP.pack(OP_COPY, 0, sig.block_count))
    with pytest.raises(LimitExceeded):
        patcher.feed(COPY_OP.pack(OP_COPY, 0, 1))


def test_big_patch_is_verified_before_it_is_returned() -> None:
    base = os.urandom(6 << 20)
    new = base[:3 << 20] + b"changed" + base[3 << 20 :]
    dlt = deltabkp.delta(deltabkp.signature(base), new)
    bad_hash = dlt[:-32] + bytes(32)
    for kwargs in ({}, {"out": bytearray(len(new))}):
        with pytest.raises(IntegrityError, match="blake3"):
            deltabkp.patch(base, bad_hash, **kwargs)  # type: ignore[arg-type]
        with pytest.raises(FormatError, match="truncated"):
            deltabkp.patch(base, dlt[:-41], **kwargs)  # type: ignore[arg-type]
        assert bytes(deltabkp.patch(base, dlt, **kwargs)) == new  # type: ignore[arg-type]
