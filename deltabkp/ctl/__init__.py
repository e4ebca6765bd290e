"""``deltabkp ctl``: the light client of a deltabkp server (register, list, log, restore, ...).

One command line becomes one control request on one connection; the answer is printed as a
human table or as JSON (``--json``), and the exit code says what happened: 0 ok,
1 ``backup-now --wait`` ran and failed (or ``restore`` could not write next to DEST), 2 usage
error, 3 refused by the server (or by the agent, through the server), 4 server unreachable,
wrong key or protocol failure, 5/6 a restored archive that is malformed / fails its hash,
7 ``backup-now --wait`` gave up after ``--wait-timeout`` while the backup goes on.
Every error names the node and path the command was about, and the server when it is at fault.

The modules: ``_commands`` (the command table and argument parsing), ``_client`` (the
connection), ``_restore`` (download and extract), ``_render`` (tables, dates, sizes).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from deltabkp import _cli_run
from deltabkp.ctl._client import default_server
from deltabkp.ctl._commands import EXIT_FAILED, register
from deltabkp.ctl._render import format_size
from deltabkp.ctl._restore import RestoreWriteError

__all__ = ["register", "main", "format_size", "default_server", "EXIT_FAILED", "RestoreWriteError"]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m deltabkp.ctl ARGS`` is ``deltabkp ctl ARGS``: its exit code."""
    parser = argparse.ArgumentParser(prog="deltabkp")
    register(parser.add_subparsers(dest="command", metavar="COMMAND"))
    return _cli_run.run(parser, ["ctl", *(sys.argv[1:] if argv is None else argv)])
