"""The compose image's entry point (docker/entrypoint.sh), run for real without Docker.

Job: no Docker engine runs here, so the roles the containers run are run as local processes on
127.0.0.1 (the script takes its ports and directories from the environment, as compose sets
them): ``keygen`` creates the shared key once and never replaces it; ``manager`` serves; an
``echosv`` node starts its echo app, agent and load, registers itself with the manager through
``deltabkp ctl`` and gets backed up; ``healthcheck-echosv`` passes while the node runs and
fails once it is stopped; SIGTERM stops every process of the node; a restarted node finds its
target already registered and carries on. As compose runs them: two ``manager``s over one real
PostgreSQL catalog and one real S3 store (SeaweedFS), the first address of ``BKP_SERVERS`` down
— the node registers its app ONCE, every manager sees that one target, it is backed up into
S3, and the node announces itself to every manager.

Invariants: deadlines on every wait, no timing assertion; every process session started here is
killed at the end, pass or fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures_s3 import BUCKET, s3_env, seaweedfs  # noqa: F401  (fixtures)

from deltabkp.testing import SeaweedFS

REPO = Path(__file__).resolve().parent.parent
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
sys.path.insert(0, str(REPO / "scripts"))
import local_cluster as lc  # noqa: E402

pytestmark = pytest.mark.slow
DEADLINE_S = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(pred: Callable[[], Any], what: str, logs: Callable[[], str], timeout: float = DEADLINE_S) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}\n{logs()}")
        time.sleep(0.2)


class Roles:
    """Runs entrypoint roles as sessions of their own; kills every one of them at close()."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.key = root / "key" / "cluster.key"
        self.manager_port = free_port()
        self.env = {
            **os.environ,
            # The image puts deltabkp-* and python on PATH; here they sit beside this Python.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOME": str(root / "home"),
            "DELTABKP_KEY_FILE": str(self.key),
            "LISTEN_HOST": "127.0.0.1",
            "PYTHONUNBUFFERED": "1",
        }
        self.started: list[tuple[subprocess.Popen[bytes], int, Path]] = []

    def start(self, role: str, name: str, **env: str) -> subprocess.Popen[bytes]:
        log = self.root / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(["bash", str(ENTRYPOINT), role], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env={**self.env, **env}, start_new_session=True)
        self.started.append((proc, lc.start_ticks(proc.pid), log))
        return proc

    def run(self, role: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(ENTRYPOINT), role], capture_output=True, text=True,
                              env={**self.env, **env}, timeout=60)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.root.glob("*.log")))

    def ctl(self, *args: str, server: str | None = None) -> Any:
        res = subprocess.run(
            [sys.executable, "-m", "deltabkp", "ctl", "--server", server or f"127.0.0.1:{self.manager_port}",
             "--json", *args], capture_output=True, text=True, env=self.env, timeout=60)
        assert res.returncode == 0, f"ctl {args}: {res.stderr}\n{self.logs()}"
        return json.loads(res.stdout) if res.stdout.strip() else None

    def close(self) -> None:
        for proc, ticks, _ in self.started:
            for pid in [proc.pid, *lc.session_members(proc.pid, ticks)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.fixture
def roles(tmp_path: Path) -> Iterator[Roles]:
    r = Roles(tmp_path)
    try:
        yield r
    finally:
        r.close()
        print(r.logs())


def test_entrypoint_roles_keygen_manager_echosv(roles: Roles, tmp_path: Path) -> None:
    r = roles
    # keygen: a key once, mode 0600; a second run keeps it.
    assert r.run("keygen").returncode == 0
    key = r.key.read_bytes()
    assert len(key.strip()) >= 32 and stat.S_IMODE(r.key.stat().st_mode) == 0o600
    again = r.run("keygen")
    assert again.returncode == 0 and "kept" in again.stderr and r.key.read_bytes() == key

    r.start("manager", "manager", MANAGER_PORT=str(r.manager_port), MANAGER_DATA_DIR=str(tmp_path / "mdata"))
    wait_for(lambda: "listening on" in (tmp_path / "manager.log").read_text(), "the manager", r.logs)

    data = tmp_path / "echo-data"
    echo_port, agent_port = free_port(), free_port()
    node = f"127.0.0.1:{agent_port}"
    node_env = {
        "ECHO_PORT": str(echo_port), "AGENT_PORT": str(agent_port), "ECHO_DATA_DIR": str(data),
        "ECHO_APP_DIR": str(REPO / "examples" / "echo"), "AGENT_CACHE_DIR": str(tmp_path / "cache"),
        "BKP_SERVERS": f"127.0.0.1:{r.manager_port}", "ECHO_NODE": node, "BKP_EVERY": "2s",
    }
    echosv = r.start("echosv", "echosv", **node_env)

    def archives() -> list[dict[str, Any]]:
        targets = {(t["node"], t["path"]) for t in r.ctl("targets")}
        return r.ctl("list", node, str(data)) if (node, str(data)) in targets else []

    wait_for(archives, "the node to register itself and its first backup", r.logs)
    assert r.run("healthcheck-echosv", **node_env).returncode == 0
    assert (data / "messages.log").exists() and json.loads((data / "stats.json").read_text())["messages"] >= 1

    # SIGTERM stops the node and everything it started (app, agent, load, registration).
    ticks = lc.start_ticks(echosv.pid)
    echosv.send_signal(signal.SIGTERM)
    assert echosv.wait(timeout=60) == 0
    wait_for(lambda: lc.session_members(echosv.pid, ticks) == [], "the node's processes to stop", r.logs)
    assert r.run("healthcheck-echosv", **node_env).returncode != 0

    # A restarted node finds itself registered already, and its backups go on.
    before = len(archives())
    r.start("echosv", "echosv-restarted", **node_env)
    wait_for(lambda: "already registered" in (tmp_path / "echosv-restarted.log").read_text(),
             "the restarted node to see its registration", r.logs)
    wait_for(lambda: len(archives()) > before, "a backup after the restart", r.logs)
    assert r.run("healthcheck-echosv", **node_env).returncode == 0
    assert re.search(r"registered once, through 127\.0\.0\.1:\d+: ", (tmp_path / "echosv.log").read_text())


def test_echosv_registers_once_with_managers_sharing_postgres_and_s3(
    s3_env: SeaweedFS, postgres_url: str, roles: Roles, tmp_path: Path  # noqa: F811
) -> None:
    r = roles
    assert r.run("keygen").returncode == 0
    # What compose gives every manager: the same catalog and store (S3 keys and endpoint in the
    # standard AWS variables), a short lease TTL.
    shared = {"BKP_CATALOG": postgres_url, "BKP_STORE": f"s3://{BUCKET}/entry-{uuid.uuid4().hex[:8]}",
              "BKP_LEASE_TTL": "5", **s3_env.env()}
    managers = []
    for i in (1, 2):
        port = free_port()
        r.start("manager", f"manager{i}", MANAGER_PORT=str(port), MANAGER_DATA_DIR=str(tmp_path / f"m{i}"),
                **shared)
        log = tmp_path / f"manager{i}.log"
        wait_for(lambda log=log: "listening on" in log.read_text(), f"manager{i}", r.logs)  # type: ignore[misc]
        assert f"on catalog {postgres_url}" in log.read_text()
        managers.append(f"127.0.0.1:{port}")
    down = f"127.0.0.1:{free_port()}"  # a manager that is down, first in the list

    data = tmp_path / "echo-data"
    echo_port, agent_port = free_port(), free_port()
    node = f"127.0.0.1:{agent_port}"
    node_env = {
        "ECHO_PORT": str(echo_port), "AGENT_PORT": str(agent_port), "ECHO_DATA_DIR": str(data),
        "ECHO_APP_DIR": str(REPO / "examples" / "echo"), "AGENT_CACHE_DIR": str(tmp_path / "cache"),
        "BKP_SERVERS": " ".join([down, *managers]), "ECHO_NODE": node, "BKP_EVERY": "2s",
    }
    echosv = r.start("echosv", "echosv", **node_env)

    def archives(server: str) -> list[dict[str, Any]]:
        targets = {(t["node"], t["path"]) for t in r.ctl("targets", server=server)}
        return r.ctl("list", node, str(data), server=server) if (node, str(data)) in targets else []

    wait_for(lambda: archives(managers[1]), "the node to register itself and its first backup", r.logs)
    # ONE registration, through the list (the dead address skipped), and one target for all.
    text = (tmp_path / "echosv.log").read_text()
    assert text.count("registered once, through ") == 1, text
    assert f"through {','.join([down, *managers])}: " in text
    for m in managers:
        assert [(t["node"], t["path"]) for t in r.ctl("targets", server=m)] == [(node, str(data))]
    # Both managers list the same archives (backups go on meanwhile: compare what both had),
    # which are in S3, not in either manager's data directory.
    first = {a["seq"]: a["hash"] for a in archives(managers[0])}
    later = {a["seq"]: a["hash"] for a in archives(managers[1])}
    assert first and all(later.get(seq, h) == h for seq, h in first.items()), (first, later)
    assert min(first) in later
    for i in (1, 2):
        local = [p for p in (tmp_path / f"m{i}").rglob("*.tgz") if "s3-cache" not in p.parts]
        assert local == []
    # The agent announced itself to every manager (the dead one is retried in the background).
    for i in (1, 2):
        wait_for(lambda i=i: f"agent {node} announced itself" in (tmp_path / f"manager{i}.log").read_text(),  # type: ignore[misc]
                 f"the announcement to manager{i}", r.logs)

    # A restarted node finds its app registered (by whichever manager) and registers nothing new.
    ticks = lc.start_ticks(echosv.pid)
    echosv.send_signal(signal.SIGTERM)
    assert echosv.wait(timeout=60) == 0
    wait_for(lambda: lc.session_members(echosv.pid, ticks) == [], "the node's processes to stop", r.logs)
    before = len(archives(managers[0]))
    r.start("echosv", "echosv-restarted", **node_env)
    wait_for(lambda: "already registered" in (tmp_path / "echosv-restarted.log").read_text(),
             "the restarted node to see its registration", r.logs)
    wait_for(lambda: len(archives(managers[0])) > before, "a backup after the restart", r.logs)
    for m in managers:
        assert len(r.ctl("targets", server=m)) == 1
