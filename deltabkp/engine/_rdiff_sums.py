"""librsync's block checksums (rdiff formats), vectorised with numpy.

Weak sums, as librsync defines them (src/rabinkarp.h, src/rollsum.h):

* RabinKarp: ``H = M**L + sum(x[j] * M**(L-1-j))`` mod 2**32 (seed 1, ``M = 0x08104225``).
  ``M`` is odd, so with ``P = M**-1`` the sum of every window comes from one prefix sum
  ``S[k] = sum(x[j] * P**j, j < k)``: ``H(i) = M**L + M**(L-1+i) * (S[i+L] - S[i])``.
* rollsum (rsync's Adler-like sum, bytes offset by 31): ``s1 = sum(x[j] + 31)``,
  ``s2 = sum((L-j) * (x[j] + 31))``, digest ``(s2 mod 2**16) << 16 | (s1 mod 2**16)``.  Both
  come from prefix sums of ``x`` and ``j * x``.

All arithmetic is uint32 with wrap-around (exact modulo 2**32, hence modulo 2**16).

Strong sums: BLAKE2b with a 32-byte digest (hashlib) or MD4 (pycryptodome: OpenSSL 3 builds
of hashlib no longer offer MD4), truncated to the signature's ``strong_len``.  Hashing many
blocks splits the work with one helper thread: both hashes release the GIL, and the strong
sums are most of the cost of an rdiff signature or delta.

Invariants: power tables are indexed from the start of the buffer being hashed, so results
never depend on chunk boundaries; the helper thread only reads the caller's buffer and is
joined before returning.
"""

from __future__ import annotations

import enum
import hashlib
import threading
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from deltabkp.engine._rolling import _grow

__all__ = [
    "SignatureKind",
    "block_sums",
    "strong_fn",
    "strong_sums_of_blocks",
    "weak_sum",
    "weak_sums_all_offsets",
    "weak_sums_of_blocks",
    "weak_sums_of_suffixes",
]

U32 = npt.NDArray[np.uint32]
U8 = npt.NDArray[np.uint8]


class SignatureKind(enum.IntEnum):
    """An rdiff signature's magic: which weak and strong sums it holds (librsync.h)."""

    MD4 = 0x72730136  # rollsum + MD4 (librsync < 1.0)
    BLAKE2 = 0x72730137  # rollsum + BLAKE2b
    RK_MD4 = 0x72730146  # RabinKarp + MD4
    RK_BLAKE2 = 0x72730147  # RabinKarp + BLAKE2b: what rdiff writes by default

    @property
    def rabinkarp(self) -> bool:
        return self & 0xF0 == 0x40

    @property
    def blake2(self) -> bool:
        return self & 0x0F == 0x07

    @property
    def max_strong_len(self) -> int:
        return 32 if self.blake2 else 16

    @property
    def label(self) -> str:
        return f"{'rabinkarp' if self.rabinkarp else 'rollsum'} + {'BLAKE2' if self.blake2 else 'MD4'}"


M = 0x08104225
_P = pow(M, -1, 1 << 32)
CHAR_OFFSET = 31

_lock = threading.Lock()
# (M**j, M**-j, j) for j < len, grown on demand, read-only, swapped as one tuple.
_tables: tuple[U32, U32, U32] = (
    np.ones(1, np.uint32), np.ones(1, np.uint32), np.zeros(1, np.uint32)
)


def _powers(n: int) -> tuple[U32, U32, U32]:
    global _tables
    q, p, r = _tables
    if len(q) < n:
        with _lock:
            q, p, r = _tables
            if len(q) < n:
                size = max(n, 2 * len(q))
                ramp = np.arange(size, dtype=np.uint32)
                ramp.setflags(write=False)
                _tables = q, p, r = _grow(q, M, size), _grow(p, _P, size), ramp
    return q[:n], p[:n], r[:n]


def _u32(x: int) -> np.uint32:
    return np.uint32(x & 0xFFFFFFFF)


def weak_sum(kind: SignatureKind, block: bytes | bytearray | memoryview) -> int:
    """The weak sum of one block of any length."""
    x = np.frombuffer(block, np.uint8)
    n = len(x)
    if kind.rabinkarp:
        q, _p, _r = _powers(n + 1)
        return (int(q[n]) + int(np.multiply(x, q[:n][::-1], dtype=np.uint32).sum(
            dtype=np.uint32))) & 0xFFFFFFFF
    s1 = int(x.sum(dtype=np.uint64)) + CHAR_OFFSET * n
    _q, _p, r = _powers(n + 1)
    s2 = int(np.multiply(x, r[1:][::-1], dtype=np.uint32).sum(dtype=np.uint32))
    s2 += CHAR_OFFSET * n * (n + 1) // 2
    return ((s2 & 0xFFFF) << 16) | (s1 & 0xFFFF)


def weak_sums_of_blocks(kind: SignatureKind, data: U8, block_size: int) -> U32:
    """Weak sums of consecutive whole blocks; ``len(data)`` must be a multiple of the size."""
    bs = block_size
    nblocks = len(data) // bs
    q, _p, r = _powers(bs + 1)
    weights = q[:bs][::-1].copy() if kind.rabinkarp else r[1:][::-1].copy()
    out = np.empty(nblocks, np.uint32)
    s1 = None if kind.rabinkarp else np.empty(nblocks, np.uint32)
    per = max(1, (256 * 1024) // bs)  # sub-chunks keep the uint32 temporary in cache
    tmp = np.empty((min(per, nblocks), bs), np.uint32)
    for first in range(0, nblocks, per):
        last = min(nblocks, first + per)
        blocks = data[first * bs : last * bs].reshape(last - first, bs)
        t = tmp[: last - first]
        np.multiply(blocks, weights, out=t)
        np.add.reduce(t, axis=1, dtype=np.uint32, out=out[first:last])
        if s1 is not None:
            np.add.reduce(blocks, axis=1, dtype=np.uint32, out=s1[first:last])
    if s1 is None:
        out += q[bs]
        return out
    s1 += _u32(CHAR_OFFSET * bs)
    out += _u32(CHAR_OFFSET * bs * (bs + 1) // 2)
    np.left_shift(out, 16, out=out)
    np.bitwise_or(out, s1 & np.uint32(0xFFFF), out=out)
    return out


def weak_sums_all_offsets(kind: SignatureKind, data: U8, block_size: int) -> U32:
    """Weak sum of the window ``data[i:i+block_size]`` for every ``i`` where it fits."""
    m = len(data)
    bs = block_size
    count = m - bs + 1
    if count <= 0:
        return np.empty(0, np.uint32)
    q, p, r = _powers(m + 1)
    s = np.empty(m + 1, np.uint32)
    s[0] = 0
    if kind.rabinkarp:
        np.multiply(data, p[:m], out=s[1:])
        np.cumsum(s[1:], out=s[1:])
        w = np.subtract(s[bs:], s[:count])
        np.multiply(w, q[bs - 1 : bs - 1 + count], out=w)
        w += q[bs]
        return w
    np.cumsum(data, dtype=np.uint32, out=s[1:])
    d1 = np.subtract(s[bs:], s[:count])
    np.multiply(data, r[:m], out=s[1:])
    np.cumsum(s[1:], out=s[1:])
    # s2 = (i + L) * d1 - (B[i+L] - B[i]) + 31 * L * (L + 1) / 2
    s2 = np.multiply(d1, r[bs : bs + count])
    s2 -= s[bs:]
    s2 += s[:count]
    s2 += _u32(CHAR_OFFSET * bs * (bs + 1) // 2)
    d1 += _u32(CHAR_OFFSET * bs)
    np.left_shift(s2, 16, out=s2)
    np.bitwise_or(s2, d1 & np.uint32(0xFFFF), out=s2)
    return s2


def weak_sums_of_suffixes(kind: SignatureKind, data: U8) -> U32:
    """``out[t-1]`` is the weak sum of ``data[-t:]``, for t = 1..len(data)."""
    n = len(data)
    if n == 0:
        return np.empty(0, np.uint32)
    q, _p, r = _powers(n + 1)
    rev = data[::-1]
    if kind.rabinkarp:
        out = np.multiply(rev, q[:n], dtype=np.uint32)
        np.cumsum(out, out=out)
        out += q[1 : n + 1]
        return out
    s1 = np.cumsum(rev, dtype=np.uint32)
    s2 = np.multiply(rev, r[1 : n + 1], dtype=np.uint32)
    np.cumsum(s2, out=s2)
    t = r[1 : n + 1].astype(np.uint64)
    s1 += (t * CHAR_OFFSET).astype(np.uint32)
    s2 += (t * (t + 1) // 2 * CHAR_OFFSET).astype(np.uint32)
    np.left_shift(s2, 16, out=s2)
    np.bitwise_or(s2, s1 & np.uint32(0xFFFF), out=s2)
    return s2


def _blake2(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=32).digest()


def _md4(data: bytes | bytearray | memoryview) -> bytes:
    # Imported on first use: only the legacy MD4 signatures need pycryptodome.
    from Crypto.Hash import MD4

    return MD4.new(data).digest()


def strong_fn(kind: SignatureKind) -> Callable[[bytes | bytearray | memoryview], bytes]:
    """The full (untruncated) strong hash of a signature kind."""
    return _blake2 if kind.blake2 else _md4


#: Below this many bytes a helper thread costs more than it saves.
PARALLEL_MIN = 512 * 1024
#: hashlib releases the GIL only while hashing at least 2 KiB at once: smaller blocks would
#: just take turns on it.
GIL_FREE_MIN = 2048


def strong_sums_of_blocks(
    kind: SignatureKind, mv: memoryview, block_size: int, strong_len: int
) -> bytes:
    """Truncated strong sums of the whole blocks of ``mv``, concatenated."""
    return _split_strong(kind, mv, block_size, strong_len, 0.5, None)


def block_sums(
    kind: SignatureKind, data: U8, mv: memoryview, block_size: int, strong_len: int
) -> tuple[U32, bytes]:
    """Weak and truncated strong sums of the whole blocks of ``mv`` (``data`` is the same
    bytes as a numpy array).  The weak sums are computed beside the helper thread's strong
    sums, so that thread takes the bigger share of the strong ones."""
    weak: list[U32] = []
    strong = _split_strong(
        kind, mv, block_size, strong_len, 0.65,
        lambda: weak.append(weak_sums_of_blocks(kind, data, block_size)),
    )
    if not weak:  # too small to split: nothing ran beside
        weak.append(weak_sums_of_blocks(kind, data, block_size))
    return weak[0], strong


def _split_strong(
    kind: SignatureKind, mv: memoryview, block_size: int, strong_len: int,
    share: float, beside: Callable[[], None] | None,
) -> bytes:
    """Strong sums of the whole blocks of ``mv``: a helper thread hashes the first ``share``
    of them while this one runs ``beside`` (if any), then hashes the rest."""
    h, bs, sl = strong_fn(kind), block_size, strong_len
    n = len(mv) // bs

    def run(a: int, b: int) -> bytes:
        return b"".join([h(mv[o : o + bs])[:sl] for o in range(a * bs, b * bs, bs)])

    if n < 2 or n * bs < PARALLEL_MIN or bs < GIL_FREE_MIN:
        return run(0, n)
    cut = max(1, min(n - 1, int(n * share)))
    result: list[bytes] = []
    worker = threading.Thread(
        target=lambda: result.append(run(0, cut)), name="deltabkp-rdiff-strong"
    )
    worker.start()
    try:
        if beside is not None:
            beside()
        second = run(cut, n)
    finally:
        worker.join()
    # An empty result means the worker died: redo its part here rather than guess.
    return (result[0] if result else run(0, cut)) + second
