"""Peak memory of the engine's streaming classes as the files grow (docs/library.md, memory).

    python benchmarks/bench_stream_memory.py [--sizes-mib 16,64,256] [--chunk-kib 1024]

For each size: random base and new data fed in chunks, never held whole by the measured
step.  ``tracemalloc`` gives the peak of Python and numpy allocations per step (the input
chunks included): ``SignatureBuilder`` over the base, ``DeltaEncoder`` over an unrelated new
file (all literal) and over an identical one (all COPY), and ``Patcher`` over the
all-literal delta, with the base in memory as the patcher's random-access input (an mmap in
real use), pieces dropped as they come.  A benchmark, not a test: it asserts nothing; the
claim "the peak does not grow with the file" is read off the rows.
"""

from __future__ import annotations

import argparse
import tracemalloc
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

import numpy as np

import deltabkp

MIB = 1 << 20
T = TypeVar("T")
P = ParamSpec("P")


def stream(size: int, seed: int, chunk: int) -> Iterator[bytes]:
    rng = np.random.default_rng(seed)
    for at in range(0, size, chunk):
        yield rng.integers(0, 256, min(chunk, size - at), dtype=np.uint8).tobytes()


def peak(step: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> tuple[float, T]:
    """The peak traced allocation (MiB) while ``step(*args)`` runs, and its result."""
    tracemalloc.start()
    try:
        result = step(*args, **kwargs)
        return tracemalloc.get_traced_memory()[1] / MIB, result
    finally:
        tracemalloc.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes-mib", default="16,64,256")
    ap.add_argument("--chunk-kib", type=int, default=1024)
    args = ap.parse_args()
    chunk = args.chunk_kib * 1024
    print(f"{'size':>8} {'signature':>10} {'sig peak':>9} {'delta unrel':>12} "
          f"{'delta same':>11} {'patch':>8}   (peaks in MiB, tracemalloc)")
    for size in (int(s) * MIB for s in args.sizes_mib.split(",")):
        p_sig, sig = peak(build_signature, size, chunk)
        # The delta is the caller's, not the encoder's: measured as streamed and dropped.
        p_unrel, _ = peak(encode_drop, sig, size, 2, chunk)
        p_same, _ = peak(encode_drop, sig, size, 1, chunk)
        base = b"".join(stream(size, 1, chunk))
        encoder = deltabkp.DeltaEncoder(sig)
        literal_delta = b"".join([*map(encoder.feed, stream(size, 2, chunk)), encoder.finish()])
        p_patch, _ = peak(patch_drop, base, literal_delta, chunk)
        print(f"{size // MIB:>5} MiB {len(sig):>10,} {p_sig:>9.1f} {p_unrel:>12.1f} "
              f"{p_same:>11.1f} {p_patch:>8.1f}")
        del base, literal_delta


def build_signature(size: int, chunk: int) -> bytes:
    builder = deltabkp.SignatureBuilder(base_size=size)
    for part in stream(size, 1, chunk):
        builder.feed(part)
    return builder.finish()


def encode_drop(sig: bytes, size: int, seed: int, chunk: int) -> int:
    """Stream a delta and drop it as it comes (as a sender writing to a socket would)."""
    encoder = deltabkp.DeltaEncoder(sig)
    sent = sum(len(encoder.feed(part)) for part in stream(size, seed, chunk))
    return sent + len(encoder.finish())


def patch_drop(base: bytes, delta: bytes, chunk: int) -> int:
    """Apply a delta fed in chunks, dropping the output pieces as they come."""
    patcher = deltabkp.Patcher(base)
    n = 0
    for at in range(0, len(delta), chunk):
        n += sum(len(piece) for piece in patcher.feed(delta[at : at + chunk]))
    patcher.finish()
    return n


if __name__ == "__main__":
    main()
