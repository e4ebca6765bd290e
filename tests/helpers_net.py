"""In-process protocol peers for tests: two ``net.Channel``s joined by a memory stream.

No sockets, no TLS, no threads: the pair runs on trio's ``MockClock`` (autojump), where a
deadline is exact and a wait of minutes costs nothing.
"""

from __future__ import annotations

import trio
import trio.testing

from deltabkp import net
from deltabkp import protocol as p


async def channel_pair(key: bytes) -> tuple[net.Channel, net.Channel]:
    """A server's and an agent's channel after the key handshake, joined in memory."""
    a, b = trio.testing.memory_stream_pair()
    server = net.Channel(a, p.Connection(key=key, our_role="server", initiator=True, peer="agent"))
    agent = net.Channel(b, p.Connection(key=key, our_role="agent", initiator=False, peer="server",
                                        serve_roles=("server",)))
    async with trio.open_nursery() as n:
        n.start_soon(server.handshake)
        n.start_soon(agent.handshake)
    return server, agent
