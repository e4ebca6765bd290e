"""The messages of protocol v1: typed, validated attrs classes, one per wire type tag.

Invariant: every field is checked by its class's validators when a message is built, so a
decoded message is valid before any caller sees it (the codec builds them from the wire).
Free-form data (request args, responses, info maps) is plain JSON-like data, bounded in depth.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import attrs
import msgpack

__all__ = [
    "PROTOCOL_MAGIC",
    "PROTOCOL_VERSION",
    "MAX_FRAME",
    "MAX_CHUNK",
    "ROLES",
    "REGISTRY",
    "Message",
    "Hello",
    "Challenge",
    "Auth",
    "Welcome",
    "Error",
    "Request",
    "Response",
    "DataChunk",
    "DataEnd",
    "Rows",
    "RowsEnd",
    "ROWS_BUDGET",
    "RowPacker",
]

PROTOCOL_MAGIC = "DELTABKP"
PROTOCOL_VERSION = 1
#: Hard ceiling on one frame's payload; a bigger length prefix is refused before buffering.
MAX_FRAME = 1 << 20
#: Largest data chunk a sender puts in one *Chunk message (leaves room for the envelope).
MAX_CHUNK = 256 * 1024
ROLES = ("server", "ctl", "agent")
#: Byte budget a sender aims at for one ``rows`` message (rows are packed until it is reached;
#: far under ``MAX_FRAME``, so one long row — a long error text — still fits beside others).
ROWS_BUDGET = 128 * 1024

#: Wire type tag → message class.  The backup side's classes (``_backup``) join it when that
#: module is first imported: look tags up with ``_frames.message_class``.
REGISTRY: dict[str, type[Message]] = {}

M = TypeVar("M", bound="type[Message]")


def _message(tag: str) -> Callable[[M], M]:
    """Register an attrs class under its wire type tag."""

    def wrap(cls: M) -> M:
        cls.TYPE = tag
        REGISTRY[tag] = cls
        return cls

    return wrap


class Message:
    """Base of every wire message; ``TYPE`` is the tag stored under key ``"t"``."""

    TYPE: ClassVar[str] = ""



_str = attrs.validators.instance_of(str)
_int = attrs.validators.instance_of(int)
_bytes = attrs.validators.instance_of(bytes)
_dict = attrs.validators.instance_of(dict)
_opt_bytes = attrs.validators.optional(_bytes)
_str_tuple = attrs.validators.deep_iterable(_str, attrs.validators.instance_of(tuple))
_pair_tuple = attrs.validators.deep_iterable(
    attrs.validators.deep_iterable(_str, attrs.validators.instance_of(tuple)),
    attrs.validators.instance_of(tuple),
)


def _nonneg(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or value < 0:
        raise ValueError(f"{attr.name} must be a non-negative integer")


def _positive(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or value <= 0:
        raise ValueError(f"{attr.name} must be a positive integer")


#: Field metadata: the codec leaves this field out of the frame while it holds its default
#: (a field added after v1 shipped: older peers, which refuse unknown fields, still parse it).
OMIT_DEFAULT = "omit_default"


def _port(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not 0 <= value <= 65535:
        raise ValueError(f"{attr.name} must be a TCP port (0-65535)")


#: Free-form values (request args, responses, info maps) may nest this deep, no deeper.
MAX_DEPTH = 32
_PLAIN = (str, bytes, int, float, bool, type(None))
_EXACT = frozenset(_PLAIN)  # the fast path of ``_check_plain`` (subclasses: ``isinstance``)


def _check_plain(value: object) -> None:
    """Free-form data must be JSON-like (no msgpack ext types) and shallow, so that no
    consumer (``json.dumps`` in ``ctl --json``) can be made to fail or recurse without end."""
    if isinstance(value, _PLAIN):
        return
    # Only containers go on the stack: a streamed answer is ~100,000 maps of scalars.
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if depth >= MAX_DEPTH:
            raise ValueError(f"data nested deeper than {MAX_DEPTH} levels")
        if type(v) is dict:
            items: Any = v.values()
        elif type(v) is list or type(v) is tuple:  # exact: msgpack's ExtType is a tuple
            items = v
        else:
            raise ValueError(f"unsupported value of type {type(v).__name__}")
        for x in items:
            if type(x) not in _EXACT and not isinstance(x, _PLAIN):
                stack.append((x, depth + 1))


def _plain(_inst: object, _attr: attrs.Attribute[Any], value: Any) -> None:
    _check_plain(value)


def _to_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _to_pairs(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_to_tuple(v) for v in value)
    return value


# --- handshake ------------------------------------------------------------------------------


@_message("hello")
@attrs.frozen
class Hello(Message):
    """Initiator's opening: protocol magic and version, its role, a fresh nonce."""

    magic: str = attrs.field(validator=_str)
    version: int = attrs.field(validator=[_int, _nonneg])
    role: str = attrs.field(validator=attrs.validators.in_(ROLES))
    nonce: bytes = attrs.field(validator=_bytes)


@_message("challenge")
@attrs.frozen
class Challenge(Message):
    """Responder's nonce and its proof of the key over both nonces."""

    nonce: bytes = attrs.field(validator=_bytes)
    proof: bytes = attrs.field(validator=_bytes)


@_message("auth")
@attrs.frozen
class Auth(Message):
    """Initiator's proof of the key over both nonces."""

    proof: bytes = attrs.field(validator=_bytes)


@_message("welcome")
@attrs.frozen
class Welcome(Message):
    """Handshake done; ``info`` says who answered (name, version)."""

    info: dict[str, Any] = attrs.field(factory=dict, validator=[_dict, _plain])


# --- generic --------------------------------------------------------------------------------


@_message("error")
@attrs.frozen
class Error(Message):
    """A refusal or failure: a stable machine ``code`` and a human ``message``."""

    code: str = attrs.field(validator=_str)
    message: str = attrs.field(validator=_str)


# --- control (ctl -> server) ----------------------------------------------------------------


@_message("request")
@attrs.frozen
class Request(Message):
    op: str = attrs.field(validator=_str)
    args: dict[str, Any] = attrs.field(factory=dict, validator=[_dict, _plain])


@_message("response")
@attrs.frozen
class Response(Message):
    data: Any = attrs.field(default=None, validator=_plain)


@_message("data-chunk")
@attrs.frozen
class DataChunk(Message):
    data: bytes = attrs.field(validator=_bytes)


@_message("data-end")
@attrs.frozen
class DataEnd(Message):
    pass


@_message("rows")
@attrs.frozen
class Rows(Message):
    """One batch of a streamed answer (``log``, ``list``): JSON-like maps, newest first."""

    rows: list[Any] = attrs.field(factory=list, validator=[attrs.validators.instance_of(list), _plain])


@_message("rows-end")
@attrs.frozen
class RowsEnd(Message):
    """End of a streamed answer: ``info["rows"]`` is how many rows were sent (checked by the
    receiver), and the server may add more (``more``: rows remain beyond the limit)."""

    info: dict[str, Any] = attrs.field(factory=dict, validator=[_dict, _plain])


class RowPacker:
    """Packs rows into ``Rows`` batches of about ``budget`` encoded bytes (sans-I/O).

    ``add(row)`` returns a full batch when ``row`` does not fit in the current one (``row``
    then starts the next); ``flush()`` returns what is left.  Memory: one batch.
    """

    def __init__(self, budget: int = ROWS_BUDGET) -> None:
        self.budget = budget
        self._rows: list[Any] = []
        self._size = 0

    def add(self, row: Any) -> Rows | None:
        size = len(msgpack.packb(row, use_bin_type=True))
        out = None
        if self._rows and self._size + size > self.budget:
            out = self.flush()
        self._rows.append(row)
        self._size += size
        return out

    def flush(self) -> Rows | None:
        if not self._rows:
            return None
        out, self._rows, self._size = Rows(self._rows), [], 0
        return out
