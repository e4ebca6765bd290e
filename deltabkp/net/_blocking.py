"""The blocking edge of the protocol: a ``BlockingChannel`` moves a ``protocol.Connection``'s
bytes over TLS 1.3 on a plain ``socket``, for a one-shot client (``deltabkp ctl``).

The Trio edge (``_channel``) serves daemons, which juggle many connections; a ctl command
asks one question on one connection, and importing and starting Trio cost it more than the
question.  Like h11's two edges, this is only another way to move the same bytes: every rule
of the conversation and both handshakes' proofs stay the ``Connection``'s, the certificates
and the translation of TLS failures ``_tls``'s — and every error says what ``_channel``'s says
for the same failure (the ctl's output does not depend on the edge it took).
Invariants: every wait on the network has a deadline — connecting has ``timeout``, then TLS
and the key handshake share another (as on the Trio edge), each answer has its own; the
socket is closed on every error.
"""

from __future__ import annotations

import socket
import ssl
import time
from typing import Any, Self, TypeVar

from deltabkp import protocol
from deltabkp.errors import DeltabkpError, PeerUnavailable, RemoteProtocolError
from deltabkp.net import _tls
from deltabkp.net._address import Address
from deltabkp.net._defaults import DEFAULT_SEND_TIMEOUT

__all__ = ["BlockingChannel", "connect_blocking"]

_RECV_SIZE = 64 * 1024

T = TypeVar("T", bound=protocol.Message)


class _Deadline(Exception):
    """A wait on the socket ran out of time (turned into the caller's own words)."""


class BlockingChannel:
    """One connection's socket and its ``protocol.Connection`` (the ``Channel`` of a
    one-shot client: ``send``, ``receive``, ``receive_a``, closed by ``with``)."""

    def __init__(self, sock: socket.socket, conn: protocol.Connection) -> None:
        self._sock = sock
        self.conn = conn

    @property
    def peer(self) -> str:
        return self.conn.peer

    @property
    def peer_role(self) -> str | None:
        return self.conn.peer_role

    def _lost(self, reason: str) -> PeerUnavailable:
        return PeerUnavailable(reason, peer=self.peer, peer_role=self.peer_role)

    def _failed(self, exc: BaseException, what: str) -> DeltabkpError:
        # A TLS 1.3 client learns of a refused certificate only at its first read.
        tls = _tls.describe_tls_failure(exc, self.peer, self.peer_role)
        return tls if tls is not None else self._lost(f"{what} ({exc})")

    def _flush(self, deadline: float | None) -> None:
        data = self.conn.data_to_send()
        if not data:
            return
        self._sock.settimeout(_left(deadline))
        try:
            self._sock.sendall(data)
        except TimeoutError:
            raise _Deadline from None
        except OSError as exc:  # ssl.SSLError is one
            raise self._failed(exc, "connection lost while sending") from None

    def _receive_data(self, deadline: float | None) -> None:
        self._sock.settimeout(_left(deadline))
        try:
            data = self._sock.recv(_RECV_SIZE)
        except TimeoutError:
            raise _Deadline from None
        except OSError as exc:
            raise self._failed(exc, "connection lost") from None
        if not data:
            raise self._lost("connection closed by peer")
        self.conn.receive_data(data)

    def handshake(self, deadline: float) -> None:
        """Run the key handshake until the connection is authenticated (``_Deadline``)."""
        self.conn.initiate()
        while not self.conn.authenticated:
            self._flush(deadline)
            self._receive_data(deadline)
        self._flush(deadline)

    def send(self, msg: protocol.Message, timeout: float = DEFAULT_SEND_TIMEOUT) -> None:
        """Send one message (checked by the conversation first)."""
        self.conn.send(msg)
        try:
            self._flush(time.monotonic() + timeout)
        except _Deadline:
            raise self._lost(f"peer stopped reading (nothing sent for {timeout:g} s)") from None

    def receive(self, timeout: float | None, *, raise_errors: bool = True) -> protocol.Message:
        """The next message. An ``error`` from the peer raises its refusal by default."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while (msg := self.conn.next_event()) is None:
                self._receive_data(deadline)
        except _Deadline:
            raise self._lost(f"no answer within {timeout:g} s") from None
        if raise_errors and isinstance(msg, protocol.Error):
            raise self.conn.refusal(msg)
        return msg

    def receive_a(self, kind: type[T], timeout: float | None) -> T:
        """The next message, which must be a ``kind`` (the conversation allows others too)."""
        msg = self.receive(timeout)
        if not isinstance(msg, kind):
            raise RemoteProtocolError(
                f"expected {kind.TYPE} message, got {msg.TYPE}", peer=self.peer,
                peer_role=self.peer_role,
            )
        return msg

    def close(self) -> None:
        self._sock.close()  # TLS: no close_notify, as on the Trio edge (https_compatible)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _left(deadline: float | None) -> float | None:
    """Seconds until ``deadline`` for ``settimeout`` (never 0: that would mean non-blocking)."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise _Deadline
    return left


def connect_blocking(
    address: Address, *, key: bytes, role: str, timeout: float,
    tls: _tls.TlsSettings | None = None,
) -> BlockingChannel:
    """``_channel.connect`` without Trio: an authenticated channel to ``address`` as ``role``
    (TLS 1.3 with ``tls``, default this process's installed settings, then the protocol
    handshake): connecting within ``timeout``, then both handshakes within ``timeout``."""
    settings = tls or _tls.installed_tls()
    conn = protocol.Connection(
        key=key, our_role=role, initiator=True, peer=str(address), other_keys=settings.extra_keys,
    )
    ctx: dict[str, Any] = {"peer": conn.peer, "peer_role": conn.peer_role}
    if settings.plaintext:
        _tls.check_plaintext_address(address.host, "connecting to")
    # An ASCII host as bytes: a str goes through the idna codec (an import) on every lookup.
    host: str | bytes = address.host.encode() if address.host.isascii() else address.host
    try:
        # typeshed says str; getaddrinfo (what it calls) takes bytes as well
        sock = socket.create_connection((host, address.port), timeout=timeout)  # type: ignore[arg-type]
    except TimeoutError:
        raise PeerUnavailable(f"connection timed out after {timeout:g} s", **ctx) from None
    except OSError as exc:
        raise PeerUnavailable(f"cannot connect ({exc.strerror or exc})", **ctx) from None
    deadline = time.monotonic() + timeout  # then both handshakes, as on the Trio edge
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as trio's streams do
        if not settings.plaintext:
            sock = _secure(sock, settings, key, role, deadline, timeout, ctx)
        chan = BlockingChannel(sock, conn)
        try:
            chan.handshake(deadline)
        except _Deadline:
            raise PeerUnavailable(f"handshake timed out after {timeout:g} s", **ctx) from None
    except BaseException:
        sock.close()
        raise
    return chan


def _secure(
    sock: socket.socket, settings: _tls.TlsSettings, key: bytes, role: str, deadline: float,
    timeout: float, ctx: dict[str, Any],
) -> ssl.SSLSocket:
    """The TLS 1.3 handshake on ``sock`` (an alert OpenSSL sends on a refused certificate
    goes straight to the socket, so the peer learns why)."""
    tls_sock = _tls.tls_client_context(settings, key, role).wrap_socket(
        sock, do_handshake_on_connect=False
    )
    try:
        tls_sock.settimeout(_left(deadline))
        tls_sock.do_handshake()
    except (_Deadline, TimeoutError):
        tls_sock.close()  # it owns the socket now
        raise PeerUnavailable(f"handshake timed out after {timeout:g} s", **ctx) from None
    except OSError as exc:
        tls_sock.close()
        tls_error = _tls.describe_tls_failure(exc, ctx["peer"], ctx["peer_role"])
        if tls_error is not None:
            raise tls_error from None
        detail = str(exc) or "hung up"
        raise PeerUnavailable(
            f"connection lost during the TLS handshake ({detail})", **ctx
        ) from None
    return tls_sock
