"""Run one parsed ``deltabkp`` command line: dispatch to its ``func`` and map errors to exit codes.

Shared by ``deltabkp.cli`` (the whole ``deltabkp`` command) and ``deltabkp.ctl`` (``python -m
deltabkp.ctl``), so neither imports the other.  Exit codes (borg-style): what ``func``
returns, else the ``exit_code`` of the ``DeltabkpError`` it raised (1 other, 2 usage,
3 refused, 4 connection/protocol, 5 bad input data, 6 integrity), 130 on Ctrl-C.  An error
prints one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from deltabkp.errors import DeltabkpError

__all__ = ["EXIT_OK", "EXIT_USAGE", "run"]

EXIT_OK = 0
EXIT_USAGE = 2


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
        print(f"deltabkp: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1
    return int(code or 0)
