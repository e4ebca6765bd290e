"""The local cluster, end to end through the make targets: real processes on 127.0.0.1.

Job: ``make local-up`` (a run directory under tmp, a 2-second frequency) → a first backup of
every echo app arrives → ``make local-add-echosv`` → the new app's backup arrives, nothing else
restarted → the live, changing data yields further archives → every stored archive extracts
with ``tar xzf`` and holds the app's own messages, ``deltabkp ctl restore`` too → ``make
local-status`` / ``local-logs`` show the cluster → ``make local-down`` leaves none of the
recorded processes (nor any process of their sessions) running, and nothing else is touched.
With ``MANAGERS=3``: a real PostgreSQL and a real SeaweedFS start in the run directory, three
servers share them, every app is registered once and seen alike by every server, archives land
in S3, a server killed with -9 is dropped from the live servers and its work goes on elsewhere
within the lease TTL, and ``make local-down`` stops PostgreSQL and SeaweedFS too.

Invariants: every wait has a deadline (no timing assertion); whatever happens, the fixture
runs ``make local-down`` and then kills any recorded process that is still ours, so a failing
test leaves nothing behind either.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import blake3
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import local_cluster as lc  # noqa: E402

pytestmark = pytest.mark.slow

EVERY = "2s"
DEADLINE_S = 120.0


def wait_for(pred: Callable[[], Any], what: str, timeout: float = DEADLINE_S, run: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}" + (f"\n{logs(run)}" if run else ""))
        time.sleep(0.2)


def logs(run: Path | None) -> str:
    if run is None or not (run / "logs").is_dir():
        return ""
    return "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-3000:]}"
                     for p in sorted((run / "logs").glob("*.log")))


class LocalRun:
    """One run directory and the make targets that drive it."""

    def __init__(self, run: Path) -> None:
        self.run = run

    def make(self, target: str, *variables: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["make", "--no-print-directory", "-C", str(REPO), target, f"RUN_DIR={self.run}",
             f"PYTHON={sys.executable}", *variables],
            capture_output=True, text=True, timeout=timeout,
            # Small logs rotate every few seconds: files are renamed and deleted under the backups.
            env={**os.environ, "ECHO_ROTATE_BYTES": "2048"},
        )

    def make_ok(self, target: str, *variables: str) -> str:
        res = self.make(target, *variables)
        assert res.returncode == 0, f"make {target} exited {res.returncode}:\n{res.stdout}\n{res.stderr}\n{logs(self.run)}"
        return res.stdout

    def record(self) -> dict[str, Any]:
        rec: dict[str, Any] | None = lc.read_record(self.run)
        assert rec is not None, f"no {lc.RECORD} in {self.run}"
        return rec

    def ctl(self, *args: str, server: str | None = None) -> Any:
        """``deltabkp ctl --json ARGS`` through ``server`` (default: every recorded server, as
        RUN_DIR/env lists them: the next one is tried when one is down)."""
        rec = self.record()
        server = server or ",".join(s["address"] for s in lc.servers_of(rec))
        cmd = [sys.executable, "-m", "deltabkp", "ctl", "--server", server,
               "--key-file", str(self.run / "cluster.key"), "--json", *args]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, f"{' '.join(args)}: {res.stderr}\n{logs(self.run)}"
        return json.loads(res.stdout) if res.stdout.strip() else None

    def targets(self) -> dict[tuple[str, str], dict[str, Any]]:
        return {(t["node"], t["path"]): t for t in self.ctl("targets")}


def tear_down(r: LocalRun) -> None:
    r.make("local-down")
    rec = lc.read_record(r.run)
    if rec is not None:
        # Belt and braces: whatever local-down missed is killed here (and the test failed).
        for e in lc.all_entries(rec):
            if lc.is_ours_and_alive(e["pid"], e["ticks"]):
                for pid in [e["pid"], *lc.session_members(e["pid"], e["ticks"])]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
    print(logs(r.run))  # shown by pytest for a failing test only


@pytest.fixture
def local_run(tmp_path: Path) -> Iterator[LocalRun]:
    r = LocalRun(tmp_path / "run")
    try:
        yield r
    finally:
        tear_down(r)


@pytest.fixture
def shared_run() -> Iterator[LocalRun]:
    """A run directory PostgreSQL can use: as root it runs as the ``postgres`` user, which
    cannot enter pytest's tmp_path (its parent is private), so a directory of the system temp
    dir, open for traversal, removed afterwards."""
    top = Path(tempfile.mkdtemp(prefix="deltabkp-local-"))
    top.chmod(0o755)
    r = LocalRun(top / "run")
    try:
        yield r
    finally:
        try:
            tear_down(r)
        finally:
            shutil.rmtree(top, ignore_errors=True)


def node_key(node: dict[str, Any]) -> tuple[str, str]:
    return node["agent"]["address"], node["data_dir"]


def stored(r: LocalRun, node: dict[str, Any]) -> list[dict[str, Any]]:
    return r.ctl("list", *node_key(node))  # type: ignore[no-any-return]


def at_least_two(r: LocalRun, node: dict[str, Any]) -> list[dict[str, Any]] | None:
    got = stored(r, node)
    return got if len(got) >= 2 else None


def extract_and_check(tgz: Path, dest: Path) -> tuple[set[str], set[str]]:
    """``tar xzf`` works and the tree is one echo app's; returns (clients seen, file names).

    Log lines are ``<time> <peer> <client> <seq> <words>``; each app is loaded by exactly one
    generator, named after its node, so an archive holds one client's messages at most (the
    first backup, taken at registration, may come before the first message). stats.json is
    replaced atomically by the app: a hot backup must never catch it half-written.
    """
    dest.mkdir(parents=True)
    res = subprocess.run(["tar", "xzf", str(tgz), "-C", str(dest)], capture_output=True, text=True)
    assert res.returncode == 0, f"tar xzf {tgz}: {res.stderr}"
    logs_in = sorted(dest.rglob("messages*.log"))
    assert logs_in, f"{tgz} holds no messages log: {sorted(p.name for p in dest.rglob('*'))}"
    clients = {line.split()[2] for p in logs_in for line in p.read_text().splitlines()
               if len(line.split()) >= 4}
    assert len(clients) <= 1, f"{tgz}: messages of {clients}"
    for stats in dest.rglob("stats.json"):
        assert json.loads(stats.read_text())["messages"] >= 1
    return clients, {p.name for p in dest.rglob("*") if p.is_file()}


def test_local_cluster_up_add_backups_down(local_run: LocalRun, tmp_path: Path) -> None:
    r = local_run
    out = r.make_ok("local-up", "ECHO_SERVERS=2", f"EVERY={EVERY}")
    assert "2 echo node(s)" in out

    rec = r.record()
    assert [n["name"] for n in rec["nodes"]] == ["echosv1", "echosv2"]
    assert [s["name"] for s in lc.servers_of(rec)] == ["server"] and rec["services"] == []
    server = lc.servers_of(rec)[0]
    assert "--catalog" not in server["argv"] and "--store" not in server["argv"]
    addresses = [server["address"]] + [n[k]["address"] for n in rec["nodes"] for k in ("app", "agent")]
    assert all(a.startswith("127.0.0.1:") for a in addresses)
    assert len(set(addresses)) == len(addresses), "ports chosen at start must differ"
    assert all(lc.is_ours_and_alive(e["pid"], e["ticks"]) for e in lc.all_entries(rec))

    # Every echo app is registered (by local-up, through deltabkp ctl) and gets a first backup.
    targets = r.targets()
    assert set(targets) == {node_key(n) for n in rec["nodes"]}
    assert all(t["every_seconds"] == 2 for t in targets.values())
    for n in rec["nodes"]:
        wait_for(partial(stored, r, n), f"first backup of {n['name']}", run=r.run)

    # Add a node: nothing that runs is restarted, the new app is registered and backed up.
    before = {e["name"]: (e["pid"], e["ticks"]) for e in lc.all_entries(rec)}
    r.make_ok("local-add-echosv", "NEW_ECHOSVS=1")
    rec = r.record()
    assert [n["name"] for n in rec["nodes"]] == ["echosv1", "echosv2", "echosv3"]
    after = {e["name"]: (e["pid"], e["ticks"]) for e in lc.all_entries(rec)}
    assert {k: after[k] for k in before} == before
    assert all(lc.is_ours_and_alive(*after[k]) for k in after)
    new = rec["nodes"][2]
    assert node_key(new) in r.targets()
    wait_for(lambda: stored(r, new), "first backup of echosv3", run=r.run)

    # Live, changing data: the load generators keep writing, so further archives are stored.
    for n in rec["nodes"]:
        got = wait_for(partial(at_least_two, r, n), f"a second archive of {n['name']}", run=r.run)
        assert len({a["hash"] for a in got}) == len(got), "a stored archive must differ from the last"
    # And a backup taken after an app rotated its log (it does past --rotate-bytes of load):
    # a rotated file is in an archive.  Waited for, not assumed: how many backups come before
    # the first rotation depends on how fast both run (faster backups once ended this test
    # with two archives a node, both before any rotation).
    seen_at: dict[str, int] = {}

    def after_rotation() -> bool:
        for n in rec["nodes"]:
            if any(Path(n["data_dir"]).glob("messages-*.log")):
                count = len(stored(r, n))
                if count > seen_at.setdefault(n["name"], count):
                    return True
        return False

    wait_for(after_rotation, "a backup after a log rotation", run=r.run)

    status = r.make_ok("local-status")
    assert status.count("running") >= 10 and server["address"] in status
    assert "live servers on this catalog: 1" in status
    assert all(n["data_dir"] in status for n in rec["nodes"])
    shown = r.make_ok("local-logs", "FOLLOW=0")
    assert "server " in shown and "echosv3-agent " in shown and "listening on" in shown

    # Freeze the store before reading it (rotation deletes old archives): unregistering stops
    # the backups and keeps every archive and the history.
    for n in rec["nodes"]:
        r.ctl("unregister", *node_key(n))

    # Every retained version, fetched through the server (older ones are rebuilt from reverse
    # deltas), extracts with plain tar and holds its own app's messages.
    archive_root = r.run / "server" / "archives"

    def settled() -> int | None:
        # An execution that was running at unregister time may still commit, and its reverse
        # delta conversion follows: wait until the objects on disk and the catalog agree.
        versions = [a for n in rec["nodes"] for a in stored(r, n) if a["retained"]]
        on_disk = [p for p in archive_root.rglob("*") if p.suffix in (".tgz", ".rdelta")]
        return len(versions) if len(on_disk) == len(versions) else None

    retained = wait_for(settled, "the store and the catalog to agree", run=r.run)
    assert len([d for d in archive_root.iterdir() if d.is_dir()]) == 3 and retained >= 6
    seen: set[str] = set()
    names: set[str] = set()
    n_tgz = 0
    for n in rec["nodes"]:
        clients: set[str] = set()
        newest: set[str] = set()
        for a in sorted((a for a in stored(r, n) if a["retained"]), key=lambda a: a["seq"]):
            tgz = tmp_path / "fetched" / n["name"] / f"{a['seq']}.tgz"
            tgz.parent.mkdir(parents=True, exist_ok=True)
            r.ctl("fetch", *node_key(n), str(tgz), "--version", str(a["seq"]))
            assert blake3.blake3(tgz.read_bytes()).hexdigest() == a["hash"]
            newest, files = extract_and_check(tgz, tmp_path / "extracted" / n["name"] / str(a["seq"]))
            clients |= newest
            names |= files
            n_tgz += 1
        assert len(clients) == 1 and newest == clients, f"{n['name']}: archives of {clients}, newest {newest}"
        seen |= clients
    assert seen == {n["name"] for n in rec["nodes"]}
    assert n_tgz == retained
    # The apps rotated their logs between backups: rotated files made it into archives.
    assert any(re.fullmatch(r"messages-\d+\.log", n) for n in names), names
    (tmp_path / "restored").mkdir()
    for n in rec["nodes"]:
        dest = tmp_path / "restored" / n["name"]
        res = subprocess.run(
            [sys.executable, "-m", "deltabkp", "ctl", "--server", server["address"],
             "--key-file", str(r.run / "cluster.key"), "restore", *node_key(n), str(dest)],
            capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        text = "".join(p.read_text() for p in dest.rglob("messages*.log"))
        assert f" {n['name']} " in text and json.loads((dest / "stats.json").read_text())["messages"] >= 1

    # local-down stops exactly what was started: a bystander process of ours stays up.
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        down = r.make_ok("local-down")
        assert "local cluster stopped" in down
        for e in lc.all_entries(r.record()):
            assert not lc.is_ours_and_alive(e["pid"], e["ticks"]), f"{e['name']} still runs"
            assert lc.session_members(e["pid"], e["ticks"]) == [], f"{e['name']}'s session lives on"
        host, _, port = server["address"].rpartition(":")
        with pytest.raises(OSError):
            socket.create_connection((host, int(port)), timeout=2).close()
        assert bystander.poll() is None, "local-down stopped a process it had not started"
    finally:
        bystander.kill()
        bystander.wait()
    # Once down, a second local-down is a no-op and local-add-echosv refuses.
    r.make_ok("local-down")
    assert r.make("local-add-echosv").returncode != 0


def test_failed_local_up_stops_what_it_started(local_run: LocalRun) -> None:
    # The server refuses a bad frequency at registration: by then the server and the first
    # node's app, agent and load generator run, and local-up must stop all of them.
    res = local_run.make("local-up", "ECHO_SERVERS=1", "EVERY=0")
    assert res.returncode != 0
    assert "register" in res.stderr and "stopping what was started" in res.stderr
    rec = local_run.record()
    entries = lc.all_entries(rec)
    assert {e["name"] for e in entries} == {"server", "echosv1-app", "echosv1-agent", "echosv1-load"}
    for e in entries:
        assert not lc.is_ours_and_alive(e["pid"], e["ticks"]), f"{e['name']} still runs"
        assert lc.session_members(e["pid"], e["ticks"]) == []
    # A later local-up in the same run directory starts afresh.
    assert "already up" not in local_run.make("local-up", "ECHO_SERVERS=0").stderr
    assert local_run.record()["nodes"] == []


def test_local_down_never_signals_a_reused_pid(tmp_path: Path) -> None:
    # A record whose pid now belongs to another process (different start time) must leave that
    # process alone; the same pid with its true start time is ours and is stopped.
    run = tmp_path / "run"
    run.mkdir()
    sleeper = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        ticks = lc.start_ticks(sleeper.pid)
        assert ticks > 0
        entry = {"name": "server", "pid": sleeper.pid, "ticks": ticks + 1, "argv": ["sleep"],
                 "log": "logs/server.log", "address": None}
        lc.write_record(run, {"server": entry, "nodes": []})
        r = LocalRun(run)
        out = r.make_ok("local-down")
        assert "already gone" in out
        assert sleeper.poll() is None, "local-down signalled a process it had not started"
        lc.write_record(run, {"server": {**entry, "ticks": ticks}, "nodes": []})
        assert "stopped" in r.make_ok("local-down")
        assert sleeper.wait(timeout=30) == -signal.SIGTERM
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


# -- three managers over one PostgreSQL catalog and one S3 store ------------------------------

SHARED_EVERY_S = 3
LEASE_TTL_S = 4


def port_closed(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError:
        return True
    return False


def s3_keys(r: LocalRun, rec: dict[str, Any]) -> list[str]:
    """Every object key under the cluster's store, read with the cluster's own credentials."""
    import boto3
    import botocore.config

    creds = lc.read_env_file(r.run / "services.env")
    bucket, _, prefix = rec["store"].removeprefix("s3://").partition("/")
    client = boto3.session.Session(
        aws_access_key_id=creds["AWS_ACCESS_KEY_ID"], aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
        region_name=creds["AWS_REGION"],
    ).client("s3", endpoint_url=rec["s3_endpoint"],
             config=botocore.config.Config(s3={"addressing_style": "path"}))
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_local_cluster_three_managers_share_one_catalog_and_store(shared_run: LocalRun) -> None:
    r = shared_run
    out = r.make_ok("local-up", "MANAGERS=3", "ECHO_SERVERS=2", f"EVERY={SHARED_EVERY_S}s",
                    f"LEASE_TTL={LEASE_TTL_S}")
    assert "3 servers" in out and "2 echo node(s)" in out
    rec = r.record()
    servers = lc.servers_of(rec)
    assert [s["name"] for s in servers] == ["server1", "server2", "server3"]
    assert [e["name"] for e in rec["services"]] == ["postgres", "seaweedfs"]
    assert all(lc.is_ours_and_alive(e["pid"], e["ticks"]) for e in lc.all_entries(rec))
    # PostgreSQL and SeaweedFS live in the run directory and log into RUN_DIR/logs.
    assert (r.run / "postgres" / "data" / "PG_VERSION").exists() and (r.run / "seaweedfs" / "data").is_dir()
    assert "ready to accept connections" in (r.run / "logs" / "postgres.log").read_text()
    assert (r.run / "logs" / "seaweedfs.log").stat().st_size > 0
    assert rec["catalog"].startswith("postgresql://") and rec["store"].startswith("s3://")
    for s in servers:
        argv = s["argv"]
        assert argv[argv.index("--catalog") + 1] == rec["catalog"]
        assert argv[argv.index("--store") + 1] == rec["store"]
        assert argv[argv.index("--lease-ttl") + 1] == str(LEASE_TTL_S)
    # The credentials are the cluster's own and private to its user.
    assert (r.run / "services.env").stat().st_mode & 0o077 == 0
    assert "PGPASSWORD" in lc.read_env_file(r.run / "services.env")
    env = lc.read_env_file(r.run / "env")
    assert env["DELTABKP_SERVER"].split(",") == [s["address"] for s in servers]
    # The agents announce to every server.
    for n in rec["nodes"]:
        announced = [a for i, a in enumerate(n["agent"]["argv"]) if n["agent"]["argv"][i - 1] == "--server"]
        assert announced == [s["address"] for s in servers]

    # Every app registered once, and every server sees the same targets from the shared catalog.
    expected = sorted(node_key(n) for n in rec["nodes"])
    for s in servers:
        seen = sorted((t["node"], t["path"]) for t in r.ctl("targets", server=s["address"]))
        assert seen == expected, f"{s['name']} sees {seen}"
    status = r.ctl("status")
    assert sorted(x["address"] for x in status["servers"]) == sorted(s["address"] for s in servers)
    assert status["catalog"] == rec["catalog"] and status["store"] == rec["store"]

    # Backups are stored — in S3, not in the servers' data directories.
    for n in rec["nodes"]:
        wait_for(partial(stored, r, n), f"first backup of {n['name']}", run=r.run)
    keys = s3_keys(r, rec)
    assert sum(k.endswith(".tgz") for k in keys) >= len(rec["nodes"]), keys
    for s in servers:
        local = [p for p in (r.run / s["name"]).rglob("*.tgz") if "s3-cache" not in p.parts]
        assert local == [], f"{s['name']} stored archives locally: {local}"

    # Failover: server1 dies without a word; ctl (server1 first in its list) goes on to the next,
    # the live servers drop to two within the TTL, and every target is backed up again.
    victim = servers[0]
    os.kill(victim["pid"], signal.SIGKILL)
    killed = time.time()
    wait_for(lambda: not lc.is_ours_and_alive(victim["pid"], victim["ticks"]), "server1 to die", run=r.run)
    wait_for(lambda: len(r.ctl("status")["servers"]) == 2, "server1 to leave the live servers",
             timeout=LEASE_TTL_S + 30, run=r.run)

    def backed_up_after(t: float) -> bool:
        done = {(e["node"], e["path"]) for e in r.ctl("log")
                if e["outcome"] in ("stored", "unchanged")
                and datetime.fromisoformat(e["started"]).timestamp() > t}
        return done >= set(expected)

    wait_for(lambda: backed_up_after(killed + LEASE_TTL_S), "every app backed up after the kill",
             timeout=LEASE_TTL_S + 4 * SHARED_EVERY_S + 30, run=r.run)
    status_text = r.make_ok("local-status")
    assert "live servers on this catalog: 2" in status_text
    assert re.search(r"^postgres\s+\d+\s+running", status_text, re.MULTILINE), status_text
    assert re.search(r"^seaweedfs\s+\d+\s+running", status_text, re.MULTILINE), status_text
    assert re.search(r"^server1\s+\d+\s+stopped", status_text, re.MULTILINE), status_text

    # local-down stops everything, PostgreSQL (and its backends) and SeaweedFS included.
    down = r.make_ok("local-down")
    assert f"server1: pid {victim['pid']} already gone" in down
    assert "postgres: pid" in down and "seaweedfs: pid" in down
    for e in lc.all_entries(r.record()):
        assert not lc.is_ours_and_alive(e["pid"], e["ticks"]), f"{e['name']} still runs"
        assert lc.session_members(e["pid"], e["ticks"]) == [], f"{e['name']}'s session lives on"
    for e in [*servers, *rec["services"]]:
        assert port_closed(e["address"]), f"{e['name']} still listens on {e['address']}"
    weed = rec["services"][1]
    assert [p for port in weed["ports"] for p in Path("/tmp").glob(f"seaweedfs-*-{port}.sock")] == []


def test_failed_local_up_with_two_managers_stops_postgres_and_seaweedfs(shared_run: LocalRun) -> None:
    # The refused registration comes last: PostgreSQL, SeaweedFS, both servers and the node run
    # by then, and every one of them must be stopped (PostgreSQL's backends included).
    res = shared_run.make("local-up", "MANAGERS=2", "ECHO_SERVERS=1", "EVERY=0")
    assert res.returncode != 0
    assert "register" in res.stderr and "stopping what was started" in res.stderr
    rec = shared_run.record()
    entries = lc.all_entries(rec)
    assert {e["name"] for e in entries} == {"postgres", "seaweedfs", "server1", "server2",
                                            "echosv1-app", "echosv1-agent", "echosv1-load"}
    for e in entries:
        assert not lc.is_ours_and_alive(e["pid"], e["ticks"]), f"{e['name']} still runs"
        assert lc.session_members(e["pid"], e["ticks"]) == [], f"{e['name']}'s session lives on"
    assert all(port_closed(e["address"]) for e in rec["services"])
    assert rec["stopped"] == "aborted"
