"""Talking to agents outside a backup: ping (liveness, and "would you serve this path?"), and
serving the announcements agents send when they start.

Job: the one home of the server's short conversations with agents, used by the scheduler
(retry probes), the control API (the path check at register) and the listener (announce).
Invariants: every wait has a deadline; ``ping`` never raises a ``DeltabkpError`` — an agent
that does not answer is an answer too (the reason why, as an error value).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from deltabkp import __version__, net, protocol
from deltabkp.errors import DeltabkpError, ErrorCode, PeerUnavailable, RequestRefused

__all__ = ["Pinged", "ping", "serve_announcements", "SERVER_INFO", "AGENT_IDLE_S"]

log = logging.getLogger("deltabkp_server")

#: How long an agent's announce connection may stay silent.
AGENT_IDLE_S = 30.0
SERVER_INFO: dict[str, object] = {"name": "deltabkp-server", "version": __version__}


@attrs.frozen
class Pinged:
    """An agent's answer to a ping: ``error`` is None when it answered."""

    info: dict[str, Any] = attrs.Factory(dict)
    error: DeltabkpError | None = None

    @property
    def answered(self) -> bool:
        return self.error is None

    def path_refusal(self) -> RequestRefused | None:
        """The agent's "no" to the path asked about, as an error value (None if it said yes)."""
        check = self.info.get("path_check")
        if not isinstance(check, dict) or check.get("ok", True):
            return None
        return RequestRefused(
            ErrorCode.parse(str(check.get("code") or ErrorCode.REFUSED)),
            str(check.get("message") or "the agent will not serve this path"),
        )


async def ping(node: str, key: bytes, *, timeout: float, path: str | None = None) -> Pinged:
    """Ping the agent at ``node`` (and ask about ``path``, if given)."""
    try:
        with trio.fail_after(timeout):
            chan = await net.connect(net.Address.parse(node), key=key, role="server", timeout=timeout)
            async with chan:
                await chan.send(protocol.Ping(path))
                pong = await chan.receive_a(protocol.Pong, timeout=timeout)
    except trio.TooSlowError:
        return Pinged(error=PeerUnavailable(f"no answer within {timeout:g} s", node=node, path=path))
    except DeltabkpError as exc:
        return Pinged(error=exc.with_context(node=node, path=path))
    return Pinged(dict(pong.info))


async def serve_announcements(
    chan: net.Channel, announce: Callable[[str, int, str], Awaitable[list[Any]]]
) -> None:
    """An agent's connection: ``announce`` → ``ack`` (its pending retries run now), ``ping``."""
    while (msg := await chan.next_request(AGENT_IDLE_S)) is not None:
        if isinstance(msg, protocol.Announce):
            peer_host = net.Address.parse(chan.peer).host if chan.peer != "peer" else ""
            hit = len(await announce(msg.host, msg.port, peer_host))
            log.info(
                "agent %s announced itself; %d pending retr%s run now",
                net.Address(msg.host, msg.port), hit, "y" if hit == 1 else "ies",
            )
            await chan.send(protocol.Ack())
        elif isinstance(msg, protocol.Ping):
            await chan.send(protocol.Pong(dict(SERVER_INFO)))
        else:  # an error from the agent: the conversation is closed
            return
