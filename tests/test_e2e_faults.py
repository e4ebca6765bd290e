"""End to end under faults, with real processes: agent outages, kill -9 and SIGTERM of the server.

- An agent that is down makes the execution ``failed`` with the reason; when it comes back the
  backup runs by itself within seconds (through its announce, or through the retry probe).
- kill -9 of the server in the middle of a transfer, then a restart: no partial archive is
  listed or left on disk, the catalog passes ``PRAGMA integrity_check``, the interrupted
  execution is logged as failed, and the next backup succeeds.
- SIGTERM in the middle of a transfer: a clean exit, nothing partial left.

The transfer is made long enough to catch by backing up incompressible data (tens of MB);
the test waits for the ``.part`` file to hold data, so it knows the kill lands mid-transfer.
"""

from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path

from helpers_proc import Cluster, cluster, tree_equal, wait_for  # noqa: F401
from test_e2e_backup import make_small_tree, register_and_first_backup

BIG_FILES, BIG_FILE_SIZE = 24, 1 << 20


def make_big_tree(root: Path) -> Path:
    app = root / "big"
    app.mkdir()
    for i in range(BIG_FILES):
        (app / f"blob{i:02d}.bin").write_bytes(os.urandom(BIG_FILE_SIZE))
    return app


def parts(c: Cluster) -> list[Path]:
    d = c.data_dir / "archives"
    return sorted(d.rglob("*.part")) if d.exists() else []


def part_with_data(c: Cluster) -> list[Path]:
    out = []
    for p in parts(c):
        try:
            if p.stat().st_size > 0:
                out.append(p)
        except FileNotFoundError:
            pass
    return out


def integrity(c: Cluster) -> str:
    db = sqlite3.connect(c.data_dir / "catalog.sqlite3")
    try:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        db.close()


def _outage(c: Cluster, tmp_path: Path, *, announce: bool) -> None:
    app = make_small_tree(tmp_path)
    c.start_server()
    agent = c.start_agent(tmp_path, announce=announce)
    node, port = agent.address, agent.port
    register_and_first_backup(c, node, app)
    agent.stop()
    (app / "conf" / "app.ini").write_text("[main]\nport = 9090\n")
    res = c.ctl_run("--json", "backup-now", node, str(app), "--wait")
    assert res.returncode != 0, res.stdout
    [failed] = [e for e in c.ctl("log", node, str(app)) if e["outcome"] == "failed"]
    assert node in failed["error"] and str(app) in failed["error"]
    assert "connect" in failed["error"].lower(), failed["error"]
    # The execution is logged before its lease is released (and a retry probe may hold one):
    # "running" in between.
    t = wait_for(lambda: next((x for x in c.ctl("targets") if x["state"] != "running"), None),
                 timeout=30, what="the failed target to settle")
    assert t["state"] == "retrying" and t["last_error"]
    # Back on the same port: no backup-now, and the period (1 h) is far away.
    c.start_agent(tmp_path, port=port, announce=announce)
    stored = wait_for(
        lambda: [e for e in c.ctl("log", node, str(app)) if e["outcome"] == "stored" and e["id"] > failed["id"]],
        timeout=60, what="the retry after the agent came back",
    )
    assert stored[0]["trigger"] in (("announce", "retry") if announce else ("retry",)), stored[0]
    t = wait_for(lambda: next((x for x in c.ctl("targets") if x["state"] != "running"), None),
                 timeout=30, what="the target to settle")
    assert t["state"] == "ok"
    assert len(c.ctl("list", node, str(app))) == 2


def test_agent_down_then_back_announces_itself(cluster: Cluster, tmp_path: Path) -> None:
    _outage(cluster, tmp_path, announce=True)


def test_agent_down_then_back_found_by_probe(cluster: Cluster, tmp_path: Path) -> None:
    _outage(cluster, tmp_path, announce=False)


def test_kill_9_mid_transfer_then_restart(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    app = make_big_tree(tmp_path)
    server = c.start_server()
    agent = c.start_agent(tmp_path)
    c.ctl("register", agent.address, str(app), "--every", "1h")  # due at once
    caught = wait_for(lambda: part_with_data(c), timeout=120, interval=0.005, what="a .part file with data")
    server.kill()
    assert not server.alive()
    # The kill landed mid-transfer: the half archive is there (for now) and not committed.
    assert any(p.exists() for p in caught) or parts(c), "the transfer ended before the kill"
    db = sqlite3.connect(c.data_dir / "catalog.sqlite3")
    assert db.execute("SELECT COUNT(*) FROM archives").fetchone()[0] == 0
    db.close()

    # The target is overdue when the server comes back: keep the agent away for the checks,
    # so that no new transfer starts a new .part while we look.
    node, port = agent.address, agent.port
    agent.stop()
    c.start_server()
    assert parts(c) == []
    assert c.archive_files() == []
    assert c.ctl("list", node, str(app)) == []
    assert integrity(c) == "ok"
    log = c.ctl("log", node, str(app))
    interrupted = log[-1]
    assert interrupted["outcome"] == "failed" and "server stopped" in interrupted["error"]
    assert all(e["outcome"] == "failed" for e in log)
    agent = c.start_agent(tmp_path, port=port)
    # The agent's announce may already have run the overdue backup; then this one is unchanged.
    rec = c.ctl("backup-now", agent.address, str(app), "--wait", timeout=300)
    assert rec["outcome"] in ("stored", "unchanged"), rec
    [a] = c.ctl("list", agent.address, str(app))
    assert a["size"] == rec["archive_size"] and a["retained"]
    assert [e["outcome"] for e in c.ctl("log", node, str(app))].count("stored") == 1
    # Its signature is made after the commit that answered --wait.
    want = [f"{a['seq']}.sig", f"{a['seq']}.tgz"]
    wait_for(lambda: sorted(p.name for p in c.archive_files()) == want, what="the signature")
    dest = tmp_path / "restored"
    assert c.ctl_run("restore", agent.address, str(app), str(dest), timeout=300).returncode == 0
    assert tree_equal(app, dest) == []


def test_sigterm_mid_transfer_is_a_clean_stop(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    app = make_big_tree(tmp_path)
    server = c.start_server()
    agent = c.start_agent(tmp_path)
    c.ctl("register", agent.address, str(app), "--every", "1h")
    wait_for(lambda: part_with_data(c), timeout=120, interval=0.005, what="a .part file with data")
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0
    server.stop()
    assert parts(c) == [] and c.archive_files() == []
    assert integrity(c) == "ok"
    agent.stop()  # so that the overdue target does not start again while we read the log
    c.start_server()
    [e] = c.ctl("log", agent.address, str(app))[-1:]
    assert e["outcome"] == "failed" and "cancelled" in e["error"]


def open_executions(c: Cluster) -> int:
    db = sqlite3.connect(c.data_dir / "catalog.sqlite3", timeout=30)
    try:
        return int(db.execute("SELECT COUNT(*) FROM executions WHERE outcome IS NULL").fetchone()[0])
    finally:
        db.close()


def check_store_matches_catalog(c: Cluster, restarted_at: float = float("inf")) -> int:
    """Every retained row has its archive with the recorded size and blake3, and its
    signature unless a kill came between its commit and its signature's write (made at its
    next use), one of that archive if there (a version held as a reverse delta: its
    ``.rdelta`` of the recorded stored size); no other files; no execution from before
    ``restarted_at`` is left open."""
    import deltabkp
    import blake3

    db = sqlite3.connect(c.data_dir / "catalog.sqlite3")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = db.execute(
            "SELECT target_id, seq, size, hash FROM archives WHERE retained=1 AND missing=0"
            " AND form='whole'"
        ).fetchall()
        # Older versions held as reverse deltas (versions.py): one <seq>.rdelta of the
        # recorded stored size (their bytes are proved by rebuilding: ctl restore / verify).
        deltas = db.execute(
            "SELECT target_id, seq, stored_size FROM archives WHERE retained=1 AND missing=0"
            " AND form='delta'"
        ).fetchall()
        open_execs = db.execute(
            "SELECT COUNT(*) FROM executions WHERE outcome IS NULL AND started < ?", (restarted_at,)
        ).fetchone()[0]
    finally:
        db.close()
    want = set()
    for tid, seq, stored_size in deltas:
        rdelta = c.data_dir / "archives" / str(tid) / f"{seq}.rdelta"
        assert rdelta.stat().st_size == stored_size, rdelta
        want.add(rdelta)
    for tid, seq, size, h in rows:
        tgz = c.data_dir / "archives" / str(tid) / f"{seq}.tgz"
        sig = c.data_dir / "archives" / str(tid) / f"{seq}.sig"
        data = tgz.read_bytes()
        assert len(data) == size and blake3.blake3(data).digest() == bytes(h), tgz
        want.add(tgz)
        if sig.exists():
            parsed = deltabkp.Signature.parse(sig.read_bytes())
            assert (parsed.base_size, parsed.base_hash) == (size, bytes(h)), sig
            want.add(sig)
    assert set(c.archive_files()) == want
    assert open_execs == 0
    return len(rows) + len(deltas)


def test_kill_9_at_random_instants_never_leaves_a_partial_archive(cluster: Cluster, tmp_path: Path) -> None:
    import random
    import time

    seed = random.randrange(1 << 30)
    print(f"random seed {seed}")
    rng = random.Random(seed)
    c = cluster
    app = tmp_path / "churn"
    app.mkdir()
    for i in range(6):
        (app / f"f{i}.bin").write_bytes(os.urandom(2 << 20))
    server = c.start_server()
    server_port = server.port
    agent = c.start_agent(tmp_path)
    agent_port = agent.port
    c.ctl("register", agent.address, str(app), "--every", "1s")
    for round_ in range(8):
        # Change the tree so that every period stores a new archive, then kill at a random instant.
        (app / f"f{round_ % 6}.bin").write_bytes(os.urandom(2 << 20))
        # Kill at a random instant of an execution: connecting, building, transferring,
        # verifying, renaming, committing or rotating.
        wait_for(lambda: open_executions(c), timeout=60, interval=0.005, what="an execution to start")
        time.sleep(rng.uniform(0.0, 0.4))
        server.kill()
        print(f"round {round_}: killed with {len(parts(c))} .part file(s) on disk")
        # With the agent away the restarted server can start no transfer while we look
        # (its due execution fails to connect), so what we see is what reconciliation left.
        agent.stop()
        restarted_at = time.time()
        server = c.start_server(port=server_port)  # reconciliation runs before the ready line
        check_store_matches_catalog(c, restarted_at)
        agent = c.start_agent(tmp_path, port=agent_port)
    rec = c.ctl("backup-now", agent.address, str(app), "--wait", timeout=300)
    assert rec["outcome"] in ("stored", "unchanged"), rec
    # The target is due every second: stop cleanly before looking, so a scheduled run that
    # began after backup-now is cancelled (logged, its partial files removed), not caught
    # half-way.
    agent.stop()
    server.stop()
    assert check_store_matches_catalog(c) >= 1
    c.start_server(port=server_port)  # to restore from (the agent stays away)
    dest = tmp_path / "restored"
    assert c.ctl_run("restore", agent.address, str(app), str(dest), timeout=300).returncode == 0
    assert tree_equal(app, dest) == []
