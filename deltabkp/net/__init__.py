"""The Trio edge: channels over TLS 1.3, connect/accept, serving a port, addresses, key files,
TLS certificates, daemon life cycle.

Everything here moves bytes for ``deltabkp.protocol`` and applies deadlines; no conversation
rule lives here.  ``import deltabkp`` never imports this package (the library stays free of
Trio); the daemons and ``ctl`` do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deltabkp._lazy import lazy_attributes

# Loaded on first use (PEP 562), so that a ctl command does not import the daemon's life
# cycle, the accept loop or the log formats; type checkers see the imports below.
if TYPE_CHECKING:
    from deltabkp.net._address import (
        DEFAULT_AGENT_PORT,
        Address,
        is_loopback,
        normalise_path,
    )
    from deltabkp.net._blocking import BlockingChannel, connect_blocking
    from deltabkp.net._certcache import tls_cache_dir
    from deltabkp.net._channel import (
        Channel,
        accept,
        connect,
        listen,
        open_secure_stream,
    )
    from deltabkp.net._defaults import DEFAULT_SEND_TIMEOUT, DEFAULT_SERVER_PORT, DEFAULT_TIMEOUT
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
        tls_client_context,
        tls_contexts,
        tls_from_args,
    )

#: Public name → the module that defines it.
_LAZY: dict[str, str] = {
    **dict.fromkeys((
        "DEFAULT_AGENT_PORT", "Address", "is_loopback", "normalise_path",
    ), "deltabkp.net._address"),
    **dict.fromkeys((
        "Channel", "accept", "connect", "listen", "open_secure_stream",
    ), "deltabkp.net._channel"),
    # Plain numbers: read by ctl's parser, so not through _channel (Trio).
    **dict.fromkeys((
        "DEFAULT_SEND_TIMEOUT", "DEFAULT_SERVER_PORT", "DEFAULT_TIMEOUT",
    ), "deltabkp.net._defaults"),
    **dict.fromkeys((
        "BlockingChannel", "connect_blocking",
    ), "deltabkp.net._blocking"),
    "tls_cache_dir": "deltabkp.net._certcache",
    **dict.fromkeys((
        "Starter", "add_daemon_arguments", "at_least_one", "configure_logging", "daemon_main",
        "run_daemon",
    ), "deltabkp.net._daemon"),
    **dict.fromkeys((
        "default_key_path", "load_key",
    ), "deltabkp.net._keys"),
    **dict.fromkeys((
        "LOG_FORMATS", "log_context",
    ), "deltabkp.net._logfmt"),
    **dict.fromkeys((
        "MAX_RATE", "TokenBucket", "parse_rate",
    ), "deltabkp.net._ratelimit"),
    **dict.fromkeys((
        "FLOOD_FACTOR", "HANDSHAKE_TIMEOUT", "MAX_PENDING_HANDSHAKES", "HandshakeGate",
        "RateLimitedLog", "serve",
    ), "deltabkp.net._serve"),
    **dict.fromkeys((
        "PLAINTEXT_FLAG", "TlsSettings", "add_tls_arguments", "check_plaintext_address",
        "cluster_ca_pem", "install_tls", "installed_tls", "prepare_tls", "tls_contexts",
        "tls_client_context", "tls_from_args",
    ), "deltabkp.net._tls"),
}

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
    "BlockingChannel",
    "connect_blocking",
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
    "tls_client_context",
    "tls_cache_dir",
    "add_tls_arguments",
    "check_plaintext_address",
    "tls_from_args",
]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
