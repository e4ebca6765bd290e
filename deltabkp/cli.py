"""The ``deltabkp`` command: rdiff-style engine commands, archive commands and ``ctl``.

Each command family lives in its own module and registers its subcommands here; this module
only builds the parser.  ``deltabkp._cli_run`` dispatches and maps ``DeltabkpError`` families
to exit codes (borg-style): 0 ok, 1 other error, 2 usage, 3 refused by the server,
4 connection/protocol failure, 5 bad input data, 6 integrity failure.  Errors print one line
on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from deltabkp import _cli_run
from deltabkp._cli_run import EXIT_OK, EXIT_USAGE

__all__ = ["EXIT_OK", "EXIT_USAGE", "build_parser", "main"]

# Each family module exposes ``register(subparsers)`` and sets ``func`` on its parsers:
# ``func(args) -> int`` returns the exit code.  Imported only when its parsers are built.
_FAMILIES = ("deltabkp._cli_engine", "deltabkp._cli_archive", "deltabkp.ctl")
#: The one family a ``deltabkp ctl …`` command line can reach (``_families``).
_CTL = "deltabkp.ctl"


def _families(argv: Sequence[str] | None) -> tuple[str, ...]:
    """The families whose parsers ``argv`` needs.  ``ctl …`` (a one-shot client command,
    where start-up is most of the cost) needs only ctl's: the top-level parser has no option
    but --help/--version, so a first word 'ctl' is that subcommand, and every message the
    top-level parser could still print (its usage line, 'unrecognized arguments') names no
    other family's command.  Anything else gets every family (``deltabkp --help``)."""
    words = sys.argv[1:] if argv is None else argv
    return (_CTL,) if words and words[0] == "ctl" else _FAMILIES


def build_parser(families: Sequence[str] = _FAMILIES) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltabkp",
        description=(
            "rsync-style delta backups. Engine commands work like rdiff "
            "(signature / delta / patch); 'archive' and 'extract' build and restore "
            "deterministic rsyncable tgz files; 'ctl' talks to a deltabkp-server."
        ),
    )
    from deltabkp import __version__

    parser.add_argument("--version", action="version", version=f"deltabkp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for family in families:
        importlib.import_module(family).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``deltabkp`` console script: the exit code of the command line ``argv``.

    Without ``argv`` (the program itself, from ``sys.argv``) the process ends here once its
    output is flushed, skipping the interpreter's teardown: tearing down Trio, OpenSSL and
    the rest costs a ctl command ~0.1-0.25 s of CPU after its answer is printed, and nothing
    is left to clean up (every file and connection is closed by its ``with`` by now)."""
    if argv is not None:
        return _cli_run.run(build_parser(_families(argv)), argv)
    try:
        code = _cli_run.run(build_parser(_families(None)), None)
    except SystemExit as exc:  # argparse: --help, --version, a usage error (already printed)
        if not (exc.code is None or isinstance(exc.code, int)):
            raise
        code = exc.code or 0
    _exit(code)


def _exit(code: int) -> NoReturn:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # a reader that went away (| head), a full disk: not a success
        code = code or 1
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
