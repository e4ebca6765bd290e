"""``deltabkp ctl`` as a user runs it: real processes (server, agent, the ctl command) on 127.0.0.1.

Argument parsing and exit codes (0 ok, 1 failed backup, 2 usage, 3 refused, 4 connection or
key failure), human tables and ``--json`` (before or after the subcommand), and a full
register → backup-now --wait → list → restore round trip with a verified download.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from deltabkp.ctl._commands import parse_since
from helpers_proc import Cluster, cluster, exe, tree_equal, wait_for  # noqa: F401


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [exe("deltabkp"), "ctl", *args], capture_output=True, text=True, timeout=60, env=env
    )


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    key = tmp_path / "cluster.key"
    key.write_text("0123456789abcdef0123456789abcdef\n")
    return {**os.environ, "DELTABKP_KEY_FILE": str(key), "HOME": str(tmp_path / "home")}


def make_app(root: Path) -> Path:
    app = root / "apps" / "shop"
    (app / "conf").mkdir(parents=True)
    (app / "conf" / "shop.ini").write_text("[shop]\nport = 8080\n")
    (app / "data.txt").write_text("".join(f"order {i}\n" for i in range(3000)))
    (app / "run.sh").write_text("#!/bin/sh\nexec shop\n")
    (app / "run.sh").chmod(0o755)
    os.symlink("conf/shop.ini", app / "current.ini")
    return app


# -- usage errors: exit 2, nothing sent -----------------------------------------------------------


@pytest.mark.parametrize(
    "args, needle",
    [
        ([], "SUBCOMMAND"),
        (["register", "10.0.0.5:7471", "/srv/app"], "--every"),
        (["register", "10.0.0.5:7471", "srv/app", "--every", "5"], "absolute"),
        (["register", "10.0.0.5:", "/srv/app", "--every", "5"], "missing port"),
        (["list", "10.0.0.5:notaport", "/srv/app"], "port"),
        (["log", "10.0.0.5:7471"], "both"),
        (["log", "--limit", "-1"], "--limit"),
        (["log", "--since", "yesterday"], "--since"),
        (["log", "--outcome", "exploded"], "--outcome"),
        (["--server", "127.0.0.1:99999", "targets"], "port out of range"),
        (["--timeout", "0", "targets"], "--timeout"),
        (["--timeout", "nan", "targets"], "--timeout"),
        (["--timeout", "inf", "targets"], "--timeout"),
        (["backup-now", "10.0.0.5:7471", "/srv/app", "--wait", "--wait-timeout", "nan"],
         "--wait-timeout"),
        (["--key-file", "/nonexistent/key", "targets"], "does not exist"),
        (["frobnicate"], "invalid choice"),
        (["restore", "10.0.0.5:7471", "/srv/app"], "DEST"),
        (["fetch", "10.0.0.5:7471", "/srv/app"], "OUT.tgz"),
        (["verify"], "--all"),
        (["verify", "--all", "10.0.0.5:7471", "/srv/app"], "--all"),
    ],
)
def test_usage_errors_exit_2(args: list[str], needle: str, env: dict[str, str]) -> None:
    # Port 9 (discard) is never a deltabkp server: a usage error must be found before connecting.
    res = run(*(["--server", "127.0.0.1:9"] if "--server" not in args else []), *args, env=env)
    assert res.returncode == 2, res
    assert needle in res.stderr, res.stderr


def test_help_teaches_with_examples(env: dict[str, str]) -> None:
    res = run("--help", env=env)
    assert res.returncode == 0
    for word in ("register", "backup-now", "restore", "examples:", "exit codes", "--every 15"):
        assert word in res.stdout
    res = run("restore", "--help", env=env)
    assert res.returncode == 0 and "--version" in res.stdout and "examples:" in res.stdout
    res = run("fetch", "--help", env=env)
    assert res.returncode == 0 and "--version" in res.stdout and "standard output" in res.stdout
    res = run("verify", "--help", env=env)
    assert res.returncode == 0 and "--all" in res.stdout and "--scrub-every" in res.stdout
    res = run("log", "--help", env=env)
    assert res.returncode == 0
    for word in ("--limit 0", "--since 2h", "--outcome failed", "unchanged xN", "count"):
        assert word in res.stdout, word


@pytest.mark.parametrize("text, iso", [
    ("2h", "2026-11-29T10:00:00+00:00"), ("90s", "2026-11-29T11:58:30+00:00"),
    ("7d", "2026-11-22T12:00:00+00:00"), (" 30m ", "2026-11-29T11:30:00+00:00"),
    ("2026-11-28", "2026-11-28T00:00:00+00:00"), ("2026-11-28 09:30", "2026-11-28T09:30:00+00:00"),
    ("2026-11-28T09:30+02:00", "2026-11-28T07:30:00+00:00"),
])
def test_since_is_a_duration_back_from_now_or_a_utc_time(text: str, iso: str) -> None:
    now = datetime(2026, 11, 29, 12, tzinfo=UTC).timestamp()
    assert parse_since(text, now) == iso


def test_restore_into_an_unwritable_place_is_one_line_naming_dest(env: dict[str, str]) -> None:
    # Found before connecting (nothing listens on port 9): the temp file comes first.
    res = run("--server", "127.0.0.1:9", "restore", "10.0.0.5:7471", "/srv/app", "/proc/x", env=env)
    assert res.returncode == 1, res
    assert "Traceback" not in res.stderr, res.stderr
    [line] = res.stderr.strip().splitlines()
    assert "/proc/x" in line and "10.0.0.5:7471 /srv/app" in line


# -- connection failures: exit 4 ------------------------------------------------------------------


def test_no_server_exits_4_and_says_where_it_looked(env: dict[str, str]) -> None:
    res = run("list", "10.0.0.5:7471", "/srv/app", env={**env, "DELTABKP_SERVER": "127.0.0.1:1"})
    assert res.returncode == 4
    assert "127.0.0.1:1" in res.stderr and "10.0.0.5:7471 /srv/app" in res.stderr


def test_wrong_key_exits_4(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_server()
    other = tmp_path / "other.key"
    other.write_text("f" * 64 + "\n")
    res = cluster.ctl_run("targets", key_file=other)
    assert res.returncode == 4 and "key" in res.stderr, res


# -- refusals: exit 3, and nothing changes -------------------------------------------------------


def test_refusals_exit_3_and_name_node_and_path(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_server()
    app = make_app(tmp_path)
    agent = cluster.start_agent(app)
    node = agent.address

    out = cluster.ctl("register", node, str(app), "--every", "60")
    assert out["node"] == node and out["path"] == str(app) and out["every_seconds"] == 3600

    def refused(*args: str, code: str, needle: str = "") -> str:
        res = cluster.ctl_run(*args)
        assert res.returncode == 3, res
        assert f"[{code}]" in res.stderr, res.stderr
        if needle:
            assert needle in res.stderr, res.stderr
        return res.stderr

    err = refused("register", node, str(app), "--every", "5", code="exists")
    assert node in err and str(app) in err
    for bad in ("0", "abc", "-5", "5x"):
        err = refused("register", node, str(app / "conf"), "--every", bad, code="invalid")
        assert node in err and str(app / "conf") in err
    # The agent refuses paths outside its allowed roots; the server passes that on.
    err = refused("register", node, str(tmp_path), "--every", "5", code="refused")
    assert node in err and str(tmp_path) in err
    for cmd in ("list", "unregister", "backup-now"):
        err = refused(cmd, node, "/not/registered", code="not-found")
        assert node in err and "/not/registered" in err
    err = refused("log", node, "/not/registered", code="not-found")
    assert node in err and "/not/registered" in err

    # Nothing changed: still exactly one target.
    targets = cluster.ctl("targets")
    assert [(t["node"], t["path"]) for t in targets] == [(node, str(app))]


def test_register_with_agent_down_is_accepted_with_a_warning(cluster: Cluster) -> None:
    cluster.start_server()
    res = cluster.ctl_run("register", "127.0.0.1:9", "/srv/app", "--every", "90s")
    assert res.returncode == 0, res
    assert "registered 127.0.0.1:9 /srv/app" in res.stdout and "warning" in res.stdout
    res = cluster.ctl_run("targets")
    assert res.returncode == 0 and "127.0.0.1:9" in res.stdout and "/srv/app" in res.stdout
    assert "NODE" in res.stdout.splitlines()[0]  # a human table with a header


def test_json_before_or_after_the_subcommand(cluster: Cluster) -> None:
    cluster.start_server()
    before = cluster.ctl_run("--json", "status")
    after = cluster.ctl_run("status", "--json")
    assert before.returncode == after.returncode == 0
    a, b = json.loads(before.stdout), json.loads(after.stdout)
    assert a["version"] == b["version"] and a["targets"] == 0
    human = cluster.ctl_run("status")
    assert human.returncode == 0 and "version:" in human.stdout


# -- the round trip -------------------------------------------------------------------------------


def test_register_backup_list_restore(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_server()
    app = make_app(tmp_path)
    agent = cluster.start_agent(app)
    node = agent.address
    cluster.ctl("register", node, str(app), "--every", "60")

    res = cluster.ctl_run("backup-now", node, str(app), "--wait")
    assert res.returncode == 0, res.stderr
    assert f"{node} {app}: " in res.stdout and ("stored" in res.stdout or "unchanged" in res.stdout)

    rows = cluster.ctl("list", node, str(app))
    assert len(rows) == 1
    [row] = rows
    assert row["retained"] is True and row["size"] > 0 and row["transferred"] > 0
    assert row["created"][:4].isdigit() and "T" in row["created"]
    human = cluster.ctl_run("list", node, str(app))
    assert human.returncode == 0 and "SEQ" in human.stdout and "yes" in human.stdout

    dest = tmp_path / "restored"
    res = cluster.ctl_run("restore", node, str(app), str(dest))
    assert res.returncode == 0, res.stderr
    assert "blake3 verified" in res.stdout
    assert tree_equal(app, dest) == []
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]

    # A destination that is not empty is a usage error; an unknown version is refused.
    res = cluster.ctl_run("restore", node, str(app), str(dest))
    assert res.returncode == 2 and "not empty" in res.stderr
    res = cluster.ctl_run("restore", node, str(app), str(tmp_path / "v9"), "--version", "9")
    assert res.returncode == 3 and "[not-found]" in res.stderr and node in res.stderr

    # Registering runs the first backup at once; backup-now found nothing new.
    log = cluster.ctl("log", node, str(app), "--limit", "5")
    assert [e["outcome"] for e in log] == ["unchanged", "stored"]
    assert all(e["node"] == node and e["path"] == str(app) for e in log)
    human = cluster.ctl_run("log")
    assert human.returncode == 0 and "OUTCOME" in human.stdout and "stored" in human.stdout


def test_skipped_entries_and_folded_checks_show_in_text_output(cluster: Cluster, tmp_path: Path) -> None:
    """A socket cannot go into a tgz: backup-now, log and targets say so without --json; a
    run of unchanged checks is one 'unchanged xN' row whose count covers every check."""
    cluster.start_server()
    app = make_app(tmp_path)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(app / "shop.sock"))  # the socket file stays after close
    agent = cluster.start_agent(app)
    node = agent.address
    cluster.ctl("register", node, str(app), "--every", "60")
    wait_for(lambda: [e["outcome"] for e in cluster.ctl("log", node, str(app))] == ["stored"],
             what="the first backup")
    (app / "data.txt").write_text("changed\n")
    res = cluster.ctl_run("backup-now", node, str(app), "--wait")
    assert res.returncode == 0 and "stored" in res.stdout, res
    assert "1 skipped: shop.sock (socket" in res.stdout, res.stdout
    for _ in range(3):  # nothing changes: three checks, one row
        assert cluster.ctl_run("backup-now", node, str(app), "--wait").returncode == 0
    log = cluster.ctl("log", node, str(app), "--limit", "0")
    # The first check after a new archive may compare hashes, the next ones fingerprints: a
    # different verdict starts a new row; the count still covers every check.
    unchanged = [e for e in log if e["outcome"] == "unchanged"]
    assert sum(e["count"] for e in unchanged) == 3 and log[0]["count"] >= 2, log
    assert [e["outcome"] for e in log[len(unchanged):]] == ["stored", "stored"]
    assert log[0]["first"] < log[0]["last"] == log[0]["started"]
    human = cluster.ctl_run("log", node, str(app)).stdout
    n = log[0]["count"]
    assert f"unchanged x{n}" in human and f"{n} checks since" in human, human
    assert "1 skipped: shop.sock (socket" in human
    human = cluster.ctl_run("log", "--outcome", "stored", "--limit", "1").stdout
    assert human.count("stored") == 1 and "--limit 0 shows all" in human, human
    assert cluster.ctl("log", "--since", "1h", "--outcome", "failed") == []
    assert "no executions match" in cluster.ctl_run("log", "--outcome", "failed").stdout
    targets = cluster.ctl_run("targets").stdout
    assert "1 skipped: shop.sock (socket" in targets, targets
    [t] = cluster.ctl("targets")
    assert t["skipped_count"] == 1 and t["skipped"][0][0] == "shop.sock"


def test_backup_now_wait_exits_1_when_the_execution_fails(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_server()
    app = make_app(tmp_path)
    agent = cluster.start_agent(app)
    node = agent.address
    cluster.ctl("register", node, str(app), "--every", "60")
    agent.stop()
    res = cluster.ctl_run("backup-now", node, str(app), "--wait")
    assert res.returncode == 1, res
    assert "failed" in res.stdout and node in res.stdout and str(app) in res.stdout
    res = cluster.ctl_run("--json", "backup-now", node, str(app), "--wait")
    assert res.returncode == 1 and json.loads(res.stdout)["outcome"] == "failed"
    # Without --wait it is only queued.
    res = cluster.ctl_run("backup-now", node, str(app))
    assert res.returncode == 0 and "queued" in res.stdout


def test_restore_refuses_an_archive_that_fails_its_hash(cluster: Cluster, tmp_path: Path) -> None:
    """A stored archive corrupted on the server's disk is caught before extraction: the
    server checks every version's blake3 before serving it and refuses a corrupt one (exit
    3), marking it corrupt; ctl's own check of what arrives (exit 6) stays behind it."""
    cluster.start_server()
    app = make_app(tmp_path)
    agent = cluster.start_agent(app)
    node = agent.address
    cluster.ctl("register", node, str(app), "--every", "60")
    cluster.ctl("backup-now", node, str(app), "--wait")
    [tgz] = [p for p in cluster.archive_files() if p.suffix == ".tgz"]
    data = bytearray(tgz.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one bit pattern flipped
    tgz.write_bytes(bytes(data))

    dest = tmp_path / "restored"
    res = cluster.ctl_run("restore", node, str(app), str(dest))
    assert res.returncode == 3, res
    assert "blake3" in res.stderr and node in res.stderr and str(app) in res.stderr
    assert "archive 1 is corrupt" in res.stderr
    assert not dest.exists() or not any(dest.iterdir())  # nothing extracted
    assert cluster.ctl("list", node, str(app))[0]["corrupt"] is True
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]  # temp file removed
