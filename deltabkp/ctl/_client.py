"""The ctl end of the control conversation: one authenticated connection to the server per command.

``net`` moves the bytes and ``protocol.ControlSession`` checks the conversation (including a
``fetch`` download's size and blake3); this module only adds what the user needs to act on a
failure, and hands a streamed answer (``log``, ``list``) to the caller batch by batch, so
memory stays flat however long it is.  Two edges, one conversation: every command's own
request (``ask``, ``ask_stream``, ``blocking_session`` for a download) runs on
``net.connect_blocking`` (stdlib sockets: no Trio to import or start); what needs concurrency
(the progress bar polled beside ``backup-now --wait``) and callers already inside Trio use
``net.connect`` (``session``, ``request``, ``stream``).  Invariants: every error leaving here is a ``DeltabkpError`` that names the node and
path the command was about as fields (``with_context``; ``net`` and ``protocol`` name the
server as the peer) — the text of an error is never edited; every wait has a deadline.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any

from deltabkp import net, protocol
from deltabkp.errors import (
    AuthError,
    DeltabkpError,
    PeerUnavailable,
    RemoteProtocolError,
)

if TYPE_CHECKING:
    from deltabkp.net import BlockingChannel, Channel

__all__ = ["Client", "default_server", "parse_servers", "ENV_SERVER"]

ENV_SERVER = "DELTABKP_SERVER"

#: What to do when the server cannot be reached, or refuses our key.
UNREACHABLE_HINT = "is deltabkp-server running there? (--server / $DELTABKP_SERVER)"
KEY_HINT = (
    "the server and this client must use the same cluster key "
    "(check --key-file / $DELTABKP_KEY_FILE)"
)


def default_server() -> str:
    """The server ``ctl`` talks to without ``--server``: ``$DELTABKP_SERVER``, else local."""
    return os.environ.get(ENV_SERVER) or f"127.0.0.1:{net.DEFAULT_SERVER_PORT}"


def _about(args: Mapping[str, Any]) -> dict[str, str | None]:
    """The node and path a request is about (the context of any error answering it)."""
    node, path = args.get("node"), args.get("path")
    return {
        "node": node if isinstance(node, str) else None,
        "path": path if isinstance(path, str) else None,
    }


def parse_servers(text: str) -> list[net.Address]:
    """``--server a:7470,b:7470``: every server sharing one catalog answers every command."""
    return [net.Address.parse(part, net.DEFAULT_SERVER_PORT) for part in text.split(",") if part.strip()]


class Client:
    """Connect, authenticate as ``ctl``, ask, close: one connection per command.

    With several servers, the next one is tried when one cannot be reached (before anything
    is sent, so no request is ever made twice).
    """

    def __init__(self, servers: net.Address | list[net.Address], key: bytes, timeout: float) -> None:
        self.servers = servers if isinstance(servers, list) else [servers]
        self.timeout = timeout
        self._key = key

    def _first(self, connect: Callable[[net.Address], Any]) -> Any:
        """``connect(server)`` for each server in turn until one answers."""
        for i, server in enumerate(self.servers):
            try:
                return connect(server)
            except PeerUnavailable:
                if i == len(self.servers) - 1:
                    raise
        raise AssertionError("no server to connect to")  # parse_servers never gives none

    async def _connect(self) -> Channel:
        for i, server in enumerate(self.servers):
            try:
                return await net.connect(server, key=self._key, role="ctl", timeout=self.timeout)
            except PeerUnavailable:
                if i == len(self.servers) - 1:
                    raise
        raise AssertionError("no server to connect to")  # parse_servers never gives none

    @asynccontextmanager
    async def session(self, args: Mapping[str, Any]) -> AsyncIterator[Channel]:
        """An open channel to the server; any error inside names what ``args`` is about."""
        with _about_errors(args):
            with _connect_errors():
                chan = await self._connect()
            async with chan:
                yield chan

    @contextmanager
    def blocking_session(self, args: Mapping[str, Any]) -> Iterator[BlockingChannel]:
        """``session`` on the blocking edge."""
        with _about_errors(args):
            with _connect_errors():
                chan: BlockingChannel = self._first(
                    lambda server: net.connect_blocking(
                        server, key=self._key, role="ctl", timeout=self.timeout
                    )
                )
            with chan:
                yield chan

    async def request(
        self, op: str, args: Mapping[str, Any], timeout: float | None = None
    ) -> Any:
        """Send ``Request(op, args)``; the ``Response``'s data (a refusal raises).

        ``timeout`` overrides the per-answer deadline (``backup-now --wait`` waits longer).
        """
        async with self.session(args) as chan:
            await chan.send(protocol.Request(op, dict(args)))
            answer = await chan.receive_a(protocol.Response, timeout or self.timeout)
            return answer.data

    def ask(self, op: str, args: Mapping[str, Any], timeout: float | None = None) -> Any:
        """``request`` on the blocking edge."""
        with self.blocking_session(args) as chan:
            chan.send(protocol.Request(op, dict(args)))
            return chan.receive_a(protocol.Response, timeout or self.timeout).data

    def ask_stream(
        self, op: str, args: Mapping[str, Any], on_rows: Callable[[list[Any]], None]
    ) -> dict[str, Any]:
        """Send ``Request(op, args)`` for a streamed answer; call ``on_rows`` with each batch
        as it arrives (nothing is kept here); return the ``rows-end`` info.  The deadline
        applies to each batch, not to the whole answer."""
        with self.blocking_session(args) as chan:
            chan.send(protocol.Request(op, dict(args)))
            while True:
                if (info := _rows(chan.receive(self.timeout), chan, on_rows)) is not None:
                    return info


def _rows(
    msg: protocol.Message, chan: Channel | BlockingChannel, on_rows: Callable[[list[Any]], None]
) -> dict[str, Any] | None:
    """One message of a streamed answer: a batch to hand over, or the end's info."""
    if isinstance(msg, protocol.RowsEnd):
        return msg.info
    if not isinstance(msg, protocol.Rows):  # the conversation allows no other
        raise RemoteProtocolError(
            f"expected rows, got {msg.TYPE}", peer=chan.peer, peer_role=chan.peer_role
        )
    on_rows(msg.rows)
    return None


@contextmanager
def _connect_errors() -> Iterator[None]:
    """What to do about a server we cannot reach, or that refuses our key."""
    try:
        yield
    except PeerUnavailable as exc:
        raise exc.with_context(hint=UNREACHABLE_HINT)
    except AuthError as exc:
        raise exc.with_context(hint=KEY_HINT)


@contextmanager
def _about_errors(args: Mapping[str, Any]) -> Iterator[None]:
    """Any error inside names the node and path ``args`` are about."""
    try:
        yield
    except DeltabkpError as exc:
        # The network layers already name the server (peer) when it is the one at fault;
        # an error of ours (a write failing during a download) must not blame it.
        raise exc.with_context(**_about(args))
