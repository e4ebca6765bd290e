"""Real processes for end-to-end tests: ``deltabkp-server``, ``deltabkp-agent``, ``deltabkp ctl``.

Each daemon is started on 127.0.0.1 port 0 by ``deltabkp.testing.Daemon`` and found through
its ``... listening on HOST:PORT`` line; its output goes to a log file that is printed when a
test fails.  Every wait has a deadline; nothing here asserts anything about time.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from deltabkp import testing
from deltabkp_server._crash import CRASH_ENV

exe = testing.console_script


def wait_for(pred: Callable[[], Any], timeout: float = 30.0, what: str = "condition", interval: float = 0.05) -> Any:
    """Poll ``pred`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class Daemon(testing.Daemon):
    """A started daemon process (``deltabkp.testing.Daemon``) in its own session; a daemon
    that does not come up fails the test, with its log."""

    def __init__(self, name: str, cmd: list[str], log: Path, env: dict[str, str]) -> None:
        self.cmd = cmd
        try:
            super().__init__(cmd, log=log, name=name, env=env, start_new_session=True)
        except testing.DaemonStartError as exc:
            pytest.fail(exc.message, pytrace=False)


class Cluster:
    """Key file, server, agents and the ctl client of one test, all under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.key_file = root / "cluster.key"
        self.key_file.write_text(secrets.token_hex(32) + "\n")
        self.key_file.chmod(0o600)
        self.env = {
            **os.environ,
            "DELTABKP_KEY_FILE": str(self.key_file),
            "HOME": str(root / "home"),  # never touch the real user's key or data
            "PYTHONUNBUFFERED": "1",
        }
        self.data_dir = root / "server-data"
        self.server: Daemon | None = None
        self.agents: list[Daemon] = []
        self._n = 0

    def _log(self, name: str) -> Path:
        self._n += 1
        return self.root / f"{self._n:02d}-{name}.log"

    def start_server(self, *extra: str, port: int = 0, crash: str | None = None) -> Daemon:
        """A server; with ``crash``, one that kills itself (-9) the first time it reaches
        that step (``deltabkp_server._crash``)."""
        cmd = [
            exe("deltabkp-server"), "--listen", f"127.0.0.1:{port}", "--data-dir",
            str(self.data_dir), "--key-file", str(self.key_file), *extra,
        ]
        env = {**self.env, CRASH_ENV: crash} if crash else self.env
        self.server = Daemon("deltabkp-server", cmd, self._log("server"), env)
        return self.server

    def start_agent(self, *allow: Path, port: int = 0, announce: bool = True, key_file: Path | None = None) -> Daemon:
        cmd = [exe("deltabkp-agent"), "--listen", f"127.0.0.1:{port}",
               "--key-file", str(key_file or self.key_file)]
        for a in allow:
            cmd += ["--allow", str(a)]
        if announce and self.server is not None:
            cmd += ["--server", self.server.address]
        agent = Daemon("deltabkp-agent", cmd, self._log("agent"), self.env)
        self.agents.append(agent)
        return agent

    def ctl_run(self, *args: str, server: str | None = None, key_file: Path | None = None,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        assert server or self.server
        cmd = [exe("deltabkp"), "ctl", "--server", server or self.server.address,  # type: ignore[union-attr]
               "--key-file", str(key_file or self.key_file), *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=timeout)

    def ctl(self, *args: str, timeout: float = 120) -> Any:
        """``deltabkp ctl --json ARGS``, which must succeed; returns the parsed JSON."""
        res = self.ctl_run("--json", *args, timeout=timeout)
        if res.returncode != 0:
            pytest.fail(f"deltabkp ctl {' '.join(args)} exited {res.returncode}: {res.stderr}\n{self.logs()}")
        return json.loads(res.stdout) if res.stdout.strip() else None

    def logs(self) -> str:
        out = []
        for p in sorted(self.root.glob("*.log")):
            text = p.read_text(errors="replace")
            out.append(f"--- {p.name} (last 4000 chars) ---\n{text[-4000:]}")
        return "\n".join(out)

    def archive_files(self) -> list[Path]:
        d = self.data_dir / "archives"
        return sorted(p for p in d.rglob("*") if p.is_file()) if d.exists() else []

    def close(self) -> None:
        for a in self.agents:
            a.stop()
        if self.server is not None:
            self.server.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()
        # pytest shows captured output only for failing tests: the daemons' logs then.
        print(c.logs())


def tree_equal(a: Path, b: Path) -> list[str]:
    """Differences between two trees (names, types, contents, modes, symlink targets)."""
    diffs: list[str] = []

    def walk(root: Path) -> dict[str, Path]:
        return {str(p.relative_to(root)): p for p in root.rglob("*")}

    wa, wb = walk(a), walk(b)
    for name in sorted(set(wa) | set(wb)):
        pa, pb = wa.get(name), wb.get(name)
        if pa is None or pb is None:
            diffs.append(f"{name}: only in {'restore' if pa is None else 'source'}")
        elif pa.is_symlink() or pb.is_symlink():
            if not (pa.is_symlink() and pb.is_symlink() and os.readlink(pa) == os.readlink(pb)):
                diffs.append(f"{name}: symlink differs")
        elif pa.is_dir() != pb.is_dir():
            diffs.append(f"{name}: type differs")
        elif pa.is_file():
            if pa.read_bytes() != pb.read_bytes():
                diffs.append(f"{name}: content differs")
            elif (pa.stat().st_mode & 0o777) != (pb.stat().st_mode & 0o777):
                diffs.append(f"{name}: mode differs")
    return diffs
