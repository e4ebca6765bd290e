"""Frames: a u32 big-endian payload length, then one msgpack map ``{"t": TYPE, ...fields}``.

Sans-I/O: ``encode`` turns a message into one frame; ``FrameDecoder`` is fed bytes and yields
validated messages.  A length prefix above the decoder's limit is refused as soon as its four
bytes arrive, before any payload is buffered; anything malformed is a ``RemoteProtocolError``.
"""

from __future__ import annotations

import struct

import attrs
import msgpack

from deltabkp.errors import LocalProtocolError, RemoteProtocolError
from deltabkp.protocol._messages import MAX_FRAME, OMIT_DEFAULT, REGISTRY, Hello, Message

__all__ = ["encode", "decode_payload", "FrameDecoder", "HEADER_SIZE"]

_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size


_OMITTABLE: dict[type[Message], tuple[tuple[str, object], ...]] = {}


def _omittable(cls: type[Message]) -> tuple[tuple[str, object], ...]:
    """(name, default) of ``cls``'s fields marked ``OMIT_DEFAULT`` (added after v1)."""
    found = _OMITTABLE.get(cls)
    if found is None:
        found = _OMITTABLE[cls] = tuple(
            (a.name, a.default) for a in attrs.fields(cls)  # type: ignore[arg-type]
            if a.metadata.get(OMIT_DEFAULT)
        )
    return found


def encode(msg: Message) -> bytes:
    """One complete frame for ``msg``."""
    fields = attrs.asdict(msg, recurse=False)  # type: ignore[arg-type]
    for name, default in _omittable(type(msg)):
        if fields[name] == default:
            del fields[name]
    payload: bytes = msgpack.packb({"t": msg.TYPE, **fields}, use_bin_type=True)
    if len(payload) > MAX_FRAME:
        # Our own bug (a chunk too big), not the peer's: blame the local side.
        raise LocalProtocolError(
            f"{msg.TYPE} message of {len(payload)} bytes exceeds the {MAX_FRAME}-byte frame limit"
        )
    return _HEADER.pack(len(payload)) + payload


def message_class(tag: str) -> type[Message] | None:
    """The class of wire type ``tag`` (None: no such message), building the backup side's
    messages first if ``tag`` may be one of them (``_backup``: a ctl never needs them)."""
    cls = REGISTRY.get(tag)
    if cls is None:
        # Not a look at sys.modules: a module is there from the start of its import, so a
        # thread would see it half-built; the import statement waits for the other thread.
        import deltabkp.protocol._backup  # noqa: F401  (registers its messages)

        cls = REGISTRY.get(tag)
    return cls


def decode_payload(payload: bytes) -> Message:
    """Parse and validate one frame's payload; anything wrong is a ``RemoteProtocolError``."""
    try:
        obj = msgpack.unpackb(
            payload,
            raw=False,
            use_list=True,  # free-form data (Response, Request args) stays JSON-like
            strict_map_key=True,
        )
    # msgpack reports bad input as ValueError subclasses, or TypeError for an unhashable key.
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise RemoteProtocolError(f"malformed frame: {exc}") from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError("malformed frame: payload is not a map")
    tag = obj.pop("t", None)
    cls = message_class(tag) if isinstance(tag, str) else None
    if cls is None:
        raise RemoteProtocolError(f"unknown message type {tag!r}")
    if cls is Hello:
        # Hello must stay parseable by every version, so that a version mismatch gets a clear
        # "unsupported version" answer instead of a field error.
        obj = {k: obj.get(k) for k in ("magic", "version", "role", "nonce")}
    try:
        return cls(**obj)
    except (TypeError, ValueError) as exc:
        raise RemoteProtocolError(f"invalid {tag} message: {exc}") from None


class FrameDecoder:
    """Incremental frame splitter: ``feed`` bytes, then take messages with ``next_message``.

    Buffers at most one partial frame plus what was fed; a length prefix above the limit is
    refused as soon as its four bytes arrive, before any payload is buffered.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data
        self._check_header()

    def _check_header(self) -> None:
        if len(self._buf) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buf)
            if length > self.max_frame:
                raise RemoteProtocolError(
                    f"frame of {length} bytes exceeds the {self.max_frame}-byte limit "
                    "(not a deltabkp peer?)"
                )

    def next_message(self) -> Message | None:
        """The next complete message, or None until more bytes are fed."""
        # Checked here too, not only on feed: the limit may have been raised (after the
        # handshake) or the buffer may hold a next frame whose header nobody looked at yet.
        self._check_header()
        if len(self._buf) < _HEADER.size:
            return None
        (length,) = _HEADER.unpack_from(self._buf)
        end = _HEADER.size + length
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[_HEADER.size : end])
        del self._buf[:end]
        return decode_payload(payload)

    @property
    def buffered(self) -> int:
        return len(self._buf)
