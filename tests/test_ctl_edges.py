"""The client's rough edges, each through the real command against real daemons on 127.0.0.1.

A ``failing`` state; ``targets --all`` (unregistered targets that keep archives); exit 7 when
``backup-now --wait`` gives up while the backup goes on; human durations, local time and
``--utc``; errors as JSON under ``--json``; the wrong-key sentence; a NODE without a port;
``--version`` on the three commands; a server that cannot start leaves no new data dir.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

from helpers_proc import Cluster, cluster, exe  # noqa: F401

from deltabkp import __version__


def test_failing_unregistered_still_running_times_and_json_errors(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.start_server()
    root = tmp_path / "apps"
    (root / "shop").mkdir(parents=True)
    (root / "shop" / "data.txt").write_text("order\n" * 1000)
    agent = cluster.start_agent(root)
    node, shop, gone = agent.address, str(root / "shop"), str(root / "gone")
    cluster.ctl("register", node, shop, "--every", "60")
    cluster.ctl("register", node, gone, "--every", "60")  # not there: registered anyway
    # (register ran the first backup at once: this one may find nothing changed)
    done = cluster.ctl("backup-now", node, shop, "--wait")
    assert done["outcome"] in ("stored", "unchanged")
    res = cluster.ctl_run("backup-now", node, gone, "--wait")
    assert res.returncode == 1, res

    # failing: the last finished execution failed and no retry is pending ('not found' is
    # permanent) — no longer 'ok' beside 'LAST failed'.
    states = {t["path"]: t["state"] for t in cluster.ctl("targets")}
    assert states == {shop: "ok", gone: "failing"}
    # Human durations in status (its JSON keeps uptime_s in seconds), and the failing count.
    human = cluster.ctl_run("status").stdout
    assert re.search(r"^uptime: \d+ (s|min)", human, re.MULTILINE) and "uptime_s" not in human
    assert re.search(r"^failing: 1$", human, re.MULTILINE), human

    # Local time by default (the ctl's TZ: UTC+05:30 here), UTC with --utc; JSON is UTC ISO.
    t = datetime.fromisoformat(done["started"])  # the newest execution of shop
    local = t.astimezone(timezone(timedelta(hours=5, minutes=30))).strftime("%Y-%m-%d %H:%M:%S")
    utc = t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    env = {**cluster.env, "TZ": "XXX-05:30"}
    base = [exe("deltabkp"), "ctl", "--server", cluster.server.address,  # type: ignore[union-attr]
            "--key-file", str(cluster.key_file)]
    out = subprocess.run([*base, "log", node, shop, "--limit", "1"], capture_output=True,
                         text=True, env=env, timeout=60).stdout
    assert local in out and utc not in out, out
    out = subprocess.run([*base, "--utc", "log", node, shop, "--limit", "1"],
                         capture_output=True, text=True, env=env, timeout=60).stdout
    assert utc in out, out

    # Under --json an error is one JSON object on stdout; the exit code is unchanged.
    res = cluster.ctl_run("--json", "register", node, gone, "--every", "5")
    assert res.returncode == 3 and not res.stderr, res
    err = json.loads(res.stdout)["error"]
    assert err["code"] == "exists" and gone in err["message"] and err["node"] == node

    # The wrong-key sentence: one line, says what to check, and no garbled "or we rejected".
    other = tmp_path / "other.key"
    other.write_text("f" * 64 + "\n")
    res = cluster.ctl_run("targets", key_file=other)
    assert res.returncode == 4 and len(res.stderr.strip().splitlines()) == 1, res
    assert "wrong cluster key" in res.stderr and "or we" not in res.stderr, res.stderr
    res = cluster.ctl_run("--json", "targets", key_file=other)
    assert res.returncode == 4 and json.loads(res.stdout)["error"]["code"] == "auth"

    # backup-now --wait that gives up while the backup goes on: exit 7, not 4.  The agent is
    # stopped (SIGSTOP), so the execution cannot end before its own connect deadline.
    os.kill(agent.pid, signal.SIGSTOP)
    try:
        res = cluster.ctl_run("backup-now", node, shop, "--wait", "--wait-timeout", "1")
    finally:
        os.kill(agent.pid, signal.SIGCONT)
    assert res.returncode == 7, res
    assert "still queued or running" in res.stdout and not res.stderr, res

    # targets --all: an unregistered target that keeps its archives is listed, as such.
    cluster.ctl("unregister", node, shop)
    assert [t["path"] for t in cluster.ctl("targets")] == [gone]
    every = {t["path"]: t for t in cluster.ctl("targets", "--all")}
    assert every[shop]["state"] == "unregistered" and every[shop]["archives"] >= 1
    assert every[gone]["state"] == "failing"
    table = cluster.ctl_run("targets", "--all").stdout
    assert re.search(rf"{re.escape(shop)}\s+1h\s+unregistered\s+-\s", table), table
    assert re.search(rf"{re.escape(gone)}\s+1h\s+failing\s", table), table


def test_a_node_without_a_port_is_its_agents_default_port(tmp_path: Path) -> None:
    # Nothing listens on port 9: the request fails to connect, naming the node as parsed.
    env = {**os.environ, "HOME": str(tmp_path), "DELTABKP_KEY_FILE": str(tmp_path / "k")}
    (tmp_path / "k").write_text("k" * 64 + "\n")
    res = subprocess.run([exe("deltabkp"), "ctl", "--server", "127.0.0.1:9", "list",
                          "10.0.0.5", "/srv/app"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert res.returncode == 4 and "10.0.0.5:7471 /srv/app" in res.stderr, res


def test_version_on_every_command() -> None:
    for name in ("deltabkp", "deltabkp-server", "deltabkp-agent"):
        res = subprocess.run([exe(name), "--version"], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and res.stdout.strip() == f"{name} {__version__}", res


def test_a_failed_start_leaves_no_new_data_dir(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_text("k" * 64 + "\n")
    kept = tmp_path / "kept"
    kept.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        for data_dir in (tmp_path / "new" / "data", kept):
            res = subprocess.run(
                [exe("deltabkp-server"), "--listen", f"127.0.0.1:{port}", "--data-dir",
                 str(data_dir), "--key-file", str(key)],
                capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(tmp_path)},
            )
            assert res.returncode == 1 and "cannot listen" in res.stderr, res
    # Only what this start created is removed: the new tree goes, an existing dir stays.
    assert not (tmp_path / "new").exists()
    assert kept.is_dir()
