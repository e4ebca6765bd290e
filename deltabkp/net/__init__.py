"""The Trio edge: channels over TLS 1.3, connect/accept, serving a port, addresses, key files,
TLS certificates, daemon life cycle.

Everything here moves bytes for ``deltabkp.protocol`` and applies deadlines; no conversation
rule lives here.  ``import deltabkp`` never imports this package (the library stays free of
Trio); the daemons and ``ctl`` do.
"""

from __future__ import annotations

from deltabkp.net._address import DEFAULT_AGENT_PORT, Address, is_loopback, normalise_path
from deltabkp.net._channel import (
    DEFAULT_SEND_TIMEOUT,
    DEFAULT_SERVER_PORT,
    DEFAULT_TIMEOUT,
    Channel,
    accept,
    connect,
    listen,
    open_secure_stream,
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
from deltabkp.net._logfmt import LOG_FORMATS, log_context
from deltabkp.net._ratelimit import MAX_RATE, TokenBucket, parse_rate
from deltabkp.net._serve import (
    FLOOD_FACTOR,
    HANDSHAKE_TIMEOUT,
    MAX_PENDING_HANDSHAKES,
    HandshakeGate,
    RateLimitedLog,
    serve,
)
from deltabkp.net._tls import (
    PLAINTEXT_FLAG,
    TlsSettings,
    add_tls_arguments,
    check_plaintext_address,
    cluster_ca_pem,
    install_tls,
    installed_tls,
    prepare_tls,
    tls_contexts,
    tls_from_args,
)

__all__ = [
    "Address",
    "normalise_path",
    "DEFAULT_AGENT_PORT",
    "is_loopback",
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
    "LOG_FORMATS",
    "log_context",
    "MAX_RATE",
    "TokenBucket",
    "parse_rate",
    "open_secure_stream",
    "FLOOD_FACTOR",
    "HANDSHAKE_TIMEOUT",
    "MAX_PENDING_HANDSHAKES",
    "HandshakeGate",
    "RateLimitedLog",
    "serve",
    "PLAINTEXT_FLAG",
    "TlsSettings",
    "cluster_ca_pem",
    "install_tls",
    "installed_tls",
    "prepare_tls",
    "tls_contexts",
    "add_tls_arguments",
    "check_plaintext_address",
    "tls_from_args",
]
