"""Scripted protocol peers: a fake agent for testing a server, a fake server for testing an agent.

``ScriptedAgent`` answers a server exactly as an agent would (protocol v1 through
``deltabkp.net``, so inside TLS 1.3 under the cluster key's CA like the real daemons), but
serves plain byte strings as its "archives" and misbehaves on request: a delta that
rebuilds other bytes than the hash it announces, a hang-up mid-stream, refusals,
a gate that holds every backup, and counters of what it saw.  ``backup_exchange`` is the
server's side of one backup, made against a real agent, with every answer returned as a value.

Invariants: both peers drive the same ``protocol.Connection`` as the real daemons, so every
message they send or receive is checked against the conversation's table (a peer that breaks
the rules raises ``RemoteProtocolError``; one of these peers breaking them by mistake raises
``LocalProtocolError``, which is never swallowed).  Deliberate misbehaviour stays within
what the protocol can express: a wrong hash, a hang-up, a refusal.  Every wait has a deadline.
"""

from __future__ import annotations

from typing import Any

import attrs
import blake3
import trio

import deltabkp
from deltabkp import net, protocol
from deltabkp.errors import (
    AuthError,
    ErrorCode,
    PeerUnavailable,
    RemoteProtocolError,
    RequestRefused,
)

__all__ = ["ScriptedAgent", "BackupResult", "backup_exchange"]

#: The scripted agent sends its delta in chunks of this size (several per archive in tests).
DELTA_CHUNK = 50_000
#: How long the scripted agent waits for each message of a server.
IDLE_S = 30.0


@attrs.define(eq=False)
class ScriptedAgent:
    """An agent-side peer serving ``content[path]`` as the archive bytes of ``path``.

    Start it with ``await nursery.start(agent.serve)`` (reports ``address``); stop it with
    ``stop()``.  Paths under ``allowed_root`` pass the ping path check, others are refused.
    Misbehaviour, set before or between backups:

    - ``corrupt_next``: this many backups announce a hash the delta does not rebuild;
    - ``hang_up_after_chunks``: close the connection after this many delta chunks;
    - ``refuse``: answer every backup with an ``error`` of ``refuse_code`` and this reason;
    - ``gate``: every backup waits for this event first (to observe concurrency).

    ``need_sig_always`` False lets it keep the signature of what it sent last, as the real
    agent's cache does, and skip asking for the base's signature when it holds it.
    """

    key: bytes
    content: dict[str, bytes] = attrs.Factory(dict)
    corrupt_next: int = 0
    hang_up_after_chunks: int | None = None
    refuse: str | None = None
    refuse_code: ErrorCode = ErrorCode.PATH_NOT_ALLOWED
    need_sig_always: bool = True
    gate: trio.Event | None = None
    allowed_root: str = "/srv/"
    host: str = "127.0.0.1"
    port: int = 0
    #: Backups running now / at most, on this peer; ``shared`` is the same across several
    #: peers that are given one list: [running now, at most].
    active: int = 0
    max_active: int = 0
    shared: list[int] = attrs.Factory(lambda: [0, 0])
    requests: list[protocol.BackupRequest] = attrs.Factory(list)
    pings: list[protocol.Ping] = attrs.Factory(list)
    signatures_received: int = 0
    #: What ended each connection that did not end cleanly (the server's errors, hang-ups).
    errors: list[Exception] = attrs.Factory(list)
    address: str = ""
    cancel_scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    _sigs: dict[bytes, bytes] = attrs.field(factory=dict, init=False)

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on ``host:port`` (port 0: any) until ``stop()``; reports ``address``."""
        with self.cancel_scope:
            listeners = await trio.open_tcp_listeners(self.port, host=self.host)
            self.port = listeners[0].socket.getsockname()[1]
            self.address = str(net.Address(self.host, self.port))
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._handle, listeners)
                task_status.started(self.address)

    def stop(self) -> None:
        self.cancel_scope.cancel()

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                chan = await net.accept(
                    stream, key=self.key, role="agent", roles=("server",),
                    info={"name": "scripted-agent"},
                )
                while True:
                    try:
                        msg = await chan.receive(timeout=IDLE_S)
                    except PeerUnavailable:
                        return  # the server hung up (or went quiet) between requests: the end
                    if not await self._answer(chan, msg):
                        return
            except (PeerUnavailable, RequestRefused, RemoteProtocolError, AuthError) as exc:
                self.errors.append(exc)

    async def _answer(self, chan: net.Channel, msg: protocol.Message) -> bool:
        """Answer one request; False ends the connection."""
        if isinstance(msg, protocol.Ping):
            self.pings.append(msg)
            info: dict[str, Any] = {"node": self.address}
            if msg.path is not None:
                info["path_check"] = self.path_check(msg.path)
            await chan.send(protocol.Pong(info))
            return True
        if isinstance(msg, protocol.BackupRequest):
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.shared[0] += 1
            self.shared[1] = max(self.shared[1], self.shared[0])
            try:
                if self.gate is not None:
                    await self.gate.wait()
                return await self._backup(chan, msg)
            finally:
                self.active -= 1
                self.shared[0] -= 1
        return False  # cancel: the server gave up

    def path_check(self, path: str) -> dict[str, Any]:
        """The scripted allowlist's verdict, in the shape of the real agent's ping answer."""
        if path.startswith(self.allowed_root):
            return {"ok": True}
        return {"ok": False, "code": ErrorCode.PATH_NOT_ALLOWED.value,
                "message": f"not under an allowed root ({self.allowed_root})"}

    async def _backup(self, chan: net.Channel, req: protocol.BackupRequest) -> bool:
        self.requests.append(req)
        if self.refuse:
            await chan.send(protocol.Error(self.refuse_code.value, self.refuse))
            return True
        data = self.content[req.path]
        h = blake3.blake3(data).digest()
        if req.base_hash == h:
            await chan.send(protocol.Unchanged(h, "hash"))
            return True
        sig = deltabkp.signature(b"")
        if req.base_hash is not None:
            cached = None if self.need_sig_always else self._sigs.get(req.base_hash)
            if cached is not None:
                sig = cached
            else:
                await chan.send(protocol.NeedSignature())
                got = await self._receive_signature(chan)
                if got is None:
                    return False
                sig = got
        sent = data
        if self.corrupt_next:
            self.corrupt_next -= 1
            # The delta rebuilds other bytes than the hash announced: an integrity failure.
            sent = data[:-1] + bytes([data[-1] ^ 1]) if data else b"\0"
        dlt = deltabkp.delta(sig, sent)
        for i, start in enumerate(range(0, len(dlt), DELTA_CHUNK)):
            if self.hang_up_after_chunks is not None and i >= self.hang_up_after_chunks:
                await trio.sleep(0.2)
                return False  # hang up mid-stream
            await chan.send(protocol.DeltaChunk(dlt[start : start + DELTA_CHUNK]))
        await chan.send(protocol.BackupDone(h, len(data), 1, (("a.log", "grew while read"),), ()))
        if sent is data:
            self._sigs[h] = deltabkp.signature(data)
        return True

    async def _receive_signature(self, chan: net.Channel) -> bytes | None:
        """The base's signature, or None if the server gave up (cancel)."""
        sig = bytearray()
        while True:
            m = await chan.receive(timeout=IDLE_S)
            if isinstance(m, protocol.SignatureEnd):
                self.signatures_received += 1
                return bytes(sig)
            if isinstance(m, protocol.SignatureChunk):
                sig += m.data
            else:  # cancel (the conversation allows nothing else here)
                return None


@attrs.frozen
class BackupResult:
    """An agent's answer to one backup request.

    ``kind`` is "unchanged" (``reason`` "fingerprint" or "hash") or "delta" (the ``delta``
    bytes against the base, and the ``done`` message); ``asked_signature`` says whether the
    agent asked for the base's signature.
    """

    kind: str
    reason: str = ""
    delta: bytes = b""
    done: protocol.BackupDone | None = None
    asked_signature: bool = False


async def backup_exchange(
    address: net.Address | str,
    key: bytes,
    path: str,
    base: bytes | None = None,
    *,
    base_sig: bytes | None = None,
    chunk: int = 1000,
    timeout: float = 60.0,
    idle: float = 30.0,
    accepts: tuple[str, ...] = (),
) -> BackupResult:
    """One backup of ``path`` from the agent at ``address``, as a server makes it.

    ``base`` is the server's last archive (its hash is offered); if the agent asks for its
    signature it gets ``base_sig`` (default: the signature of ``base``) in chunks of ``chunk``
    bytes.  The agent's refusal raises ``RequestRefused``; a delta chunk over
    ``protocol.MAX_CHUNK`` is a ``RemoteProtocolError``.  ``accepts``: the delta forms
    offered besides the rolling one (e.g. ``layout_capability()``; the delta is then returned
    as sent, to be applied by the caller: ``LayoutPatcher`` when it starts with
    ``LAYOUT_MAGIC``).
    """
    if isinstance(address, str):
        address = net.Address.parse(address)
    base_hash = blake3.blake3(base).digest() if base is not None else None
    with trio.fail_after(timeout):
        async with await net.connect(address, key=key, role="server", timeout=idle) as chan:
            await chan.send(protocol.BackupRequest(path, base_hash, (), accepts=accepts))
            msg = await chan.receive(timeout=idle)
            asked = isinstance(msg, protocol.NeedSignature)
            if asked:
                assert base is not None  # the conversation refuses need-sig without a base
                sig = base_sig if base_sig is not None else deltabkp.signature(base)
                for i in range(0, len(sig), chunk):
                    await chan.send(protocol.SignatureChunk(sig[i : i + chunk]))
                await chan.send(protocol.SignatureEnd())
                msg = await chan.receive(timeout=idle)
            if isinstance(msg, protocol.Unchanged):  # for our base: the conversation checked
                return BackupResult("unchanged", msg.reason, asked_signature=asked)
            delta = bytearray()
            while isinstance(msg, protocol.DeltaChunk):
                if len(msg.data) > protocol.MAX_CHUNK:
                    raise RemoteProtocolError(
                        f"sent a delta chunk of {len(msg.data)} bytes (at most "
                        f"{protocol.MAX_CHUNK})", node=str(address), path=path,
                    )
                delta += msg.data
                msg = await chan.receive(timeout=idle)
            if not isinstance(msg, protocol.BackupDone):
                raise RemoteProtocolError(
                    f"sent {msg.TYPE} during a backup", node=str(address), path=path
                )
            return BackupResult("delta", "", bytes(delta), msg, asked)
