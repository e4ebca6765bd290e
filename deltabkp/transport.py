"""Trio edge of the wire protocol: authenticated message channels and cluster key files.

Invariants: no message other than the handshake is sent or accepted before both sides have
proved knowledge of the cluster key (HMAC challenge-response with nonces from both sides,
constant-time comparison); every wait on the network has a deadline; byte counters include
frame headers, so they are the real bytes on the wire.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path
from typing import TypeVar

import trio

from deltabkp import wire
from deltabkp.errors import (
    AuthError,
    PeerUnavailable,
    RemoteProtocolError,
    RequestRefused,
    UsageError,
)

__all__ = [
    "Channel",
    "connect",
    "accept",
    "load_key",
    "default_key_path",
    "parse_hostport",
    "format_hostport",
    "DEFAULT_TIMEOUT",
    "DEFAULT_SEND_TIMEOUT",
    "DEFAULT_SERVER_PORT",
]

DEFAULT_TIMEOUT = 10.0
#: A peer that reads nothing for this long is treated as gone (it must not pin our tasks).
DEFAULT_SEND_TIMEOUT = 60.0
#: Before authentication a peer may make us buffer this much, no more (handshake frames are tiny).
HANDSHAKE_MAX_FRAME = 4096
DEFAULT_SERVER_PORT = 7470
_RECV_SIZE = 64 * 1024
_MIN_KEY = 16
_MAX_KEY_FILE = 4096

T = TypeVar("T", bound=wire.Message)


class Channel:
    """A message channel over an authenticated stream (after ``connect`` / ``accept``)."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        peer: str,
        role: str = "",
        *,
        send_timeout: float = DEFAULT_SEND_TIMEOUT,
    ) -> None:
        self._stream = stream
        # Unauthenticated peers get a tiny frame limit; ``_authenticated`` lifts it.
        self._decoder = wire.FrameDecoder(HANDSHAKE_MAX_FRAME)
        self._send_lock = trio.Lock()
        self.peer = peer
        self.role = role
        self.send_timeout = send_timeout
        self.peer_info: dict[str, object] = {}
        self.bytes_sent = 0
        self.bytes_received = 0

    def _authenticated(self) -> None:
        self._decoder.max_frame = wire.MAX_FRAME

    async def send(self, msg: wire.Message) -> None:
        """Send one message; a peer that stops reading for ``send_timeout`` s is gone."""
        frame = wire.encode(msg)
        async with self._send_lock:
            with trio.move_on_after(self.send_timeout) as scope:
                try:
                    await self._stream.send_all(frame)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    raise PeerUnavailable(
                        f"{self.peer}: connection lost while sending ({exc})"
                    ) from None
            if scope.cancelled_caught:
                raise PeerUnavailable(
                    f"{self.peer}: peer stopped reading (nothing sent for {self.send_timeout:g} s)"
                )
        self.bytes_sent += len(frame)

    async def receive(
        self, timeout: float | None = DEFAULT_TIMEOUT, *, raise_errors: bool = True
    ) -> wire.Message:
        """The next message. An ``Error`` from the peer raises ``RequestRefused`` by default."""
        with trio.move_on_after(timeout if timeout is not None else float("inf")) as scope:
            msg = await self._receive()
        if scope.cancelled_caught:
            raise PeerUnavailable(f"{self.peer}: no answer within {timeout:g} s")
        if raise_errors and isinstance(msg, wire.Error):
            if msg.code == "auth":
                raise AuthError(f"{self.peer}: {msg.message}")
            raise RequestRefused(msg.code, msg.message)
        return msg

    async def receive_a(self, kind: type[T], timeout: float | None = DEFAULT_TIMEOUT) -> T:
        """The next message, which must be a ``kind``."""
        msg = await self.receive(timeout)
        if not isinstance(msg, kind):
            raise RemoteProtocolError(
                f"{self.peer}: expected {kind.TYPE} message, got {msg.TYPE}"
            )
        return msg

    async def _receive(self) -> wire.Message:
        while True:
            msg = self._decoder.next_message()
            if msg is not None:
                return msg
            try:
                data = await self._stream.receive_some(_RECV_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise PeerUnavailable(f"{self.peer}: connection lost ({exc})") from None
            if not data:
                raise PeerUnavailable(f"{self.peer}: connection closed by peer")
            self.bytes_received += len(data)
            self._decoder.feed(data)

    async def send_error(self, code: str, message: str) -> None:
        """Best effort: tell the peer why we are about to hang up."""
        with trio.move_on_after(2):
            try:
                await self.send(wire.Error(code, message))
            except PeerUnavailable:
                pass

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self._stream.aclose()

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def format_hostport(host: str, port: int) -> str:
    """``host:port``, bracketing IPv6 literals (the inverse of ``parse_hostport``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _peer_name(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None)
    if sock is None:
        return "peer"
    try:
        addr = sock.getpeername()
    except OSError:
        return "peer"
    return format_hostport(addr[0], addr[1])


class _UnsupportedPeerVersion(RemoteProtocolError):
    """The peer speaks another protocol version (answered with code "version")."""


def _check_nonce(nonce: bytes, peer: str) -> None:
    if not 16 <= len(nonce) <= 64:
        raise RemoteProtocolError(f"{peer}: handshake nonce of {len(nonce)} bytes")


async def connect(
    host: str, port: int, *, key: bytes, role: str, timeout: float = DEFAULT_TIMEOUT
) -> Channel:
    """Open an authenticated channel to ``host:port`` as ``role`` (initiator side)."""
    peer = format_hostport(host, port)
    try:
        with trio.fail_after(timeout):
            stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        raise PeerUnavailable(f"{peer}: connection timed out after {timeout:g} s") from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise PeerUnavailable(f"{peer}: cannot connect ({reason})") from None
    chan = Channel(stream, peer, role)
    try:
        with trio.fail_after(timeout):
            await _initiate(chan, key, role)
    except trio.TooSlowError:
        await chan.aclose()
        raise PeerUnavailable(f"{peer}: handshake timed out after {timeout:g} s") from None
    except BaseException:
        await chan.aclose()
        raise
    return chan


async def _initiate(chan: Channel, key: bytes, role: str) -> None:
    n_i = wire.new_nonce()
    try:
        await chan.send(wire.Hello(wire.PROTOCOL_MAGIC, wire.PROTOCOL_VERSION, role, n_i))
        challenge = await chan.receive_a(wire.Challenge, timeout=None)
        _check_nonce(challenge.nonce, chan.peer)
        expected = wire.handshake_proof(key, "responder", n_i, challenge.nonce)
        if not wire.proof_matches(expected, challenge.proof):
            raise AuthError(f"{chan.peer} does not hold our cluster key (wrong key file?)")
        await chan.send(wire.Auth(wire.handshake_proof(key, "initiator", n_i, challenge.nonce)))
        welcome = await chan.receive_a(wire.Welcome, timeout=None)
    except RequestRefused as exc:
        # A refusal during the handshake is a protocol failure (wrong port, wrong version,
        # wrong role), not a refused request: it must not look like the server said "no".
        raise RemoteProtocolError(f"{chan.peer} refused the connection: {exc.message}") from None
    chan._authenticated()
    chan.peer_info = dict(welcome.info)


async def accept(
    stream: trio.abc.Stream,
    *,
    key: bytes,
    timeout: float = DEFAULT_TIMEOUT,
    roles: tuple[str, ...] = wire.ROLES,
    info: dict[str, object] | None = None,
) -> Channel:
    """Authenticate an incoming stream (responder side); the caller closes ``stream`` on error.

    A peer that fails the handshake gets one ``Error`` frame and nothing else.
    """
    chan = Channel(stream, _peer_name(stream))
    try:
        with trio.fail_after(timeout):
            await _respond(chan, key, roles, info or {})
    except trio.TooSlowError:
        await chan.send_error("protocol", f"handshake not completed within {timeout:g} s")
        raise PeerUnavailable(f"{chan.peer}: handshake timed out") from None
    except AuthError:
        await chan.send_error("auth", "authentication failed: the cluster keys differ")
        raise
    except _UnsupportedPeerVersion as exc:
        await chan.send_error("version", str(exc))
        raise
    except RemoteProtocolError as exc:
        await chan.send_error("protocol", str(exc))
        raise
    return chan


async def _respond(chan: Channel, key: bytes, roles: tuple[str, ...], info: dict[str, object]) -> None:
    hello = await chan.receive(timeout=None, raise_errors=False)
    if not isinstance(hello, wire.Hello):
        raise RemoteProtocolError(f"{chan.peer}: expected hello, got {hello.TYPE}")
    if hello.magic != wire.PROTOCOL_MAGIC:
        raise RemoteProtocolError(f"{chan.peer}: not a deltabkp peer (magic {hello.magic!r})")
    if hello.version != wire.PROTOCOL_VERSION:
        raise _UnsupportedPeerVersion(
            f"{chan.peer}: protocol version {hello.version} is not supported (this side "
            f"speaks {wire.PROTOCOL_VERSION})"
        )
    if hello.role not in roles:
        raise RemoteProtocolError(f"{chan.peer}: role {hello.role!r} is not served here")
    _check_nonce(hello.nonce, chan.peer)
    n_r = wire.new_nonce()
    proof = wire.handshake_proof(key, "responder", hello.nonce, n_r)
    await chan.send(wire.Challenge(n_r, proof))
    auth = await chan.receive(timeout=None, raise_errors=False)
    if not isinstance(auth, wire.Auth):
        raise AuthError(f"{chan.peer}: expected auth, got {auth.TYPE}")
    expected = wire.handshake_proof(key, "initiator", hello.nonce, n_r)
    if not wire.proof_matches(expected, auth.proof):
        raise AuthError(f"{chan.peer} failed authentication (wrong cluster key)")
    chan.role = hello.role
    chan._authenticated()
    await chan.send(wire.Welcome(dict(info)))


# --- keys and addresses ---------------------------------------------------------------------


def default_key_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "deltabkp" / "cluster.key"


def load_key(path: str | os.PathLike[str] | None = None) -> bytes:
    """The cluster key: ``path``, else ``$DELTABKP_KEY_FILE``, else the per-user default.

    Only the per-user default is created when missing (mode 0600), so a one-machine demo needs
    no flags while a mistyped explicit path is an error rather than a silent new key.
    """
    explicit = path if path is not None else os.environ.get("DELTABKP_KEY_FILE") or None
    if explicit is not None:
        p = Path(explicit)
        if not p.exists():
            raise UsageError(f"key file {p} does not exist")
    else:
        p = default_key_path()
        _create_key_file(p)
    try:
        with open(p, "rb") as f:
            data = f.read(_MAX_KEY_FILE + 1)
    except OSError as exc:
        raise UsageError(f"cannot read key file {p}: {exc.strerror}") from None
    if len(data) > _MAX_KEY_FILE:
        raise UsageError(f"key file {p} is larger than {_MAX_KEY_FILE} bytes")
    key = data.strip()
    if len(key) < _MIN_KEY:
        raise UsageError(f"key file {p} holds fewer than {_MIN_KEY} bytes of key")
    return key


def _create_key_file(p: Path) -> None:
    if p.exists():
        return
    try:
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Write a complete private temp file, then link it into place: a process starting at
        # the same instant sees either no key file or a whole one, never an empty one.
        fd, tmp = tempfile.mkstemp(prefix=".cluster.key.", dir=p.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_hex(32).encode() + b"\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, p)
            except FileExistsError:
                pass  # another process won the race; its key is the key
        finally:
            os.unlink(tmp)
    except OSError as exc:
        raise UsageError(f"cannot create key file {p}: {exc.strerror or exc}") from None


def parse_hostport(text: str, default_port: int | None = None) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` → (host, port); a clear ``UsageError`` otherwise."""
    s = text.strip()
    if s.startswith("["):
        host, sep, rest = s[1:].partition("]")
        port_s = rest[1:] if rest.startswith(":") else ""
        if not sep or (rest and not rest.startswith(":")):
            raise UsageError(f"bad address {text!r}: expected HOST:PORT")
    else:
        host, sep, port_s = s.rpartition(":")
        if not sep:
            host, port_s = s, ""
    if not port_s:
        if default_port is None:
            raise UsageError(f"bad address {text!r}: expected HOST:PORT")
        port_s = str(default_port)
    if not host:
        raise UsageError(f"bad address {text!r}: missing host")
    try:
        port = int(port_s)
    except ValueError:
        raise UsageError(f"bad address {text!r}: port {port_s!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise UsageError(f"bad address {text!r}: port out of range")
    return host, port
