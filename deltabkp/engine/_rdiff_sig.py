"""librsync (rdiff) signatures: the ``RdiffSignature`` value, its parser, a streaming builder.

Format (librsync doc/formats.md; docs/formats.md, section rdiff): a 12-byte header of three
big-endian u32 (magic, block length, strong-sum length), then per block of the base a u32
weak sum and the first ``strong_len`` bytes of its strong sum.  The magic says which sums
(``SignatureKind``).  The last block may be short; the format does not record the base's
size, so the block count is implied by the file's length.  The defaults (block length
``isqrt(size)`` rounded down to a multiple of 128, at least 256; the whole strong sum) are
rdiff's, so ``signature(base)`` is byte-identical to ``rdiff signature BASE``.

Invariants: the parser checks the magic before anything else and never reads or allocates
beyond its size limit; the builder holds at most one partial block besides its sums.
"""

from __future__ import annotations

import math
import struct
from typing import TYPE_CHECKING

import attrs
import numpy as np

from deltabkp.engine._rdiff_sums import (
    SignatureKind,
    block_sums,
    check_threads,
    strong_fn,
    weak_sum,
)
from deltabkp.engine._signature import MAX_SIGNATURE_SIZE, as_bytes_view
from deltabkp.errors import FormatError, LimitExceeded, UsageError

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "DEFAULT_KIND",
    "DELTA_MAGIC",
    "MAX_BLOCK_SIZE",
    "RdiffSignature",
    "RdiffSignatureBuilder",
    "SignatureKind",
    "default_block_size",
    "is_delta",
    "is_signature",
    "signature",
]

DELTA_MAGIC = 0x72730236
DEFAULT_KIND = SignatureKind.RK_BLAKE2
#: rdiff accepts any block length; ours stops at 16 MiB so a delta's scan window stays small.
MAX_BLOCK_SIZE = 1 << 24
#: librsync's block length when the base's size is unknown (RS_DEFAULT_BLOCK_LEN).
UNKNOWN_SIZE_BLOCK = 2048
FEED_SLICE = 1 << 20
HEADER = struct.Struct(">III")


def _magic_of(data: Buffer) -> int | None:
    mv = as_bytes_view(data)
    return int.from_bytes(mv[:4], "big") if len(mv) >= 4 else None


def is_signature(data: Buffer) -> bool:
    """Whether ``data`` (or just its first 4 bytes) starts with an rdiff signature magic."""
    return _magic_of(data) in SignatureKind._value2member_map_


def is_delta(data: Buffer) -> bool:
    """Whether ``data`` (or just its first 4 bytes) starts with the rdiff delta magic."""
    return _magic_of(data) == DELTA_MAGIC


def default_block_size(size: int | None) -> int:
    """rdiff's recommended block length for a base of ``size`` bytes (None: unknown)."""
    if size is None:
        return UNKNOWN_SIZE_BLOCK
    if size < 0:
        raise UsageError(f"base size must be >= 0, got {size}")
    return 256 if size <= 256 * 256 else math.isqrt(size) & ~127


def _check_args(kind: SignatureKind, block_size: int, strong_len: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise UsageError(f"block size must be an integer, got {block_size!r}")
    if not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise UsageError(f"block size {block_size} is outside 1..{MAX_BLOCK_SIZE} bytes")
    if not 1 <= strong_len <= kind.max_strong_len:
        raise UsageError(
            f"strong sum length {strong_len} is outside 1..{kind.max_strong_len} "
            f"for {kind.label}"
        )


@attrs.frozen
class RdiffSignature:
    """An rdiff signature: one (weak, truncated strong) sum per block of the base.

    ``weak_sums`` holds u32 big-endian values, ``strong_sums`` ``strong_len`` bytes per block;
    the base's size is not recorded (only that it needs ``block_count`` blocks).
    """

    kind: SignatureKind
    block_size: int
    strong_len: int
    weak_sums: bytes = attrs.field(repr=False)
    strong_sums: bytes = attrs.field(repr=False)

    @property
    def block_count(self) -> int:
        return len(self.weak_sums) // 4

    def weak_array(self) -> np.ndarray[tuple[int], np.dtype[np.uint32]]:
        """The weak sums as a native-endian uint32 array (a fresh copy)."""
        return np.frombuffer(self.weak_sums, ">u4").astype(np.uint32)

    def strong_of(self, block: int) -> bytes:
        n = self.strong_len
        return self.strong_sums[block * n : (block + 1) * n]

    def to_bytes(self) -> bytes:
        n, sl = self.block_count, self.strong_len
        rows = np.empty((n, 4 + sl), np.uint8)
        rows[:, :4] = np.frombuffer(self.weak_sums, np.uint8).reshape(n, 4)
        rows[:, 4:] = np.frombuffer(self.strong_sums, np.uint8).reshape(n, sl)
        return HEADER.pack(self.kind, self.block_size, sl) + rows.tobytes()

    @classmethod
    def parse(cls, data: Buffer, *, max_size: int = MAX_SIGNATURE_SIZE) -> RdiffSignature:
        """Parse and validate a whole rdiff signature; raises a ``FormatError`` if bad."""
        try:
            mv = as_bytes_view(data)
        except (TypeError, ValueError) as exc:
            raise FormatError(f"rdiff signature: not a byte buffer ({exc})") from None
        size = len(mv)
        if size >= 4 and not is_signature(mv):
            raise FormatError(
                f"not an rdiff signature: magic is {bytes(mv[:4]).hex()}, expected one of "
                + ", ".join(f"{k:08x} ({k.label})" for k in SignatureKind)
            )
        if size < HEADER.size:
            raise FormatError(
                f"rdiff signature truncated: {size} bytes, the header alone needs {HEADER.size}"
            )
        if size > max_size:
            raise LimitExceeded(f"rdiff signature of {size} bytes exceeds the limit of {max_size}")
        magic, block_size, strong_len = HEADER.unpack_from(mv)
        kind = SignatureKind(magic)
        if not 1 <= block_size <= MAX_BLOCK_SIZE:
            raise FormatError(
                f"rdiff signature block length {block_size} is outside 1..{MAX_BLOCK_SIZE}"
            )
        if not 1 <= strong_len <= kind.max_strong_len:
            raise FormatError(
                f"rdiff signature strong sum length {strong_len} is outside "
                f"1..{kind.max_strong_len} for {kind.label}"
            )
        row = 4 + strong_len
        body = size - HEADER.size
        if body % row:
            raise FormatError(
                f"rdiff signature length {size} is not the header plus whole blocks of "
                f"{row} bytes (truncated or trailing data)"
            )
        rows = np.frombuffer(mv, np.uint8, offset=HEADER.size).reshape(body // row, row)
        return cls(
            kind=kind,
            block_size=block_size,
            strong_len=strong_len,
            weak_sums=rows[:, :4].tobytes(),
            strong_sums=rows[:, 4:].tobytes(),
        )


class RdiffSignatureBuilder:
    """Streaming rdiff signature of a base: ``feed()`` its bytes in any chunks, ``finish()``.

    ``block_size`` None means rdiff's recommendation for ``base_size`` (2048 if that is None
    too); ``strong_len`` None means the whole strong sum (rdiff's default).  ``threads``:
    helper threads hashing beside the caller (None: one per further core, at most 3; 0: all
    in the calling thread); the result is the same.  Memory: the sums produced so far plus one
    partial block.
    """

    def __init__(
        self,
        block_size: int | None = None,
        *,
        base_size: int | None = None,
        strong_len: int | None = None,
        kind: SignatureKind = DEFAULT_KIND,
        threads: int | None = None,
    ) -> None:
        kind = SignatureKind(kind)
        if block_size is None:
            block_size = default_block_size(base_size)
        if strong_len is None:
            strong_len = kind.max_strong_len
        _check_args(kind, block_size, strong_len)
        self.kind, self.block_size, self.strong_len = kind, block_size, strong_len
        self.threads = check_threads(threads)
        self._pending = bytearray()
        self._weak: list[np.ndarray[tuple[int], np.dtype[np.uint32]]] = []
        self._strong: list[bytes] = []
        self._done = False

    def feed(self, data: Buffer) -> None:
        if self._done:
            raise UsageError("RdiffSignatureBuilder.feed() called after finish()")
        mv = as_bytes_view(data)
        bs = self.block_size
        if self._pending:
            take = min(bs - len(self._pending), len(mv))
            self._pending += mv[:take]
            mv = mv[take:]
            if len(self._pending) < bs:
                return
            self._add_blocks(memoryview(self._pending))
            self._pending = bytearray()
        whole = len(mv) - len(mv) % bs
        for at in range(0, whole, max(bs, FEED_SLICE - FEED_SLICE % bs)):
            self._add_blocks(mv[at : min(whole, at + max(bs, FEED_SLICE - FEED_SLICE % bs))])
        if whole < len(mv):
            self._pending += mv[whole:]

    def _add_blocks(self, mv: memoryview) -> None:
        data = np.frombuffer(mv, np.uint8)
        weak, strong = block_sums(
            self.kind, data, mv, self.block_size, self.strong_len, self.threads
        )
        self._weak.append(weak)
        self._strong.append(strong)

    def finish(self) -> bytes:
        """Return the whole signature (rdiff format)."""
        return self.finish_signature().to_bytes()

    def finish_signature(self) -> RdiffSignature:
        if self._done:
            raise UsageError("RdiffSignatureBuilder.finish() called twice")
        self._done = True
        if self._pending:
            tail = bytes(self._pending)
            self._weak.append(np.array([weak_sum(self.kind, tail)], np.uint32))
            self._strong.append(strong_fn(self.kind)(tail)[: self.strong_len])
            self._pending = bytearray()
        weak = np.concatenate(self._weak).astype(">u4").tobytes() if self._weak else b""
        strong = b"".join(self._strong)
        self._weak, self._strong = [], []
        return RdiffSignature(self.kind, self.block_size, self.strong_len, weak, strong)


def signature(
    base: Buffer,
    block_size: int | None = None,
    *,
    strong_len: int | None = None,
    kind: SignatureKind = DEFAULT_KIND,
    threads: int | None = None,
) -> bytes:
    """The rdiff signature of a whole base held in memory (rdiff's defaults; ``threads`` as
    for ``RdiffSignatureBuilder``)."""
    mv = as_bytes_view(base)
    builder = RdiffSignatureBuilder(
        block_size, base_size=len(mv), strong_len=strong_len, kind=kind, threads=threads
    )
    whole = len(mv) - len(mv) % builder.block_size
    if whole:
        builder._add_blocks(mv[:whole])  # one pass: tasks spread over the threads
    builder.feed(mv[whole:])
    return builder.finish()
