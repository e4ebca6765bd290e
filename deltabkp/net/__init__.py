"""The Trio edge: channels over TCP, connect/accept, addresses, key files, daemon life cycle.

Everything here moves bytes for ``deltabkp.protocol`` and applies deadlines; no conversation
rule lives here.  ``import deltabkp`` never imports this package (the library stays free of
Trio); the daemons and ``ctl`` do.
"""

from __future__ import annotations

from deltabkp.net._address import Address, normalise_path
from deltabkp.net._channel import (
    DEFAULT_SEND_TIMEOUT,
    DEFAULT_SERVER_PORT,
    DEFAULT_TIMEOUT,
    Channel,
    accept,
    connect,
    listen,
)
from deltabkp.net._daemon import (
    Starter,
    add_daemon_arguments,
    at_least_one,
    configure_logging,
    daemon_main,
    run_daemon,
)
from deltabkp.net._keys import default_key_path, load_key

__all__ = [
    "Address",
    "normalise_path",
    "Channel",
    "accept",
    "connect",
    "listen",
    "DEFAULT_SEND_TIMEOUT",
    "DEFAULT_SERVER_PORT",
    "DEFAULT_TIMEOUT",
    "Starter",
    "add_daemon_arguments",
    "at_least_one",
    "configure_logging",
    "daemon_main",
    "run_daemon",
    "default_key_path",
    "load_key",
]
