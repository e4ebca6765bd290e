"""Tools for testing deltabkp and code built on it: scripted peers and a daemon launcher.

Shipped with the package (as ``trio.testing`` is with Trio) for deltabkp's own tests and for
users' tests, scripts and demos; no test framework is imported here.

- ``ScriptedAgent``: an agent-side protocol peer that serves byte strings as archives and can
  misbehave on purpose, to test a server; ``backup_exchange``/``BackupResult``: the server's
  side of one backup against a real agent.
- ``Daemon``: starts ``deltabkp-server``, ``deltabkp-agent`` (or any command that prints
  ``NAME listening on HOST:PORT``), waits for that line under a deadline, stops it;
  ``DaemonStartError`` when it does not come up; ``console_script`` finds the installed
  commands.
- ``PostgresServer``: a throwaway PostgreSQL (initdb + pg_ctl on a free port in a temp dir) for
  tests of a catalog shared by several servers.

Importing this package imports Trio and ``deltabkp.net``; ``import deltabkp`` never imports it.
"""

from __future__ import annotations

from deltabkp.testing._daemons import READY_LINE, Daemon, DaemonStartError, console_script
from deltabkp.testing._peers import BackupResult, ScriptedAgent, backup_exchange
from deltabkp.testing._services import PostgresServer
from deltabkp.testing._services import SeaweedFS
from deltabkp.testing._netns import NetLab, NetLabError, NetNode

__all__ = [
    "ScriptedAgent",
    "BackupResult",
    "backup_exchange",
    "Daemon",
    "DaemonStartError",
    "READY_LINE",
    "console_script",
    "PostgresServer",
    "SeaweedFS",
    "NetLab",
    "NetLabError",
    "NetNode",
]
