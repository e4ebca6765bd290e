"""The wire protocol, sans-I/O: messages, frames, the handshake and every conversation.

No sockets, no Trio, no threads, no clock: a ``Connection`` takes bytes and gives messages,
takes messages and gives bytes, and checks each against the conversation's state machine,
blaming the side that broke a rule.  ``deltabkp.net`` moves its bytes over TCP; the server,
the agent, ``ctl`` and the test peers in ``deltabkp.testing`` all drive it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deltabkp._lazy import lazy_attributes
from deltabkp.protocol import _connection, _conversations, _frames, _messages
from deltabkp.protocol._connection import *  # noqa: F403
from deltabkp.protocol._conversations import *  # noqa: F403
from deltabkp.protocol._frames import *  # noqa: F403
from deltabkp.protocol._messages import *  # noqa: F403

# The backup side's messages and conversations (server ↔ agent) are built on first use, so
# that a ctl command does not pay for twelve attrs classes it never sees (``_backup``).
if TYPE_CHECKING:
    from deltabkp.protocol._backup import *  # noqa: F403

#: ``_backup.__all__``, named here so that reading one of them is what imports it.
_BACKUP_NAMES = (
    "Ping", "Pong", "BackupRequest", "Unchanged", "NeedSignature", "SignatureChunk",
    "SignatureEnd", "DeltaChunk", "BackupDone", "Cancel", "Announce", "Ack", "AgentSession",
    "AnnounceSession",
)
__getattr__, __dir__ = lazy_attributes(
    __name__, dict.fromkeys(_BACKUP_NAMES, "deltabkp.protocol._backup")
)

__all__ = [*_messages.__all__, *_frames.__all__, *_connection.__all__, *_conversations.__all__,
           *_BACKUP_NAMES]
