"""The Trio edge of the protocol: a ``Channel`` moves a ``protocol.Connection``'s bytes over TCP.

The channel adds only what sans-I/O code cannot have: sockets and deadlines.  Every rule of
the conversation (what may be sent or received when, the handshake and its proofs) is the
``Connection``'s.  Invariants: every wait on the network has a deadline; a peer that stops
reading for ``send_timeout`` seconds is gone; byte counters include frame headers and the
handshake, so they are the real bytes on the wire.
"""

from __future__ import annotations

from typing import Any, TypeVar

import trio

from deltabkp import protocol
from deltabkp.errors import DeltabkpError, ErrorCode, PeerUnavailable, RemoteProtocolError
from deltabkp.net._address import Address

__all__ = [
    "Channel",
    "connect",
    "accept",
    "listen",
    "DEFAULT_TIMEOUT",
    "DEFAULT_SEND_TIMEOUT",
    "DEFAULT_SERVER_PORT",
]

DEFAULT_TIMEOUT = 10.0
#: A peer that reads nothing for this long is treated as gone (it must not pin our tasks).
DEFAULT_SEND_TIMEOUT = 60.0
DEFAULT_SERVER_PORT = 7470
_RECV_SIZE = 64 * 1024

T = TypeVar("T", bound=protocol.Message)


class Channel:
    """One connection's stream and its ``protocol.Connection``."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        conn: protocol.Connection,
        *,
        send_timeout: float = DEFAULT_SEND_TIMEOUT,
    ) -> None:
        self._stream = stream
        self.conn = conn
        self._send_lock = trio.Lock()
        self.send_timeout = send_timeout
        self.bytes_sent = 0
        self.bytes_received = 0

    @property
    def peer(self) -> str:
        return self.conn.peer

    @property
    def peer_role(self) -> str | None:
        return self.conn.peer_role

    @property
    def peer_info(self) -> dict[str, Any]:
        return self.conn.peer_info

    def _lost(self, reason: str) -> PeerUnavailable:
        return PeerUnavailable(reason, peer=self.peer, peer_role=self.peer_role)

    async def flush(self) -> None:
        """Send what the connection has queued; a peer that stops reading is gone."""
        async with self._send_lock:
            data = self.conn.data_to_send()
            if not data:
                return
            with trio.move_on_after(self.send_timeout) as scope:
                try:
                    await self._stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    raise self._lost(f"connection lost while sending ({exc})") from None
            if scope.cancelled_caught:
                raise self._lost(f"peer stopped reading (nothing sent for {self.send_timeout:g} s)")
            self.bytes_sent += len(data)

    async def send(self, msg: protocol.Message) -> None:
        """Send one message (checked by the conversation first)."""
        self.conn.send(msg)
        await self.flush()

    async def receive(
        self, timeout: float | None = DEFAULT_TIMEOUT, *, raise_errors: bool = True
    ) -> protocol.Message:
        """The next message. An ``error`` from the peer raises its refusal by default."""
        with trio.move_on_after(timeout if timeout is not None else float("inf")) as scope:
            msg = await self._receive()
        if scope.cancelled_caught:
            raise self._lost(f"no answer within {timeout:g} s")
        if raise_errors and isinstance(msg, protocol.Error):
            raise self.conn.refusal(msg)
        return msg

    async def next_request(self, timeout: float) -> protocol.Message | None:
        """A serving loop's next message; None when the peer is done (hung up, silent for
        ``timeout``, or out of turn — which it is told before we hang up)."""
        try:
            return await self.receive(timeout, raise_errors=False)
        except RemoteProtocolError as exc:
            await self.send_error(ErrorCode.PROTOCOL, exc.reason)
        except DeltabkpError:
            pass
        return None

    async def receive_a(self, kind: type[T], timeout: float | None = DEFAULT_TIMEOUT) -> T:
        """The next message, which must be a ``kind`` (the conversation allows others too)."""
        msg = await self.receive(timeout)
        if not isinstance(msg, kind):
            raise RemoteProtocolError(
                f"expected {kind.TYPE} message, got {msg.TYPE}", peer=self.peer,
                peer_role=self.peer_role,
            )
        return msg

    async def _receive_data(self) -> None:
        try:
            data = await self._stream.receive_some(_RECV_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise self._lost(f"connection lost ({exc})") from None
        if not data:
            raise self._lost("connection closed by peer")
        self.bytes_received += len(data)
        self.conn.receive_data(data)

    async def _receive(self) -> protocol.Message:
        while True:
            msg = self.conn.next_event()
            if msg is not None:
                return msg
            await self._receive_data()

    async def send_error(self, code: ErrorCode, reason: str) -> None:
        """Best effort: tell the peer why we are about to hang up."""
        self.conn.send_error(code, reason)
        with trio.move_on_after(2):
            try:
                await self.flush()
            except PeerUnavailable:
                pass

    async def handshake(self) -> None:
        """Run the handshake until the connection is authenticated (no deadline of its own)."""
        if self.conn.initiator:
            self.conn.initiate()
        while not self.conn.authenticated:
            await self.flush()
            await self._receive_data()
        await self.flush()  # the responder's welcome

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self._stream.aclose()

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def listen(address: Address) -> tuple[list[trio.SocketListener], Address]:
    """Listening sockets for ``address`` and the address really bound (port 0 resolved)."""
    try:
        listeners = await trio.open_tcp_listeners(address.port, host=address.host)
    except OSError as exc:
        raise DeltabkpError(f"cannot listen on {address}: {exc.strerror}") from None
    sockname = listeners[0].socket.getsockname()
    return listeners, Address(address.host or sockname[0], sockname[1])


def _peer_name(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None)
    if sock is None:
        return "peer"
    try:
        addr = sock.getpeername()
    except OSError:
        return "peer"
    return str(Address(addr[0], addr[1]))


async def connect(
    address: Address, *, key: bytes, role: str, timeout: float = DEFAULT_TIMEOUT
) -> Channel:
    """Open an authenticated channel to ``address`` as ``role`` (initiator side)."""
    conn = protocol.Connection(key=key, our_role=role, initiator=True, peer=str(address))
    peer_role = conn.peer_role
    try:
        with trio.fail_after(timeout):
            stream: trio.abc.Stream = await trio.open_tcp_stream(address.host, address.port)
    except trio.TooSlowError:
        raise PeerUnavailable(
            f"connection timed out after {timeout:g} s", peer=conn.peer, peer_role=peer_role
        ) from None
    except OSError as exc:
        raise PeerUnavailable(
            f"cannot connect ({exc.strerror or exc})", peer=conn.peer, peer_role=peer_role
        ) from None
    chan = Channel(stream, conn)
    try:
        with trio.fail_after(timeout):
            await chan.handshake()
    except trio.TooSlowError:
        await chan.aclose()
        raise chan._lost(f"handshake timed out after {timeout:g} s") from None
    except BaseException:
        await chan.aclose()
        raise
    return chan


async def accept(
    stream: trio.abc.Stream,
    *,
    key: bytes,
    role: str,
    roles: tuple[str, ...] = protocol.ROLES,
    timeout: float = DEFAULT_TIMEOUT,
    info: dict[str, object] | None = None,
) -> Channel:
    """Authenticate an incoming stream as ``role`` (responder side, serving initiators of
    ``roles``); the caller closes ``stream`` on error.

    A peer that fails the handshake gets one ``error`` frame and nothing else.
    """
    conn = protocol.Connection(
        key=key, our_role=role, initiator=False, peer=_peer_name(stream), serve_roles=roles,
        info=info,
    )
    chan = Channel(stream, conn)
    try:
        with trio.fail_after(timeout):
            await chan.handshake()
    except trio.TooSlowError:
        await chan.send_error(ErrorCode.PROTOCOL, f"handshake not completed within {timeout:g} s")
        raise chan._lost("handshake timed out") from None
    except DeltabkpError:
        with trio.move_on_after(2):  # the connection queued its one error frame
            try:
                await chan.flush()
            except PeerUnavailable:
                pass
        raise
    return chan
