"""Progress: ``ctl status`` shows a running execution's bytes so far (from any server sharing
the catalog), and ``ctl backup-now --wait`` / ``restore`` / ``fetch`` draw bytes, rate (and
ETA where the size is known) on a real terminal — a pty as their stderr — and nothing at
all when stderr is not a terminal or with ``--json``.

The backups are slowed down by the agent's ``--bwlimit`` so that they are still running
while we look; nothing here measures time."""

from __future__ import annotations

import fcntl
import os
import re
import struct
import subprocess
import termios
from pathlib import Path
from typing import Any

import trio

from deltabkp import net
from deltabkp.ctl._client import Client
from helpers_proc import Cluster, Daemon, cluster, exe, wait_for  # noqa: F401

RATE = re.compile(r"\d[\d.]*\s?[kKMG]?i?B/s")


def _on_a_terminal(c: Cluster, *args: str) -> tuple[int, str, str]:
    """Run ``deltabkp ctl ARGS`` with a pty as its stderr: exit code, stdout, what the
    terminal showed."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    cmd = [exe("deltabkp"), "ctl", "--server", c.server.address,  # type: ignore[union-attr]
           "--key-file", str(c.key_file), *args]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=slave, env=c.env)
    os.close(slave)
    seen = bytearray()
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        seen += data
    out = proc.stdout.read().decode() if proc.stdout else ""
    code = proc.wait(timeout=120)
    os.close(master)
    return code, out, seen.decode(errors="replace")


def test_progress_on_a_terminal_and_nowhere_else(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    trees = tmp_path / "trees"
    src, src2 = trees / "one", trees / "two"
    src.mkdir(parents=True)
    (src / "one.bin").write_bytes(os.urandom(1 << 20))  # incompressible: ~1 MiB on the wire
    server = c.start_server()
    agent = Daemon("deltabkp-agent", [
        exe("deltabkp-agent"), "--listen", "127.0.0.1:0", "--allow", str(trees),
        "--key-file", str(c.key_file), "--bwlimit", "256K"], tmp_path / "slow-agent.log", c.env)
    c.agents.append(agent)
    client = Client(net.Address.parse(server.address), net.load_key(str(c.key_file)), 60.0)
    node, path = agent.address, str(src)

    def ask(op: str, **args: Any) -> Any:
        return trio.run(client.request, op, args)

    ask("register", node=node, path=path, every="60")  # the first backup starts at once

    # status: the running execution with its bytes so far, as the catalog has them.
    def running() -> Any:
        rows = ask("status")["executions"]
        return rows if rows and rows[0]["transferred"] > 0 else None

    [row] = wait_for(running, what="a running execution with bytes in ctl status")
    assert (row["node"], row["path"], row["trigger"]) == (node, path, "schedule")
    assert row["server"] == ask("status")["server_id"] and row["expected"] is None
    prog = ask("progress", node=node, path=path)
    assert prog["running"] is True and prog["execution"] == row["execution"]
    wait_for(lambda: not ask("progress", node=node, path=path)["running"],
             what="the first backup to end")
    assert ask("status")["executions"] == []

    # backup-now --wait on a terminal: the bytes and rate of the execution it asked for.
    # Registered before its directory exists, the target's first run fails (next try: its
    # next period), so the requested run is its first backup: ~4 s at the agent's cap.
    path = str(src2)
    ask("register", node=node, path=path, every="60")
    wait_for(lambda: any(t["path"] == path and t["last_outcome"] == "failed"
                         for t in ask("targets")), what="the first run to fail")
    src2.mkdir()
    (src2 / "two.bin").write_bytes(os.urandom(1 << 20))
    code, out, term = _on_a_terminal(c, "backup-now", node, path, "--wait")
    assert code == 0, out + term
    assert "stored" in out and "backup" in term and RATE.search(term), term

    # restore on a terminal: the size is known, so the share done and the ETA too.
    code, out, term = _on_a_terminal(c, "restore", node, path, str(tmp_path / "r1"))
    assert code == 0, out + term
    assert "restore" in term and "100%" in term and RATE.search(term), term
    assert (tmp_path / "r1" / "two.bin").read_bytes() == (src2 / "two.bin").read_bytes()
    # --json on a terminal: nothing but the answer.
    code, out, term = _on_a_terminal(c, "--json", "fetch", node, path, str(tmp_path / "a.tgz"))
    assert code == 0 and term == "" and '"seq"' in out
    # Not a terminal: not a byte of progress (stderr empty, stdout only the answer).
    res = c.ctl_run("fetch", node, path, str(tmp_path / "b.tgz"))
    assert res.returncode == 0 and res.stderr == "" and "\r" not in res.stdout
    assert (tmp_path / "b.tgz").read_bytes() == (tmp_path / "a.tgz").read_bytes()


def test_status_renders_the_running_executions() -> None:
    from deltabkp.ctl import _render

    text = _render.status({"version": "0.1.0", "executions": [
        {"execution": 12, "node": "10.0.0.5:7471", "path": "/srv/app", "trigger": "manual",
         "started": "2026-11-29T10:00:00.000+00:00", "server": "vm/1/ab",
         "transferred": 3 << 20, "expected": None}]}, {})
    assert "running executions: 1" in text
    [row] = [ln for ln in text.splitlines() if ln.startswith("12 ")]
    assert "10.0.0.5:7471" in row and "/srv/app" in row and "3.0 MiB" in row
    assert "executions:" not in text.replace("running executions:", "")
    assert "running executions" not in _render.status({"version": "0.1.0", "executions": []}, {})
