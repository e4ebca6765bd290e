"""The wire protocol, sans-I/O: messages, frames, the handshake and every conversation.

No sockets, no Trio, no threads, no clock: a ``Connection`` takes bytes and gives messages,
takes messages and gives bytes, and checks each against the conversation's state machine,
blaming the side that broke a rule.  ``deltabkp.net`` moves its bytes over TCP; the server,
the agent, ``ctl`` and the test peers in ``deltabkp.testing`` all drive it.
"""

from __future__ import annotations

from deltabkp.protocol import _connection, _conversations, _frames, _messages
from deltabkp.protocol._connection import *  # noqa: F403
from deltabkp.protocol._conversations import *  # noqa: F403
from deltabkp.protocol._frames import *  # noqa: F403
from deltabkp.protocol._messages import *  # noqa: F403

__all__ = [*_messages.__all__, *_frames.__all__, *_connection.__all__, *_conversations.__all__]
