"""Pull: the server's side of one backup exchange with an agent, and nothing else.

Job: ask the agent for ``path`` against the base the server holds, hand it the base's
signature if it asks, and pass every delta chunk to a sink; the answer is a value —
``Unchanged(reason)`` or ``Delta(done)`` — never an exception.  The order of the messages is
checked by ``protocol.AgentSession`` (an ``unchanged`` for a base we did not offer, a
signature request with no base, a chunk out of turn are the agent's protocol errors); this
module only moves them, each wait under the idle deadline; while the server makes the
base's signature (a crash left it unsigned) the agent gets an empty ``sig-chunk`` every
``SIG_KEEPALIVE_S``, so a large base's signing never outlasts the agent's wait.  It offers the layout delta
(``accepts``: each version the agent's ``welcome`` advertised with the same zlib, the streamed
one first) only to such an agent.
Patching and storing are the sink's business (``ingest``).  It laps the execution's
timeline (``deltabkp._phases``): the agent's time to answer, then receive and apply.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import attrs
import trio

from deltabkp import net, protocol
from deltabkp._phases import Phases
from deltabkp.archive import layout_capabilities
from deltabkp.errors import RemoteProtocolError

__all__ = ["SIG_KEEPALIVE_S", "Delta", "DeltaSink", "Pulled", "Unchanged", "offers_layout", "pull"]

#: Longest the agent hears nothing while the server makes the base's signature for it (a
#: crash left the base unsigned): an empty ``sig-chunk`` then goes out, well within the
#: 60 s any agent waits for the next chunk (``deltabkp_agent.backup.SIG_CHUNK_TIMEOUT``).
#: Protocol v1 as it stands: every agent appends the empty chunk (nothing) and waits again.
SIG_KEEPALIVE_S = 15.0


@attrs.frozen
class Unchanged:
    """The agent's archive is the base: ``reason`` is "fingerprint" or "hash"."""

    reason: str


@attrs.frozen
class Delta:
    """The delta stream ended: ``done`` says what the new archive is."""

    done: protocol.BackupDone


Pulled = Unchanged | Delta


class DeltaSink(Protocol):
    async def feed(self, data: bytes) -> None: ...


async def pull(
    chan: net.Channel,
    path: str,
    base_hash: bytes | None,
    *,
    idle: float,
    read_signature: Callable[[], Awaitable[bytes]],
    sink: DeltaSink,
    bwlimit: int | None = None,
    phases: Phases | None = None,
) -> Pulled:
    """One backup request on ``chan``; delta chunks go to ``sink`` as they arrive
    (``bwlimit``: the target's cap on what the agent sends, bytes/s).  ``phases``: laps
    "agent" (the request until the agent's first answer: its checks and build), "signature",
    then "receive" (waiting for chunks) and "apply" (the sink's work) as they alternate."""
    ph = phases if phases is not None else Phases()
    # The layout delta (docs/formats.md) only to an agent that advertised the same form
    # (and zlib): an agent that predates it never sees the field.  Both versions it
    # advertised, the streamed one first (the agent takes the first it makes).
    theirs = _deltas(chan)
    accepts = tuple(c for c in layout_capabilities() if c in theirs)
    await chan.send(protocol.BackupRequest(path, base_hash, (), bwlimit, accepts))
    msg = await chan.receive(timeout=idle)
    ph.lap("agent")
    if isinstance(msg, protocol.NeedSignature):
        sig = await _kept_alive(chan, read_signature)
        for i in range(0, len(sig), protocol.MAX_CHUNK):
            await chan.send(protocol.SignatureChunk(sig[i : i + protocol.MAX_CHUNK]))
        await chan.send(protocol.SignatureEnd())
        msg = await chan.receive(timeout=idle)
        ph.lap("signature")
    if isinstance(msg, protocol.Unchanged):
        return Unchanged(msg.reason)
    while isinstance(msg, protocol.DeltaChunk):
        await sink.feed(msg.data)
        ph.lap("apply")
        msg = await chan.receive(timeout=idle)
        ph.lap("receive")
    if isinstance(msg, protocol.BackupDone):
        return Delta(msg)
    # The conversation allows nothing else here; a bug in its table would land here.
    raise RemoteProtocolError(f"unexpected {msg.TYPE} during a backup", peer=chan.peer)


async def _kept_alive(chan: net.Channel, read_signature: Callable[[], Awaitable[bytes]]) -> bytes:
    """``read_signature()``, an empty ``sig-chunk`` to the agent every ``SIG_KEEPALIVE_S``
    while it runs: a base a crash left unsigned is signed now, and a multi-GB one takes
    longer than the agent waits for a chunk (60 s).  Only this task sends; errors are
    raised as they are (an ``IntegrityError`` makes the executor retry as a full
    transfer), not as a nursery's group."""
    got: list[bytes] = []
    failed: list[Exception] = []
    done = trio.Event()

    async def read() -> None:
        try:
            got.append(await read_signature())
        except Exception as exc:  # noqa: BLE001 - raised below, outside the nursery
            failed.append(exc)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        try:
            while not done.is_set():
                with trio.move_on_after(SIG_KEEPALIVE_S):
                    await done.wait()
                if not done.is_set():
                    await chan.send(protocol.SignatureChunk(b""))
        except Exception as exc:  # noqa: BLE001 - the agent gone: raised after the signing
            failed.append(exc)
    if failed:
        raise failed[0]
    return got[0]


def offers_layout(chan: net.Channel) -> bool:
    """The agent advertised a layout delta with this server's zlib: its next backup will
    likely be one (the server then keeps seek points of the archive it stores)."""
    theirs = _deltas(chan)  # none of ours where this server cannot make the deflate bytes
    return any(c in theirs for c in layout_capabilities())


def _deltas(chan: net.Channel) -> tuple[str, ...]:
    """The delta forms the agent advertised in its ``welcome`` (``deltas``)."""
    got = chan.peer_info.get("deltas")
    return tuple(d for d in got if isinstance(d, str)) if isinstance(got, list) else ()
