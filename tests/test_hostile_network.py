"""A hostile network, for real: server, agent and ctl in their own network namespaces.

``deltabkp.testing.NetLab`` joins one namespace per role to a bridge (veth pairs, a private
/24); the daemons are started by the usual launcher wrapped in ``ip netns exec`` and ``ctl``
runs inside its own namespace, so every byte crosses a link this test can cut, slow down
(``tc tbf``) or filter (nftables).  Each test checks, through ``ctl --json`` and the data dir:

- a link cut mid-transfer: the execution is logged failed with the reason, nothing partial
  is listed or stored, and the target's retry stores the backup once the link is back;
- a one-way partition that lands in the signature phase or in the delta phase (an nftables
  rule that bites once the connection has carried N bytes: no timing), each direction: a
  clean failure with a reason under the server's idle timeout, then success once healed;
- 20 % packet loss both ways: the backup is stored (retried if an attempt fails);
- a 1 Mbit/s link and a first backup a few times longer than the idle timeout: stored,
  the idle timeout does not misfire;
- a flood of idle and slow sockets at both daemons, more than the server has descriptors:
  ``ctl status`` from a third namespace still answers, a backup still runs, the server logs
  no traceback and no line per socket (latencies are printed, never asserted).

Short daemon timeouts keep each test to seconds; the long campaigns with figures are in
``benchmarks/bench_hostile.py``.  Not root: skipped with the reason.  Root but no namespaces
(no iproute2, no nftables): the lab raises and the test fails — CI has both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers_proc import Cluster, Daemon, exe, tree_equal, wait_for
from test_e2e_faults import check_store_matches_catalog, part_with_data, parts

from deltabkp.testing import NetLab
from deltabkp.testing._netns import have_root

SERVER_PORT, AGENT_PORT = 7470, 7471
#: Server's longest silence of an agent mid-backup: short, so a partition fails fast.  A
#: delta chunk (256 KiB) takes ~2.1 s at 1 Mbit/s, under it: the slow-link test relies on it.
IDLE_TIMEOUT_S = 4


class NetCluster(Cluster):
    """``helpers_proc.Cluster`` with each role in its namespace of ``lab``: the server in
    ``server``, the agent in ``agent``, ``ctl`` in ``ctl``, on fixed ports (namespaces do not
    share ports), so a restarted daemon keeps its address."""

    def __init__(self, root: Path, lab: NetLab, idle_timeout: float = IDLE_TIMEOUT_S) -> None:
        super().__init__(root)
        self.lab = lab
        self.idle_timeout = idle_timeout

    def start_server(self, *extra: str, port: int = SERVER_PORT, wrap: Sequence[str] = ()) -> Daemon:
        """``wrap``: a command prefix run inside the namespace (``prlimit --nofile=N``)."""
        cmd = [
            *wrap, exe("deltabkp-server"), "--listen", f"{self.lab['server'].address}:{port}",
            "--data-dir", str(self.data_dir), "--key-file", str(self.key_file),
            "--idle-timeout", f"{self.idle_timeout:g}", *extra,
        ]
        self.server = Daemon("deltabkp-server", self.lab.exec_argv("server", cmd),
                             self._log("server"), self.env)
        return self.server

    def start_agent(self, *allow: Path, port: int = AGENT_PORT, announce: bool = True,
                    key_file: Path | None = None, cache: str = "cache") -> Daemon:
        cmd = [exe("deltabkp-agent"), "--listen", f"{self.lab['agent'].address}:{port}",
               "--key-file", str(key_file or self.key_file),
               "--cache-dir", str(self.root / cache)]
        for a in allow:
            cmd += ["--allow", str(a)]
        if announce and self.server is not None:
            cmd += ["--server", self.server.address]
        agent = Daemon("deltabkp-agent", self.lab.exec_argv("agent", cmd), self._log("agent"),
                       self.env)
        self.agents.append(agent)
        return agent

    def ctl_run(self, *args: str, server: str | None = None, key_file: Path | None = None,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        assert server or self.server
        cmd = [exe("deltabkp"), "ctl", "--server", server or self.server.address,  # type: ignore[union-attr]
               "--key-file", str(key_file or self.key_file), *args]
        return subprocess.run(self.lab.exec_argv("ctl", cmd), capture_output=True, text=True,
                              env=self.env, timeout=timeout, check=False)

    def log(self, node: str, path: Path) -> list[dict[str, Any]]:
        return list(self.ctl("log", node, str(path)))


@pytest.fixture
def lab() -> Iterator[NetLab]:
    if not have_root():
        pytest.skip("network namespaces need root")
    # Any other failure to make the lab (no iproute2, no nftables) fails the test.
    with NetLab(["server", "agent", "ctl", "mob"]) as lab:
        yield lab


@pytest.fixture
def net(tmp_path: Path, lab: NetLab) -> Iterator[NetCluster]:
    c = NetCluster(tmp_path, lab)
    try:
        yield c
    finally:
        c.close()
        print(c.logs())


def _store_settles(c: Cluster, restarted_at: float = float("inf")) -> int:
    """``check_store_matches_catalog`` once the live server has settled: a stored row's
    signature, retention and conversion follow its commit (an atomic write's temp file, a
    ``.tgz`` going as its ``.rdelta`` comes), so a check right after it may see them midway;
    a real mismatch still fails, after 30 s."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return check_store_matches_catalog(c, restarted_at)
        except (AssertionError, FileNotFoundError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def random_tree(root: Path, name: str, sizes: list[int]) -> Path:
    app = root / name
    app.mkdir()
    for i, n in enumerate(sizes):
        (app / f"f{i:02d}.bin").write_bytes(os.urandom(n))
    (app / "conf.ini").write_text("[main]\nport = 8080\n")
    return app


def after(log: list[dict[str, Any]], eid: int, outcome: str) -> list[dict[str, Any]]:
    return [e for e in log if e["id"] > eid and e["outcome"] == outcome]


def assert_failed_cleanly(c: NetCluster, node: str, app: Path, e: dict[str, Any]) -> None:
    """A failed execution names node and path and says why, and stored no archive.  (Its
    partial file is checked by ``check_store_matches_catalog`` once nothing runs.)"""
    assert e["outcome"] == "failed", e
    assert node in e["error"] and str(app) in e["error"], e["error"]
    assert e["archive_size"] is None and e["ended"] is not None, e


# -- a cut --------------------------------------------------------------------------------------


def test_link_cut_mid_transfer_fails_then_retries_when_the_link_returns(
    net: NetCluster, lab: NetLab, tmp_path: Path
) -> None:
    c = net
    app = random_tree(tmp_path, "app", [1 << 20] * 2)
    lab.shape("agent", "8mbit")  # ~2 s for the transfer: room to cut it in the middle
    c.start_server()
    agent = c.start_agent(tmp_path)
    node = agent.address
    every = 4  # the backoff cap is min(60 s, the period)
    c.ctl("register", node, str(app), "--every", f"{every}s")
    wait_for(lambda: part_with_data(c), timeout=60, interval=0.01, what="a .part file with data")
    lab.cut("agent")
    cut_at = time.monotonic()
    failed = wait_for(lambda: [e for e in c.log(node, app) if e["outcome"] == "failed"],
                      timeout=60, what="the execution to be logged failed")[0]
    print(f"failed {time.monotonic() - cut_at:.1f} s after the cut: {failed['error']}")
    assert_failed_cleanly(c, node, app, failed)
    # The link is still down: no retry can have started a new transfer.
    assert c.ctl("list", node, str(app)) == [] and c.archive_files() == [] and parts(c) == []
    [t] = c.ctl("targets")
    # Retrying: waiting for its next probe, or probing ("running") the unreachable node.
    assert t["state"] in ("retrying", "running") and t["last_outcome"] == "failed", t
    lab.restore("agent")
    back_at, back_wall = time.monotonic(), time.time()
    stored = wait_for(lambda: after(c.log(node, app), failed["id"], "stored"),
                      timeout=3 * every + 30, what="the retry once the link was back")[0]
    print(f"stored {time.monotonic() - back_at:.1f} s after the link came back "
          f"(trigger {stored['trigger']}, backoff cap {every} s)")
    assert stored["trigger"] in ("retry", "schedule"), stored
    [a] = c.ctl("list", node, str(app))
    assert a["retained"] and a["size"] == stored["archive_size"]
    # Sizes and blake3 of what is stored; every execution from before the link came back is
    # closed (later ones, every 4 s, may be running: unchanged, they write nothing).
    _store_settles(c, back_wall)


# -- one-way partitions, landing in a given phase ------------------------------------------------

#: Bytes a connection carries before the rule bites: well past the handshake (TLS included)
#: and the backup request, well inside the signature (~47 KB for 4 MB) or the delta (MBs).
SIG_AFTER = 16 << 10
DELTA_AFTER = 128 << 10


# The server connects: server → agent is the connection's "original" direction (it carries
# the signature), agent → server its "reply" (the delta).  Dropping one direction past N
# bytes loses that data, or the acknowledgements of the other direction's data.
PARTITIONS: list[tuple[str, str, dict[str, Any]]] = [
    ("delta, agent → server lost", "delta",
     {"direction": "out", "sport": AGENT_PORT, "after_bytes": ("reply", DELTA_AFTER)}),
    ("delta, server → agent lost", "delta",
     {"direction": "in", "dport": AGENT_PORT, "after_bytes": ("reply", DELTA_AFTER)}),
    ("signature, server → agent lost", "signature",
     {"direction": "in", "dport": AGENT_PORT, "after_bytes": ("original", SIG_AFTER)}),
]
#: The agent's acknowledgements of the signature lost: the server's send blocks once the
#: signature no longer fits in its socket buffer; its send deadline (``--idle-timeout``, like
#: every silence during a backup) ends it.
SIG_ACKS_LOST = ("signature, agent → server lost", "signature",
                 {"direction": "out", "sport": AGENT_PORT, "after_bytes": ("original", SIG_AFTER)})


def _partitioned_backup(c: NetCluster, lab: NetLab, node: str, app: Path, *, rule: dict[str, Any],
                        label: str) -> dict[str, Any]:
    """``backup-now`` under ``rule`` fails with a reason; healed, the target's next run stores.
    Returns the failed execution."""
    lab.drop("agent", **rule)
    res = c.ctl_run("--json", "backup-now", node, str(app), "--wait")
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    failed: dict[str, Any] = json.loads(res.stdout)
    print(f"{label}: {failed['error']}")
    assert lab.dropped("agent") > 0, "the rule never bit: the partition missed the phase"
    assert_failed_cleanly(c, node, app, failed)
    lab.heal("agent")
    # The target is retrying; its probe, or this request, runs it again over the healed link.
    rec = c.ctl("backup-now", node, str(app), "--wait")
    if rec["outcome"] != "stored":
        assert rec["outcome"] == "unchanged", rec  # the retry got there first
        assert after(c.log(node, app), failed["id"], "stored"), c.log(node, app)
    return failed


def partition_campaign(c: NetCluster, lab: NetLab, tmp_path: Path,
                       cases: list[tuple[str, str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """A first backup, then each case: a change, a partitioned backup, healed; the failed
    executions, in order."""
    app = random_tree(tmp_path, "app", [1 << 20] * 4)
    c.start_server()
    agent = c.start_agent(tmp_path)
    node = agent.address
    c.ctl("register", node, str(app), "--every", "1h")
    assert c.ctl("backup-now", node, str(app), "--wait")["outcome"] in ("stored", "unchanged")
    failures = []
    for i, (label, phase, rule) in enumerate(cases):
        if phase == "signature":
            # An agent with an empty cache has no signature of the base: it asks the server
            # for it (need-sig), and the server sends ~47 KB: the signature phase.
            c.agents.pop().stop()
            c.start_agent(tmp_path, cache=f"cache{i}")
            (app / "conf.ini").write_text(f"[main]\nport = {9000 + i}\n")
        else:
            (app / f"f0{i % 4}.bin").write_bytes(os.urandom(1 << 20))  # a change: a 1 MB delta
        failures.append(_partitioned_backup(c, lab, node, app, rule=rule, label=label))
    assert len(c.ctl("list", node, str(app))) == 1 + len(cases)
    _store_settles(c)
    return failures


def test_partition_in_the_signature_or_delta_phase_either_way(
    net: NetCluster, lab: NetLab, tmp_path: Path
) -> None:
    partition_campaign(net, lab, tmp_path, [*PARTITIONS, SIG_ACKS_LOST])


# -- loss and a slow link -------------------------------------------------------------------------


def test_twenty_percent_loss_backs_up_anyway(net: NetCluster, lab: NetLab, tmp_path: Path) -> None:
    c = net
    app = random_tree(tmp_path, "app", [256 << 10])
    c.start_server()
    agent = c.start_agent(tmp_path)
    node = agent.address
    # Both ways, every TCP packet of the agent, handshakes included.
    lab.drop("agent", "out", percent=20)
    lab.drop("agent", "in", percent=20)
    c.ctl("register", node, str(app), "--every", "1h")  # one backup, retried until stored
    stored = wait_for(lambda: [e for e in c.log(node, app) if e["outcome"] == "stored"],
                      timeout=120, interval=0.5, what="a backup stored through 20 % loss")
    log = c.log(node, app)
    failed = [e for e in log if e["outcome"] == "failed" and e["id"] < stored[0]["id"]]
    print(f"20 % loss: stored after {len(failed)} failed attempt(s); dropped "
          f"{lab.dropped('agent')} packets; failures: {[e['error'] for e in failed]}")
    for e in failed:
        assert_failed_cleanly(c, node, app, e)
    lab.heal("agent")
    _store_settles(c)
    dest = tmp_path / "restored"
    assert c.ctl_run("restore", node, str(app), str(dest)).returncode == 0
    assert tree_equal(app, dest) == []


def test_slow_link_first_backup_completes_without_idle_timeouts(
    net: NetCluster, lab: NetLab, tmp_path: Path
) -> None:
    c = net
    app = random_tree(tmp_path, "app", [512 << 10, 512 << 10])  # ~9 s at 1 Mbit/s
    lab.shape("agent", "1mbit")
    c.start_server()
    agent = c.start_agent(tmp_path)
    node = agent.address
    t0 = time.monotonic()
    c.ctl("register", node, str(app), "--every", "1h")  # the first backup starts at once
    [rec] = wait_for(lambda: [e for e in c.log(node, app) if e["outcome"] is not None],
                     timeout=300, interval=0.5, what="the first backup over 1 Mbit/s")
    took = time.monotonic() - t0
    assert rec["outcome"] == "stored", rec
    print(f"1 Mbit/s: {rec['archive_size']} B archive, {rec['bytes_received']} B received "
          f"in {took:.1f} s (idle timeout {IDLE_TIMEOUT_S} s)")
    # The transfer outlasted the idle timeout twice over at least, and it was one attempt.
    assert rec["bytes_received"] > 2 * IDLE_TIMEOUT_S * 125_000  # > 2 idle timeouts' worth


# -- a flood --------------------------------------------------------------------------------------


def test_flood_at_both_daemons_server_out_of_descriptors(
    net: NetCluster, lab: NetLab, tmp_path: Path
) -> None:
    """Idle and slow sockets at both daemons, more than the server has descriptors (the
    issue's case, scaled down): ``ctl status`` answers, a backup runs through the agent's
    flood, and the server logs no traceback and nowhere near a line per socket."""
    c = net
    nofile = 256
    app = random_tree(tmp_path, "app", [64 << 10])
    server = c.start_server(wrap=["prlimit", f"--nofile={nofile}:{nofile}"])
    agent = c.start_agent(tmp_path)
    node = agent.address
    c.ctl("register", node, str(app), "--every", "1h")
    assert c.ctl("backup-now", node, str(app), "--wait")["outcome"] in ("stored", "unchanged")
    mark = len(server.log_text())
    seconds = 6
    floods = [lab.flood("mob", addr, idle=nofile + 100, slow=100, seconds=seconds, slow_every=2,
                        stdout=subprocess.PIPE)
              for addr in (server.address, agent.address)]
    try:
        time.sleep(1)  # let the flood build up (a start, not a timing assertion)
        t0 = time.monotonic()
        assert c.ctl("status", timeout=60)
        took = time.monotonic() - t0
        (app / "conf.ini").write_text("[main]\nport = 9090\n")
        res = c.ctl_run("--json", "backup-now", node, str(app), "--wait", timeout=90)
        rec = json.loads(res.stdout) if res.stdout.strip() else {}
        # Through the agent's flood: stored, or (its handshake evicted by the flood) failed
        # cleanly and retried until stored.
        if rec.get("outcome") != "stored":
            assert_failed_cleanly(c, node, app, rec)
            wait_for(lambda: after(c.log(node, app), rec["id"], "stored"), timeout=120,
                     what="the retry of the backup that failed in the flood")
        print(f"backup through the agent's flood: {rec.get('outcome')} {rec.get('error') or ''}")
        t1 = time.monotonic()
        assert c.ctl("status", timeout=60)
        print(f"ctl status under flood: {took:.3f} s, {time.monotonic() - t1:.3f} s")
    finally:
        counts = []
        for p in floods:
            out, _ = p.communicate(timeout=seconds + 30)
            counts.append(json.loads(out.decode().strip().splitlines()[-1]))
    during = server.log_text()[mark:]
    lines = during.splitlines()
    print(f"flood at server, agent: {counts}; the server logged {len(lines)} lines "
          f"({len(during)} B) meanwhile")
    assert all(k["opened"] > nofile for k in counts), counts  # the flood did happen
    assert server.alive() and agent.alive()
    assert "Traceback" not in during, during[-3000:]
    # Refusals and accept errors are rate-limited: nowhere near a line per socket.
    assert len(lines) < counts[0]["opened"] // 4, during[-3000:]


def test_lab_sweeps_the_leftovers_of_a_crashed_run(tmp_path: Path) -> None:
    if not have_root():
        pytest.skip("network namespaces need root")
    prefix = "dbkpsweep-"

    def mine() -> list[str]:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
        return [line.split()[0] for line in out.stdout.splitlines() if line.startswith(prefix)]

    # A run that dies with its lab up (kill -9: no teardown), a process still inside it.
    script = ("import sys, time; from deltabkp.testing import NetLab\n"
              f"lab = NetLab(['a', 'b'], prefix={prefix!r}).__enter__()\n"
              "lab.popen('a', ['sleep', '600'])\n"
              "print('up', flush=True); time.sleep(600)\n")
    crashed = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert crashed.stdout is not None and crashed.stdout.readline().strip() == "up"
    finally:
        crashed.kill()
        crashed.wait(30)
    left = mine()
    assert len(left) == 3, left  # hub, a, b
    with NetLab(["a"], prefix=prefix) as lab:
        assert sorted(mine()) == sorted([lab.hub, lab["a"].netns])  # the crashed run's are gone
    assert mine() == []
