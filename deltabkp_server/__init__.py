"""deltabkp_server: the backup server (``deltabkp-server``).

Pieces: ``catalog`` (targets, archives, execution log: SQLite/WAL behind the ``Catalog``
protocol), ``store`` (archive + signature files behind the ``Store`` protocol, atomic
writes), ``execution`` (one backup: delta → patch → verify → store → rotate), ``scheduler``
(periods, retries with backoff, announce, concurrency limits), ``control`` (the ctl API) and
``server`` (listener, start-up reconciliation).  Imports ``deltabkp`` only, never the agent.
"""

from __future__ import annotations

__all__ = ["Server"]


def __getattr__(name: str) -> object:
    # Lazy: `import deltabkp_server.catalog` in tests needs no engine import.
    if name == "Server":
        from deltabkp_server.server import Server

        return Server
    raise AttributeError(name)
