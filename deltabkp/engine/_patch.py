"""Patching: apply a delta (format v1) to a base, verifying the result's length and blake3.

Invariants: the patcher does no I/O; COPY output pieces are zero-copy memoryviews into the
base; it buffers at most one incomplete op (<= 5 + 64 KiB bytes) between feeds; every field
is checked before use (block ranges, literal lengths, END), so a corrupt or foreign delta
raises a ``FormatError`` and a delta applied to the wrong base or a mismatching result raises
``IntegrityError``, never a wrong output reported as good.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import blake3
import numpy as np
import numpy.typing as npt

from deltabkp.engine._delta import (
    COPY_OP,
    DELTA_HEADER,
    DELTA_MAGIC,
    DELTA_VERSION,
    END_OP,
    LITERAL_OP,
    MAX_LITERAL,
    OP_COPY,
    OP_END,
    OP_LITERAL,
)
from deltabkp.engine._rolling import WholeHash
from deltabkp.engine._signature import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, as_bytes_view
from deltabkp.errors import (
    FormatError,
    IntegrityError,
    LimitExceeded,
    UnsupportedVersion,
    UsageError,
)

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["Patcher", "patch"]

_HEADER_SIZE = DELTA_HEADER.size


class Patcher:
    """Streaming patch of ``base``: ``feed()`` delta bytes in any chunks, then ``finish()``.

    ``feed`` returns the output pieces decoded so far, in order.  ``finish`` raises
    ``FormatError`` on a truncated delta and ``IntegrityError`` if the output's length or
    blake3 differ from the delta's END record; afterwards ``new_size`` and ``new_hash`` hold
    the verified values.  If ``base_hash`` is given, a delta made against another base is
    refused from its header on (no hashing of the base is done here).  With ``max_size``, an
    output growing past it raises ``LimitExceeded`` (a few COPY ops of the whole base can
    describe an arbitrarily large output).
    """

    def __init__(
        self, base: Buffer, *, base_hash: bytes | None = None, max_size: int | None = None
    ) -> None:
        self._base = as_bytes_view(base)
        self._want_base_hash = base_hash
        self._max_size = max_size
        self._buf = bytearray()
        self._offset = 0  # delta offset of _buf[0], for error messages
        self._block_size = 0
        self._blocks = 0
        self._have_header = False
        self._end: tuple[int, bytes] | None = None
        self._hasher = WholeHash()
        self._hash_pieces = True  # off only inside patch(), which hashes them in parallel
        self._size = 0
        self._done = False
        self.base_hash: bytes | None = None
        self.new_size = 0
        self.new_hash = b""

    def feed(self, data: Buffer) -> list[bytes | memoryview]:
        """Decode the next delta bytes; return the output pieces they complete, in order.

        Pieces may be views into ``base`` or into ``data`` (when it is ``bytes``): write or
        copy them before the base changes.  An incomplete op's bytes wait for the next call.
        """
        if self._done:
            raise UsageError("Patcher.feed() called after finish()")
        mv = as_bytes_view(data)
        if not mv:
            return []
        if self._end is not None:
            raise FormatError(f"delta: trailing data after END at offset {self._offset}")
        pieces: list[bytes | memoryview] = []
        if self._buf:
            self._buf += mv
            used = self._parse(pieces, self._buf)
            del self._buf[:used]
        else:
            # Parse the caller's buffer in place; keep only an incomplete op's bytes.  Literal
            # pieces may be views into it only if it is immutable.
            used = self._parse(pieces, mv, shared=isinstance(mv.obj, bytes))
            self._buf = bytearray(mv[used:])
        self._offset += used
        return pieces

    def _parse_header(self, buf: bytearray | memoryview) -> int:
        n = len(buf)
        if bytes(buf[: min(n, 4)]) != DELTA_MAGIC[: min(n, 4)]:
            raise FormatError(
                f"not a deltabkp delta: magic is {bytes(buf[:4])!r}, expected {DELTA_MAGIC!r}"
            )
        if n >= 5 and buf[4] != DELTA_VERSION:
            raise UnsupportedVersion(
                f"delta version {buf[4]} is not supported "
                f"(this build reads version {DELTA_VERSION})"
            )
        if n < _HEADER_SIZE:
            return 0
        _m, _v, block_size, base_size, base_hash = DELTA_HEADER.unpack_from(buf)
        if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
            raise FormatError(
                f"delta block size {block_size} is outside {MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE}"
            )
        if base_size != len(self._base):
            raise IntegrityError(
                f"delta was made against a base of {base_size} bytes, "
                f"but this base has {len(self._base)} bytes"
            )
        if self._want_base_hash is not None and base_hash != self._want_base_hash:
            raise IntegrityError(
                f"delta was made against base {base_hash.hex()[:16]}..., "
                f"not {self._want_base_hash.hex()[:16]}..."
            )
        self.base_hash = base_hash
        self._block_size = block_size
        self._blocks = -(-base_size // block_size)
        self._have_header = True
        return _HEADER_SIZE

    def _parse(
        self, pieces: list[bytes | memoryview], buf: bytearray | memoryview, shared: bool = False
    ) -> int:
        n = len(buf)
        p = 0
        if not self._have_header:
            p = self._parse_header(buf)
            if not self._have_header:
                return 0
        base = self._base
        base_size = len(base)
        bs = self._block_size
        nblocks = self._blocks
        update = self._hasher.update if self._hash_pieces else None
        size = self._size
        try:
            while p < n:
                if self._end is not None:
                    raise FormatError(
                        f"delta: trailing data after END at offset {self._offset + p}"
                    )
                tag = buf[p]
                if tag == OP_COPY:
                    if n - p < COPY_OP.size:
                        break
                    _t, first, count = COPY_OP.unpack_from(buf, p)
                    if count == 0 or first + count > nblocks:
                        raise FormatError(
                            f"delta: COPY of blocks {first}..{first + count - 1} at offset "
                            f"{self._offset + p} is outside the base's {nblocks} blocks"
                            if count
                            else f"delta: empty COPY at offset {self._offset + p}"
                        )
                    piece: bytes | memoryview = base[
                        first * bs : min((first + count) * bs, base_size)
                    ]
                    p += COPY_OP.size
                elif tag == OP_LITERAL:
                    if n - p < LITERAL_OP.size:
                        break
                    _t, length = LITERAL_OP.unpack_from(buf, p)
                    if not 1 <= length <= MAX_LITERAL:
                        raise FormatError(
                            f"delta: LITERAL of {length} bytes at offset {self._offset + p} "
                            f"(must be 1..{MAX_LITERAL})"
                        )
                    start = p + LITERAL_OP.size
                    if n - start < length:
                        break
                    if shared and isinstance(buf, memoryview):
                        piece = buf[start : start + length]
                    else:
                        piece = bytes(buf[start : start + length])
                    p = start + length
                elif tag == OP_END:
                    if n - p < END_OP.size:
                        break
                    _t, new_size, new_hash = END_OP.unpack_from(buf, p)
                    self._end = (new_size, new_hash)
                    p += END_OP.size
                    continue
                else:
                    raise FormatError(
                        f"delta: unknown op byte 0x{tag:02x} at offset {self._offset + p}"
                    )
                size += len(piece)
                if self._max_size is not None and size > self._max_size:
                    raise LimitExceeded(
                        f"delta: output passes the limit of {self._max_size} bytes "
                        f"at offset {self._offset + p}"
                    )
                if update is not None:
                    update(piece)
                pieces.append(piece)
        finally:
            self._size = size
        return p

    def finish(self) -> None:
        """Check the whole output against the delta's END record (size and blake3)."""
        self._finish(self._hasher.digest)

    def _finish(self, digest: Callable[[], bytes]) -> None:
        if self._done:
            raise UsageError("Patcher.finish() called twice")
        self._done = True
        if not self._have_header:
            raise FormatError(
                f"delta truncated: {len(self._buf)} bytes, the header alone needs {_HEADER_SIZE}"
            )
        if self._end is None:
            raise FormatError(
                f"delta truncated: no END record (stream stops at offset "
                f"{self._offset + len(self._buf)}"
                + (f" inside an op starting at {self._offset})" if self._buf else ")")
            )
        new_size, new_hash = self._end
        if self._size != new_size:
            raise IntegrityError(
                f"patched output is {self._size} bytes but the delta's END says {new_size}"
            )
        got = digest()
        if got != new_hash:
            raise IntegrityError(
                f"patched output's blake3 {got.hex()[:16]}... does not match the delta's END "
                f"{new_hash.hex()[:16]}... (wrong or corrupt base?)"
            )
        self.new_size, self.new_hash = new_size, new_hash


#: Outputs at least this big are hashed in a worker thread while the main one copies them.
_PARALLEL_MIN = 4 << 20


def _hash_pieces(pieces: list[bytes | memoryview]) -> bytes:
    hasher = blake3.blake3()
    for piece in pieces:
        hasher.update(piece)
    return bytes(hasher.digest())


def _copy_into(dest: npt.NDArray[np.uint8], pieces: list[bytes | memoryview]) -> None:
    at = 0
    for piece in pieces:
        end = at + len(piece)
        dest[at:end] = np.frombuffer(piece, np.uint8)  # numpy copies without the GIL
        at = end


def patch(
    base: Buffer, delta: Buffer, *, out: Buffer | None = None, max_size: int | None = None
) -> bytes | memoryview:
    """Apply a whole delta to a whole base and return the verified new file.

    The result is a zero-copy view into ``base`` when the delta is a single COPY run,
    ``bytes`` when it is small, else a view of a fresh numpy buffer.  With ``out`` (a writable
    buffer at least as long as the result, e.g. one reused across calls) the result is
    written there and a view of its first ``new_size`` bytes is returned.

    For big outputs blake3 runs in a worker thread while this one copies the pieces with
    numpy: both release the GIL, so the page faults of a fresh output buffer (which can cost
    more than the patch itself) overlap the hashing.  Nothing is returned unverified.
    """
    patcher = Patcher(base, max_size=max_size)
    patcher._hash_pieces = False
    pieces = patcher.feed(delta)
    total = patcher._size
    view: memoryview | None = None
    if out is not None:
        view = as_bytes_view(out)
        if view.readonly or len(view) < total:
            raise UsageError(
                f"patch(out=...) needs a writable buffer of at least {total} bytes, "
                f"got {len(view)}{' (read-only)' if view.readonly else ''}"
            )
    if total < _PARALLEL_MIN or (view is None and len(pieces) == 1):
        patcher._finish(lambda: _hash_pieces(pieces))
        if view is None:
            return pieces[0] if len(pieces) == 1 else b"".join(pieces)
        _copy_into(np.frombuffer(view, np.uint8), pieces)
        return view[:total]
    digest: list[bytes] = []
    worker = threading.Thread(
        target=lambda: digest.append(_hash_pieces(pieces)), name="deltabkp-patch-blake3"
    )
    worker.start()
    try:
        dest = np.empty(total, np.uint8) if view is None else np.frombuffer(view, np.uint8)
        _copy_into(dest, pieces)
    finally:
        worker.join()
    # An empty list means the worker died: hash here rather than trust the output.
    patcher._finish(lambda: digest[0] if digest else _hash_pieces(pieces))
    return dest.data[:total] if view is None else view[:total]
