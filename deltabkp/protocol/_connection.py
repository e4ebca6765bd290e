"""One connection, sans-I/O: the authenticating handshake, then one conversation.

Bytes in (``receive_data``), messages out (``next_event``); messages in (``send``), bytes out
(``data_to_send``) — the hyper-h2 shape.  The Trio edge (``deltabkp.net``) only moves bytes
and applies deadlines; the real server, agent and ctl and the test peers all drive this.

The handshake (docs/formats.md, "Handshake")::

    initiator → hello(magic, version, role, nonce_i)
    responder → challenge(nonce_r, HMAC(key, "responder" | nonce_i | nonce_r))
    initiator → auth(HMAC(key, "initiator" | nonce_i | nonce_r))
    responder → welcome(info)

Invariants: before both proofs check out, no message but the handshake's is accepted and a
frame may be at most ``HANDSHAKE_MAX_FRAME`` bytes; proofs are compared in constant time; a
responder whose handshake fails queues exactly one ``error`` frame (code ``auth``,
``version`` or ``protocol``) and nothing else.  During a key rotation a side may also accept
``other_keys``: it proves with its own ``key`` (a responder) or with the key the responder
proved (an initiator), and accepts a proof under any of its keys.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import secrets
from collections.abc import Mapping
from typing import Any

from deltabkp.errors import (
    AuthError,
    DeltabkpError,
    ErrorCode,
    LocalProtocolError,
    RemoteProtocolError,
    RequestRefused,
)
from deltabkp.protocol._conversations import ControlSession, Conversation
from deltabkp.protocol._frames import FrameDecoder, encode
from deltabkp.protocol._messages import (
    MAX_FRAME,
    PROTOCOL_MAGIC,
    PROTOCOL_VERSION,
    ROLES,
    Auth,
    Challenge,
    Error,
    Hello,
    Message,
    Welcome,
)

__all__ = [
    "Connection",
    "UnsupportedPeerVersion",
    "HANDSHAKE_MAX_FRAME",
    "NONCE_SIZE",
    "new_nonce",
    "handshake_proof",
    "proof_matches",
]

#: Before authentication a peer may make us buffer this much, no more (handshake frames are tiny).
HANDSHAKE_MAX_FRAME = 4096
NONCE_SIZE = 32
_LABELS = {"responder": b"deltabkp/1 responder proof", "initiator": b"deltabkp/1 initiator proof"}


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_SIZE)


def handshake_proof(key: bytes, side: str, initiator_nonce: bytes, responder_nonce: bytes) -> bytes:
    """HMAC-SHA256 over both nonces; the label keeps one side's proof from serving the other."""
    msg = _LABELS[side] + b"\0" + initiator_nonce + responder_nonce
    return hmac.new(key, msg, hashlib.sha256).digest()


def _conversation(initiator_role: str) -> type[Conversation] | None:
    """The conversation class a connection opened by ``initiator_role`` carries.  The server's
    and the agent's (``_backup``) are built on first use: a ctl never needs them."""
    if initiator_role == ControlSession.INITIATOR:
        return ControlSession
    from deltabkp.protocol._backup import AgentSession, AnnounceSession

    return {c.INITIATOR: c for c in (AgentSession, AnnounceSession)}.get(initiator_role)


def for_initiator(initiator_role: str, our_role: str, peer: str = "peer") -> Conversation:
    """The conversation a connection opened by ``initiator_role`` carries, seen by ``our_role``."""
    cls = _conversation(initiator_role)
    if cls is None:
        raise LocalProtocolError(f"no conversation is opened by a {initiator_role!r}")
    return cls(our_role, peer)


def responder_of(initiator_role: str) -> str:
    cls = _conversation(initiator_role)
    if cls is None:
        raise KeyError(initiator_role)
    return cls.RESPONDER


def proof_matches(expected: bytes, got: bytes) -> bool:
    return hmac.compare_digest(expected, got)


class UnsupportedPeerVersion(RemoteProtocolError):
    """The peer speaks another protocol version (answered with code ``version``)."""


class Connection:
    """Both phases of one connection, as ``our_role``.

    The initiator knows its conversation from the start; the responder learns it from the
    peer's ``hello`` (its role), among ``serve_roles``.  ``peer`` names the other end in
    errors (its address).
    """

    def __init__(
        self,
        *,
        key: bytes,
        our_role: str,
        initiator: bool,
        peer: str = "peer",
        serve_roles: tuple[str, ...] = ROLES,
        info: Mapping[str, Any] | None = None,
        nonce: bytes | None = None,
        other_keys: tuple[bytes, ...] = (),
    ) -> None:
        if our_role not in ROLES:
            raise LocalProtocolError(f"unknown role {our_role!r}")
        self.our_role = our_role
        self.initiator = initiator
        self.peer = peer
        self._key = key
        self._keys = (key, *(k for k in other_keys if k != key))
        self._serve_roles = serve_roles
        self._info = dict(info or {})
        self._nonce = nonce if nonce is not None else new_nonce()
        self._peer_nonce = b""
        self._decoder = FrameDecoder(HANDSHAKE_MAX_FRAME)
        self._out = bytearray()
        self._events: collections.deque[Message] = collections.deque()
        self.handshake_state = "start" if initiator else "await hello"
        self.peer_role: str | None = responder_of(our_role) if initiator else None
        self.peer_info: dict[str, Any] = {}
        self.conversation: Conversation | None = None
        self._refused = False

    # -- bytes ---------------------------------------------------------------------------

    @property
    def authenticated(self) -> bool:
        return self.conversation is not None

    def data_to_send(self) -> bytes:
        """Everything queued for the peer since the last call."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer; runs the handshake; raises on any violation."""
        if self.authenticated:
            self._decoder.feed(data)
            return
        try:
            self._decoder.feed(data)
            while not self.authenticated:
                msg = self._decoder.next_message()
                if msg is None:
                    return
                self._handshake(msg)
        except RemoteProtocolError as exc:
            # Garbage or an oversized frame before authentication: the one error frame too.
            if not self.initiator and not self._refused:
                self._refuse(ErrorCode.PROTOCOL, exc.reason)
            raise

    def next_event(self) -> Message | None:
        """The next message of the conversation (already checked), or None for more bytes."""
        if not self.authenticated:
            return None
        msg = self._decoder.next_message()
        if msg is not None:
            assert self.conversation is not None
            self.conversation.receive(msg)
        return msg

    def send(self, msg: Message) -> None:
        """Queue ``msg`` after checking that the conversation allows it now."""
        if self.conversation is None:
            raise LocalProtocolError(f"{self.our_role} tried to send {msg.TYPE} before the handshake")
        frame = encode(msg)  # first: a message too big to send must not move the state
        self.conversation.send(msg)
        self._out += frame

    def send_error(self, code: ErrorCode, reason: str) -> None:
        """Queue an ``error`` frame outside the conversation's rules: we are about to hang up."""
        self._out += encode(Error(str(code), reason))

    # -- errors --------------------------------------------------------------------------

    def refusal(self, msg: Error) -> DeltabkpError:
        """The exception for an ``error`` from the peer, with what it answered filled in."""
        conv = self.conversation
        if msg.code == ErrorCode.AUTH:
            return AuthError(msg.message, peer=self.peer, peer_role=self.peer_role)
        # A refusal is an answer about the request's node and path, not about the link.
        return RequestRefused(
            msg.code, msg.message, node=conv.node if conv else None,
            path=conv.path if conv else None,
        )

    # -- the handshake -------------------------------------------------------------------

    def initiate(self) -> None:
        """Initiator: queue ``hello``."""
        if not self.initiator or self.handshake_state != "start":
            raise LocalProtocolError("initiate() is the initiator's first step, and only once")
        self._out += encode(Hello(PROTOCOL_MAGIC, PROTOCOL_VERSION, self.our_role, self._nonce))
        self.handshake_state = "await challenge"

    def _handshake(self, msg: Message) -> None:
        if self.initiator:
            self._initiator_step(msg)
            return
        try:
            self._responder_step(msg)
        except AuthError:
            self._refuse(ErrorCode.AUTH, "authentication failed: the cluster keys differ")
            raise
        except UnsupportedPeerVersion as exc:
            self._refuse(ErrorCode.VERSION, exc.reason)
            raise
        except RemoteProtocolError as exc:
            self._refuse(ErrorCode.PROTOCOL, exc.reason)
            raise

    def _refuse(self, code: ErrorCode, reason: str) -> None:
        """The responder's one error frame of a failed handshake."""
        self._refused = True
        self.send_error(code, reason)

    def _peer_error(self, what: str) -> RemoteProtocolError:
        return RemoteProtocolError(what, peer=self.peer, peer_role=self.peer_role)

    def _check_nonce(self, nonce: bytes) -> None:
        if not 16 <= len(nonce) <= 64:
            raise self._peer_error(f"handshake nonce of {len(nonce)} bytes")

    def _initiator_step(self, msg: Message) -> None:
        if isinstance(msg, Error):
            # A refusal during the handshake is a failed connection (wrong key, port, version
            # or role), not a refused request: it must not look like the server said "no".
            if msg.code == ErrorCode.AUTH:
                raise AuthError(msg.message, peer=self.peer, peer_role=self.peer_role)
            raise self._peer_error(f"refused the connection: {msg.message}")
        if self.handshake_state == "await challenge" and isinstance(msg, Challenge):
            self._check_nonce(msg.nonce)
            # Every key is tried (no early exit): the time taken says nothing about which.
            matched = [
                k for k in self._keys
                if proof_matches(handshake_proof(k, "responder", self._nonce, msg.nonce), msg.proof)
            ]
            if not matched:
                raise AuthError(
                    "does not hold our cluster key (wrong key file?)",
                    peer=self.peer, peer_role=self.peer_role,
                )
            proof = handshake_proof(matched[0], "initiator", self._nonce, msg.nonce)
            self._out += encode(Auth(proof))
            self.handshake_state = "await welcome"
        elif self.handshake_state == "await welcome" and isinstance(msg, Welcome):
            self.peer_info = dict(msg.info)
            self._authenticated(self.our_role)
        else:
            want = self.handshake_state.removeprefix("await ")
            raise self._peer_error(f"expected {want} message, got {msg.TYPE}")

    def _responder_step(self, msg: Message) -> None:
        if self.handshake_state == "await hello":
            if not isinstance(msg, Hello):
                raise self._peer_error(f"expected hello, got {msg.TYPE}")
            if msg.magic != PROTOCOL_MAGIC:
                raise self._peer_error(f"not a deltabkp peer (magic {msg.magic!r})")
            if msg.version != PROTOCOL_VERSION:
                raise UnsupportedPeerVersion(
                    f"protocol version {msg.version} is not supported (this side speaks "
                    f"{PROTOCOL_VERSION})", peer=self.peer,
                )
            if msg.role not in self._serve_roles or msg.role == self.our_role:
                raise self._peer_error(f"role {msg.role!r} is not served here")
            self._check_nonce(msg.nonce)
            self._peer_nonce = msg.nonce
            self.peer_role = msg.role
            proof = handshake_proof(self._key, "responder", msg.nonce, self._nonce)
            self._out += encode(Challenge(self._nonce, proof))
            self.handshake_state = "await auth"
            return
        if not isinstance(msg, Auth):
            raise AuthError(f"expected auth, got {msg.TYPE}", peer=self.peer)
        # A list, not a generator: every key is tried, so the time says nothing about which.
        if not any([  # noqa: C419
            proof_matches(handshake_proof(k, "initiator", self._peer_nonce, self._nonce), msg.proof)
            for k in self._keys
        ]):
            raise AuthError("failed authentication (wrong cluster key)", peer=self.peer)
        assert self.peer_role is not None
        self._authenticated(self.peer_role)
        self._out += encode(Welcome(self._info))

    def _authenticated(self, initiator_role: str) -> None:
        self.handshake_state = "done"
        self._decoder.max_frame = MAX_FRAME
        self.conversation = for_initiator(initiator_role, self.our_role, self.peer)
