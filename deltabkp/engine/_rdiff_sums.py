"""librsync's block checksums (rdiff formats), vectorised with numpy, hashed on several cores.

Weak sums, as librsync defines them (src/rabinkarp.h, src/rollsum.h):

* RabinKarp: ``H = M**L + sum(x[j] * M**(L-1-j))`` mod 2**32 (seed 1, ``M = 0x08104225``).
  ``M`` is odd, so with ``P = M**-1`` the sum of every window comes from one prefix sum
  ``S[k] = sum(x[j] * P**j, j < k)``: ``H(i) = M**L + M**(L-1+i) * (S[i+L] - S[i])``.
* rollsum (rsync's Adler-like sum, bytes offset by 31): ``s1 = sum(x[j] + 31)``,
  ``s2 = sum((L-j) * (x[j] + 31))``, digest ``(s2 mod 2**16) << 16 | (s1 mod 2**16)``.  Both
  come from prefix sums of ``x`` and ``j * x``.

All arithmetic is uint32 with wrap-around (exact modulo 2**32, hence modulo 2**16).

Strong sums: BLAKE2b with a 32-byte digest (``_blake2``: libsodium or libb2 when found,
else hashlib) or MD4 (pycryptodome: OpenSSL 3 builds of hashlib no longer offer MD4),
truncated to the signature's ``strong_len``.  They are most of the cost of an rdiff signature
or delta, so many blocks are cut into tasks of a few hundred KiB that the calling thread and
up to ``threads`` helpers of one shared pool take in turn (``run_tasks``): every hash call
releases the GIL (hashlib's on blocks of 2 KiB and more), and one task per few dozen blocks
amortises the hand-off.

Invariants: power tables are indexed from the start of the buffer being hashed, so results
never depend on chunk boundaries or on how tasks fall to threads; helpers only read the
caller's buffer, and ``run_tasks`` returns only once no helper is still running one of its
tasks (a helper that has not started yet is cancelled, never waited for, so a busy or absent
pool costs speed, never progress).
"""

from __future__ import annotations

import enum
import functools
import itertools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from deltabkp.engine._blake2 import blake2b_256, blake2b_blocks
from deltabkp.engine._rolling import _grow
from deltabkp.errors import UsageError

__all__ = [
    "SignatureKind",
    "block_sums",
    "check_threads",
    "default_threads",
    "matching_blocks",
    "run_in_order",
    "run_tasks",
    "strong_fn",
    "weak_sum",
    "weak_sums_all_offsets",
    "weak_sums_of_blocks",
    "weak_sums_of_suffixes",
]

U32 = npt.NDArray[np.uint32]
U8 = npt.NDArray[np.uint8]
T = TypeVar("T")


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


@functools.lru_cache(maxsize=16)
def _block_weights(rabinkarp: bool, bs: int) -> U32:
    # Cached: a delta sums a few hundred KiB of blocks at a time, hundreds of times.
    q, _p, r = _powers(bs + 1)
    weights = q[:bs][::-1].copy() if rabinkarp else r[1:][::-1].copy()
    weights.setflags(write=False)
    return weights


def weak_sums_of_blocks(kind: SignatureKind, data: U8, block_size: int) -> U32:
    """Weak sums of consecutive whole blocks; ``len(data)`` must be a multiple of the size."""
    bs = block_size
    nblocks = len(data) // bs
    blocks = data[: nblocks * bs].reshape(nblocks, bs)
    q, _p, _r = _powers(bs + 1)
    weights = _block_weights(kind.rabinkarp, bs)
    out = np.empty(nblocks, np.uint32)
    # einsum's sum of products casts each byte to uint32 in small buffers and wraps modulo
    # 2**32: no block-sized uint32 temporary, ~25% less time than multiply + reduce.
    np.einsum("ij,j->i", blocks, weights, dtype=np.uint32, casting="unsafe", out=out)
    if kind.rabinkarp:
        out += q[bs]
        return out
    s1 = np.einsum("ij->i", blocks, dtype=np.uint32, casting="unsafe")
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


def _md4(data: bytes | bytearray | memoryview) -> bytes:
    # Imported on first use: only the legacy MD4 signatures need pycryptodome.
    from Crypto.Hash import MD4

    return MD4.new(data).digest()


def strong_fn(kind: SignatureKind) -> Callable[[bytes | bytearray | memoryview], bytes]:
    """The full (untruncated) strong hash of a signature kind."""
    return blake2b_256 if kind.blake2 else _md4


#: hashlib releases the GIL only while hashing at least 2 KiB at once, and the ctypes loop
#: holds it ~1.2 us per block whatever its size (~3 us of hashing at 2 KiB; the C loop,
#: ``_blake2.loop() == "C"``, releases it for a whole task): smaller blocks would mostly take
#: turns on it, so they are hashed in the calling thread.
GIL_FREE_MIN = 2048
#: Bytes of blocks per task: a hand-off costs ~10-50 us, a task of 256 KiB ~0.4 ms of BLAKE2b,
#: and a few tasks per thread let a thread that was descheduled fall behind without the
#: others waiting for it.
TASK_BYTES = 256 * 1024
#: Bytes of blocks per task while a delta confirms a run of matching blocks: a run that ends
#: inside a task wastes the rest of the task's sums (strong ones, when they confirm alone)
#: and whatever the helpers have just claimed, so these are smaller than a signature's (the
#: 30 MB archive pair hashes 5,708 blocks on one thread and 5,780 on two for 5,552 new ones;
#: 48 KiB and 256 KiB measured no different).
RUN_TASK_BYTES = 96 * 1024
#: Strong sums (BLAKE2b) at least this long confirm a block of a run on their own (2**-128).
STRONG_ONLY_MIN = 16
#: Below this many bytes one thread hashes them all (~0.2 ms of BLAKE2b: a hand-off would
#: cost a good part of what it saves).
PARALLEL_MIN = 128 * 1024
#: Helper threads by default: one per further core, at most this many (BLAKE2b scales to
#: about as many threads as cores, and the pool's threads are shared by every caller).
MAX_THREADS = 3


def default_threads() -> int:
    """Helper threads that hash beside the caller by default: the usable cores less one, at
    most ``MAX_THREADS``."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min(MAX_THREADS, (cores or 1) - 1))


def check_threads(threads: int | None) -> int:
    """``threads`` as given (None: ``default_threads()``), checked."""
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise UsageError(f"threads must be an integer >= 0, got {threads!r}")
    return threads


_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _get_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            # Threads start on demand and stay for the next call: a delta confirms its runs
            # in hundreds of small rounds, and a fresh thread per round costs more than that.
            _pool = ThreadPoolExecutor(MAX_THREADS, thread_name_prefix="deltabkp-rdiff")
        return _pool


def _forget_pool() -> None:
    # A forked child has none of the parent's threads: the next call starts a fresh pool.
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _drain(
    fn: Callable[[int], tuple[T, bool]], count: int, results: list[tuple[T, bool] | None],
    claim: itertools.count[int], stop: list[int],
) -> None:
    # Indices are claimed in order (count's next() is atomic under the GIL), so every index
    # below the first one that says "stop" is claimed before it and never skipped.  ``stop``
    # only ever holds indices that said so: racing writers may leave a later one there,
    # which costs a skipped skip, never a missing result.
    while (i := next(claim)) < count and i <= stop[0]:
        results[i] = got = fn(i)
        if got[1] and i < stop[0]:
            stop[0] = i


def _helper(work: list[Callable[[], None]]) -> None:
    for job in work[:1]:  # empty once the caller is done: nothing left to help with
        job()


def run_in_order(fn: Callable[[int], tuple[T, bool]], count: int, threads: int) -> list[T]:
    """``fn(0)``, ``fn(1)``, ... in the calling thread and up to ``threads`` pool helpers,
    up to the first ``i`` whose ``fn(i)`` returns ``(value, True)`` (``(value, False)``:
    go on); the values of ``0..i`` in order.  ``fn`` must be CPU work that is safe to run
    concurrently; a few calls past the stopping one may run and are discarded."""
    helpers = min(threads, MAX_THREADS, count - 1)
    results: list[tuple[T, bool] | None] = [None] * count
    claim, stop = itertools.count(), [count]
    futures: list[Future[None]] = []
    # The helpers reach fn (and through it the caller's buffers) only through this list,
    # emptied before returning: a cancelled job stays queued in the pool until a thread pops
    # it, and must not keep the caller's buffers exported (a bytearray could not resize).
    work: list[Callable[[], None]] = [functools.partial(_drain, fn, count, results, claim, stop)]
    if helpers > 0:
        pool = _get_pool()
        futures = [pool.submit(_helper, work) for _ in range(helpers)]
    try:
        work[0]()
    finally:
        for f in futures:
            if not f.cancel():
                f.exception()  # running: wait, it may still read the caller's buffer
        work.clear()
    out: list[T] = []
    for i, got in enumerate(results):
        # A call whose helper raised is redone here, where its error (if it recurs) surfaces.
        value, last = fn(i) if got is None else got
        out.append(value)
        if last:
            break
    return out


def run_tasks(tasks: Sequence[Callable[[], T]], threads: int) -> list[T]:
    """Run ``tasks`` in the calling thread and up to ``threads`` pool helpers; their
    results in order."""
    return run_in_order(lambda i: (tasks[i](), False), len(tasks), threads)


def _strong_run(
    kind: SignatureKind, data: U8, mv: memoryview, a: int, b: int, bs: int, sl: int
) -> bytes:
    """Truncated strong sums of the whole blocks in ``mv[a:b]`` (``data``: the same bytes as
    a numpy array), concatenated."""
    if kind.blake2:
        return blake2b_blocks(data, a, b, bs, sl)
    h = strong_fn(kind)
    return b"".join([h(mv[o : o + bs])[:sl] for o in range(a, b, bs)])


def _cuts(nblocks: int, bs: int, threads: int) -> list[tuple[int, int]]:
    """Block ranges of one task each (one range if helpers would not pay)."""
    if threads <= 0 or bs < GIL_FREE_MIN or nblocks < 2 or nblocks * bs < PARALLEL_MIN:
        return [(0, nblocks)]
    per = max(1, TASK_BYTES // bs)
    # At least two tasks per thread, so that the threads finish close together.
    per = max(1, min(per, -(-nblocks // (2 * (threads + 1)))))
    return [(a, min(nblocks, a + per)) for a in range(0, nblocks, per)]


def matching_blocks(
    kind: SignatureKind, data: U8, mv: memoryview, block_size: int, strong_len: int,
    weak_want: U32, strong_want: bytes | memoryview, threads: int = 0,
) -> int:
    """How many whole blocks of ``mv`` (``data``: the same bytes as a numpy array), counted
    from its start, have the expected sums ``weak_want[j]`` and
    ``strong_want[j*strong_len:(j+1)*strong_len]``, up to the first that does not.

    Each task takes the next ``RUN_TASK_BYTES`` of blocks.  Short or MD4 strong sums can
    collide (one in 256 for a 1-byte sum), so there the weak sums come first (vectorised,
    ~4x cheaper than BLAKE2b) and only the blocks up to the first weak mismatch are hashed;
    the tasks past the end of the run cost about one weak step each.  A BLAKE2b sum of
    ``STRONG_ONLY_MIN`` bytes or more matches only the very block it was made from, whose
    weak sum is then the signature's too, so the weak pass (~20% of a delta of matching
    data) is skipped: the tasks past the end of the run then hash their blocks in vain.
    """
    bs, sl = block_size, strong_len
    nblocks = min(len(mv) // bs, len(weak_want), len(strong_want) // sl)
    per = max(1, RUN_TASK_BYTES // bs)
    if bs < GIL_FREE_MIN:
        threads = 0
    strong_only = kind.blake2 and sl >= STRONG_ONLY_MIN

    def task(c: int) -> tuple[int, bool]:
        a, b = c * per, min(nblocks, (c + 1) * per)
        if strong_only:
            t = b
        else:
            weak = weak_sums_of_blocks(kind, data[a * bs : b * bs], bs)
            differ = np.flatnonzero(weak != weak_want[a:b])
            t = a + int(differ[0]) if differ.size else b
        if t > a:
            got = _strong_run(kind, data, mv, a * bs, t * bs, bs, sl)
            want = strong_want[a * sl : t * sl]
            if got != want:  # the run ends at the first block whose strong sum differs
                m = 0
                while got[m * sl : (m + 1) * sl] == want[m * sl : (m + 1) * sl]:
                    m += 1
                t = a + m
        return t - a, t < b

    return sum(run_in_order(task, -(-nblocks // per), threads))


def block_sums(
    kind: SignatureKind, data: U8, mv: memoryview, block_size: int, strong_len: int,
    threads: int = 0,
) -> tuple[U32, bytes]:
    """Weak and truncated strong sums of the whole blocks of ``mv`` (``data`` is the same
    bytes as a numpy array); each task does both for its blocks, so the threads share the
    weak sums too."""
    bs, sl = block_size, strong_len

    def task(a: int, b: int) -> tuple[U32, bytes]:
        return (weak_sums_of_blocks(kind, data[a * bs : b * bs], bs),
                _strong_run(kind, data, mv, a * bs, b * bs, bs, sl))

    cuts = _cuts(len(mv) // bs, bs, threads)
    parts = run_tasks([functools.partial(task, a, b) for a, b in cuts], threads)
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([w for w, _s in parts]), b"".join([s for _w, s in parts])
