"""Several servers: one per SQLite data dir; many over one PostgreSQL catalog and one S3 store.

Real processes only: the servers, the agents, PostgreSQL and SeaweedFS all run here.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from fixtures_s3 import BUCKET, new_s3_store, s3_env, seaweedfs  # noqa: F401  (fixtures)
from helpers_proc import Cluster, Daemon, cluster, exe, tree_equal, wait_for  # noqa: F401

from deltabkp.testing import PostgresServer, SeaweedFS


def test_a_second_server_on_one_sqlite_data_dir_refuses_to_start(cluster: Cluster) -> None:
    first = cluster.start_server()
    res = subprocess.run(
        [exe("deltabkp-server"), "--listen", "127.0.0.1:0", "--data-dir", str(cluster.data_dir),
         "--key-file", str(cluster.key_file)],
        capture_output=True, text=True, env=cluster.env, timeout=60,
    )
    assert res.returncode != 0
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "another deltabkp-server" in err[0], res.stderr
    assert "Traceback" not in res.stderr
    # The first one is untouched and still answers.
    assert first.alive() and cluster.ctl("status")["targets"] == 0


# -- three servers over one PostgreSQL catalog and one S3 store ------------------------------

LEASE_TTL = 4.0
EVERY_S = 5


def _tree(root: Path, seed: int) -> Path:
    rnd = random.Random(seed)
    (root / "sub").mkdir(parents=True)
    for i in range(20):
        (root / "sub" / f"f{i}.txt").write_text(
            "".join(f"{seed} {i} {rnd.random()}\n" for _ in range(200)))
    (root / "blob.bin").write_bytes(rnd.randbytes(300_000))
    return root


def _servers(c: Cluster, tmp_path: Path, n: int, catalog: str, store: str) -> list[Daemon]:
    """``n`` servers on one catalog and one store (the S3 settings come from ``s3_env``)."""
    env = {**c.env, **{k: os.environ[k] for k in os.environ if k.startswith("AWS_")}}
    return [
        Daemon("deltabkp-server", [
            exe("deltabkp-server"), "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / f"srv{i}"),
            "--key-file", str(c.key_file), "--catalog", catalog, "--store", store,
            "--lease-ttl", str(LEASE_TTL),
        ], tmp_path / f"server{i}.log", env)
        for i in range(n)
    ]


def _executions(c: Cluster, server: str) -> list[dict[str, Any]]:
    res = c.ctl_run("--json", "log", "--limit", "0", server=server)  # every row, not the newest 50
    assert res.returncode == 0, res.stderr
    return list(json.loads(res.stdout))


def _started(e: dict[str, Any]) -> float:
    return datetime.fromisoformat(e["started"]).timestamp()


def test_three_servers_share_targets_and_take_over_from_a_killed_one(
    cluster: Cluster, postgres_url: str, s3_env: SeaweedFS, tmp_path: Path
) -> None:
    store = f"s3://{BUCKET}/many-{uuid.uuid4().hex[:8]}"
    servers = _servers(cluster, tmp_path, 3, postgres_url, store)
    try:
        apps = [_tree(tmp_path / f"app{i}", i) for i in range(6)]
        agents = [cluster.start_agent(*apps[i::2], announce=False) for i in range(2)]
        targets = [(agents[i % 2].address, str(app)) for i, app in enumerate(apps)]
        for k, (node, path) in enumerate(targets):
            res = cluster.ctl_run("--json", "register", node, path, "--every", f"{EVERY_S}s",
                                  server=servers[k % 3].address)
            assert res.returncode == 0, res.stderr
        # Every server sees every target, whichever registered it.
        for s in servers:
            res = cluster.ctl_run("--json", "targets", server=s.address)
            assert len(json.loads(res.stdout)) == len(targets)

        def all_backed_up(after: float) -> bool:
            done = [e for e in _executions(cluster, servers[0].address)
                    if e["outcome"] in ("stored", "unchanged") and _started(e) > after]
            return {(e["node"], e["path"]) for e in done} >= set(targets)

        wait_for(lambda: all_backed_up(0), timeout=120, what="a first backup of every target")
        status = json.loads(cluster.ctl_run("--json", "status", server=servers[0].address).stdout)
        assert len(status["servers"]) == 3

        victim = servers[1]
        os.kill(victim.pid, signal.SIGKILL)
        victim.proc.wait(10)
        killed_at = time.time()
        survivors = [servers[0], servers[2]]
        # Within a lease TTL plus a period every target is backed up again, by the others.
        wait_for(lambda: all_backed_up(killed_at + LEASE_TTL), timeout=LEASE_TTL + 2 * EVERY_S + 60,
                 what="every target backed up after the kill")
        # ctl with a dead server first in its list goes on to the next one.
        res = cluster.ctl_run("--json", "status", server=f"{victim.address},{servers[0].address}")
        assert res.returncode == 0, res.stderr
        assert len(json.loads(res.stdout)["servers"]) == 2

        # Stop the schedule, let what runs finish, then compare what every survivor says.
        for node, path in targets:
            assert cluster.ctl_run("unregister", node, path, server=survivors[0].address).returncode == 0
        wait_for(lambda: all(e["outcome"] is not None for e in _executions(cluster, survivors[1].address)),
                 timeout=60, what="running executions to end")
        logs = [_executions(cluster, s.address) for s in survivors]
        assert logs[0] == logs[1]
        for node, path in targets:
            lists = [cluster.ctl_run("--json", "list", node, path, server=s.address).stdout for s in survivors]
            assert lists[0] == lists[1]
            runs = sorted((e for e in logs[0] if (e["node"], e["path"]) == (node, path)), key=_started)
            # No two executions of one target overlap in time, across all three servers.
            for a, b in zip(runs, runs[1:]):
                assert a["ended"] is not None and datetime.fromisoformat(a["ended"]) <= datetime.fromisoformat(b["started"]), (a, b)
        # A restore through another server than the one that stored it is the source.
        node, path = targets[0]
        dest = tmp_path / "restored"
        res = cluster.ctl_run("restore", node, path, str(dest), server=survivors[1].address)
        assert res.returncode == 0, res.stderr
        assert tree_equal(Path(path), dest) == []
    finally:
        for s in servers:
            s.stop()
        print("\n".join(f"--- server {i} ---\n{s.log_text()[-3000:]}" for i, s in enumerate(servers)))


def test_a_catalog_outage_fails_executions_cleanly_and_they_resume(
    cluster: Cluster, postgres_server: PostgresServer, postgres_url: str, tmp_path: Path
) -> None:
    server = Daemon("deltabkp-server", [
        exe("deltabkp-server"), "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "srv"),
        "--key-file", str(cluster.key_file), "--catalog", postgres_url, "--lease-ttl", "4",
    ], tmp_path / "server.log", cluster.env)
    try:
        app = _tree(tmp_path / "app", 7)
        agent = cluster.start_agent(app, announce=False)
        res = cluster.ctl_run("register", agent.address, str(app), "--every", "3s", server=server.address)
        assert res.returncode == 0, res.stderr

        def backed_up_after(t: float) -> bool:
            return any(e["outcome"] in ("stored", "unchanged") and _started(e) > t
                       for e in _executions(cluster, server.address))

        wait_for(lambda: backed_up_after(0), timeout=60, what="a first backup")
        postgres_server.stop()
        try:
            time.sleep(8)  # two lease TTLs without a catalog
            assert server.alive(), server.log_text()[-3000:]
            res = cluster.ctl_run("status", server=server.address, timeout=120)
            assert res.returncode != 0 and "Traceback" not in res.stderr
        finally:
            postgres_server.start()
        restarted = time.time()
        wait_for(lambda: backed_up_after(restarted), timeout=90, what="backups after the outage")
        assert server.alive()
        assert "Traceback" not in server.log_text()
    finally:
        server.stop()


def test_a_server_killed_mid_execution_leaves_nothing_half_stored(
    cluster: Cluster, postgres_url: str, s3_env: SeaweedFS, tmp_path: Path
) -> None:
    prefix = f"kill-{uuid.uuid4().hex[:8]}"
    servers = _servers(cluster, tmp_path, 2, postgres_url, f"s3://{BUCKET}/{prefix}")
    try:
        app = tmp_path / "big"
        app.mkdir()
        for i in range(4):  # incompressible: every backup moves ~40 MB through the store
            (app / f"blob{i}.bin").write_bytes(os.urandom(10 << 20))
        agent = cluster.start_agent(app, announce=False)
        name = f"{agent.address} {app}"
        res = cluster.ctl_run("register", agent.address, str(app), "--every", "1h",
                              server=servers[0].address)
        assert res.returncode == 0, res.stderr

        def holder() -> Daemon | None:
            st = json.loads(cluster.ctl_run("--json", "status", server=servers[0].address).stdout)
            ids = [s["address"] for s in st["servers"] if name in s["targets"]]
            return next((d for d in servers if d.address in ids), None)

        victim = wait_for(holder, timeout=60, interval=0.02, what="a server running the backup")
        os.kill(victim.pid, signal.SIGKILL)
        victim.proc.wait(10)
        killed_at = time.time()
        survivor = next(s for s in servers if s is not victim)

        def stored_after_kill() -> bool:
            return any(e["outcome"] == "stored" and _started(e) > killed_at
                       for e in _executions(cluster, survivor.address))

        # The other server claims it once the lease runs out (first backup: due at once).
        res = cluster.ctl_run("backup-now", agent.address, str(app), server=survivor.address)
        assert res.returncode == 0, res.stderr
        wait_for(stored_after_kill, timeout=LEASE_TTL + 90, what="the backup done by the other server")
        log = _executions(cluster, survivor.address)
        interrupted = [e for e in log if _started(e) < killed_at]
        assert interrupted and all(e["outcome"] in ("failed", "stored") for e in interrupted), log
        assert all(e["outcome"] is not None for e in log)
        restored = tmp_path / "restored"
        res = cluster.ctl_run("restore", agent.address, str(app), str(restored), server=survivor.address)
        assert res.returncode == 0, res.stderr
        assert tree_equal(app, restored) == []
    finally:
        for s in servers:
            s.stop()
    # Nothing half-stored: every object pairs with a committed row, and what the killed
    # server left (an incomplete upload, at most) goes with reconciliation.
    from deltabkp_server.catalog import open_catalog

    cat = open_catalog(postgres_url, default_dir=tmp_path)
    try:
        committed = cat.retained_keys()
    finally:
        cat.close()
    store = new_s3_store(tmp_path, prefix)
    assert store.keys() == committed
    store.reconcile(committed, grace_s=0)
    assert store.keys() == committed
    client = store.bucket.client
    objects = client.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/").get("Contents", [])
    # Each committed version: its .tgz, and its .sig unless the kill came between the
    # catalog commit and the signature's put (made at its next use; not garbage).
    kinds = sorted(str(o["Key"]).rsplit(".", 1)[1] for o in objects)
    assert kinds.count("tgz") == len(committed) and set(kinds) <= {"tgz", "sig"}, objects
    assert kinds.count("sig") <= len(committed), objects
    uploads = client.list_multipart_uploads(Bucket=BUCKET, Prefix=f"{prefix}/").get("Uploads", [])
    assert uploads == [], uploads
