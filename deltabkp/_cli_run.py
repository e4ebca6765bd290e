"""Run one parsed ``deltabkp`` command line: dispatch to its ``func`` and map errors to exit codes.

Shared by ``deltabkp.cli`` (the whole ``deltabkp`` command) and ``deltabkp.ctl`` (``python -m
deltabkp.ctl``), so neither imports the other.  Exit codes (borg-style): what ``func``
returns, else the ``exit_code`` of the ``DeltabkpError`` it raised (1 other, 2 usage,
3 refused, 4 connection/protocol, 5 bad input data, 6 integrity), 130 on Ctrl-C.  An error
prints one line on stderr; under ``--json`` (ctl) it is one JSON document on stdout instead,
``{"error": {"code", "message", "node", "path"}}``, so stdout always holds exactly one JSON
answer — except when stdout carries an archive (``fetch … -``): then on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from deltabkp.errors import DeltabkpError

__all__ = ["EXIT_OK", "EXIT_USAGE", "run", "error_json"]

EXIT_OK = 0
EXIT_USAGE = 2


def error_json(exc: DeltabkpError) -> dict[str, Any]:
    """An error as ``ctl --json`` prints it: its family's code and the sentence a user reads."""
    out: dict[str, Any] = {"code": exc.kind, "message": str(exc)}
    for field in ("node", "path"):
        if getattr(exc, field):
            out[field] = getattr(exc, field)
    return {"error": out}


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` with ``parser`` and run the chosen ``func(args) -> int``."""
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        code = func(args)
    except DeltabkpError as exc:
        if getattr(args, "json", None):
            archive_on_stdout = getattr(args, "out", None) == "-"
            print(json.dumps(error_json(exc), sort_keys=True),
                  file=sys.stderr if archive_on_stdout else sys.stdout)
        else:
            print(f"deltabkp: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1
    return int(code or 0)
