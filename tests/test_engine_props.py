"""Delta engine properties under hypothesis: round trips for any input and any chunking, and
fuzzed signatures/deltas that may only raise the library's typed errors (never a wrong output).
"""

from __future__ import annotations

import random

from hypothesis import assume, given, settings
from hypothesis import strategies as st

import deltabkp
from deltabkp import (
    DeltaEncoder,
    FormatError,
    IntegrityError,
    Patcher,
    Signature,
    SignatureBuilder,
)

block_sizes = st.sampled_from([16, 17, 31, 64, 100])


@st.composite
def base_and_new(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A base and a new file related in one of the ways that matter to a delta."""
    alphabet = draw(st.lists(st.binary(min_size=1, max_size=120), min_size=1, max_size=4))
    base = draw(
        st.one_of(
            st.binary(max_size=3000),
            # repeated blocks: base built from a few pieces, many times over
            st.lists(st.sampled_from(alphabet), max_size=40).map(b"".join),
        )
    )
    kind = draw(
        st.sampled_from(["identical", "unrelated", "edited", "shifted", "repeated", "cut"])
    )
    if kind == "identical":
        new = base
    elif kind == "unrelated":
        new = draw(st.binary(max_size=3000))
    elif kind == "shifted":
        new = draw(st.binary(min_size=1, max_size=50)) + base + draw(st.binary(max_size=50))
    elif kind == "repeated":
        new = b"".join(draw(st.lists(st.sampled_from([*alphabet, base[:64] or b"x"]), max_size=60)))
    elif kind == "cut":
        a = draw(st.integers(0, len(base)))
        b = draw(st.integers(a, len(base)))
        new = base[:a] + base[b:]
    else:
        new = base
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(new)))
            cut = draw(st.integers(0, 80))
            new = new[:at] + draw(st.binary(max_size=80)) + new[at + cut :]
    return base, new


def chunked(data: bytes, sizes: list[int]) -> list[bytes]:
    out: list[bytes] = []
    at = 0
    for size in sizes:
        if at >= len(data):
            break
        out.append(data[at : at + size])
        at += size
    if at < len(data):
        out.append(data[at:])
    return out


chunk_sizes = st.lists(st.integers(1, 700), max_size=30)


@given(base_and_new(), block_sizes)
def test_roundtrip_whole(pair: tuple[bytes, bytes], block_size: int) -> None:
    base, new = pair
    sig = deltabkp.signature(base, block_size)
    dlt = deltabkp.delta(sig, new)
    assert bytes(deltabkp.patch(base, dlt)) == new


@given(base_and_new(), block_sizes, chunk_sizes, chunk_sizes, chunk_sizes)
def test_roundtrip_streamed(
    pair: tuple[bytes, bytes],
    block_size: int,
    base_chunks: list[int],
    new_chunks: list[int],
    delta_chunks: list[int],
) -> None:
    base, new = pair
    builder = SignatureBuilder(block_size)
    for piece in chunked(base, base_chunks):
        builder.feed(piece)
    sig = builder.finish()
    assert sig == deltabkp.signature(base, block_size)
    enc = DeltaEncoder(sig)
    parts = [enc.feed(piece) for piece in chunked(new, new_chunks)]
    parts.append(enc.finish())
    dlt = b"".join(parts)
    # Chunking may move op boundaries (literals split differently), never the result.
    patcher = Patcher(base)
    out: list[bytes | memoryview] = []
    for piece in chunked(dlt, delta_chunks):
        out += patcher.feed(piece)
    patcher.finish()
    assert b"".join(bytes(p) for p in out) == new
    assert patcher.new_size == enc.new_size == len(new)
    assert patcher.new_hash == enc.new_hash


@given(base_and_new(), block_sizes)
def test_byte_at_a_time(pair: tuple[bytes, bytes], block_size: int) -> None:
    base, new = pair
    assume(len(new) < 600)
    sig = deltabkp.signature(base, block_size)
    enc = DeltaEncoder(sig)
    dlt = b"".join([enc.feed(new[i : i + 1]) for i in range(len(new))]) + enc.finish()
    patcher = Patcher(base)
    out: list[bytes | memoryview] = []
    for i in range(len(dlt)):
        out += patcher.feed(dlt[i : i + 1])
    patcher.finish()
    assert b"".join(bytes(p) for p in out) == new


# --- fuzzing ----------------------------------------------------------------------------------


def _mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(4)
        if op == 0 and buf:
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            at = rng.randrange(len(buf))
            del buf[at : at + rng.randrange(1, 9)]
        elif op == 2:
            at = rng.randrange(len(buf) + 1)
            buf[at:at] = rng.randbytes(rng.randrange(1, 9))
        elif buf:
            buf = buf[: rng.randrange(len(buf))]
    return bytes(buf)


@given(st.binary(max_size=300))
def test_fuzz_signature_random_bytes(data: bytes) -> None:
    for blob in (data, b"DBKS" + data, b"DBKS\x01" + data):
        try:
            Signature.parse(blob)
        except FormatError:
            pass


@given(st.binary(max_size=300))
def test_fuzz_delta_random_bytes(data: bytes) -> None:
    base = b"0123456789abcdef" * 10
    for blob in (data, b"DBKD" + data, b"DBKD\x01" + data):
        try:
            out = deltabkp.patch(base, blob)
        except (FormatError, IntegrityError):
            continue
        raise AssertionError(f"random delta accepted: {bytes(out)!r}")


@settings(max_examples=200)
@given(base_and_new(), block_sizes, st.integers(0, 2**32))
def test_fuzz_mutated_signature_never_gives_wrong_output(
    pair: tuple[bytes, bytes], block_size: int, seed: int
) -> None:
    base, new = pair
    sig = _mutate(deltabkp.signature(base, block_size), random.Random(seed))
    try:
        dlt = deltabkp.delta(sig, new)
    except FormatError:
        return
    try:
        out = deltabkp.patch(base, dlt)
    except IntegrityError:
        return  # e.g. a mutated strong sum: caught by the whole-file hash
    assert bytes(out) == new


@settings(max_examples=200)
@given(base_and_new(), block_sizes, st.integers(0, 2**32), st.integers(1, 64))
def test_fuzz_mutated_delta_never_gives_wrong_output(
    pair: tuple[bytes, bytes], block_size: int, seed: int, step: int
) -> None:
    base, new = pair
    dlt = _mutate(deltabkp.delta(deltabkp.signature(base, block_size), new), random.Random(seed))
    patcher = Patcher(base)
    out: list[bytes | memoryview] = []
    try:
        for i in range(0, len(dlt), step):
            out += patcher.feed(dlt[i : i + step])
        patcher.finish()
    except (FormatError, IntegrityError):
        return
    # A mutation that survives verification must have left the output intact.
    assert b"".join(bytes(p) for p in out) == new


@given(
    st.integers(4, 40).flatmap(lambda n: st.binary(min_size=n * 64, max_size=n * 64 + 63)),
    st.binary(min_size=1, max_size=100),
    st.integers(0, 2**32),
)
def test_everything_unchanged_is_found(base: bytes, insert: bytes, seed: int) -> None:
    """After an insertion anywhere, the delta is the insertion plus at most two blocks."""
    rng = random.Random(seed)
    # Unique blocks, so that the only good match for each is its own position.
    base = bytes(b ^ rng.getrandbits(8) for b in base)
    at = rng.randrange(len(base) + 1)
    new = base[:at] + insert + base[at:]
    dlt = deltabkp.delta(deltabkp.signature(base, 64), new)
    assert bytes(deltabkp.patch(base, dlt)) == new
    overhead = 49 + 41 + 3 * (5 + 9)  # header, END, a few COPY/LITERAL headers
    assert len(dlt) <= overhead + len(insert) + 2 * 64


@settings(max_examples=40)
@given(
    st.integers(0, 2**32),
    st.sampled_from([16, 64, 500, 4096]),
    st.lists(st.integers(1, 50_000), min_size=1, max_size=20),
)
def test_roundtrip_streamed_large(seed: int, block_size: int, sizes: list[int]) -> None:
    """Inputs big enough that the encoder scans before finish() (the in-between path)."""
    rng = random.Random(seed)
    base = rng.randbytes(rng.randrange(0, 300_000))
    new = bytearray(base)
    for _ in range(rng.randrange(0, 30)):
        at = rng.randrange(len(new) + 1)
        kind = rng.randrange(3)
        if kind == 0:
            new[at:at] = rng.randbytes(rng.randrange(1, 3000))
        elif kind == 1:
            del new[at : at + rng.randrange(1, 3000)]
        else:
            src = rng.randrange(len(base) + 1)
            new[at:at] = base[src : src + rng.randrange(1, 20_000)]  # moved data
    enc = DeltaEncoder(deltabkp.signature(base, block_size))
    parts = [enc.feed(piece) for piece in chunked(bytes(new), sizes * 30)]
    parts.append(enc.finish())
    dlt = b"".join(parts)
    assert bytes(deltabkp.patch(base, dlt)) == new
    whole = deltabkp.delta(deltabkp.signature(base, block_size), bytes(new))
    # Streaming may split literals differently but finds the same matches.
    assert abs(len(dlt) - len(whole)) <= 64 * len(parts)
