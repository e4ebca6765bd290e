"""``deltabkp ctl``: the light client of a deltabkp server (register, list, log, restore, ...).

Job: turn one command line into one control request (docs/formats.md, "Control ops"), print
the server's answer as a human table or as JSON (``--json``), and exit with a code that tells
what happened: 0 ok, 1 ``backup-now --wait`` ran and failed (or ``restore`` could not write
next to DEST), 2 usage error, 3 refused by the server (or by the agent, through the server),
4 server unreachable or protocol failure, 5/6 a restored archive that is malformed / fails
its hash.
Invariants:
- every message names the server, and the node and path the request was about;
- every network wait has a deadline (``--timeout``; ``backup-now --wait`` waits as long as
  ``--wait-timeout``);
- ``restore`` writes the archive to a temp file next to DEST, checks its size and blake3
  against what the server announced, and only then extracts it (safely) into DEST; the temp
  file is removed whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import blake3
import trio

from deltabkp import transport, wire
from deltabkp.errors import (
    AuthError,
    DeltabkpError,
    IntegrityError,
    PeerUnavailable,
    ProtocolError,
    RemoteProtocolError,
    RequestRefused,
    UsageError,
)

__all__ = ["register", "default_server", "EXIT_FAILED", "RestoreWriteError"]

#: ``backup-now --wait``: the execution ran and failed.
EXIT_FAILED = 1


class RestoreWriteError(DeltabkpError):
    """``restore`` could not write the downloaded archive next to DEST (permissions, disk full)."""

    exit_code = 1


_ENV_SERVER = "DELTABKP_SERVER"

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

server address: --server HOST:PORT, else $DELTABKP_SERVER, else 127.0.0.1:7470.
cluster key: --key-file F, else $DELTABKP_KEY_FILE, else ~/.config/deltabkp/cluster.key.
frequency: integer minutes ('15'), or a number with s, m, h or d ('90s', '5m', '2h', '1d').

exit codes: 0 ok; 1 'backup-now --wait' ran and failed, or restore could not write next to
DEST; 2 usage error; 3 refused by the server
(already registered, unknown target, bad frequency, path not allowed by the agent, ...);
4 server unreachable, wrong key or protocol failure; 5/6 restored archive malformed / corrupt.
"""


def default_server() -> str:
    return os.environ.get(_ENV_SERVER) or f"127.0.0.1:{transport.DEFAULT_SERVER_PORT}"


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

    def add(name: str, help: str, description: str, examples: str) -> argparse.ArgumentParser:
        p = cmds.add_parser(
            name, help=help, description=description, epilog="examples:\n" + examples,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _common(p, top=False)
        p.set_defaults(func=_run_command)
        return p

    p = add("register", "start backing up NODE:PORT PATH every FREQ",
            "Register a target. The server checks with the node's agent (if it answers) that "
            "PATH is allowed there; the first backup runs right away, then every FREQ.",
            "  deltabkp ctl register 10.0.0.5:7471 /srv/shop --every 15\n"
            "  deltabkp ctl register 10.0.0.5:7471 /srv/shop --every 2h\n")
    _target_args(p)
    p.add_argument("--every", required=True, metavar="FREQ",
                   help="backup frequency: integer minutes ('15') or '90s', '5m', '2h', '1d'")

    p = add("unregister", "stop backing up NODE:PORT PATH",
            "Unregister a target: its backups stop. Its archives and its execution log stay on "
            "the server (list/log/restore still work).",
            "  deltabkp ctl unregister 10.0.0.5:7471 /srv/shop\n")
    _target_args(p)

    p = add("list", "every backup made of NODE:PORT PATH (date, size, transferred, retained)",
            "List every backup ever made of a target, newest first: creation date, archive "
            "size, bytes that crossed the network for it, and whether it is still retained "
            "(the server keeps the newest 10).",
            "  deltabkp ctl list 10.0.0.5:7471 /srv/shop\n"
            "  deltabkp ctl list 10.0.0.5:7471 /srv/shop --json\n")
    _target_args(p)

    add("targets", "all registered targets and their state",
        "Show every registered target: frequency, state (ok, retrying, running), next due "
        "time, last outcome and error, archives kept.",
        "  deltabkp ctl targets\n")

    p = add("log", "execution history (all targets, or one)",
            "Show the execution log, newest first: every backup attempt with its outcome "
            "(stored, unchanged, failed), bytes on the wire, archive size, files that changed "
            "while being read, and the error if any.",
            "  deltabkp ctl log\n  deltabkp ctl log 10.0.0.5:7471 /srv/shop --limit 5\n")
    p.add_argument("node", nargs="?", metavar="NODE:PORT", help="only this target's executions")
    p.add_argument("path", nargs="?", metavar="PATH")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="at most N executions")

    add("status", "the server's state (version, uptime, targets, running)",
        "Show the server's status.", "  deltabkp ctl status\n")

    p = add("backup-now", "run a backup of NODE:PORT PATH now",
            "Queue a backup of a target now. With --wait, block until that execution ends, "
            "print its outcome, and exit 1 if it failed.",
            "  deltabkp ctl backup-now 10.0.0.5:7471 /srv/shop --wait\n")
    _target_args(p)
    p.add_argument("--wait", action="store_true", help="wait for the execution to end")
    p.add_argument("--wait-timeout", type=float, default=3600.0, metavar="S",
                   help="longest wait with --wait, seconds (default 3600)")

    p = add("restore", "download a backup of NODE:PORT PATH and extract it into DEST",
            "Download an archive of a target (the newest by default), verify its blake3 hash, "
            "and extract it into DEST (created if missing; must be empty). Entries that would "
            "escape DEST (absolute paths, '..', links pointing outside) are refused.",
            "  deltabkp ctl restore 10.0.0.5:7471 /srv/shop ./shop\n"
            "  deltabkp ctl restore 10.0.0.5:7471 /srv/shop ./shop-v7 --version 7\n")
    _target_args(p)
    p.add_argument("dest", metavar="DEST", help="directory to extract into")
    p.add_argument("--version", type=int, default=None, metavar="N", dest="seq",
                   help="archive number (SEQ column of 'list'; default: the newest retained)")


def _common(p: argparse.ArgumentParser, *, top: bool) -> None:
    # Accepted before and after the subcommand: a subcommand's copy only overrides the
    # top-level value when it is given (SUPPRESS keeps the namespace untouched otherwise).
    default: Any = None if top else argparse.SUPPRESS
    p.add_argument("--server", metavar="HOST:PORT", default=default,
                   help="server address (default: $DELTABKP_SERVER, else 127.0.0.1:7470)")
    p.add_argument("--key-file", metavar="F", default=default,
                   help="cluster key file (default: $DELTABKP_KEY_FILE, else "
                   "~/.config/deltabkp/cluster.key)")
    p.add_argument("--json", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="print the server's answer as JSON")
    p.add_argument("--timeout", type=float, metavar="S",
                   default=transport.DEFAULT_TIMEOUT * 3 if top else argparse.SUPPRESS,
                   help="deadline for connecting and for each answer, seconds (default 30)")


def _target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("node", metavar="NODE:PORT", help="the node's agent address, e.g. 10.0.0.5:7471")
    p.add_argument("path", metavar="PATH", help="absolute directory path on the node")


def _no_subcommand(args: argparse.Namespace) -> int:
    args._ctl_parser.print_help(sys.stderr)
    return 2


# -- running a command --------------------------------------------------------------------------


def _check_node(text: str) -> str:
    host, port = transport.parse_hostport(text)
    if not 1 <= port <= 65535:
        raise UsageError(f"bad node {text!r}: port must be 1-65535")
    return text


def _check_path(node: str, path: str) -> str:
    if not path.startswith("/"):
        raise UsageError(f"{node} {path}: PATH must be absolute (a directory on the node)")
    return path


def _run_command(args: argparse.Namespace) -> int:
    cmd: str = args.ctl_command
    server = args.server or default_server()
    host, port = transport.parse_hostport(server, transport.DEFAULT_SERVER_PORT)
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise UsageError("--timeout must be a positive number of seconds")
    req: dict[str, Any] = {}
    if cmd in ("register", "unregister", "list", "backup-now", "restore") or (
        cmd == "log" and args.node is not None
    ):
        if cmd == "log" and args.path is None:
            raise UsageError("log: give both NODE:PORT and PATH, or neither")
        req["node"] = _check_node(args.node)
        req["path"] = _check_path(args.node, args.path)
    if cmd == "register":
        req["every"] = args.every
    if cmd == "log" and args.limit is not None:
        if args.limit < 1:
            raise UsageError("--limit must be at least 1")
        req["limit"] = args.limit
    if cmd == "backup-now":
        req["wait"] = bool(args.wait)
        if not (math.isfinite(args.wait_timeout) and args.wait_timeout > 0):
            raise UsageError("--wait-timeout must be a positive number of seconds")
    key = transport.load_key(args.key_file)
    client = _Client(host, port, key, float(args.timeout))
    what = f"{req['node']} {req['path']}" if "node" in req else ""

    if cmd == "restore":
        dest = _prepare_dest(Path(args.dest), what)
        if args.seq is not None:
            req["seq"] = args.seq
        meta = trio.run(_restore, client, req, dest, what)
        _emit(args, meta, _human_restore(meta, dest))
        return 0

    timeout = float(args.wait_timeout) if cmd == "backup-now" and args.wait else None
    data = trio.run(client.request, cmd, req, what, timeout)
    _emit(args, data, _HUMAN[cmd](data, req))
    if cmd == "backup-now" and args.wait and isinstance(data, dict):
        return EXIT_FAILED if data.get("outcome") == "failed" else 0
    return 0


class _Client:
    """One connection to the server per command (connect, authenticate, ask, close)."""

    def __init__(self, host: str, port: int, key: bytes, timeout: float) -> None:
        self.host, self.port, self.key, self.timeout = host, port, key, timeout
        self.name = transport.format_hostport(host, port)

    async def connect(self, what: str) -> transport.Channel:
        try:
            return await transport.connect(
                self.host, self.port, key=self.key, role="ctl", timeout=self.timeout
            )
        except AuthError as exc:
            raise AuthError(
                f"{_about(what)}server {self.name} rejected our cluster key or we rejected its "
                f"(check --key-file / $DELTABKP_KEY_FILE): {exc}"
            ) from None
        except PeerUnavailable as exc:
            raise PeerUnavailable(
                f"{_about(what)}cannot reach the deltabkp server at {self.name} "
                f"({str(exc).removeprefix(self.name + ': ')}); is "
                "deltabkp-server running there? (--server / $DELTABKP_SERVER)"
            ) from None

    async def request(self, op: str, args: dict[str, Any], what: str, timeout: float | None) -> Any:
        chan = await self.connect(what)
        async with chan:
            await chan.send(wire.Request(op, args))
            msg = await self._receive(chan, what, timeout)
            if not isinstance(msg, wire.Response):
                raise RemoteProtocolError(
                    f"{_about(what)}server {self.name} answered {op} with {msg.TYPE}"
                )
            return msg.data

    async def _receive(self, chan: transport.Channel, what: str, timeout: float | None = None) -> wire.Message:
        try:
            return await chan.receive(timeout=timeout or self.timeout)
        except RequestRefused as exc:
            raise RequestRefused(exc.code, _name(what, exc.message) + f" [{exc.code}]") from None
        except (PeerUnavailable, ProtocolError) as exc:
            raise type(exc)(f"{_about(what)}server {self.name}: {exc}") from None


def _about(what: str) -> str:
    return f"{what}: " if what else ""


def _name(what: str, message: str) -> str:
    """Prefix the node and path unless the server's message already names them."""
    if not what:
        return message
    node, _, path = what.partition(" ")
    return message if (node in message and path in message) else f"{what}: {message}"


# -- restore ------------------------------------------------------------------------------------


def _prepare_dest(dest: Path, what: str) -> Path:
    if dest.exists():
        if not dest.is_dir():
            raise UsageError(f"{what}: restore destination {dest} exists and is not a directory")
        if any(dest.iterdir()):
            raise UsageError(f"{what}: restore destination {dest} is not empty")
    parent = dest.absolute().parent
    if not parent.is_dir():
        raise UsageError(f"{what}: the parent of the restore destination, {parent}, does not exist")
    return dest


async def _restore(client: _Client, req: dict[str, Any], dest: Path, what: str) -> dict[str, Any]:
    # The temp file first: a destination we cannot write to fails before anything is asked.
    try:
        fd, tmp_name = tempfile.mkstemp(
            dir=dest.absolute().parent, prefix=f".{dest.name}.", suffix=".tgz.part"
        )
    except OSError as exc:
        raise RestoreWriteError(
            f"{what}: cannot create a temp file next to the restore destination {dest}: "
            f"{exc.strerror or exc}"
        ) from None
    tmp = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                async with await client.connect(what) as chan:
                    meta, got, size, hasher, want = await _download(client, chan, req, what, f)
                await trio.to_thread.run_sync(f.flush)
        except OSError as exc:  # the network's own are PeerUnavailable already: these are ours
            raise RestoreWriteError(
                f"{what}: cannot write the archive to {tmp} (restore destination {dest}): "
                f"{exc.strerror or exc}"
            ) from None
        if got != size or hasher.digest() != want:
            raise IntegrityError(
                f"{what}: archive {meta.get('seq')} arrived with {got} bytes and blake3 "
                f"{hasher.hexdigest()[:16]}, but the server announced {size} bytes and "
                f"{want.hex()[:16]}; nothing was extracted"
            )
        report = await trio.to_thread.run_sync(_extract, tmp, dest)
        meta["dest"] = str(dest)
        meta["extracted"] = report
        return meta
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


async def _download(
    client: _Client, chan: transport.Channel, req: dict[str, Any], what: str, f: BinaryIO
) -> tuple[dict[str, Any], int, int, blake3.blake3, bytes]:
    """Fetch the archive into ``f``: (header, bytes got, size announced, hasher, hash announced)."""
    await chan.send(wire.Request("fetch", req))
    head = await client._receive(chan, what)
    if not isinstance(head, wire.Response) or not isinstance(head.data, dict):
        raise RemoteProtocolError(f"{what}: server {client.name} sent {head.TYPE} to fetch")
    meta: dict[str, Any] = dict(head.data)
    try:
        size = int(meta["size"])
        want = bytes.fromhex(str(meta["hash"]))
    except (KeyError, TypeError, ValueError):
        raise RemoteProtocolError(
            f"{what}: server {client.name} sent a malformed archive header {meta!r}"
        ) from None
    hasher = blake3.blake3()
    got = 0
    while True:
        msg = await client._receive(chan, what)
        if isinstance(msg, wire.DataEnd):
            return meta, got, size, hasher, want
        if not isinstance(msg, wire.DataChunk):
            raise RemoteProtocolError(
                f"{what}: server {client.name} sent {msg.TYPE} inside an archive"
            )
        got += len(msg.data)
        if got > size:
            raise IntegrityError(
                f"{what}: archive {meta.get('seq')} is longer than the {size} bytes announced"
            )
        hasher.update(msg.data)
        await trio.to_thread.run_sync(f.write, msg.data)


def _extract(archive: Path, dest: Path) -> dict[str, Any]:
    from deltabkp.archive import extract_archive

    r = extract_archive(archive, dest)  # refuses entries escaping dest (UnsafeArchiveError)
    return {"files": r.files, "dirs": r.dirs, "symlinks": r.symlinks, "hardlinks": r.hardlinks,
            "bytes": r.bytes}


# -- output -------------------------------------------------------------------------------------


def _emit(args: argparse.Namespace, data: Any, human: str) -> None:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(human)


def size(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "-"
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if v < 1024 or unit == "TiB":
            return f"{int(v)} B" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{n} B"


def _when(iso: Any) -> str:
    """'2026-11-26T18:40:12.345+00:00' → '2026-11-26 18:40:12Z' (tables stay narrow)."""
    if not isinstance(iso, str) or "T" not in iso:
        return "-"
    day, _, rest = iso.partition("T")
    return f"{day} {rest[:8]}Z"


def _every(seconds: Any) -> str:
    if not isinstance(seconds, int):
        return "-"
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % n == 0:
            return f"{seconds // n}{unit}"
    return f"{seconds}s"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers], *[["-" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def _human_register(d: Any, req: dict[str, Any]) -> str:
    out = (
        f"registered {d.get('node')} {d.get('path')}: backed up every "
        f"{_every(d.get('every_seconds'))}, first backup due {_when(d.get('next_due'))}"
    )
    if d.get("warning"):
        out += f"\nwarning: {d['warning']}"
    return out


def _human_unregister(d: Any, req: dict[str, Any]) -> str:
    return (
        f"unregistered {d.get('node')} {d.get('path')}: no more backups; its archives and "
        "execution log stay on the server"
    )


def _human_list(rows: Any, req: dict[str, Any]) -> str:
    what = f"{req['node']} {req['path']}"
    if not rows:
        return f"{what}: no backups yet"
    kept = sum(1 for r in rows if r.get("retained"))
    body = table(
        ["SEQ", "CREATED", "SIZE", "TRANSFERRED", "RATIO", "RETAINED", "HASH"],
        [
            [
                r.get("seq"), _when(r.get("created")), size(r.get("size")),
                size(r.get("transferred")), _ratio(r.get("transferred"), r.get("size")),
                "yes" if r.get("retained") else ("missing" if r.get("missing") else "no"),
                str(r.get("hash", ""))[:16],
            ]
            for r in rows
        ],
    )
    return f"{what}: {len(rows)} backup(s), {kept} retained\n{body}"


def _ratio(part: Any, whole: Any) -> str:
    if isinstance(part, int) and isinstance(whole, int) and whole > 0:
        return f"{100.0 * part / whole:.1f}%"
    return "-"


def _human_targets(rows: Any, req: dict[str, Any]) -> str:
    if not rows:
        return "no targets registered (deltabkp ctl register NODE:PORT PATH --every FREQ)"
    return table(
        ["NODE", "PATH", "EVERY", "STATE", "NEXT DUE", "LAST", "ARCHIVES", "LAST ERROR"],
        [
            [
                r.get("node"), r.get("path"), _every(r.get("every_seconds")), r.get("state"),
                _when(r.get("next_due")), r.get("last_outcome"), r.get("archives"),
                r.get("last_error") or "",
            ]
            for r in rows
        ],
    )


def _human_log(rows: Any, req: dict[str, Any]) -> str:
    if not rows:
        target = f" of {req['node']} {req['path']}" if "node" in req else ""
        return f"no executions{target} yet"
    return table(
        ["ID", "STARTED", "NODE", "PATH", "OUTCOME", "TRIGGER", "TRANSFERRED", "SIZE", "CHANGED",
         "ERROR / NOTE"],
        [
            [
                r.get("id"), _when(r.get("started")), r.get("node"), r.get("path"),
                r.get("outcome") or "running", r.get("trigger"), size(r.get("transferred")),
                size(r.get("archive_size")), r.get("changed"),
                r.get("error") or r.get("note") or "",
            ]
            for r in rows
        ],
    )


def _human_status(d: Any, req: dict[str, Any]) -> str:
    if not isinstance(d, dict):
        return str(d)
    return "\n".join(f"{k}: {v}" for k, v in d.items())


def _human_backup_now(d: Any, req: dict[str, Any]) -> str:
    what = f"{req['node']} {req['path']}"
    if not isinstance(d, dict) or d.get("queued"):
        return f"queued a backup of {what} (see: deltabkp ctl log {what})"
    outcome = d.get("outcome")
    line = f"{what}: {outcome}"
    if outcome == "stored":
        line += (
            f" as archive {d.get('seq')}, {size(d.get('archive_size'))}, "
            f"{size(d.get('transferred'))} on the wire "
            f"({_ratio(d.get('transferred'), d.get('archive_size'))})"
        )
    elif outcome == "unchanged":
        why = str(d.get("note") or "nothing changed").removeprefix("unchanged").strip(" ()")
        line += f" ({why}), {size(d.get('transferred'))} on the wire"
    if d.get("changed"):
        line += f"; {d['changed']} file(s) changed while read"
    if d.get("error"):
        line += f"\nerror: {d['error']}"
    return line


def _human_restore(meta: dict[str, Any], dest: Path) -> str:
    x = meta.get("extracted") or {}
    return (
        f"restored {meta.get('node')} {meta.get('path')} archive {meta.get('seq')} "
        f"(created {_when(meta.get('created'))}, {size(meta.get('size'))}, blake3 verified) "
        f"into {dest}: {x.get('files', 0)} files, {x.get('dirs', 0)} directories, "
        f"{x.get('symlinks', 0) + x.get('hardlinks', 0)} links, {size(x.get('bytes'))} of data"
    )


_HUMAN = {
    "register": _human_register,
    "unregister": _human_unregister,
    "list": _human_list,
    "targets": _human_targets,
    "log": _human_log,
    "status": _human_status,
    "backup-now": _human_backup_now,
}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m deltabkp.ctl ...`` is ``deltabkp ctl ...``."""
    from deltabkp.cli import main as cli_main

    return cli_main(["ctl", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
