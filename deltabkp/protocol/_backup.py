"""The backup side of protocol v1: the messages a ``deltabkp ctl`` never sends nor expects and
the two conversations that carry them, built on first use.

Server ↔ agent (``AgentSession``): ``ping``/``pong``, ``backup`` … ``backup-done``, ``cancel``;
agent → server (``AnnounceSession``): ``announce``/``ack``, ``ping``/``pong``.  Why a module of
its own: building an attrs class compiles its generated methods (~1 ms of CPU each), and a
one-shot ctl command, which needs only the handshake's and the control conversation's
messages, would pay for these twelve at every start (issue 10).
Invariants: the classes, their wire tags, fields and validators are protocol v1's
(docs/formats.md), exactly as when ``_messages`` defined them; importing this module adds its
messages to ``_messages.REGISTRY``, and it is imported before anything could need one of its
names: ``protocol``'s module attributes, ``_frames.message_class`` for a decoded tag,
``_connection``'s conversation lookup for a server's or an agent's connection.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from deltabkp.protocol._conversations import CLOSED, Conversation, _answerable, _Key
from deltabkp.protocol._messages import (
    OMIT_DEFAULT,
    Error,
    Message,
    _bytes,
    _dict,
    _int,
    _message,
    _nonneg,
    _opt_bytes,
    _pair_tuple,
    _plain,
    _port,
    _positive,
    _str,
    _str_tuple,
    _to_pairs,
    _to_tuple,
)

__all__ = [
    "Ping",
    "Pong",
    "BackupRequest",
    "Unchanged",
    "NeedSignature",
    "SignatureChunk",
    "SignatureEnd",
    "DeltaChunk",
    "BackupDone",
    "Cancel",
    "Announce",
    "Ack",
    "AgentSession",
    "AnnounceSession",
]

# --- generic (pings: server → agent, agent → server) ------------------------------------------


@_message("ping")
@attrs.frozen
class Ping(Message):
    """Liveness probe; with ``path``, also ask an agent whether it would serve that path."""

    path: str | None = attrs.field(default=None, validator=attrs.validators.optional(_str))


@_message("pong")
@attrs.frozen
class Pong(Message):
    """Answer to ``Ping``."""

    info: dict[str, Any] = attrs.field(factory=dict, validator=[_dict, _plain])


# --- one backup (server -> agent) -----------------------------------------------------------


@_message("backup")
@attrs.frozen
class BackupRequest(Message):
    """Back up ``path``; ``base_hash`` is the blake3 of the server's newest archive, if any."""

    path: str = attrs.field(validator=_str)
    base_hash: bytes | None = attrs.field(default=None, validator=_opt_bytes)
    exclude: tuple[str, ...] = attrs.field(default=(), converter=_to_tuple, validator=_str_tuple)
    #: The target's bandwidth cap, bytes/s (``ctl register --bwlimit``): the agent sends no
    #: faster than the lower of this and its own ``--bwlimit``.  Left out of the frame when
    #: None, so an agent that predates it still parses every uncapped request.
    bwlimit: int | None = attrs.field(
        default=None, validator=attrs.validators.optional([_int, _positive]),
        metadata={OMIT_DEFAULT: True},
    )
    #: Delta forms the server takes besides the rolling one (``archive.layout_capability()``);
    #: offered only to an agent that advertised the same string in its ``welcome``.
    accepts: tuple[str, ...] = attrs.field(
        default=(), converter=_to_tuple, validator=_str_tuple, metadata={OMIT_DEFAULT: True},
    )


@_message("unchanged")
@attrs.frozen
class Unchanged(Message):
    """Nothing changed since ``archive_hash``; ``reason`` is "fingerprint" or "hash"."""

    archive_hash: bytes = attrs.field(validator=_bytes)
    reason: str = attrs.field(validator=_str)


@_message("need-sig")
@attrs.frozen
class NeedSignature(Message):
    """The agent has no cached signature for the base: send it."""


@_message("sig-chunk")
@attrs.frozen
class SignatureChunk(Message):
    data: bytes = attrs.field(validator=_bytes)


@_message("sig-end")
@attrs.frozen
class SignatureEnd(Message):
    pass


@_message("delta-chunk")
@attrs.frozen
class DeltaChunk(Message):
    data: bytes = attrs.field(validator=_bytes)


@_message("backup-done")
@attrs.frozen
class BackupDone(Message):
    """End of the delta stream: what the new archive is and what the build saw."""

    archive_hash: bytes = attrs.field(validator=_bytes)
    archive_size: int = attrs.field(validator=[_int, _nonneg])
    files: int = attrs.field(validator=[_int, _nonneg])
    changed: tuple[tuple[str, ...], ...] = attrs.field(
        default=(), converter=_to_pairs, validator=_pair_tuple
    )
    skipped: tuple[tuple[str, ...], ...] = attrs.field(
        default=(), converter=_to_pairs, validator=_pair_tuple
    )


@_message("cancel")
@attrs.frozen
class Cancel(Message):
    """The sender abandons the exchange; the peer stops work and closes."""


# --- agent -> server ------------------------------------------------------------------------


@_message("announce")
@attrs.frozen
class Announce(Message):
    """An agent that (re)started says where it listens, so pending retries can run now."""

    host: str = attrs.field(validator=_str)
    port: int = attrs.field(validator=[_int, _port])


@_message("ack")
@attrs.frozen
class Ack(Message):
    pass


# --- their conversations ---------------------------------------------------------------------


class AgentSession(Conversation):
    """Server ↔ agent: pings and backups, any number of them one after another."""

    NAME = "backup"
    INITIATOR = "server"
    RESPONDER = "agent"
    TABLE: ClassVar[dict[_Key, str]] = {
        ("idle", "server", Ping): "pinged",
        ("pinged", "agent", Pong): "idle",
        ("pinged", "agent", Error): "idle",
        ("idle", "server", BackupRequest): "requested",
        ("requested", "agent", Unchanged): "idle",
        ("requested", "agent", NeedSignature): "sending signature",
        ("requested", "agent", DeltaChunk): "streaming delta",
        ("requested", "agent", BackupDone): "idle",
        ("sending signature", "server", SignatureChunk): "sending signature",
        ("sending signature", "server", SignatureEnd): "awaiting delta",
        ("awaiting delta", "agent", DeltaChunk): "streaming delta",
        ("awaiting delta", "agent", BackupDone): "idle",
        ("awaiting delta", "agent", Unchanged): "idle",
        ("streaming delta", "agent", DeltaChunk): "streaming delta",
        ("streaming delta", "agent", BackupDone): "idle",
        # The agent hangs up on a server it cannot serve (too many sessions).
        ("idle", "agent", Error): CLOSED,
    }
    _BUSY = ("requested", "sending signature", "awaiting delta", "streaming delta")
    _answerable(TABLE, _BUSY, "agent", (Error,), "idle")
    _answerable(TABLE, ("idle", *_BUSY), "server", (Cancel, Error), CLOSED)

    def __init__(self, our_role: str, peer: str = "peer") -> None:
        super().__init__(our_role, peer)
        self.node = peer
        self.base_hash: bytes | None = None

    def _check(self, sender: str, msg: Message, nxt: str) -> str:
        if isinstance(msg, BackupRequest):
            self.path, self.base_hash = msg.path, msg.base_hash
        elif isinstance(msg, Ping):
            self.path = msg.path
        elif isinstance(msg, Unchanged):
            if self.base_hash is None or msg.archive_hash != self.base_hash:
                offered = "no base" if self.base_hash is None else "another base hash"
                self._fault(sender, f"answered unchanged for {self.path} but the server offered {offered}")
        elif isinstance(msg, NeedSignature) and self.base_hash is None:
            self._fault(sender, f"asked for the signature of {self.path} but no base was offered")
        return nxt


class AnnounceSession(Conversation):
    """Agent → server: "I am up" (pending retries of this node run now), and pings."""

    NAME = "announce"
    INITIATOR = "agent"
    RESPONDER = "server"
    TABLE: ClassVar[dict[_Key, str]] = {
        ("idle", "agent", Announce): "announced",
        ("announced", "server", Ack): "idle",
        ("announced", "server", Error): "idle",
        ("idle", "agent", Ping): "pinged",
        ("pinged", "server", Pong): "idle",
        ("pinged", "server", Error): "idle",
        ("idle", "server", Error): CLOSED,
    }
