"""Weak and strong block checksums of the delta engine, vectorised with numpy.

Weak sum (id 1, "poly32"): for a block ``x[0..L)``, ``W = sum(x[t] * Q**t) mod 2**32`` with the
odd constant ``Q`` below.  Because ``Q`` is odd it is invertible mod 2**32, so the weak sum of
*every* window of a buffer comes out of one wrap-around prefix sum:
``S[k] = sum(x[j] * Q**j, j < k)`` and ``W(i) = Q**-i * (S[i+L] - S[i])``.  All arithmetic is
uint32 with wrap-around, which numpy does natively; no Python loop touches single bytes.

Strong sum (id 1, "xxh3-128"): the first ``strong_len`` bytes of the canonical (big-endian)
XXH3-128 digest of the block.  It only confirms weak candidates; the whole-file blake3 in the
delta's END record is what makes a patched file trustworthy.

Invariants: exponent tables are indexed from the start of the buffer being hashed, so the
results never depend on where a caller's chunk boundaries fall.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import blake3
import numpy as np
import numpy.typing as npt
import xxhash

__all__ = [
    "WEAK_ID_POLY32",
    "STRONG_ID_XXH3_128",
    "Q",
    "weak_sum",
    "weak_sums_of_blocks",
    "weak_sums_all_offsets",
    "strong_sum",
    "WholeHash",
    "hash_beside",
]

U32 = npt.NDArray[np.uint32]
U8 = npt.NDArray[np.uint8]

WEAK_ID_POLY32 = 1
STRONG_ID_XXH3_128 = 1

#: Odd multiplier of the polynomial weak sum (the 32-bit golden-ratio constant).
Q = 0x9E3779B1
_P = pow(Q, -1, 1 << 32)  # Q**-1 mod 2**32

_strong = xxhash.xxh3_128_digest

# Powers Q**j and P**j (j < len), grown on demand and shared read-only by every encoder; one
# tuple so that a reader always sees a matching pair, even while another thread grows them.
_lock = threading.Lock()
_tables: tuple[U32, U32] = (np.ones(1, np.uint32), np.ones(1, np.uint32))


def _grow(table: U32, base: int, n: int) -> U32:
    out = np.empty(n, np.uint32)
    have = len(table)
    out[:have] = table
    # Doubling: out[m:2m] = out[:m] * base**m keeps every step vectorised.
    while have < n:
        step = min(have, n - have)
        mult = np.uint32(pow(base, have, 1 << 32))
        np.multiply(out[:step], mult, out=out[have : have + step])
        have += step
    out.setflags(write=False)
    return out


def _powers(n: int) -> tuple[U32, U32]:
    """Return (Q**j, Q**-j) for j < n (views of shared, read-only tables)."""
    global _tables
    q, p = _tables
    if len(q) < n:
        with _lock:
            q, p = _tables
            if len(q) < n:
                size = max(n, 2 * len(q))
                _tables = q, p = _grow(q, Q, size), _grow(p, _P, size)
    return q[:n], p[:n]


def weak_sum(block: bytes | memoryview) -> int:
    """Weak sum of one block of any length (used for a base's short last block)."""
    x = np.frombuffer(block, np.uint8)
    if len(x) == 0:
        return 0
    q, _ = _powers(len(x))
    return int(np.multiply(x, q, dtype=np.uint32).sum(dtype=np.uint32))


def weak_sums_of_blocks(data: U8, block_size: int) -> U32:
    """Weak sums of consecutive whole blocks; ``len(data)`` must be a multiple of the size."""
    q, _ = _powers(block_size)
    nblocks = len(data) // block_size
    out = np.empty(nblocks, np.uint32)
    # Sub-chunks of ~256 KiB keep the uint32 temporary in cache.
    per = max(1, (256 * 1024) // block_size)
    tmp = np.empty((min(per, nblocks), block_size), np.uint32)
    for first in range(0, nblocks, per):
        last = min(nblocks, first + per)
        blocks = data[first * block_size : last * block_size].reshape(last - first, block_size)
        t = tmp[: last - first]
        np.multiply(blocks, q, out=t)
        np.add.reduce(t, axis=1, dtype=np.uint32, out=out[first:last])
    return out


def weak_sums_all_offsets(
    data: U8, block_size: int, scratch: tuple[U32, U32] | None = None
) -> U32:
    """Weak sum of the window ``data[i:i+block_size]`` for every ``i`` where it fits.

    ``scratch`` is two uint32 arrays, each at least ``len(data) + 1`` long, reused for the
    prefix sums and the result (which is then a view into the second): fresh multi-megabyte
    temporaries would cost more in page faults than the arithmetic itself.
    """
    m = len(data)
    count = m - block_size + 1
    if count <= 0:
        return np.empty(0, np.uint32)
    q, p = _powers(m)
    if scratch is None:
        s, w = np.empty(m + 1, np.uint32), np.empty(count, np.uint32)
    else:
        s, w = scratch[0][: m + 1], scratch[1][:count]
    s[0] = 0
    np.multiply(data, q, out=s[1:])
    np.cumsum(s[1:], out=s[1:])
    np.subtract(s[block_size:], s[:count], out=w)
    np.multiply(w, p[:count], out=w)
    return w


def strong_sum(block: bytes | bytearray | memoryview, strong_len: int) -> bytes:
    """Strong sum of one block: the first ``strong_len`` bytes of its XXH3-128 digest."""
    return _strong(block)[:strong_len]


class WholeHash:
    """blake3 of a stream: big updates use every core, small ones are batched first.

    blake3's multi-threaded update pays off from ~256 KiB and costs more than it saves on
    small pieces, so pieces below that are staged in one buffer and hashed in bulk.
    """

    BIG = 256 * 1024

    def __init__(self) -> None:
        self._h = blake3.blake3(max_threads=blake3.blake3.AUTO)
        self._stage = bytearray()

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) >= self.BIG:
            if self._stage:
                self._h.update(self._stage)
                self._stage.clear()
            self._h.update(data)
        else:
            self._stage += data
            if len(self._stage) >= self.BIG:
                self._h.update(self._stage)
                self._stage.clear()

    def digest(self) -> bytes:
        if self._stage:
            self._h.update(self._stage)
            self._stage.clear()
        return bytes(self._h.digest())


#: Whole buffers at least this big are hashed in a worker thread beside the main work.
BACKGROUND_HASH_MIN = 4 << 20


def hash_beside(data: memoryview) -> Callable[[], bytes]:
    """Start hashing ``data`` with blake3; return a function that waits for the digest.

    blake3 releases the GIL, so on a big buffer a worker thread hashes on one core while
    the caller scans or sums on the other; small buffers are hashed at once.  The caller
    must keep ``data`` alive and unchanged until it has the digest.
    """
    if len(data) < BACKGROUND_HASH_MIN:
        digest = bytes(blake3.blake3(data).digest())
        return lambda: digest
    result: list[bytes] = []

    def work() -> None:
        result.append(bytes(blake3.blake3(data).digest()))

    worker = threading.Thread(target=work, name="deltabkp-blake3", daemon=True)
    worker.start()

    def wait() -> bytes:
        worker.join()
        if not result:  # the worker died: recompute rather than report a wrong hash
            result.append(bytes(blake3.blake3(data).digest()))
        return result[0]

    return wait
