"""The server's configuration: frozen values, validated by the command line before use."""

from __future__ import annotations

from pathlib import Path

import attrs

from deltabkp.net import DEFAULT_SERVER_PORT, MAX_PENDING_HANDSHAKES, Address

__all__ = ["ServerConfig", "ExecutionSettings"]


#: Defaults of the scrub (``--scrub-every``, ``--scrub-rate``): daily, 16 MiB/s.
SCRUB_EVERY_S = 86400.0
SCRUB_RATE = float(16 << 20)


@attrs.frozen
class ExecutionSettings:
    keep: int = 10
    connect_timeout: float = 10.0
    #: Longest silence between two messages of the agent (it may build a big archive first).
    idle_timeout: float = 300.0
    #: Largest archive accepted: a few COPY ops can describe an unbounded output, and a
    #: compromised node must not be able to fill the server's disk with one delta.
    max_archive_size: int = 64 << 30


@attrs.frozen
class ServerConfig:
    """Everything one server is told at start-up."""

    data_dir: Path
    key: bytes = attrs.field(repr=False)
    host: str = "127.0.0.1"
    port: int = DEFAULT_SERVER_PORT
    max_concurrent: int = 8
    max_per_node: int = 2
    settings: ExecutionSettings = ExecutionSettings()
    #: Backends by URL; empty: SQLite and a local directory in ``data_dir``.
    catalog_url: str = ""
    store_url: str = ""
    s3_endpoint: str | None = None
    #: Seconds a lease (and a heartbeat) stays valid without renewal.
    lease_ttl: float = 30.0
    #: The scrub: re-check each target's stored versions every this many seconds (0: never),
    #: reading at most ``scrub_rate`` bytes/s.
    scrub_every: float = SCRUB_EVERY_S
    scrub_rate: float = SCRUB_RATE
    #: Connections in their TLS/key handshake at once (the oldest is evicted beyond this).
    max_handshakes: int = MAX_PENDING_HANDSHAKES
    #: Where ``/metrics`` and the status page are served (``--metrics-listen``); None: off.
    metrics_listen: Address | None = None
