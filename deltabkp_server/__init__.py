"""deltabkp_server: the backup server (``deltabkp-server``).

Pieces: ``catalog`` (targets, archives, execution log, leases, live servers: SQLite or
PostgreSQL behind the ``Catalog`` protocol), ``store`` (archive + signature objects: a local
directory or S3 behind the ``Store`` protocol), ``execution`` (one backup, logged: ``pull`` →
``ingest`` → ``retention``), ``scheduler`` (due targets claimed from the shared catalog with
leases, retries with backoff, concurrency limits), ``agents`` (ping, probes, announcements), ``control`` (the
ctl API), ``config`` and ``model`` (values) and ``server`` (listener, start-up
reconciliation).  Imports ``deltabkp`` only, never the agent; ``import deltabkp_server``
itself imports nothing else (the modules are imported where used).
"""

from __future__ import annotations
