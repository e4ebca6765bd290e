"""Block signatures: the ``Signature`` value, its v1 byte format, and a streaming builder.

Format v1 (see docs/formats.md, section engine): a 52-byte header (magic ``DBKS``, version,
weak/strong sum ids, strong length, block size, base size, base blake3), then the weak sums of
all blocks (u32 big-endian each), then their strong sums (``strong_len`` bytes each).  The
block count is implied by base size and block size, so the total length is checked exactly.
Invariants: the parser checks magic, then version, before anything else, and never reads or
allocates beyond its size limit; ``SignatureBuilder`` holds at most one partial block besides
the sums it has produced.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
import numpy as np

from deltabkp.engine._rolling import (
    STRONG_ID_XXH3_128,
    WEAK_ID_POLY32,
    WholeHash,
    hash_beside,
    strong_sum,
    weak_sum,
    weak_sums_of_blocks,
)
from deltabkp.errors import FormatError, LimitExceeded, UnsupportedVersion, UsageError

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "SIGNATURE_MAGIC",
    "SIGNATURE_VERSION",
    "MIN_BLOCK_SIZE",
    "MAX_BLOCK_SIZE",
    "DEFAULT_STRONG_LEN",
    "MAX_SIGNATURE_SIZE",
    "Signature",
    "SignatureBuilder",
    "default_block_size",
    "signature",
    "as_bytes_view",
]

SIGNATURE_MAGIC = b"DBKS"
SIGNATURE_VERSION = 1
MIN_BLOCK_SIZE = 16
MAX_BLOCK_SIZE = 1 << 20
MIN_STRONG_LEN = 4
MAX_STRONG_LEN = 16
DEFAULT_STRONG_LEN = 8
#: Default ceiling on a signature's size for ``Signature.parse`` (a 64 GiB base at 4 KiB blocks
#: needs ~200 MiB).
MAX_SIGNATURE_SIZE = 512 * 1024 * 1024
#: Block counts are u32 in the delta format.
MAX_BLOCKS = (1 << 32) - 1
HASH_LEN = 32
FEED_SLICE = 1 << 20

# magic, version, weak id, strong id, strong len, block size, base size, base blake3
_HEADER = struct.Struct(">4sBBBBIQ32s")
HEADER_SIZE = _HEADER.size  # 52


def as_bytes_view(data: Buffer) -> memoryview:
    """A flat unsigned-byte view of any C-contiguous buffer (bytes, bytearray, mmap, ...)."""
    mv = memoryview(data)
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    return mv


def default_block_size(size: int) -> int:
    """Block size for a base of ``size`` bytes: ~sqrt(size)/2 as a power of two, 1-16 KiB.

    Measured on gzip --rsyncable tgz pairs (docs/formats.md): below ~2 KiB the signature grows
    faster than the delta shrinks, above ~8 KiB each change costs whole extra blocks of
    literal; ``sqrt(size)/2`` keeps signature + delta near their minimum across sizes.
    """
    if size < 0:
        raise UsageError(f"base size must be >= 0, got {size}")
    target = math.isqrt(size) // 2
    block = 1024
    while block < target and block < 16 * 1024:
        block *= 2
    return block


def _check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise UsageError(f"block size must be an integer, got {block_size!r}")
    if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise UsageError(
            f"block size {block_size} is outside {MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE} bytes"
        )


@attrs.frozen
class Signature:
    """The block signature of a base: one (weak, strong) sum per block, plus the base's hash.

    ``weak_sums`` holds u32 big-endian values, ``strong_sums`` ``strong_len`` bytes per block;
    the last block is short when ``base_size`` is not a multiple of ``block_size``.
    """

    block_size: int
    base_size: int
    base_hash: bytes
    strong_len: int
    weak_sums: bytes = attrs.field(repr=False)
    strong_sums: bytes = attrs.field(repr=False)

    @property
    def block_count(self) -> int:
        """Number of blocks, the last one possibly short."""
        return -(-self.base_size // self.block_size)

    @property
    def full_blocks(self) -> int:
        """Number of whole ``block_size`` blocks (the short tail block not counted)."""
        return self.base_size // self.block_size

    def weak_array(self) -> np.ndarray[tuple[int], np.dtype[np.uint32]]:
        """The weak sums as a native-endian uint32 array (a fresh copy)."""
        return np.frombuffer(self.weak_sums, ">u4").astype(np.uint32)

    def strong_of(self, block: int) -> bytes:
        """The truncated strong sum of block number ``block``."""
        n = self.strong_len
        return self.strong_sums[block * n : (block + 1) * n]

    def to_bytes(self) -> bytes:
        """The signature file (format v1, docs/formats.md "Signature")."""
        header = _HEADER.pack(
            SIGNATURE_MAGIC,
            SIGNATURE_VERSION,
            WEAK_ID_POLY32,
            STRONG_ID_XXH3_128,
            self.strong_len,
            self.block_size,
            self.base_size,
            self.base_hash,
        )
        return b"".join((header, self.weak_sums, self.strong_sums))

    @classmethod
    def parse(cls, data: Buffer, *, max_size: int = MAX_SIGNATURE_SIZE) -> Signature:
        """Parse and validate a whole signature; raises a ``FormatError`` subclass if bad."""
        try:
            mv = as_bytes_view(data)
        except (TypeError, ValueError) as exc:
            raise FormatError(f"signature: not a byte buffer ({exc})") from None
        size = len(mv)
        if size >= 4 and mv[:4] != SIGNATURE_MAGIC:
            raise FormatError(
                f"not a deltabkp signature: magic is {bytes(mv[:4])!r}, "
                f"expected {SIGNATURE_MAGIC!r}"
            )
        if size >= 5 and mv[4] != SIGNATURE_VERSION:
            raise UnsupportedVersion(
                f"signature version {mv[4]} is not supported "
                f"(this build reads version {SIGNATURE_VERSION})"
            )
        if size < HEADER_SIZE:
            raise FormatError(
                f"signature truncated: {size} bytes, the header alone needs {HEADER_SIZE}"
            )
        if size > max_size:
            raise LimitExceeded(f"signature of {size} bytes exceeds the limit of {max_size}")
        _m, _v, weak_id, strong_id, strong_len, block_size, base_size, base_hash = (
            _HEADER.unpack_from(mv)
        )
        if weak_id != WEAK_ID_POLY32:
            raise FormatError(f"signature uses unknown weak sum id {weak_id}")
        if strong_id != STRONG_ID_XXH3_128:
            raise FormatError(f"signature uses unknown strong sum id {strong_id}")
        if not MIN_STRONG_LEN <= strong_len <= MAX_STRONG_LEN:
            raise FormatError(
                f"signature strong sum length {strong_len} is outside "
                f"{MIN_STRONG_LEN}..{MAX_STRONG_LEN}"
            )
        if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
            raise FormatError(
                f"signature block size {block_size} is outside "
                f"{MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE}"
            )
        blocks = -(-base_size // block_size)
        if blocks > MAX_BLOCKS:
            raise FormatError(f"signature claims {blocks} blocks, more than {MAX_BLOCKS}")
        expected = HEADER_SIZE + blocks * (4 + strong_len)
        if size != expected:
            raise FormatError(
                f"signature length {size} does not match its header: {blocks} blocks of "
                f"{4 + strong_len} bytes need {expected} bytes"
                + (" (truncated)" if size < expected else " (trailing data)")
            )
        weak_end = HEADER_SIZE + 4 * blocks
        return cls(
            block_size=block_size,
            base_size=base_size,
            base_hash=base_hash,
            strong_len=strong_len,
            weak_sums=bytes(mv[HEADER_SIZE:weak_end]),
            strong_sums=bytes(mv[weak_end:]),
        )


class SignatureBuilder:
    """Streaming signature of a base: ``feed()`` its bytes in any chunks, then ``finish()``.

    If ``block_size`` is None it is derived from ``base_size`` (then required) with
    ``default_block_size``.  Memory: the sums produced so far plus one partial block.
    """

    def __init__(
        self,
        block_size: int | None = None,
        *,
        base_size: int | None = None,
        strong_len: int = DEFAULT_STRONG_LEN,
    ) -> None:
        if block_size is None:
            if base_size is None:
                raise UsageError("SignatureBuilder needs a block_size or a base_size")
            block_size = default_block_size(base_size)
        _check_block_size(block_size)
        if not MIN_STRONG_LEN <= strong_len <= MAX_STRONG_LEN:
            raise UsageError(
                f"strong sum length {strong_len} is outside {MIN_STRONG_LEN}..{MAX_STRONG_LEN}"
            )
        self.block_size = block_size
        self.strong_len = strong_len
        self._pending = bytearray()
        self._weak: list[np.ndarray[tuple[int], np.dtype[np.uint32]]] = []
        self._strong = bytearray()
        self._hasher = WholeHash()
        self._size = 0
        self._done = False

    def feed(self, data: Buffer) -> None:
        """Add the next bytes of the base (any length, copied only up to one block).

        Raises ``UsageError`` after ``finish()``.
        """
        if self._done:
            raise UsageError("SignatureBuilder.feed() called after finish()")
        mv = as_bytes_view(data)
        # Slices of ~1 MiB stay in cache across the three passes (blake3, weak, strong).
        for at in range(0, len(mv), FEED_SLICE):
            part = mv[at : at + FEED_SLICE]
            self._hasher.update(part)
            self._sums(part)

    def _sums(self, mv: memoryview) -> None:
        """Add the block sums of the next bytes of the base (the caller hashes them)."""
        self._size += len(mv)
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
        if whole:
            self._add_blocks(mv[:whole])
        if whole < len(mv):
            self._pending += mv[whole:]

    def _add_blocks(self, mv: memoryview) -> None:
        bs, sl = self.block_size, self.strong_len
        self._weak.append(weak_sums_of_blocks(np.frombuffer(mv, np.uint8), bs))
        self._strong += b"".join([strong_sum(mv[o : o + bs], sl) for o in range(0, len(mv), bs)])

    def finish(self) -> bytes:
        """Return the whole signature (format v1)."""
        return self.finish_signature().to_bytes()

    def finish_signature(self) -> Signature:
        """Like ``finish()``, as a parsed ``Signature`` (for a ``DeltaEncoder`` in-process)."""
        return self._finish(self._hasher.digest)

    def _finish(self, base_hash: Callable[[], bytes]) -> Signature:
        if self._done:
            raise UsageError("SignatureBuilder.finish() called twice")
        self._done = True
        weak = self._weak
        if self._pending:
            weak = [*weak, np.array([weak_sum(bytes(self._pending))], np.uint32)]
            self._strong += strong_sum(self._pending, self.strong_len)
            self._pending = bytearray()
        weak_bytes = np.concatenate(weak).astype(">u4").tobytes() if weak else b""
        self._weak = []
        return Signature(
            block_size=self.block_size,
            base_size=self._size,
            base_hash=base_hash(),
            strong_len=self.strong_len,
            weak_sums=weak_bytes,
            strong_sums=bytes(self._strong),
        )


def signature(base: Buffer, block_size: int | None = None) -> bytes:
    """The signature (format v1) of a whole base held in memory."""
    mv = as_bytes_view(base)
    builder = SignatureBuilder(block_size, base_size=len(mv))
    digest = hash_beside(mv)  # blake3 on the other core while this one sums blocks
    try:
        for at in range(0, len(mv), FEED_SLICE):
            builder._sums(mv[at : at + FEED_SLICE])
    finally:
        sig = builder._finish(digest)
    return sig.to_bytes()
