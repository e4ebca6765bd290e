"""The ``deltabkp`` command: rdiff-style engine commands, archive commands and ``ctl``.

Each command family lives in its own module and registers its subcommands here; this module
only builds the parser.  ``deltabkp._cli_run`` dispatches and maps ``DeltabkpError`` families
to exit codes (borg-style): 0 ok, 1 other error, 2 usage, 3 refused by the server,
4 connection/protocol failure, 5 bad input data, 6 integrity failure.  Errors print one line
on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from deltabkp import _cli_archive, _cli_engine, _cli_run, ctl
from deltabkp._cli_run import EXIT_OK, EXIT_USAGE

__all__ = ["EXIT_OK", "EXIT_USAGE", "build_parser", "main"]

# Each family module exposes ``register(subparsers)`` and sets ``func`` on its parsers:
# ``func(args) -> int`` returns the exit code.
_FAMILIES: tuple[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None], ...] = (
    _cli_engine.register,
    _cli_archive.register,
    ctl.register,
)


def build_parser() -> argparse.ArgumentParser:
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
    for register in _FAMILIES:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``deltabkp`` console script: the exit code of the command line ``argv``.

    Without ``argv`` (the program itself, from ``sys.argv``) the process ends here once its
    output is flushed, skipping the interpreter's teardown: tearing down Trio, OpenSSL and
    the rest costs a ctl command ~0.1-0.25 s of CPU after its answer is printed, and nothing
    is left to clean up (every file and connection is closed by its ``with`` by now)."""
    if argv is not None:
        return _cli_run.run(build_parser(), argv)
    try:
        code = _cli_run.run(build_parser(), None)
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
