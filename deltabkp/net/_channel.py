"""The Trio edge of the protocol: a ``Channel`` moves a ``protocol.Connection``'s bytes over
TLS 1.3 on TCP.

The channel adds only what sans-I/O code cannot have: sockets, TLS and deadlines.  Every rule
of the conversation (what may be sent or received when, the handshake and its proofs) is the
``Connection``'s; certificates are ``_tls``'s.  ``connect``/``accept`` first run a mutually
authenticated TLS 1.3 handshake (``trio.SSLStream``), then the protocol's own HMAC handshake
inside it (docs/security.md says why both).  Invariants: every wait on the network has a
deadline, the TLS handshake included (it counts against the handshake's ``timeout``); a peer
that stops reading for ``send_timeout`` seconds is gone; byte counters are taken below TLS, so
they are the real bytes on the wire (TLS records, frame headers and both handshakes).
"""

from __future__ import annotations

import ssl
from typing import Any, TypeVar

import trio

from deltabkp import protocol
from deltabkp.errors import (
    DeltabkpError,
    ErrorCode,
    PeerUnavailable,
    RemoteProtocolError,
)
from deltabkp.net import _tls
from deltabkp.net._address import Address
from deltabkp.net._defaults import DEFAULT_SEND_TIMEOUT, DEFAULT_SERVER_PORT, DEFAULT_TIMEOUT
from deltabkp.net._ratelimit import TokenBucket

__all__ = [
    "Channel",
    "connect",
    "accept",
    "listen",
    "open_secure_stream",
    "DEFAULT_TIMEOUT",
    "DEFAULT_SEND_TIMEOUT",
    "DEFAULT_SERVER_PORT",
]

_RECV_SIZE = 64 * 1024

T = TypeVar("T", bound=protocol.Message)


class _Metered(trio.abc.Stream):
    """Counts the bytes that really cross the socket (below TLS)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.sent = 0
        self.received = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)
        self.sent += len(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        self.received += len(data)
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


class Channel:
    """One connection's stream and its ``protocol.Connection``."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        conn: protocol.Connection,
        *,
        send_timeout: float = DEFAULT_SEND_TIMEOUT,
        wire: _Metered | None = None,
    ) -> None:
        # ``wire``: the metered socket under ``stream`` (TLS); else ``stream`` is the socket.
        self._wire = wire if wire is not None else _Metered(stream)
        self._stream = stream if wire is not None else self._wire
        self.conn = conn
        self._send_lock = trio.Lock()
        self.send_timeout = send_timeout
        #: Bandwidth caps on what this channel sends (``--bwlimit``): every bucket is paid.
        self.limits: tuple[TokenBucket, ...] = ()

    @property
    def bytes_sent(self) -> int:
        return self._wire.sent

    @property
    def bytes_received(self) -> int:
        return self._wire.received

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

    def _failed(self, exc: BaseException, what: str) -> DeltabkpError:
        """A TLS alert says why (a TLS 1.3 client learns of a refused certificate only at its
        first read); anything else is a lost connection."""
        tls = _tls.describe_tls_failure(exc, self.peer, self.peer_role)
        return tls if tls is not None else self._lost(f"{what} ({exc or exc.__cause__})")

    async def flush(self) -> None:
        """Send what the connection has queued; a peer that stops reading is gone."""
        async with self._send_lock:
            data = self.conn.data_to_send()
            if not data:
                return
            # Outside the send deadline: waiting for the cap is not the peer being gone.
            for bucket in self.limits:
                await bucket.take(len(data))
            before = self._wire.sent
            with trio.move_on_after(self.send_timeout) as scope:
                try:
                    await self._stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    raise self._failed(exc, "connection lost while sending") from None
            for bucket in self.limits:  # TLS records: the cap is on the wire's bytes
                bucket.charge(self._wire.sent - before - len(data))
            if scope.cancelled_caught:
                raise self._lost(f"peer stopped reading (nothing sent for {self.send_timeout:g} s)")

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
            raise self._failed(exc, "connection lost") from None
        if not data:
            raise self._lost("connection closed by peer")
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
            await self._stream.aclose()  # TLS: no close_notify to wait for (https_compatible)

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def listen(
    address: Address, *, tls: _tls.TlsSettings | None = None
) -> tuple[list[trio.SocketListener], Address]:
    """Listening sockets for ``address`` and the address really bound (port 0 resolved).

    With plaintext settings only a loopback address may be listened on."""
    if (tls or _tls.installed_tls()).plaintext:
        _tls.check_plaintext_address(address.host, "listening on")
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


async def _secure(
    stream: trio.abc.Stream, *, key: bytes, role: str, tls: _tls.TlsSettings | None,
    server_side: bool, peer: str, peer_role: str | None,
) -> tuple[trio.abc.Stream, _Metered]:
    """The TLS 1.3 handshake over ``stream`` (no deadline of its own): the stream to speak
    on and the metered socket under it.  Plaintext settings: ``stream`` itself, metered."""
    settings = tls or _tls.installed_tls()
    wire = _Metered(stream)
    if settings.plaintext:
        return wire, wire
    ctxs = _tls.tls_contexts(settings, key, role)
    # https_compatible: a hang-up needs no close_notify.  Our frames carry their length and
    # every conversation its own end, so a cut is never read as a shorter answer.
    ssl_stream = trio.SSLStream(
        wire, ctxs.server if server_side else ctxs.client, server_side=server_side,
        https_compatible=True,
    )
    try:
        await ssl_stream.do_handshake()
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        tls_error = _tls.describe_tls_failure(exc, peer, peer_role)
        if tls_error is not None:
            await _send_alert(ssl_stream, wire)
            raise tls_error from None
        detail = str(exc.__cause__ or exc) or "hung up"
        raise PeerUnavailable(
            f"connection lost during the TLS handshake ({detail})", peer=peer, peer_role=peer_role,
        ) from None
    return ssl_stream, wire


async def _send_alert(ssl_stream: trio.SSLStream[_Metered], wire: _Metered) -> None:
    """Best effort: send the alert OpenSSL queued when it refused the peer's certificate.

    ``trio.SSLStream`` marks itself broken on the error without flushing its outgoing buffer,
    so the peer would see a bare hang-up instead of "unknown CA" — and could not log a wrong
    key as one.  The buffer is read through the stream's private ``_outgoing`` BIO only if it
    is there and is what we expect."""
    bio = getattr(ssl_stream, "_outgoing", None)
    if not isinstance(bio, ssl.MemoryBIO) or not bio.pending:
        return
    with trio.move_on_after(1):
        try:
            await wire.send_all(bio.read())
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


async def open_secure_stream(
    address: Address, *, key: bytes, role: str, tls: _tls.TlsSettings | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> trio.abc.Stream:
    """A TCP connection to ``address`` after the TLS handshake, before the protocol's: for
    tests and tools that speak raw frames to a daemon (``connect`` is the normal way)."""
    peer_role = protocol.Connection(key=key, our_role=role, initiator=True).peer_role
    tcp = await _open_tcp(address, peer_role, timeout, tls)
    try:
        with trio.fail_after(timeout):
            stream, _ = await _secure(
                tcp, key=key, role=role, tls=tls, server_side=False, peer=str(address),
                peer_role=peer_role,
            )
    except trio.TooSlowError:
        await tcp.aclose()
        raise PeerUnavailable(
            f"TLS handshake timed out after {timeout:g} s", peer=str(address), peer_role=peer_role
        ) from None
    except BaseException:
        await tcp.aclose()
        raise
    return stream


async def _open_tcp(
    address: Address, peer_role: str | None, timeout: float, tls: _tls.TlsSettings | None
) -> trio.SocketStream:
    if (tls or _tls.installed_tls()).plaintext:
        _tls.check_plaintext_address(address.host, "connecting to")
    try:
        with trio.fail_after(timeout):
            return await trio.open_tcp_stream(address.host, address.port)
    except trio.TooSlowError:
        raise PeerUnavailable(
            f"connection timed out after {timeout:g} s", peer=str(address), peer_role=peer_role
        ) from None
    except OSError as exc:
        raise PeerUnavailable(
            f"cannot connect ({exc.strerror or exc})", peer=str(address), peer_role=peer_role
        ) from None


async def connect(
    address: Address, *, key: bytes, role: str, timeout: float = DEFAULT_TIMEOUT,
    tls: _tls.TlsSettings | None = None,
) -> Channel:
    """Open an authenticated channel to ``address`` as ``role`` (initiator side): TLS 1.3
    (``tls``, default: this process's installed settings), then the protocol handshake, both
    within ``timeout``."""
    conn = protocol.Connection(
        key=key, our_role=role, initiator=True, peer=str(address),
        other_keys=(tls or _tls.installed_tls()).extra_keys,
    )
    tcp = await _open_tcp(address, conn.peer_role, timeout, tls)
    try:
        with trio.fail_after(timeout):
            stream, wire = await _secure(
                tcp, key=key, role=role, tls=tls, server_side=False, peer=conn.peer,
                peer_role=conn.peer_role,
            )
            chan = Channel(stream, conn, wire=wire)
            await chan.handshake()
    except trio.TooSlowError:
        await tcp.aclose()
        raise PeerUnavailable(
            f"handshake timed out after {timeout:g} s", peer=conn.peer, peer_role=conn.peer_role
        ) from None
    except BaseException:
        await tcp.aclose()
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
    tls: _tls.TlsSettings | None = None,
) -> Channel:
    """Authenticate an incoming stream as ``role`` (responder side, serving initiators of
    ``roles``): TLS 1.3 (a client certificate from our CA required), then the protocol
    handshake, both within ``timeout``; the caller closes ``stream`` on error.

    A peer that fails TLS gets a TLS alert and nothing else; one that fails the protocol
    handshake (inside TLS) gets one ``error`` frame and nothing else.
    """
    conn = protocol.Connection(
        key=key, our_role=role, initiator=False, peer=_peer_name(stream), serve_roles=roles,
        info=info, other_keys=(tls or _tls.installed_tls()).extra_keys,
    )
    with trio.move_on_after(timeout) as scope:
        secured, wire = await _secure(
            stream, key=key, role=role, tls=tls, server_side=True, peer=conn.peer, peer_role=None
        )
    if scope.cancelled_caught:
        raise PeerUnavailable(f"TLS handshake not completed within {timeout:g} s", peer=conn.peer)
    chan = Channel(secured, conn, wire=wire)
    try:
        with trio.fail_at(scope.deadline):  # one deadline for both handshakes
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
