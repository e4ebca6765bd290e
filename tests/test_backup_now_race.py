"""``backup-now --wait`` answers for its own request: the run claimed after it, never one
claimed before it (schema v5: a request id travels from the target's queue to the row).

The race, made deterministic with the real daemons: a run of target B is *claimed* (B shows
"running") but has not started — it waits for the node's only slot, which a run of A holds
while the agent is stopped (SIGSTOP).  The operator then writes a file into B and asks
``backup-now --wait``.  The answer must be the run claimed after the request, not the one
already claimed; and its archive has the file.  Then the same with the scripted peer, in
process, for two requests made while a run is in flight: one later run answers both.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import trio

from deltabkp.testing import ScriptedAgent
from deltabkp_server.execution import ExecutionSettings
from helpers_proc import Cluster, cluster, exe, wait_for  # noqa: F401
from test_server import KEY, _register, _start_server, ctl


def _state(c: Cluster, path: str) -> str:
    return next(t["state"] for t in c.ctl("targets") if t["path"] == path)


def test_wait_is_not_answered_by_a_run_claimed_before_the_request(
    cluster: Cluster, tmp_path: Path
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "base.txt").write_text(f"{d.name}\n" * 100)
    # One slot per node: B's claimed run waits behind A's, with no execution row yet.
    # A long connect timeout: A's run stays in flight at the stopped agent however slow the
    # ctl calls below are on a loaded machine (not a clock the test races).
    server = cluster.start_server("--max-per-node", "1", "--connect-timeout", "120")
    agent = cluster.start_agent(a, b)
    node = agent.address

    def ran(d: Path, what: str = r"(?:stored|unchanged)") -> list[int]:
        """Ids of the executions of ``d`` the server logged as ``what`` (a log line each:
        cheaper to watch than a ``ctl`` process per look)."""
        pattern = rf"execution (\d+) of {re.escape(node)} {re.escape(str(d))}:? {what}"
        return [int(m) for m in re.findall(pattern, server.log_text())]

    for d in (a, b):
        cluster.ctl("register", node, str(d), "--every", "1h")
    for d in (a, b):
        wait_for(lambda d=d: ran(d), what=f"first run of {d}")
    [first_b] = ran(b)

    waiter: subprocess.Popen[str] | None = None
    # A's connection waits in the stopped agent's backlog, for up to the server's connect
    # timeout (120 s above): the steps below take a few ctl calls.
    os.kill(agent.pid, signal.SIGSTOP)
    try:
        cluster.ctl("backup-now", node, str(a))  # in flight at the stopped agent
        wait_for(lambda: ran(a, r"started \(manual\)"), what="A running")
        cluster.ctl("backup-now", node, str(b))  # claimed at once, then waits for A's slot
        wait_for(lambda: _state(cluster, str(b)) == "running", what="B claimed")
        assert not ran(b, r"started \(manual\)")  # claimed, not started (no row yet)
        # The operator changes a file, then asks for a backup and waits for it.
        (b / "new.txt").write_text("written just before the request\n")
        waiter = subprocess.Popen(
            [exe("deltabkp"), "ctl", "--json", "--server", server.address,
             "--key-file", str(cluster.key_file), "backup-now", node, str(b), "--wait"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cluster.env,
        )
        wait_for(lambda: "queued (--wait)" in server.log_text(), what="the --wait request")
    finally:
        os.kill(agent.pid, signal.SIGCONT)
    assert waiter is not None
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0, (out, err)
    answer = json.loads(out)

    # B ran twice after its first backup: the run claimed before the request, then ours.
    wait_for(lambda: len(ran(b)) == 3, what="B's two runs")
    rows = sorted(cluster.ctl("log", node, str(b)), key=lambda e: e["id"])
    before, ours = [e for e in rows if e["id"] > first_b]
    assert answer["id"] == ours["id"] != before["id"], (answer, rows)
    assert answer["trigger"] == "manual" and answer["started"] >= before["ended"]
    # Its archive (stored, or unchanged against the one just stored) holds the new file.
    dest = tmp_path / "got.tgz"
    cluster.ctl("fetch", node, str(b), str(dest), "--version", str(answer["seq"]))
    with tarfile.open(dest) as tf:
        names = [Path(n).name for n in tf.getnames()]
    assert "new.txt" in names, names


async def test_two_requests_during_a_run_are_answered_by_one_later_run(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    srv, scope = await _start_server(
        nursery, tmp_path / "data", ExecutionSettings(keep=3, connect_timeout=5, idle_timeout=10)
    )
    agent = ScriptedAgent(key=KEY, content={"/srv/app": os.urandom(2000)})
    await nursery.start(agent.serve)
    await _register(srv, agent)
    node, path = agent.address, "/srv/app"
    agent.gate = trio.Event()
    agent.content[path] = os.urandom(3000)  # the held run stores it: no fold with ours
    await ctl(srv.address, "backup-now", node=node, path=path)  # a run, held at the agent
    with trio.fail_after(30):
        while not agent.active:
            await trio.sleep(0.01)
    got: list[dict[str, Any]] = []

    async def wait() -> None:
        got.append(await ctl(srv.address, "backup-now", node=node, path=path, wait=True))

    for _ in range(2):
        nursery.start_soon(wait)
    with trio.fail_after(30):  # both requests are in the catalog (the held run's was 1)
        while (await srv.catalog.call(lambda c: c.find_target(node, path))).request_seq < 3:
            await trio.sleep(0.01)
    agent.gate.set()
    with trio.fail_after(30):
        while len(got) < 2:
            await trio.sleep(0.01)
    rows = sorted(await ctl(srv.address, "log", node=node, path=path), key=lambda e: e["id"])
    # The registration's run, the held one, then exactly one run for both requests.
    assert [e["trigger"] for e in rows] == ["schedule", "manual", "manual"], rows
    assert got[0]["id"] == got[1]["id"] == rows[-1]["id"]
    assert [e["outcome"] for e in rows] == ["stored", "stored", "unchanged"]
    assert got[0]["started"] >= rows[1]["ended"]
    scope.cancel()
