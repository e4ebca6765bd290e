"""The ``deltabkp ctl`` subcommands: one ``Command`` entry each (arguments, request, output).

Job: turn one command line into one control request (docs/formats.md, "Control ops"), print
the server's answer as a human table or as JSON (``--json``), and return the exit code.
Invariants: every argument is checked before anything is sent (a usage error never reaches
the network, exit 2); the node and path are sent in their canonical form (``net.Address``,
``net.normalise_path``), so errors and tables name them as the server stores them; every
network wait has a deadline (``--timeout``; ``backup-now --wait`` waits ``--wait-timeout``).
Longer than ~450 lines on purpose: each command's arguments, checks, help and examples stay
next to its entry in the one ``COMMANDS`` table (split, a command would live in two places).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs

from deltabkp import _config, net
from deltabkp.ctl import _progress, _render
from deltabkp.ctl._client import Client, default_server, parse_servers
from deltabkp._atomic import atomic_write
from deltabkp.ctl._restore import RestoreWriteError, restore
from deltabkp.ctl._restore import download as download_archive
from deltabkp.errors import UsageError

__all__ = ["register", "EXIT_FAILED", "EXIT_STILL_RUNNING", "COMMANDS", "Command"]

#: ``backup-now --wait``: the execution ran and failed.
EXIT_FAILED = 1
#: ``backup-now --wait``: ``--wait-timeout`` passed and the backup is still queued or running
#: (the server is fine; not 4, which says it could not be asked).
EXIT_STILL_RUNNING = 7

DESCRIPTION = """\
Talk to a deltabkp server: register what to back up, see what was backed up, restore it.

A target is one directory on one node, named NODE:PORT (where that node's deltabkp-agent
listens) plus an absolute PATH on the node. The server pulls a backup of each target every
FREQ; only the blocks that changed since the previous archive cross the network, and the
server keeps the newest 10 archives of each target and a log of every execution.
"""

EPILOG = """\
examples:
  deltabkp ctl register 10.0.0.5:7471 /srv/shop --every 15     # every 15 minutes
  deltabkp ctl register 10.0.0.5:7471 /srv/shop/logs --every 90s
  deltabkp ctl targets
  deltabkp ctl backup-now 10.0.0.5:7471 /srv/shop --wait
  deltabkp ctl list 10.0.0.5:7471 /srv/shop                    # every backup ever made
  deltabkp ctl log 10.0.0.5:7471 /srv/shop --limit 20          # execution history
  deltabkp ctl log --since 1d --outcome failed                 # what failed today
  deltabkp ctl restore 10.0.0.5:7471 /srv/shop ./shop-restored --version 7
  deltabkp ctl --json list 10.0.0.5:7471 /srv/shop | jq '.[0].size'
  deltabkp ctl unregister 10.0.0.5:7471 /srv/shop

server address: --server HOST:PORT[,HOST:PORT…], else $DELTABKP_SERVER, else 127.0.0.1:7470.
cluster key: --key-file F, else $DELTABKP_KEY_FILE, else ~/.config/deltabkp/cluster.key.
addresses: a HOST without :PORT means the default port of what it names (a server 7470, a
node's agent 7471); an IPv6 address with a port is written [ADDR]:PORT.
configuration: every option here also reads $DELTABKP_<OPTION> (--timeout: $DELTABKP_TIMEOUT)
and the [ctl] table of --config FILE ($DELTABKP_CONFIG); flags > variables > file > defaults;
--print-config shows the result and where each value came from.
frequency: integer minutes ('15'), or a number with s, m, h or d ('90s', '5m', '2h', '1d').
times: local time, or UTC with --utc; --json always gives ISO 8601 UTC times and seconds.

exit codes: 0 ok; 1 'backup-now --wait' ran and failed, or restore could not write next to
DEST; 2 usage error; 3 refused by the server
(already registered, unknown target, bad frequency, path not allowed by the agent, ...);
4 server unreachable, wrong key or protocol failure; 5/6 restored archive malformed / corrupt;
7 'backup-now --wait' gave up after --wait-timeout while the backup is still queued or running.
With --json an error is one JSON object on stdout, {"error": {"code": …, "message": …}} (on
stderr for 'fetch … -', whose stdout is the archive); the exit code is the same. (A command
line that does not parse at all is still argparse's usage message on stderr, exit 2.)
"""


@attrs.frozen
class Call:
    """One checked command line, ready to go: its request and the client to send it with."""

    op: str
    request: dict[str, Any]
    client: Client
    as_json: bool

    def ask(self, timeout: float | None = None) -> Any:
        """The server's answer to this call's request (``timeout``: per-answer deadline)."""
        return self.client.ask(self.op, self.request, timeout)

    def show(self, data: Any, human: str) -> None:
        _render.emit(data, human, as_json=self.as_json)


Renderer = Callable[[Any, Mapping[str, Any]], str]


def _answer(render: Renderer) -> Callable[[argparse.Namespace, Call], int]:
    """Most commands: ask once, print the answer, exit 0."""

    def run(args: argparse.Namespace, call: Call) -> int:
        data = call.ask()
        call.show(data, render(data, call.request))
        return 0

    return run


def _no_request_args(args: argparse.Namespace) -> dict[str, Any]:
    return {}


@attrs.frozen
class Command:
    """A subcommand: its help, its own arguments, the request it builds, how it runs."""

    name: str
    help: str
    description: str
    examples: str
    run: Callable[[argparse.Namespace, Call], int]
    #: NODE:PORT PATH positionals: required, optional (both or neither), or none.
    target: Literal["required", "optional", "none"] = "none"
    arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None
    #: The request's arguments beyond node and path, checked (UsageError).
    build: Callable[[argparse.Namespace], dict[str, Any]] = _no_request_args


# -- the commands' own arguments and requests ---------------------------------------------------


def _targets_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all", action="store_true",
                   help="also unregistered targets that still have archives")


def _register_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--every", required=True, metavar="FREQ",
                   help="backup frequency: integer minutes ('15') or '90s', '5m', '2h', '1d'")
    p.add_argument("--bwlimit", metavar="RATE", default=None,
                   help="cap on the bytes per second the agent sends for this target ('1M' = "
                   "1 MiB/s, '500K'; KB/MB are powers of 10); the agent's own --bwlimit, if "
                   "lower, still wins")


def _register_request(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"every": args.every}
    if args.bwlimit is not None:
        out["bwlimit"] = net.parse_rate(args.bwlimit)  # bytes/s on the wire
    return out


#: An execution's outcomes as the log names them (docs/formats.md, "log"; the server checks).
OUTCOMES = ("stored", "unchanged", "failed", "skipped")
#: ``log`` without ``--limit`` shows this many rows (the newest).
LOG_LIMIT = 50
_SINCE = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
_SINCE_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _log_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=int, default=LOG_LIMIT, metavar="N",
                   help=f"the newest N rows (default {LOG_LIMIT}); 0 shows every row, streamed")
    p.add_argument("--since", metavar="WHEN",
                   help="only executions started since WHEN: a duration back from now ('90s', "
                   "'30m', '2h', '7d') or a UTC date/time ('2026-11-28', '2026-11-28T09:30')")
    p.add_argument("--outcome", choices=OUTCOMES, metavar="OUTCOME",
                   help=f"only executions with this outcome ({', '.join(OUTCOMES)})")


def parse_since(text: str, now: float) -> str:
    """``--since``: '2h' (back from ``now``) or an ISO date/time (UTC unless it says
    otherwise) → the ISO 8601 UTC string the server compares start times with."""
    m = _SINCE.match(text)
    if m:
        t = now - int(m.group(1)) * _SINCE_UNIT[m.group(2)]
        return _dt.datetime.fromtimestamp(t, _dt.UTC).isoformat()
    try:
        when = _dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(
            f"--since {text!r}: give a duration ('90s', '30m', '2h', '7d') or a date/time "
            "('2026-11-28', '2026-11-28T09:30')"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.UTC)
    return when.astimezone(_dt.UTC).isoformat()


def _log_request(args: argparse.Namespace) -> dict[str, Any]:
    if args.limit < 0:
        raise UsageError("--limit must be 0 (every row) or more")
    out: dict[str, Any] = {"limit": args.limit}
    if args.since is not None:
        out["since"] = parse_since(args.since, time.time())
    if args.outcome is not None:
        out["outcome"] = args.outcome
    return out


def _streamed(
    headers: Sequence[str], cells: Callable[[Mapping[str, Any]], Sequence[Any]],
    footer: Callable[[_render.RowPrinter, Mapping[str, Any]], str],
    mark: Callable[[Mapping[str, Any]], bool] = lambda r: False,
) -> Callable[[argparse.Namespace, Call], int]:
    """``log`` and ``list``: rows are printed as the server streams them (memory stays flat
    however long the answer), then a footer line (human output only)."""

    def run(args: argparse.Namespace, call: Call) -> int:
        printer = _render.RowPrinter(headers, cells, as_json=call.as_json, mark=mark)
        call.client.ask_stream(call.op, call.request, printer)
        printer.close()
        text = "" if call.as_json else footer(printer, call.request)
        if text:
            print(text)
        return 0

    return run


def _backup_now_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", action="store_true", help="wait for the execution to end")
    p.add_argument("--wait-timeout", type=float, default=3600.0, metavar="S",
                   help="longest wait with --wait, seconds (default 3600); when it passes the "
                   f"backup goes on, and the exit code is {EXIT_STILL_RUNNING}")


def _backup_now_request(args: argparse.Namespace) -> dict[str, Any]:
    if not _positive(args.wait_timeout):
        raise UsageError("--wait-timeout must be a positive number of seconds")
    if not args.wait:
        return {"wait": False}
    return {"wait": True, "wait_timeout": float(args.wait_timeout)}


def _backup_now(args: argparse.Namespace, call: Call) -> int:
    # The server gives up waiting after wait_timeout and says so; our own deadline comes a
    # --timeout later, so that answer arrives (an older server: a timeout, exit 4).
    data = _progress.ask_with_progress(
        call.client, call.op, call.request,
        float(args.wait_timeout) + call.client.timeout if args.wait else None,
        enabled=args.wait and _progress.wanted(call.as_json),  # a bar: bytes and rate so far
    )
    call.show(data, _render.backup_now(data, call.request))
    if args.wait and isinstance(data, dict) and data.get("timed_out"):
        return EXIT_STILL_RUNNING
    failed = args.wait and isinstance(data, dict) and data.get("outcome") == "failed"
    return EXIT_FAILED if failed else 0


def _restore_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dest", metavar="DEST", help="directory to extract into")
    p.add_argument("--version", type=int, default=None, metavar="N", dest="seq",
                   help="archive number (SEQ column of 'list'; default: the newest retained)")


def _restore_request(args: argparse.Namespace) -> dict[str, Any]:
    return {} if args.seq is None else {"seq": args.seq}


def _restore(args: argparse.Namespace, call: Call) -> int:
    dest = Path(args.dest)
    meta = restore(call.client, call.request, dest,
                   show_progress=_progress.wanted(call.as_json))
    call.show(meta, _render.restore(meta, dest))
    return 0


def _fetch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", metavar="OUT.tgz", help="file to write ('-': standard output)")
    p.add_argument("--version", type=int, default=None, metavar="N", dest="seq",
                   help="archive number (SEQ column of 'list'; default: the newest retained)")


def _fetch(args: argparse.Namespace, call: Call) -> int:
    """The exact archive, checked (size, blake3) by the conversation as it arrives; a file
    appears only whole (``atomic_write``: a failed download leaves nothing behind)."""
    about = {k: str(call.request[k]) for k in ("node", "path")}
    out = str(args.out)
    if out == "-":
        stdout = sys.stdout.buffer
        with _progress.Progress("fetch", enabled=_progress.wanted(call.as_json)) as bar:
            meta = download_archive(call.client, call.request, stdout, bar)
        # stdout carries the archive: the confirmation goes to stderr.
        print(_render.fetch(meta, "standard output"), file=sys.stderr)
        return 0
    try:
        with atomic_write(out) as f, _progress.Progress(
            "fetch", enabled=_progress.wanted(call.as_json)
        ) as bar:
            meta = download_archive(call.client, call.request, f, bar)
    except OSError as exc:
        raise RestoreWriteError(f"cannot write the archive to {out}: {exc.strerror or exc}",
                                **about) from None
    meta["out"] = out
    call.show(meta, _render.fetch(meta, out))
    return 0


def _verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all", action="store_true", help="every target with stored archives")
    p.add_argument("--wait-timeout", type=float, default=3600.0, metavar="S",
                   help="longest wait for the verification, seconds (default 3600)")


def _verify_request(args: argparse.Namespace) -> dict[str, Any]:
    if args.all == (args.node is not None):
        raise UsageError("verify: give NODE:PORT PATH, or --all (not both)")
    if not _positive(args.wait_timeout):
        raise UsageError("--wait-timeout must be a positive number of seconds")
    return {"all": True} if args.all else {}


def _verify(args: argparse.Namespace, call: Call) -> int:
    data = call.ask(float(args.wait_timeout))
    call.show(data, _render.verify(data, call.request))
    rows = data if isinstance(data, list) else []
    return 0 if all(isinstance(r, Mapping) and r.get("ok") for r in rows) else EXIT_FAILED


COMMANDS: tuple[Command, ...] = (
    Command(
        "register", "start backing up NODE:PORT PATH every FREQ",
        "Register a target. The server checks with the node's agent (if it answers) that "
        "PATH is allowed there; the first backup runs right away, then every FREQ.",
        "  deltabkp ctl register 10.0.0.5:7471 /srv/shop --every 15\n"
        "  deltabkp ctl register 10.0.0.5:7471 /srv/shop --every 2h\n"
        "  deltabkp ctl register 10.0.0.5:7471 /srv/media --every 1d --bwlimit 2M\n",
        _answer(_render.register), target="required", arguments=_register_arguments,
        build=_register_request,
    ),
    Command(
        "unregister", "stop backing up NODE:PORT PATH",
        "Unregister a target: its backups stop. Its archives and its execution log stay on "
        "the server (list/log/restore still work).",
        "  deltabkp ctl unregister 10.0.0.5:7471 /srv/shop\n",
        _answer(_render.unregister), target="required",
    ),
    Command(
        "list", "every backup made of NODE:PORT PATH (date, size, transferred, retained)",
        "List every backup ever made of a target, newest first: creation date, archive "
        "size, bytes that crossed the network for it, and whether it is still retained "
        "(the server keeps the newest 10). The list is streamed: rows print as they arrive, "
        "however long the history.",
        "  deltabkp ctl list 10.0.0.5:7471 /srv/shop\n"
        "  deltabkp ctl list 10.0.0.5:7471 /srv/shop | head -5          # the newest few\n"
        "  deltabkp ctl list 10.0.0.5:7471 /srv/shop --json | jq -r '.[0].hash'\n",
        _streamed(_render.BACKUP_HEADERS, _render.backup_cells,
                  lambda p, req: _render.backups_footer(p.n, p.marked, req),
                  mark=lambda r: bool(r.get("retained"))),
        target="required",
    ),
    Command(
        "targets", "all registered targets and their state",
        "Show every registered target: frequency, state, next due time, last outcome and "
        "error, archives kept, and what the newest archive had to skip (sockets, FIFOs, "
        "unreadable files: a count and the first names). The state is the first that holds: "
        "running (a server runs it now), retrying (its last execution failed, a retry is "
        "pending), failing (its last finished execution failed and no retry is pending: the "
        "next try is its next period), ok. With --all, unregistered targets that still have "
        "archives are listed too (state unregistered; list, fetch and restore work on them).",
        "  deltabkp ctl targets\n"
        "  deltabkp ctl targets --all\n"
        "  deltabkp ctl targets --json | jq -r '.[] | select(.state == \"failing\") | .path'\n",
        _answer(_render.targets), arguments=_targets_arguments,
        build=lambda args: {"all": True} if args.all else {},
    ),
    Command(
        "log", "execution history (all targets, or one)",
        "Show the execution log, newest first: every backup attempt with its outcome "
        "(stored, unchanged, failed, skipped), bytes on the wire, archive size, files that "
        "changed while being read, entries the archive had to skip (sockets, unreadable "
        "files: a count and the first names), and the error if any.\n\n"
        f"The newest {LOG_LIMIT} rows by default; --limit 0 streams the whole log (rows print "
        "as they arrive). Consecutive identical 'unchanged' checks of a target are one row, "
        "'unchanged xN': N checks from FIRST to the row's start time; --json gives count, "
        "first and last for every row, so no execution is missing from the record.",
        "  deltabkp ctl log                                       # the newest 50, all targets\n"
        "  deltabkp ctl log 10.0.0.5:7471 /srv/shop --limit 5\n"
        "  deltabkp ctl log --since 2h --outcome failed           # what failed lately\n"
        "  deltabkp ctl log --since 2026-11-28 --limit 0          # everything since that day\n"
        "  deltabkp ctl log --limit 0 --json | jq '[.[].count] | add'   # executions in all\n",
        _streamed(_render.LOG_HEADERS, _render.log_cells,
                  lambda p, req: _render.log_footer(p.n, req)),
        target="optional", arguments=_log_arguments, build=_log_request,
    ),
    Command(
        "status", "the server's state (version, uptime, targets, running)",
        "Show the server's status.", "  deltabkp ctl status\n",
        _answer(_render.status),
    ),
    Command(
        "backup-now", "run a backup of NODE:PORT PATH now",
        "Queue a backup of a target now. With --wait, block until that execution ends, "
        "print its outcome (with the entries the archive had to skip, if any), and exit 1 if "
        f"it failed; exit {EXIT_STILL_RUNNING} if --wait-timeout passed first (the backup "
        "goes on: see 'log').",
        "  deltabkp ctl backup-now 10.0.0.5:7471 /srv/shop --wait\n",
        _backup_now, target="required", arguments=_backup_now_arguments,
        build=_backup_now_request,
    ),
    Command(
        "restore", "download a backup of NODE:PORT PATH and extract it into DEST",
        "Download an archive of a target (the newest by default), verify its blake3 hash, "
        "and extract it into DEST (created if missing; must be empty), all or nothing: it is "
        "extracted beside DEST and renamed into place at the end, so a failed restore leaves "
        "DEST as it was. Faithful: symlinks as they were (whatever they point to), hard "
        "links, FIFOs, modes, mtimes to the nanosecond, and owners when run as root. Unsafe "
        "entries (absolute paths, '..', writing through a symlink, devices) are refused.",
        "  deltabkp ctl restore 10.0.0.5:7471 /srv/shop ./shop\n"
        "  deltabkp ctl restore 10.0.0.5:7471 /srv/shop ./shop-v7 --version 7\n",
        _restore, target="required", arguments=_restore_arguments, build=_restore_request,
    ),
    Command(
        "fetch", "download the exact archive (tgz) of NODE:PORT PATH into OUT.tgz",
        "Download one archive of a target as it was stored (the newest by default): its "
        "blake3 equals the 'hash' of 'list --json'. Older versions are rebuilt by the server "
        "from reverse deltas and checked before they are sent; a version found corrupt is "
        "refused. OUT.tgz appears only once complete and verified; '-' writes to standard "
        "output.",
        "  deltabkp ctl fetch 10.0.0.5:7471 /srv/shop shop.tgz\n"
        "  deltabkp ctl fetch 10.0.0.5:7471 /srv/shop shop-v7.tgz --version 7\n"
        "  deltabkp ctl fetch 10.0.0.5:7471 /srv/shop - | tar tzf -\n",
        _fetch, target="required", arguments=_fetch_arguments, build=_restore_request,
    ),
    Command(
        "verify", "check every stored version of NODE:PORT PATH (or --all) against its hash",
        "Rebuild or re-read every retained version of a target (or of every target, --all) "
        "on the server and check its blake3 against the catalog. Prints each version "
        "checked; corrupt ones are marked (list shows CORRUPT, restore and fetch refuse "
        "them) and each verification is logged (trigger 'verify'). Exits 1 if anything is "
        "corrupt. The server also does this on its own (deltabkp-server --scrub-every).",
        "  deltabkp ctl verify 10.0.0.5:7471 /srv/shop\n"
        "  deltabkp ctl verify --all --json\n",
        _verify, target="optional", arguments=_verify_arguments, build=_verify_request,
    ),
)


# -- argument parsing ---------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``ctl`` and its subcommands to the ``deltabkp`` parser."""
    ctl = sub.add_parser(
        "ctl",
        help="talk to a deltabkp server (register, list, log, backup-now, restore, ...)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(ctl, top=True)
    # The ctl's own options (not a subcommand's) take $DELTABKP_* and the [ctl] table.
    ctl.set_defaults(func=_no_subcommand, _ctl_parser=ctl,
                     _ctl_config=_config.adopt(ctl, "ctl", prog="deltabkp ctl"))
    cmds = ctl.add_subparsers(dest="ctl_command", metavar="SUBCOMMAND")
    # A command line runs one subcommand: only its parser is built, with its ~20 arguments
    # (building all eleven was ~5 ms of every command's CPU; ``_Subparsers``).
    lazy = _Subparsers(cmds)
    cmds._name_parser_map = cmds.choices = lazy
    for cmd in COMMANDS:
        lazy.add(cmd)


class _Subparsers(dict[str, argparse.ArgumentParser]):
    """argparse's map of subcommand name → parser, whose parsers are built when first looked
    up: argparse looks up only the subcommand it parses (``_SubParsersAction.__call__``:
    ``_name_parser_map[name]``), checks a name with ``in`` and lists the names by iterating
    (``choices``), and ``ctl --help`` lists the help lines ``add`` records as ``add_parser``
    does — so every output stays what eagerly built parsers give."""

    def __init__(self, action: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        super().__init__()
        self._action = action
        self._pending: dict[str, Command] = {}  # in COMMANDS order, as argparse lists them

    def add(self, cmd: Command) -> None:
        """``add_parser(cmd.name, help=cmd.help, ...)`` without building the parser yet."""
        self._action._choices_actions.append(
            self._action._ChoicesPseudoAction(cmd.name, (), cmd.help)
        )
        self._pending[cmd.name] = cmd

    def __missing__(self, name: str) -> argparse.ArgumentParser:
        cmd = self._pending.pop(name)  # KeyError: no such subcommand, as argparse expects
        parser = self._action._parser_class(
            prog=f"{self._action._prog_prefix} {name}", description=cmd.description,
            epilog="examples:\n" + cmd.examples,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _subcommand_arguments(parser, cmd)
        self[name] = parser
        return parser

    def __contains__(self, name: object) -> bool:
        return name in self._pending or super().__contains__(name)

    def __iter__(self) -> Iterator[str]:
        return iter([c.name for c in COMMANDS if c.name in self])

    def __len__(self) -> int:
        return len(self._pending) + super().__len__()


def _subcommand_arguments(p: argparse.ArgumentParser, cmd: Command) -> None:
    _common(p, top=False)
    if cmd.target == "required":
        p.add_argument("node", metavar="NODE:PORT",
                       help="the node's agent address, e.g. 10.0.0.5:7471")
        p.add_argument("path", metavar="PATH", help="absolute directory path on the node")
    elif cmd.target == "optional":
        p.add_argument("node", nargs="?", metavar="NODE:PORT",
                       help="only this target's executions")
        p.add_argument("path", nargs="?", metavar="PATH")
    cmd.arguments(p)
    p.set_defaults(func=_run, _ctl_cmd=cmd)


def _common(p: argparse.ArgumentParser, *, top: bool) -> None:
    # Accepted before and after the subcommand: a subcommand's copy only overrides the
    # top-level value when it is given (SUPPRESS keeps the namespace untouched otherwise).
    default: Any = None if top else argparse.SUPPRESS
    p.add_argument("--server", metavar="HOST:PORT[,…]",
                   default=f"127.0.0.1:{net.DEFAULT_SERVER_PORT}" if top else default,
                   help="server address; several, comma-separated, are tried in turn when one "
                   "is down (default: $DELTABKP_SERVER, else 127.0.0.1:7470)")
    p.add_argument("--key-file", metavar="F", default=default,
                   help="cluster key file (default: $DELTABKP_KEY_FILE, else "
                   "~/.config/deltabkp/cluster.key)")
    net.add_tls_arguments(p, None if top else argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="print the server's answer as JSON")
    p.add_argument("--timeout", type=float, metavar="S",
                   default=net.DEFAULT_TIMEOUT * 3 if top else argparse.SUPPRESS,
                   help="deadline for connecting and for each answer, seconds (default 30)")
    p.add_argument("--utc", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="show times in UTC (default: local time; --json is always UTC)")
    _config.add_config_arguments(p, None if top else argparse.SUPPRESS)


def _no_subcommand(args: argparse.Namespace) -> int:
    if args.print_config:  # 'deltabkp ctl --print-config' needs no subcommand
        return _print_config(args)
    args._ctl_parser.print_help(sys.stderr)
    return 2


def _print_config(args: argparse.Namespace) -> int:
    """``--print-config``: the ctl options as they resolve, and where each came from."""
    config: _config.Options = args._ctl_config
    origins = config.resolve(args, os.environ)
    if args.json:
        _render.emit(config.as_json(args, origins), "", as_json=True)
    else:
        print(config.render(args, origins))
    return 0


def _positive(seconds: float) -> bool:
    return math.isfinite(seconds) and seconds > 0


# -- running a command --------------------------------------------------------------------------


def _target(args: argparse.Namespace, cmd: Command) -> dict[str, Any]:
    """``{"node", "path"}`` in canonical form, or ``{}`` for a command about no target."""
    if cmd.target == "none" or (cmd.target == "optional" and args.node is None):
        return {}
    if args.path is None:
        raise UsageError(f"{cmd.name}: give both NODE:PORT and PATH, or neither")
    try:
        node = str(net.Address.parse_node(args.node))
    except UsageError as exc:
        raise exc.with_context(hint="NODE:PORT is where the node's agent listens, e.g. 10.0.0.5:7471")
    try:
        path = net.normalise_path(args.path)
    except UsageError as exc:
        raise exc.with_context(node=node)
    return {"node": node, "path": path}


def _run(args: argparse.Namespace) -> int:
    """Check everything the command line says, then run the command against the server."""
    cmd: Command = args._ctl_cmd
    if args.print_config:
        return _print_config(args)
    args._ctl_config.resolve(args, os.environ)  # flags > $DELTABKP_* > [ctl] of --config
    _render.DISPLAY_UTC.set(bool(args.utc))
    try:
        servers = parse_servers(args.server or default_server())
        if not servers:
            raise UsageError("--server names no server")
    except UsageError as exc:
        raise exc.with_context(hint="check --server / $DELTABKP_SERVER")
    if not _positive(args.timeout):
        raise UsageError("--timeout must be a positive number of seconds")
    request = {**_target(args, cmd), **cmd.build(args)}
    key = net.load_key(args.key_file)
    tls = net.tls_from_args(args)
    if not (tls.plaintext or tls.pki):
        # Reuse the certificate an earlier ctl minted (docs/security.md, "ctl's certificate
        # cache"); daemons mint in memory.
        tls = attrs.evolve(tls, cache_dir=net.tls_cache_dir())
    if tls.plaintext:
        for server in servers:
            net.check_plaintext_address(server.host, "--server")
    net.install_tls(tls)
    client = Client(servers, key, float(args.timeout))
    return cmd.run(args, Call(cmd.name, request, client, bool(args.json)))
