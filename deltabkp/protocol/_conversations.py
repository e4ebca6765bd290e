"""The conversations after the handshake, as state machines both sides drive (h11-style).

One table per conversation says, for each state, which side may send which message and the
state it leads to; the same object checks what we send (``LocalProtocolError``: our bug) and
what we receive (``RemoteProtocolError`` naming the peer's role: its fault).  Semantic checks
that a table cannot express (an ``unchanged`` must name the base we offered, a download must
match the size and blake3 announced) live in each conversation's ``_check``.

The conversations (docs/formats.md, "Messages after the handshake"; the first two, with their
messages, live in ``_backup``, built on first use):

- ``AgentSession``, server → agent: ``ping → pong``; ``backup → unchanged`` |
  ``need-sig, sig-chunk*, sig-end`` then ``delta-chunk*, backup-done`` | ``unchanged``;
  the agent may answer ``error`` at any point of a request; the server may ``cancel``.
- ``AnnounceSession``, agent → server: ``announce → ack``, ``ping → pong``.
- ``ControlSession``, ctl → server: ``request → response | error``; ``request(fetch) →
  response(meta), data-chunk*, data-end``; ``request(log | list) → rows*, rows-end``
  (``ControlSession.ANSWERS`` says which ops are answered how: a new op is one entry).

No I/O, no clock, no threads: events in, verdicts out.
"""

from __future__ import annotations

from typing import Any, ClassVar, NoReturn

import blake3

from deltabkp.errors import IntegrityError, LocalProtocolError, RemoteProtocolError
from deltabkp.protocol._messages import (
    DataChunk,
    DataEnd,
    Error,
    Message,
    Request,
    Response,
    Rows,
    RowsEnd,
)

# ``AgentSession`` and ``AnnounceSession`` live in ``_backup`` with their messages (built on
# first use: a ctl command never needs them); ``protocol`` exports them all the same.
__all__ = [
    "Conversation",
    "ControlSession",
    "CLOSED",
]

CLOSED = "closed"
_Key = tuple[str, str, type[Message]]


class Conversation:
    """A conversation between ``initiator`` and ``responder`` roles, seen from ``our_role``."""

    NAME: ClassVar[str] = ""
    INITIATOR: ClassVar[str] = ""
    RESPONDER: ClassVar[str] = ""
    TABLE: ClassVar[dict[_Key, str]] = {}

    def __init__(self, our_role: str, peer: str = "peer") -> None:
        if our_role not in (self.INITIATOR, self.RESPONDER):
            raise LocalProtocolError(f"{our_role} takes no part in the {self.NAME} conversation")
        self.our_role = our_role
        self.their_role = self.RESPONDER if our_role == self.INITIATOR else self.INITIATOR
        self.peer = peer
        self.state = "idle"
        #: What the request in flight is about: the context of an error answering it.
        self.node: str | None = None
        self.path: str | None = None

    def send(self, msg: Message) -> None:
        """Check that we may send ``msg`` now, and move on."""
        self._step(self.our_role, msg)

    def receive(self, msg: Message) -> None:
        """Check that the peer may send ``msg`` now, and move on."""
        self._step(self.their_role, msg)

    def _step(self, sender: str, msg: Message) -> None:
        nxt = self.TABLE.get((self.state, sender, type(msg)))
        if nxt is None:
            self._fault(sender, f"sent {msg.TYPE} while {self.state} (not allowed in the "
                        f"{self.NAME} conversation)")
        nxt = self._check(sender, msg, nxt)
        self.state = nxt

    def _fault(self, sender: str, what: str, *, integrity: bool = False) -> NoReturn:
        """Blame ``sender``: us (a local bug) or the peer (a remote protocol error)."""
        if sender == self.our_role:
            raise LocalProtocolError(f"{self.our_role} {what}")
        if integrity:
            raise IntegrityError(what, node=self.node, path=self.path)
        raise RemoteProtocolError(
            f"{self.their_role} {what}", node=self.node, path=self.path, peer=self.peer,
        )

    def _check(self, sender: str, msg: Message, nxt: str) -> str:
        return nxt


def _answerable(
    table: dict[_Key, str], states: tuple[str, ...], who: str,
    kinds: tuple[type[Message], ...], nxt: str,
) -> None:
    for s in states:
        for k in kinds:
            table[(s, who, k)] = nxt


class ControlSession(Conversation):
    """ctl → server: requests and their answers; ``fetch`` streams one archive, checked here;
    ``log`` and ``list`` stream rows (never one giant frame), counted here."""

    NAME = "control"
    INITIATOR = "ctl"
    RESPONDER = "server"
    #: How a request is answered, by op: the state its ``request`` leads to.  Any other op is
    #: answered by one ``response`` (state "answering").
    ANSWERS: ClassVar[dict[str, str]] = {
        "fetch": "fetch head",
        "log": "streaming rows",
        "list": "streaming rows",
    }
    TABLE: ClassVar[dict[_Key, str]] = {
        ("idle", "ctl", Request): "answering",
        ("answering", "server", Response): "idle",
        ("answering", "server", Error): "idle",
        ("fetch head", "server", Response): "downloading",
        ("fetch head", "server", Error): "idle",
        ("downloading", "server", DataChunk): "downloading",
        ("downloading", "server", DataEnd): "idle",
        ("downloading", "server", Error): "idle",
        # A stream may fail part-way (the catalog went away): the error ends the answer.
        ("streaming rows", "server", Rows): "streaming rows",
        ("streaming rows", "server", RowsEnd): "idle",
        ("streaming rows", "server", Error): "idle",
        ("idle", "server", Error): CLOSED,
    }

    def __init__(self, our_role: str, peer: str = "peer") -> None:
        super().__init__(our_role, peer)
        self.op: str | None = None
        #: The archive being downloaded: header, bytes so far, hasher (receiving side only).
        self.meta: dict[str, Any] = {}
        self.expected_size = 0
        self.expected_hash = b""
        self.got = 0
        self._hasher: Any = None
        #: Rows streamed so far in answer to the request, and the most it asked for (0: all).
        self.rows = 0
        self.row_limit = 0

    def _check(self, sender: str, msg: Message, nxt: str) -> str:
        if isinstance(msg, Request):
            self.op = msg.op
            node, path = msg.args.get("node"), msg.args.get("path")
            self.node = node if isinstance(node, str) else None
            self.path = path if isinstance(path, str) else None
            limit = msg.args.get("limit")
            self.rows = 0
            self.row_limit = 0
            if isinstance(limit, int) and not isinstance(limit, bool):
                self.row_limit = max(limit, 0)
            return self.ANSWERS.get(msg.op, nxt)
        if self.state == "fetch head" and isinstance(msg, Response):
            self._start_download(sender, msg)
        elif isinstance(msg, DataChunk):
            self.got += len(msg.data)
            if self.got > self.expected_size:
                self._fault(sender, f"archive {self.meta.get('seq')} is longer than the "
                            f"{self.expected_size} bytes announced", integrity=True)
            if self._hasher is not None:
                self._hasher.update(msg.data)
        elif isinstance(msg, DataEnd):
            self._end_download(sender)
        elif isinstance(msg, Rows):
            if not all(isinstance(r, dict) for r in msg.rows):
                self._fault(sender, f"sent {self.op} rows that are not maps")
            rows = self.rows + len(msg.rows)
            if self.row_limit and rows > self.row_limit:
                self._fault(sender, f"sent {rows} {self.op} rows, more than the "
                            f"{self.row_limit} asked for")
            self.rows = rows  # only once the batch is accepted: a refused one moved nothing
        elif isinstance(msg, RowsEnd):
            said = msg.info.get("rows")
            if said != self.rows or isinstance(said, bool):
                self._fault(sender, f"ended {self.op} saying {said!r} rows, but {self.rows} "
                            "were sent")
        return nxt

    def _start_download(self, sender: str, msg: Response) -> None:
        meta = msg.data
        try:
            assert isinstance(meta, dict)
            size = meta["size"]
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise ValueError(size)
            self.expected_hash = bytes.fromhex(str(meta["hash"]))
        except (AssertionError, KeyError, TypeError, ValueError):
            self._fault(sender, f"sent a malformed archive header {meta!r}")
        self.meta, self.expected_size, self.got = dict(meta), size, 0
        # Only the receiver pays for hashing: it is the one that must not trust the bytes.
        self._hasher = blake3.blake3() if sender != self.our_role else None

    def _end_download(self, sender: str) -> None:
        if self.got != self.expected_size:
            self._fault(sender, f"archive {self.meta.get('seq')} arrived with {self.got} bytes, "
                        f"but {self.expected_size} were announced", integrity=True)
        if self._hasher is not None and self._hasher.digest() != self.expected_hash:
            self._fault(sender, f"archive {self.meta.get('seq')} arrived with blake3 "
                        f"{self._hasher.hexdigest()[:16]}, but the server announced "
                        f"{self.expected_hash.hex()[:16]}", integrity=True)
