"""``--metrics-listen``: Prometheus metrics of the real daemons, and the HTTP plumbing they share.

End to end (real server, agent and ctl processes): the counters follow real backups — the
server's executions by outcome match its execution log, its wire bytes are exactly the log's
bytes, the agent's builds and requests match what it served; an unreachable node shows as
such; a non-loopback address is refused without ``--metrics-allow-remote``; a taken port is a
one-line error.  In process: ``serve_http`` with a real hypercorn and a real HTTP client
(read-only, bounded, a handler's bug is a 500), two daemons' registries side by side, and
``LiveBytes`` moving while a transfer runs.
"""

from __future__ import annotations

import random
import re
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from helpers_proc import Cluster, Daemon, cluster, exe, wait_for  # noqa: F401
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from deltabkp.net import Address, is_loopback, load_key
from deltabkp.net import _http as net_http
from deltabkp.testing import ScriptedAgent
from deltabkp_agent.metrics import AgentMetrics
from deltabkp_server.metrics import ServerMetrics

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
METRICS_LINE = re.compile(r"metrics on (http://\S+)/metrics")


def metrics_url(daemon: object) -> str:
    """The base URL the daemon logged (it logs it before its ready line)."""
    m = METRICS_LINE.search(daemon.log_text())  # type: ignore[attr-defined]
    assert m, daemon.log_text()  # type: ignore[attr-defined]
    return m.group(1)


def scrape(base: str) -> Samples:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text) for s in fam.samples
    }


def val(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def start_agent_with_metrics(c: Cluster, *allow: Path) -> Daemon:
    """``Cluster.start_agent`` plus ``--metrics-listen`` (announcing to the cluster's server)."""
    assert c.server is not None
    cmd = [exe("deltabkp-agent"), "--listen", "127.0.0.1:0", "--key-file", str(c.key_file),
           "--server", c.server.address, "--metrics-listen", "127.0.0.1:0"]
    for a in allow:
        cmd += ["--allow", str(a)]
    agent = Daemon("deltabkp-agent", cmd, c._log("agent"), c.env)
    c.agents.append(agent)
    return agent


def make_tree(root: Path) -> Path:
    app = root / "app"
    (app / "data").mkdir(parents=True)
    (app / "data" / "a.txt").write_text("".join(f"line {i}\n" for i in range(3000)))
    (app / "data" / "b.bin").write_bytes(bytes(range(256)) * 200)
    return app


def test_counters_follow_real_backups(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    app = make_tree(tmp_path)
    server = c.start_server("--metrics-listen", "127.0.0.1:0")
    agent = start_agent_with_metrics(c, tmp_path)
    s_url, a_url = metrics_url(server), metrics_url(agent)

    before = scrape(s_url)
    assert val(before, "deltabkp_server_executions_total", outcome="stored") == 0
    assert val(before, "deltabkp_server_wire_bytes_total", direction="sent") == 0
    # The agent announced itself to the server (--server): counted there.
    wait_for(lambda: val(scrape(s_url), "deltabkp_server_agent_announcements_total") >= 1,
             what="the announcement to be counted")

    node, path = agent.address, str(app)
    c.ctl("register", node, path, "--every", "1h")
    rec = c.ctl("backup-now", node, path, "--wait")
    assert rec["outcome"] in ("stored", "unchanged"), rec
    rec = c.ctl("backup-now", node, path, "--wait")
    assert rec["outcome"] == "unchanged", rec

    # A node nobody answers on: a bound socket that does not listen refuses connections.
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        dead_node = f"127.0.0.1:{dead.getsockname()[1]}"
        c.ctl("register", dead_node, "/srv/gone", "--every", "1h")
        # Due at once: its first execution fails; then it only probes (no more executions).
        wait_for(lambda: val(scrape(s_url), "deltabkp_server_executions_total", outcome="failed"),
                 what="the dead node's execution to fail")

        log = c.ctl("log", "--limit", "0")
        by_outcome: dict[str, int] = {}
        for e in log:
            by_outcome[e["outcome"]] = by_outcome.get(e["outcome"], 0) + e["count"]
        # A row may fold several "unchanged" runs: run_transferred has all their bytes.
        wire = sum(e["run_transferred"] for e in log)
        stored = [e for e in log if e["outcome"] == "stored"]
        assert stored and by_outcome.get("failed", 0) >= 1 and by_outcome.get("unchanged", 0) >= 1

        got = scrape(s_url)
        for outcome, n in by_outcome.items():
            assert val(got, "deltabkp_server_executions_total", outcome=outcome) == n, outcome
        # The counters are the channels' own: equal to the log's bytes, to the byte.
        sent = val(got, "deltabkp_server_wire_bytes_total", direction="sent")
        received = val(got, "deltabkp_server_wire_bytes_total", direction="received")
        assert sent + received == wire and sent > 0 and received > 0
        assert val(got, "deltabkp_server_archive_size_bytes_count") == len(stored)
        assert val(got, "deltabkp_server_archive_size_bytes_sum") == sum(e["archive_size"] for e in stored)
        assert val(got, "deltabkp_server_execution_duration_seconds_count", outcome="failed") >= 1

        def catalog_gauges() -> Samples | None:
            # Read from the catalog at most every few seconds: wait for the fresh read.
            s = scrape(s_url)
            total = sum(v for (name, _), v in s.items() if name == "deltabkp_server_targets")
            return s if total == 2 and val(s, "deltabkp_server_targets_last_failed") == 1 else None

        g = wait_for(catalog_gauges, what="the targets gauges to show both targets")
        assert val(g, "deltabkp_server_agents", status="seen") == 1
        assert val(g, "deltabkp_server_agents", status="unreachable") == 1

    served = [e for e in log if e["node"] == node]
    unchanged = sum(e["count"] for e in served if e["outcome"] == "unchanged")

    def agent_counted() -> Samples | None:
        # The agent counts a request once it has served it, after its answer (a backup's
        # after-phase: seek points, cache), which the server may have logged long before;
        # one backup's counters move together (``AgentMetrics.backup``, no await between).
        a = scrape(a_url)
        done = (val(a, "deltabkp_agent_requests_total", kind="backup", outcome="sent")
                == len(stored)
                and val(a, "deltabkp_agent_requests_total", kind="backup", outcome="unchanged")
                == unchanged
                and val(a, "deltabkp_agent_requests_total", kind="ping", outcome="ok") >= 1)
        return a if done else None

    # Waited for until they equal the log's counts (a count past them never does: the wait
    # fails), then the rest, which moved with them.
    a = wait_for(agent_counted, what="the agent to count the requests it served")
    assert val(a, "deltabkp_agent_builds_total") >= len(stored)
    assert val(a, "deltabkp_agent_build_bytes_total") >= sum(e["archive_size"] for e in stored)
    assert val(a, "deltabkp_agent_delta_bytes_total") > 0
    assert val(a, "deltabkp_agent_build_seconds_total") > 0
    # Every byte the server received from this agent, the agent sent (plus its pongs).
    from_agent = sum(e["bytes_received"] for e in served)
    assert val(a, "deltabkp_agent_wire_bytes_total", direction="sent") >= from_agent > 0
    assert val(a, "deltabkp_agent_backups_running") == 0


async def test_wire_bytes_move_during_a_backup(cluster: Cluster) -> None:
    """A real server pulls from a scripted agent that holds the backup mid-way (after the
    request, before the delta): the scrape then shows bytes and no finished execution."""
    c = cluster
    server = await trio.to_thread.run_sync(lambda: c.start_server("--metrics-listen", "127.0.0.1:0"))
    url = metrics_url(server)
    gate = trio.Event()
    data = random.Random(5).randbytes(300_000)
    agent = ScriptedAgent(key=load_key(str(c.key_file)), content={"/srv/app": data}, gate=gate)

    async def until(pred: Callable[[Samples], bool], what: str) -> Samples:
        with trio.fail_after(60):  # a deadline, not a timing assertion
            while True:
                got = await trio.to_thread.run_sync(scrape, url)
                if pred(got):
                    return got
                await trio.sleep(0.05)
        raise AssertionError(what)  # pragma: no cover - fail_after raises first

    def finished(s: Samples) -> float:
        return sum(v for (name, _), v in s.items() if name == "deltabkp_server_executions_total")

    async with trio.open_nursery() as nursery:
        await nursery.start(agent.serve)
        # Registering makes the target due at once: its backup starts and waits at the gate.
        await trio.to_thread.run_sync(lambda: c.ctl("register", agent.address, "/srv/app", "--every", "1h"))
        held = await until(
            lambda s: val(s, "deltabkp_server_wire_bytes_total", direction="received") > 0,
            "bytes of the running backup")
        assert agent.active == 1 and finished(held) == 0  # still running: no execution ended
        sent = val(held, "deltabkp_server_wire_bytes_total", direction="sent")
        assert sent > 0  # the handshake and the backup request, counted before the end
        gate.set()
        done = await until(
            lambda s: val(s, "deltabkp_server_executions_total", outcome="stored") == 1,
            "the backup to be stored")
        received = val(done, "deltabkp_server_wire_bytes_total", direction="received")
        assert received - val(held, "deltabkp_server_wire_bytes_total", direction="received") >= len(data)
        agent.stop()


def test_non_loopback_needs_the_explicit_flag(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_text("ab" * 32 + "\n")
    key.chmod(0o600)
    res = subprocess.run(
        [exe("deltabkp-agent"), "--listen", "127.0.0.1:0", "--key-file", str(key), "--allow",
         str(tmp_path), "--metrics-listen", "0.0.0.0:0"],
        capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert "--metrics-allow-remote" in res.stderr and "0.0.0.0:0" in res.stderr


def test_a_taken_metrics_port_is_a_one_line_error(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_text("ab" * 32 + "\n")
    key.chmod(0o600)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = subprocess.run(
            [exe("deltabkp-agent"), "--listen", "127.0.0.1:0", "--key-file", str(key), "--allow",
             str(tmp_path), "--cache-dir", str(tmp_path / "cache"),
             "--metrics-listen", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=60)
    assert res.returncode == 1, res.stderr
    assert f"cannot listen on 127.0.0.1:{port} for metrics" in res.stderr
    assert "Traceback" not in res.stderr


# -- in process: the shared plumbing ---------------------------------------------------------


def _get(url: str, method: str = "GET") -> tuple[int, bytes, dict[str, str]]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


async def test_serve_http_is_read_only_bounded_and_survives_a_bug() -> None:
    import logging

    server, agent = ServerMetrics(), AgentMetrics()
    server.executions.labels("stored").inc(3)
    agent.request("backup", "busy")

    async def boom(_req: net_http.Request) -> net_http.Response:
        raise RuntimeError("a bug in a page")

    log = logging.getLogger("test_metrics.http")
    routes = {"/metrics": net_http.metrics_handler(server.registry), "/boom": boom}
    async with trio.open_nursery() as nursery:
        # Two daemons' registries side by side in one process: no global state shared.
        s = await nursery.start(net_http.serve_http, routes, Address("127.0.0.1", 0), log)
        a = await nursery.start(net_http.serve_http, agent.routes(), Address("127.0.0.1", 0), log)
        assert s.port != 0 and a.port != 0

        def calls() -> dict[str, tuple[int, bytes, dict[str, str]]]:
            base, abase = f"http://{s}", f"http://{a}"
            return {
                "metrics": _get(base + "/metrics"),
                "agent": _get(abase + "/metrics"),
                "health": _get(base + "/healthz"),
                "head": _get(base + "/metrics", "HEAD"),
                "post": _get(base + "/metrics", "POST"),
                "missing": _get(base + "/nope"),
                "long": _get(base + "/metrics?x=" + "a" * (net_http.MAX_QUERY + 1)),
                "boom": _get(base + "/boom"),
            }

        got = await trio.to_thread.run_sync(calls)
        nursery.cancel_scope.cancel()
    status, body, _ = got["metrics"]
    assert status == 200 and b'deltabkp_server_executions_total{outcome="stored"} 3.0' in body
    assert b"deltabkp_agent" not in body
    status, body, _ = got["agent"]
    assert b'deltabkp_agent_requests_total{kind="backup",outcome="busy"} 1.0' in body
    assert b"deltabkp_server" not in body
    assert got["health"][:2] == (200, b"ok\n")
    assert got["head"][0] == 200 and got["head"][1] == b""
    assert got["post"][0] == 405
    assert got["missing"][0] == 404
    assert got["long"][0] == 414
    assert got["boom"][0] == 500


def test_live_bytes_move_while_a_transfer_runs() -> None:
    reg = CollectorRegistry()
    live = net_http.LiveBytes("t_wire_bytes", "test", reg)
    progress = [0, 0]

    def read() -> tuple[int, int]:
        return progress[0], progress[1]

    def sent() -> float:
        fams = text_string_to_metric_families(generate_latest(reg).decode())
        return next(s.value for f in fams for s in f.samples if s.labels == {"direction": "sent"})

    token = live.add(read)
    seen = []
    for n in (10, 500, 4000):
        progress[0] = n
        seen.append(sent())
    live.done(token)
    progress[0] = 99999  # after done, the channel no longer counts
    seen.append(sent())
    with live.track(lambda: (7, 1)):
        seen.append(sent())
    seen.append(sent())
    assert seen == [10, 500, 4000, 4000, 4007, 4007]
    assert live.received == 1


@pytest.mark.parametrize("host, ok", [("127.0.0.1", True), ("::1", True), ("localhost", True),
                                      ("0.0.0.0", False), ("10.1.2.3", False), ("example.org", False)])
def test_loopback_rule(host: str, ok: bool) -> None:
    assert is_loopback(host) is ok
