"""The ``deltabkp`` command: rdiff-style engine commands, archive commands and ``ctl``.

Each command family lives in its own module and registers its subcommands here; this module
only parses, dispatches and maps ``DeltabkpError`` families to exit codes (borg-style):
0 ok, 1 other error, 2 usage, 3 refused by the server, 4 connection/protocol failure,
5 bad input data, 6 integrity failure.  Errors print one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from deltabkp import _cli_archive, _cli_engine, ctl
from deltabkp.errors import DeltabkpError

EXIT_OK = 0
EXIT_USAGE = 2

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
    parser = build_parser()
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
