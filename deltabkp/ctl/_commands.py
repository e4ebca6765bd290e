"""The ``deltabkp ctl`` subcommands: one ``Command`` entry each (arguments, request, output).

Job: turn one command line into one control request (docs/formats.md, "Control ops"), print
the server's answer as a human table or as JSON (``--json``), and return the exit code.
Invariants: every argument is checked before anything is sent (a usage error never reaches
the network, exit 2); the node and path are sent in their canonical form (``net.Address``,
``net.normalise_path``), so errors and tables name them as the server stores them; every
network wait has a deadline (``--timeout``; ``backup-now --wait`` waits ``--wait-timeout``).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import trio

from deltabkp import net
from deltabkp.ctl import _render
from deltabkp.ctl._client import Client, default_server, parse_servers
from deltabkp.ctl._restore import restore
from deltabkp.errors import UsageError

__all__ = ["register", "EXIT_FAILED", "COMMANDS", "Command"]

#: ``backup-now --wait``: the execution ran and failed.
EXIT_FAILED = 1

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
  deltabkp ctl restore 10.0.0.5:7471 /srv/shop ./shop-restored --version 7
  deltabkp ctl --json list 10.0.0.5:7471 /srv/shop | jq '.[0].size'
  deltabkp ctl unregister 10.0.0.5:7471 /srv/shop

server address: --server HOST:PORT[,HOST:PORT…], else $DELTABKP_SERVER, else 127.0.0.1:7470.
cluster key: --key-file F, else $DELTABKP_KEY_FILE, else ~/.config/deltabkp/cluster.key.
frequency: integer minutes ('15'), or a number with s, m, h or d ('90s', '5m', '2h', '1d').

exit codes: 0 ok; 1 'backup-now --wait' ran and failed, or restore could not write next to
DEST; 2 usage error; 3 refused by the server
(already registered, unknown target, bad frequency, path not allowed by the agent, ...);
4 server unreachable, wrong key or protocol failure; 5/6 restored archive malformed / corrupt.
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
        return trio.run(self.client.request, self.op, self.request, timeout)

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


def _register_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--every", required=True, metavar="FREQ",
                   help="backup frequency: integer minutes ('15') or '90s', '5m', '2h', '1d'")


def _log_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=int, default=None, metavar="N", help="at most N executions")


def _log_request(args: argparse.Namespace) -> dict[str, Any]:
    if args.limit is None:
        return {}
    if args.limit < 1:
        raise UsageError("--limit must be at least 1")
    return {"limit": args.limit}


def _backup_now_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", action="store_true", help="wait for the execution to end")
    p.add_argument("--wait-timeout", type=float, default=3600.0, metavar="S",
                   help="longest wait with --wait, seconds (default 3600)")


def _backup_now_request(args: argparse.Namespace) -> dict[str, Any]:
    if not _positive(args.wait_timeout):
        raise UsageError("--wait-timeout must be a positive number of seconds")
    return {"wait": bool(args.wait)}


def _backup_now(args: argparse.Namespace, call: Call) -> int:
    data = call.ask(float(args.wait_timeout) if args.wait else None)
    call.show(data, _render.backup_now(data, call.request))
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
    meta = restore(call.client, call.request, dest)
    call.show(meta, _render.restore(meta, dest))
    return 0


COMMANDS: tuple[Command, ...] = (
    Command(
        "register", "start backing up NODE:PORT PATH every FREQ",
        "Register a target. The server checks with the node's agent (if it answers) that "
        "PATH is allowed there; the first backup runs right away, then every FREQ.",
        "  deltabkp ctl register 10.0.0.5:7471 /srv/shop --every 15\n"
        "  deltabkp ctl register 10.0.0.5:7471 /srv/shop --every 2h\n",
        _answer(_render.register), target="required", arguments=_register_arguments,
        build=lambda args: {"every": args.every},
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
        "(the server keeps the newest 10).",
        "  deltabkp ctl list 10.0.0.5:7471 /srv/shop\n"
        "  deltabkp ctl list 10.0.0.5:7471 /srv/shop --json\n",
        _answer(_render.backups), target="required",
    ),
    Command(
        "targets", "all registered targets and their state",
        "Show every registered target: frequency, state (ok, retrying, running), next due "
        "time, last outcome and error, archives kept.",
        "  deltabkp ctl targets\n",
        _answer(_render.targets),
    ),
    Command(
        "log", "execution history (all targets, or one)",
        "Show the execution log, newest first: every backup attempt with its outcome "
        "(stored, unchanged, failed), bytes on the wire, archive size, files that changed "
        "while being read, and the error if any.",
        "  deltabkp ctl log\n  deltabkp ctl log 10.0.0.5:7471 /srv/shop --limit 5\n",
        _answer(_render.log), target="optional", arguments=_log_arguments, build=_log_request,
    ),
    Command(
        "status", "the server's state (version, uptime, targets, running)",
        "Show the server's status.", "  deltabkp ctl status\n",
        _answer(_render.status),
    ),
    Command(
        "backup-now", "run a backup of NODE:PORT PATH now",
        "Queue a backup of a target now. With --wait, block until that execution ends, "
        "print its outcome, and exit 1 if it failed.",
        "  deltabkp ctl backup-now 10.0.0.5:7471 /srv/shop --wait\n",
        _backup_now, target="required", arguments=_backup_now_arguments,
        build=_backup_now_request,
    ),
    Command(
        "restore", "download a backup of NODE:PORT PATH and extract it into DEST",
        "Download an archive of a target (the newest by default), verify its blake3 hash, "
        "and extract it into DEST (created if missing; must be empty). Entries that would "
        "escape DEST (absolute paths, '..', links pointing outside) are refused.",
        "  deltabkp ctl restore 10.0.0.5:7471 /srv/shop ./shop\n"
        "  deltabkp ctl restore 10.0.0.5:7471 /srv/shop ./shop-v7 --version 7\n",
        _restore, target="required", arguments=_restore_arguments, build=_restore_request,
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
    ctl.set_defaults(func=_no_subcommand, _ctl_parser=ctl)
    cmds = ctl.add_subparsers(dest="ctl_command", metavar="SUBCOMMAND")
    for cmd in COMMANDS:
        p = cmds.add_parser(
            cmd.name, help=cmd.help, description=cmd.description,
            epilog="examples:\n" + cmd.examples,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
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
    p.add_argument("--server", metavar="HOST:PORT[,…]", default=default,
                   help="server address; several, comma-separated, are tried in turn when one "
                   "is down (default: $DELTABKP_SERVER, else 127.0.0.1:7470)")
    p.add_argument("--key-file", metavar="F", default=default,
                   help="cluster key file (default: $DELTABKP_KEY_FILE, else "
                   "~/.config/deltabkp/cluster.key)")
    p.add_argument("--json", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="print the server's answer as JSON")
    p.add_argument("--timeout", type=float, metavar="S",
                   default=net.DEFAULT_TIMEOUT * 3 if top else argparse.SUPPRESS,
                   help="deadline for connecting and for each answer, seconds (default 30)")


def _no_subcommand(args: argparse.Namespace) -> int:
    args._ctl_parser.print_help(sys.stderr)
    return 2


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
    client = Client(servers, key, float(args.timeout))
    return cmd.run(args, Call(cmd.name, request, client, bool(args.json)))
