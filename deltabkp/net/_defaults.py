"""The network's defaults shared by both edges (Trio's ``_channel``, the blocking
``_blocking``): the server's port and the deadlines.  Plain numbers, so reading one imports
neither Trio nor TLS (``deltabkp ctl`` builds its parser from them)."""

from __future__ import annotations

__all__ = ["DEFAULT_SEND_TIMEOUT", "DEFAULT_SERVER_PORT", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = 10.0
#: A peer that reads nothing for this long is treated as gone (it must not pin our tasks).
DEFAULT_SEND_TIMEOUT = 60.0
DEFAULT_SERVER_PORT = 7470
