"""The docker-compose cluster as local processes: ``make local-up / local-add-echosv / local-status /
local-logs / local-down`` call this script.

Job: on 127.0.0.1, start one ``deltabkp-server`` and N echo nodes — each node is an echo app
(``examples/echo/echo_app.py``), its own ``deltabkp-agent`` allowed on the app's data directory
and announcing itself to the server, and a load generator that keeps the app's files changing —
and register every app with the server through ``deltabkp ctl register`` at ``--every``.

Everything lives in one run directory::

    RUN_DIR/cluster.json      the record: every process started (pid, start time, command, log)
                              and every address; the only thing ``down`` acts on
    RUN_DIR/cluster.key       the shared cluster key (random, mode 0600)
    RUN_DIR/env               `. RUN_DIR/env` sets DELTABKP_SERVER and DELTABKP_KEY_FILE
    RUN_DIR/logs/*.log        one log per process
    RUN_DIR/server/           the server's data directory (catalog + archives)
    RUN_DIR/echosvN/data/     echo node N's data directory: the backed-up path
    RUN_DIR/echosvN/agent/    echo node N's agent: working directory and signature cache

Invariants:
- Ports are chosen free at start: every daemon listens on port 0 and the port it reports
  (``... listening on HOST:PORT``, waited for by ``deltabkp.testing.Daemon``, the project's
  one daemon launcher) is recorded; nothing assumes a fixed port.
- ``down`` stops exactly what ``up``/``add-echosv`` started and nothing else: a recorded pid
  is signalled only while its kernel start time still matches the recorded one (so a reused
  pid is never hit), and then its whole session (each process is a session leader), which
  also catches any helper it spawned.
- The record is replaced atomically and all commands take an exclusive lock on the run
  directory, so two commands never interleave; a failed ``up``/``add-echosv`` stops what it
  had started before exiting non-zero.
- Every wait has a deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from deltabkp.testing import Daemon, DaemonStartError

REPO = Path(__file__).resolve().parent.parent
ECHO_DIR = REPO / "examples" / "echo"
RECORD = "cluster.json"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
CTL_TIMEOUT_S = 60.0
# What a previous (stopped) cluster left in a run directory; ``up`` clears only these names.
OWN_NAMES = ("cluster.json", "cluster.key", "env", "logs", "server")
OWN_NODE = re.compile(r"^echosv\d+$")


class ClusterError(Exception):
    """A command could not do its job; the message says why (printed, exit 1)."""


# -- processes ---------------------------------------------------------------------------------


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, session id, start time in clock ticks) of ``pid`` from /proc, None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0], int(fields[3]), int(fields[19])


def start_ticks(pid: int) -> int:
    st = proc_stat(pid)
    return st[2] if st else -1


def is_ours_and_alive(pid: int, ticks: int) -> bool:
    """True while ``pid`` is the very process we started (same start time) and not a zombie."""
    if not Path("/proc/self/stat").exists():  # no procfs (not Linux): best effort
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    st = proc_stat(pid)
    return st is not None and st[0] != "Z" and st[2] == ticks


def session_members(sid: int, not_before: int) -> list[int]:
    """Live processes in session ``sid`` started no earlier than its leader (so: ours)."""
    out: list[int] = []
    proc = Path("/proc")
    if not proc.is_dir():
        return out
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        st = proc_stat(int(d.name))
        if st and st[0] != "Z" and st[1] == sid and st[2] >= not_before:
            out.append(int(d.name))
    return out


def start_daemon(run: Path, name: str, argv: list[str], env: dict[str, str], cwd: Path,
                 ready: bool = True) -> dict[str, Any]:
    """Start ``argv`` detached (own session, output to ``logs/NAME.log``) and record it.

    With ``ready``, wait for its ``listening on HOST:PORT`` line and record the address; a
    daemon that does not come up is stopped by the launcher (nothing is left behind).
    """
    log = run / "logs" / f"{name}.log"
    try:
        # start_new_session: the daemon outlives this script and make, ignores the terminal's
        # Ctrl-C, and leads its own session, which is what `down` signals.
        daemon = Daemon(argv, log=log, name=name, env=env, cwd=cwd, start_new_session=True,
                        wait=ready, timeout=START_TIMEOUT_S)
    except DaemonStartError as exc:
        raise ClusterError(f"{exc.message}\n(whole log: {log})") from None
    return {
        "name": name, "pid": daemon.pid, "ticks": start_ticks(daemon.pid), "argv": argv,
        "log": str(log.relative_to(run)), "address": daemon.address if ready else None,
    }


def stop_processes(entries: Sequence[dict[str, Any]], out: Any = sys.stdout) -> list[str]:
    """SIGTERM every recorded process that is still ours, wait, then SIGKILL its session.

    Returns the names of processes that could not be stopped (should be empty)."""
    live = [e for e in entries if is_ours_and_alive(e["pid"], e["ticks"])]
    for e in entries:
        if e not in live:
            print(f"  {e['name']}: pid {e['pid']} already gone", file=out)
    for e in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(e["pid"], signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline and any(is_ours_and_alive(e["pid"], e["ticks"]) for e in live):
        time.sleep(0.05)
    stuck = []
    for e in live:
        # The leader is verified to be ours (or was, a moment ago); its session's members that
        # started after it are its helpers. Kill whatever of them is left.
        members = session_members(e["pid"], e["ticks"]) if e["ticks"] >= 0 else []
        leader_alive = is_ours_and_alive(e["pid"], e["ticks"])
        if leader_alive and e["pid"] not in members:
            members.append(e["pid"])
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        how = "killed (did not stop on SIGTERM)" if leader_alive else "stopped"
        print(f"  {e['name']}: pid {e['pid']} {how}", file=out)
    kill_deadline = time.monotonic() + STOP_TIMEOUT_S
    for e in live:
        while is_ours_and_alive(e["pid"], e["ticks"]) and time.monotonic() < kill_deadline:
            time.sleep(0.05)
        if is_ours_and_alive(e["pid"], e["ticks"]):
            stuck.append(e["name"])
    return stuck


# -- the run directory ---------------------------------------------------------------------------


@contextlib.contextmanager
def locked(run: Path) -> Iterator[None]:
    run.mkdir(parents=True, exist_ok=True)
    with open(run / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ClusterError(f"another local-cluster command is running on {run}") from None
        yield


def read_record(run: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run / RECORD).read_text())  # type: ignore[no-any-return]
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise ClusterError(f"{run / RECORD} is unreadable ({exc}); inspect it by hand") from None


def write_record(run: Path, record: dict[str, Any]) -> None:
    tmp = run / (RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, run / RECORD)


def all_entries(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Every recorded process, in stop order: load generators, agents, apps, then the server."""
    nodes = record.get("nodes", [])
    out = [n["load"] for n in nodes if n.get("load")]
    out += [n["agent"] for n in nodes if n.get("agent")]
    out += [n["app"] for n in nodes if n.get("app")]
    if record.get("server"):
        out.append(record["server"])
    return out


def environment(run: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["DELTABKP_KEY_FILE"] = str(run / "cluster.key")
    env["PYTHONUNBUFFERED"] = "1"  # logs appear as they happen
    return env


# -- commands --------------------------------------------------------------------------------------


class Cluster:
    """One run directory's cluster; methods are the commands (the caller holds the lock)."""

    def __init__(self, run: Path, python: str) -> None:
        self.run = run
        self.python = python
        self.env = environment(run)

    def ctl(self, server: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [self.python, "-m", "deltabkp", "ctl", "--server", server,
               "--key-file", str(self.run / "cluster.key"), *args]
        res = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=CTL_TIMEOUT_S)
        if check and res.returncode != 0:
            raise ClusterError(f"`deltabkp ctl {' '.join(args)}` exited {res.returncode}: "
                               f"{res.stderr.strip() or res.stdout.strip()}")
        return res

    def start_node(self, record: dict[str, Any], index: int, every: str, rate: float,
                   load_duration: float) -> dict[str, Any]:
        """Echo app + agent + load generator for node ``index``; registered with the server."""
        name = f"echosv{index}"
        node_dir = self.run / name
        data = (node_dir / "data").resolve()
        data.mkdir(parents=True, exist_ok=True)
        server = record["server"]["address"]
        node: dict[str, Any] = {"name": name, "index": index, "data_dir": str(data)}
        record["nodes"].append(node)  # recorded as it grows, so a failure can stop the parts
        node["app"] = start_daemon(self.run, f"{name}-app", [
            self.python, str(ECHO_DIR / "echo_app.py"), "--listen", "127.0.0.1:0",
            "--data-dir", str(data), "--rotate-bytes", str(record["rotate_bytes"]),
        ], self.env, node_dir)
        write_record(self.run, record)  # on disk at once: even a killed `up` leaves a full record
        agent_dir = (node_dir / "agent").resolve()
        node["agent"] = start_daemon(self.run, f"{name}-agent", [
            self.python, "-m", "deltabkp_agent", "--listen", "127.0.0.1:0", "--allow", str(data),
            "--server", server, "--key-file", str(self.run / "cluster.key"),
            # Beside the data, never inside it: the cache must not end up in the backups.
            "--cache-dir", str(agent_dir / "cache"),
        ], self.env, agent_dir)
        write_record(self.run, record)
        node["load"] = start_daemon(self.run, f"{name}-load", [
            self.python, str(ECHO_DIR / "echo_load.py"), node["app"]["address"],
            "--client", name, "--rate", str(rate), "--duration", str(load_duration),
        ], self.env, node_dir, ready=False)
        node["registered"] = False
        write_record(self.run, record)
        res = self.ctl(server, "--json", "register", node["agent"]["address"], str(data),
                       "--every", every)
        node["registered"] = True
        with contextlib.suppress(ValueError):
            warning = json.loads(res.stdout or "{}").get("warning")
            if warning:
                print(f"  {name}: {warning}")
        print(f"  {name}: echo app {node['app']['address']}, agent {node['agent']['address']}, "
              f"registered {data} every {every}")
        return node

    def up(self, echo_servers: int, every: str, rate: float, load_duration: float,
           rotate_bytes: int) -> None:
        old = read_record(self.run)
        if old is not None and any(is_ours_and_alive(e["pid"], e["ticks"]) for e in all_entries(old)):
            raise ClusterError(f"a local cluster is already up in {self.run} "
                               f"(make local-status; make local-down to stop it)")
        # A fresh cluster: ports change at every start, so a previous run's catalog would hold
        # targets for dead addresses. Clear only what a previous run of this script created.
        for p in self.run.iterdir():
            if p.name in OWN_NAMES or OWN_NODE.match(p.name):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        (self.run / "logs").mkdir()
        key = self.run / "cluster.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        record: dict[str, Any] = {
            "run_dir": str(self.run), "every": every, "rate": rate, "load_duration": load_duration,
            "rotate_bytes": rotate_bytes,
            "server": None, "nodes": [], "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        try:
            record["server"] = start_daemon(self.run, "server", [
                self.python, "-m", "deltabkp_server", "--listen", "127.0.0.1:0",
                "--data-dir", str((self.run / "server").resolve()), "--key-file", str(key),
            ], self.env, self.run / "server")
            write_record(self.run, record)
            print(f"  server: {record['server']['address']} (data {self.run / 'server'})")
            for i in range(1, echo_servers + 1):
                self.start_node(record, i, every, rate, load_duration)
                write_record(self.run, record)
        except BaseException:
            self._abort(record)
            raise
        write_record(self.run, record)
        # For a shell: `. RUN_DIR/env` and plain `deltabkp ctl ...` talks to this cluster.
        (self.run / "env").write_text(
            f"export DELTABKP_SERVER={shlex.quote(record['server']['address'])}\n"
            f"export DELTABKP_KEY_FILE={shlex.quote(str(key))}\n")
        print(f"local cluster up in {self.run}: 1 server, {echo_servers} echo node(s); "
              f"server {record['server']['address']}")
        print(f"  . {shlex.quote(str(self.run / 'env'))} && deltabkp ctl targets")

    def add_echosv(self, new: int, every: str | None) -> None:
        record = self._live_record()
        first = max((n["index"] for n in record["nodes"]), default=0) + 1
        every = every or record["every"]
        added: list[dict[str, Any]] = []
        try:
            for i in range(first, first + new):
                added.append(self.start_node(record, i, every, record["rate"], record["load_duration"]))
                write_record(self.run, record)
        except BaseException:
            # Stop only the nodes this command started; the running cluster stays as it was.
            started = [n for n in record["nodes"] if n["index"] >= first]
            self._abort({"nodes": started, "server": None})
            record["nodes"] = [n for n in record["nodes"] if n["index"] < first]
            write_record(self.run, record)
            raise
        print(f"added {new} echo node(s): {', '.join(n['name'] for n in added)} "
              f"(nothing else was restarted)")

    def status(self) -> int:
        record = read_record(self.run)
        if record is None:
            print(f"no local cluster in {self.run} (make local-up)")
            return 1
        rows = []
        for e in all_entries(record)[::-1]:
            alive = is_ours_and_alive(e["pid"], e["ticks"])
            rows.append((e["name"], str(e["pid"]), "running" if alive else "stopped",
                         e.get("address") or "-", e["log"]))
        widths = [max(len(r[i]) for r in [("process", "pid", "state", "address", "log"), *rows])
                  for i in range(5)]
        for r in [("process", "pid", "state", "address", "log"), *rows]:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        server = record["server"]
        if not (server and is_ours_and_alive(server["pid"], server["ticks"])):
            print("\nthe server is not running: no targets to show")
            return 1 if any(r[2] == "running" for r in rows) else 0
        for title, args in (("targets", ("targets",)), ("last backups", ("log", "--limit", "10"))):
            print(f"\n{title} (deltabkp ctl --server {server['address']} {' '.join(args)}):")
            res = self.ctl(server["address"], *args, check=False)
            if res.returncode != 0 and args[0] == "log":  # an older ctl without --limit
                res = self.ctl(server["address"], "log", check=False)
            sys.stdout.write(res.stdout if res.returncode == 0 else f"  (failed: {res.stderr.strip()})\n")
        return 0

    def logs(self, follow: bool, lines: int) -> None:
        files = sorted((self.run / "logs").glob("*.log")) if (self.run / "logs").is_dir() else []
        if not files:
            print(f"no logs in {self.run / 'logs'} (make local-up)")
            return
        width = max(len(p.stem) for p in files)
        offsets: dict[Path, int] = {}
        for p in files:
            text = p.read_bytes()
            offsets[p] = len(text)
            for line in text.decode(errors="replace").splitlines()[-lines:]:
                print(f"{p.stem.ljust(width)} | {line}")
        if not follow:
            return
        sys.stdout.flush()
        partial: dict[Path, bytes] = {}
        try:
            while True:
                # Nodes added meanwhile show up too.
                for p in sorted((self.run / "logs").glob("*.log")):
                    size = p.stat().st_size
                    pos = offsets.get(p, 0)
                    if size < pos:
                        pos = 0
                    if size > pos:
                        with open(p, "rb") as f:
                            f.seek(pos)
                            chunk = partial.pop(p, b"") + f.read(size - pos)
                        offsets[p] = size
                        *done, rest = chunk.split(b"\n")
                        if rest:
                            partial[p] = rest
                        for raw in done:
                            print(f"{p.stem.ljust(width)} | {raw.decode(errors='replace')}")
                        sys.stdout.flush()
                time.sleep(0.3)
        except KeyboardInterrupt:
            return

    def down(self) -> int:
        record = read_record(self.run)
        if record is None:
            print(f"no local cluster in {self.run}: nothing to stop")
            return 0
        print(f"stopping the local cluster in {self.run}:")
        stuck = stop_processes(all_entries(record))
        if stuck:
            raise ClusterError(f"could not stop: {', '.join(stuck)}")
        record["stopped"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_record(self.run, record)
        print(f"local cluster stopped; logs and data are kept in {self.run}")
        return 0

    def _live_record(self) -> dict[str, Any]:
        record = read_record(self.run)
        server = record and record.get("server")
        if not record or not server or not is_ours_and_alive(server["pid"], server["ticks"]):
            raise ClusterError(f"no local cluster is up in {self.run} (make local-up first)")
        return record

    def _abort(self, record: dict[str, Any]) -> None:
        print("start-up failed; stopping what was started:", file=sys.stderr)
        stop_processes(all_entries(record), out=sys.stderr)
        if record.get("server") is not None:
            record["stopped"] = "aborted"
            write_record(self.run, record)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="local_cluster", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default=str(REPO / "run" / "local"),
                    help="where pids, logs and data live (default %(default)s)")
    ap.add_argument("--python", default=sys.executable,
                    help="interpreter with deltabkp installed (default: this one)")
    sub = ap.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start a server and N echo nodes, register the apps")
    p_up.add_argument("--echo-servers", type=int, default=2)
    p_add = sub.add_parser("add-echosv", help="add N echo nodes to the running cluster")
    p_add.add_argument("--new", type=int, default=1)
    for p in (p_up, p_add):
        p.add_argument("--every", default=None,
                       help="backup frequency (integer minutes, or 90s / 5m / 2h; default 1)")
    # Defaults from the same variables the compose file passes to the echo containers.
    p_up.add_argument("--rate", type=float, default=float(os.environ.get("ECHO_LOAD_RATE", "5")),
                      help="load: messages per second per app (default $ECHO_LOAD_RATE, else 5)")
    p_up.add_argument("--rotate-bytes", type=int,
                      default=int(os.environ.get("ECHO_ROTATE_BYTES", str(64 * 1024))),
                      help="echo apps rotate their log at this size "
                      "(default $ECHO_ROTATE_BYTES, else 65536)")
    p_up.add_argument("--load-duration", type=float, default=24 * 3600.0,
                      help="load generators stop by themselves after this many seconds")
    sub.add_parser("status", help="processes, targets and last backups")
    p_logs = sub.add_parser("logs", help="every process's log, prefixed by its name")
    p_logs.add_argument("--follow", type=int, default=1, help="1: keep following (Ctrl-C ends)")
    p_logs.add_argument("--lines", type=int, default=20, help="lines of each log to show first")
    sub.add_parser("down", help="stop exactly what up/add-echosv started")
    args = ap.parse_args(argv)

    run = Path(args.run_dir).resolve()
    cluster = Cluster(run, args.python)
    try:
        if args.command == "logs":  # read-only, and may follow for long: no lock
            cluster.logs(bool(args.follow), args.lines)
            return 0
        if args.command == "status":
            return cluster.status()
        with locked(run):
            if args.command == "up":
                if args.echo_servers < 0:
                    ap.error("--echo-servers must be >= 0")
                if args.rotate_bytes < 1 or args.rate < 0:
                    ap.error("--rotate-bytes must be >= 1 and --rate >= 0")
                cluster.up(args.echo_servers, args.every or "1", args.rate, args.load_duration,
                           args.rotate_bytes)
            elif args.command == "add-echosv":
                if args.new < 1:
                    ap.error("--new must be >= 1")
                cluster.add_echosv(args.new, args.every)
            elif args.command == "down":
                return cluster.down()
    except ClusterError as exc:
        print(f"local_cluster: error: {exc.args[0]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
