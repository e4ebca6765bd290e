"""Applying librsync (rdiff) deltas: a streaming patcher and a one-shot ``patch``.

The op encoding is in ``_rdiff_delta`` (and docs/formats.md, section rdiff).  The format has
no checksum, so unlike the engine's patcher this one cannot verify its output: it checks every
op instead (a COPY non-empty and inside the base, a LITERAL non-empty and complete, END last
and present) and honours ``max_size``.

Invariants: no I/O; buffers at most one incomplete op header (< 17 bytes) and streams literal
bytes through (views into the caller's buffer when it is immutable ``bytes``); corrupt input
raises ``FormatError`` (``LimitExceeded`` past ``max_size``), never a silently short output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deltabkp.engine._rdiff_delta import MAGIC_BYTES, OP_RESERVED
from deltabkp.engine._rdiff_sig import DELTA_MAGIC
from deltabkp.engine._signature import as_bytes_view
from deltabkp.errors import FormatError, LimitExceeded, UsageError

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["RdiffPatcher", "patch"]

# Per op byte: (kind, first argument's width, second argument's width); kind is "end",
# "lit" (length in the op byte if width 0), "copy" or "bad".
_OPS: list[tuple[str, int, int]] = (
    [("end", 0, 0)]
    + [("lit", 0, 0)] * 64
    + [("lit", w, 0) for w in (1, 2, 4, 8)]
    + [("copy", a, b) for a in (1, 2, 4, 8) for b in (1, 2, 4, 8)]
    + [("bad", 0, 0)] * (256 - OP_RESERVED)
)


class RdiffPatcher:
    """Streaming patch of ``base`` by an rdiff delta: ``feed()`` delta bytes, ``finish()``.

    ``feed`` returns the output pieces decoded so far, in order (COPY pieces are zero-copy
    views into ``base``).  ``finish`` raises ``FormatError`` if the delta stopped before its
    END.  With ``max_size``, output growing past it raises ``LimitExceeded``.  The rdiff format
    carries no checksum of the result, so nothing more can be verified.
    """

    def __init__(self, base: Buffer, *, max_size: int | None = None) -> None:
        self._base = as_bytes_view(base)
        self._max_size = max_size
        self._head = bytearray()  # an incomplete magic or op header
        self._have_magic = False
        self._lit_left = 0  # literal bytes still to come
        self._ended = False
        self._offset = 0  # delta offset of the next byte fed
        self._done = False
        self.new_size = 0

    def _grow(self, pieces: list[bytes | memoryview], piece: bytes | memoryview) -> None:
        self.new_size += len(piece)
        if self._max_size is not None and self.new_size > self._max_size:
            raise LimitExceeded(
                f"rdiff delta: output passes the limit of {self._max_size} bytes "
                f"at offset {self._offset}"
            )
        pieces.append(piece)

    def feed(self, data: Buffer) -> list[bytes | memoryview]:
        if self._done:
            raise UsageError("RdiffPatcher.feed() called after finish()")
        mv = as_bytes_view(data)
        shared = isinstance(mv.obj, bytes)  # literal pieces may be views only into bytes
        pieces: list[bytes | memoryview] = []
        p, n = 0, len(mv)
        while p < n:
            if self._ended:
                raise FormatError(f"rdiff delta: trailing data after END at offset {self._offset}")
            if self._lit_left:
                take = min(self._lit_left, n - p)
                piece = mv[p : p + take]
                self._grow(pieces, piece if shared else bytes(piece))
                self._lit_left -= take
                p += take
                self._offset += take
                continue
            need = 4 if not self._have_magic else self._header_len(self._head[0] if self._head
                                                                   else mv[p])
            take = min(need - len(self._head), n - p)
            self._head += mv[p : p + take]
            p += take
            if len(self._head) < need:
                break
            head = bytes(self._head)
            self._head.clear()
            self._op(head, pieces)
            self._offset += need
        return pieces

    def _header_len(self, op: int) -> int:
        kind, a, b = _OPS[op]
        if kind == "bad":
            raise FormatError(f"rdiff delta: reserved op byte 0x{op:02x} at offset {self._offset}")
        return 1 + a + b

    def _op(self, head: bytes, pieces: list[bytes | memoryview]) -> None:
        if not self._have_magic:
            if head != MAGIC_BYTES:
                raise FormatError(
                    f"not an rdiff delta: magic is {head.hex()}, expected {DELTA_MAGIC:08x}"
                )
            self._have_magic = True
            return
        kind, a, _b = _OPS[head[0]]
        if kind == "end":
            self._ended = True
        elif kind == "lit":
            length = head[0] if a == 0 else int.from_bytes(head[1:], "big")
            if length == 0:
                raise FormatError(f"rdiff delta: empty LITERAL at offset {self._offset}")
            self._lit_left = length
        else:
            start = int.from_bytes(head[1 : 1 + a], "big")
            length = int.from_bytes(head[1 + a :], "big")
            size = len(self._base)
            if length == 0 or start + length > size:
                raise FormatError(
                    f"rdiff delta: COPY of {length} bytes from {start} at offset {self._offset} "
                    + ("is empty" if length == 0 else f"is outside the base's {size} bytes")
                )
            self._grow(pieces, self._base[start : start + length])

    def finish(self) -> None:
        if self._done:
            raise UsageError("RdiffPatcher.finish() called twice")
        self._done = True
        if not self._ended:
            what = (
                "no magic" if not self._have_magic
                else f"{self._lit_left} literal bytes missing" if self._lit_left
                else "no END command"
            )
            raise FormatError(f"rdiff delta truncated at offset {self._offset}: {what}")


def patch(base: Buffer, delta: Buffer, *, max_size: int | None = None) -> bytes:
    """Apply a whole rdiff delta to a whole base; returns the new file."""
    patcher = RdiffPatcher(base, max_size=max_size)
    pieces = patcher.feed(delta)
    patcher.finish()
    return b"".join(pieces)

