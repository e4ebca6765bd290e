"""The server in-process over real TCP, against a scripted protocol peer.

``deltabkp.testing.ScriptedAgent`` speaks protocol v1 exactly like an agent but serves plain
byte strings as "archives" and can misbehave on purpose (wrong hash, hang-up mid-stream,
refusals), which the real agent never does: these are the server's fault paths (integrity
fallback to a full transfer, partial files removed, every attempt logged).  The end-to-end
behaviour with the real agent and the real ``deltabkp ctl`` is in ``tests/test_e2e*.py``.
"""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import blake3
import pytest
import trio

import deltabkp
from deltabkp import net, protocol
from deltabkp.errors import AuthError, RequestRefused
from deltabkp.testing import ScriptedAgent
from deltabkp_server import control
from deltabkp_server.execution import ExecutionSettings
from deltabkp_server.model import ExecutionResult
from deltabkp_server.scheduler import RETRY_CAP_S, backoff_delay
from deltabkp_server.server import Server, configure_logging

KEY = b"s" * 32
OTHER_KEY = b"o" * 32

configure_logging()


async def ctl(address: str, op: str, key: bytes = KEY, **args: Any) -> Any:
    with trio.fail_after(60):
        chan = await net.connect(net.Address.parse(address), key=key, role="ctl")
        async with chan:
            await chan.send(protocol.Request(op, args))
            if protocol.ControlSession.ANSWERS.get(op) == "streaming rows":  # log, list
                rows: list[Any] = []
                while not isinstance(msg := await chan.receive(60), protocol.RowsEnd):
                    assert isinstance(msg, protocol.Rows)
                    rows += msg.rows
                return rows
            return (await chan.receive_a(protocol.Response, timeout=60)).data


@pytest.fixture
async def agent(nursery: trio.Nursery) -> AsyncIterator[ScriptedAgent]:
    a = ScriptedAgent(key=KEY)
    await nursery.start(a.serve)
    yield a
    a.stop()


async def _start_server(
    nursery: trio.Nursery, data_dir: Path, settings: ExecutionSettings
) -> tuple[Server, trio.CancelScope]:
    srv = Server(data_dir=data_dir, key=KEY, host="127.0.0.1", port=0, settings=settings)
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await srv.run(task_status=task_status)

    await nursery.start(run)
    return srv, scope


@pytest.fixture
async def server(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Server]:
    srv, scope = await _start_server(
        nursery, tmp_path / "data", ExecutionSettings(keep=3, connect_timeout=5, idle_timeout=10)
    )
    yield srv
    scope.cancel()


def _files(srv: Server) -> list[str]:
    return sorted(str(p.relative_to(srv.data_dir / "archives")) for p in (srv.data_dir / "archives").rglob("*") if p.is_file())


async def _files_become(srv: Server, want: list[str]) -> list[str]:
    """``_files`` once older versions are reverse deltas (``backup-now --wait`` answers at the
    commit; the conversion follows it in the same execution)."""
    with trio.move_on_after(30):
        while _files(srv) != want:
            await trio.sleep(0.05)
    return _files(srv)


async def _register(srv: Server, agent: ScriptedAgent, path: str = "/srv/app", every: str = "1h") -> dict[str, Any]:
    out = await ctl(srv.address, "register", node=agent.address, path=path, every=every)
    # Registration makes the target due at once: wait for that first execution to finish so
    # that each test starts from a known state — its row closes at the archive's commit, the
    # target leaves "running" once the signature and retention that follow are done too.
    with trio.fail_after(30):
        while not await ctl(srv.address, "log", node=agent.address, path=path) or any(
            e["outcome"] is None for e in await ctl(srv.address, "log", node=agent.address, path=path)
        ) or any(t["state"] == "running" for t in await ctl(srv.address, "targets")
                 if t["node"] == agent.address and t["path"] == path):
            await trio.sleep(0.02)
    return out


async def test_first_backup_then_delta_then_unchanged(server: Server, agent: ScriptedAgent) -> None:
    base = os.urandom(300_000)
    agent.content["/srv/app"] = base
    reg = await _register(server, agent)
    assert reg["every_seconds"] == 3600 and "warning" not in reg
    [first] = await ctl(server.address, "list", node=agent.address, path="/srv/app")
    assert first["size"] == len(base) and first["retained"] and first["seq"] == 1
    assert first["hash"] == blake3.blake3(base).hexdigest()
    assert first["transferred"] > len(base)  # all literals, plus framing
    # The signature is made after the commit that closes the execution's row.
    assert await _files_become(server, ["1/1.sig", "1/1.tgz"]) == ["1/1.sig", "1/1.tgz"]
    assert (server.data_dir / "archives/1/1.tgz").read_bytes() == base
    # The stored signature is the one the engine would compute for the archive.
    assert deltabkp.Signature.parse((server.data_dir / "archives/1/1.sig").read_bytes()).base_hash == blake3.blake3(base).digest()

    new = base[:100_000] + b"a small edit" + base[100_000:]
    agent.content["/srv/app"] = new
    rec = await ctl(server.address, "backup-now", node=agent.address, path="/srv/app", wait=True)
    assert rec["outcome"] == "stored" and rec["archive_size"] == len(new)
    assert rec["transferred"] < len(new) // 10  # only the changed blocks and the signature
    assert agent.signatures_received == 1
    assert agent.requests[-1].base_hash == blake3.blake3(base).digest()
    assert (server.data_dir / "archives/1/2.tgz").read_bytes() == new
    want = ["1/1.rdelta", "1/2.sig", "1/2.tgz"]
    assert await _files_become(server, want) == want
    sig2 = deltabkp.Signature.parse((server.data_dir / "archives/1/2.sig").read_bytes())
    assert sig2.base_hash == blake3.blake3(new).digest() and sig2.base_size == len(new)

    rec = await ctl(server.address, "backup-now", node=agent.address, path="/srv/app", wait=True)
    assert rec["outcome"] == "unchanged" and rec["seq"] == 2
    assert len(await ctl(server.address, "list", node=agent.address, path="/srv/app")) == 2
    log = await ctl(server.address, "log", node=agent.address, path="/srv/app")
    assert [e["outcome"] for e in log] == ["unchanged", "stored", "stored"]
    assert log[1]["changed"] == 1 and log[1]["changed_detail"] == [["a.log", "grew while read"]]


async def test_integrity_failure_falls_back_to_a_full_transfer(server: Server, agent: ScriptedAgent) -> None:
    agent.content["/srv/app"] = os.urandom(100_000)
    await _register(server, agent)
    new = agent.content["/srv/app"] + b"more"
    agent.content["/srv/app"] = new
    agent.corrupt_next = 1
    rec = await ctl(server.address, "backup-now", node=agent.address, path="/srv/app", wait=True)
    assert rec["outcome"] == "stored"
    assert "full transfer" in rec["note"]
    assert [r.base_hash is None for r in agent.requests[-2:]] == [False, True]
    assert (server.data_dir / "archives/1/2.tgz").read_bytes() == new
    assert rec["transferred"] > len(new)  # both attempts are counted
    want = ["1/1.rdelta", "1/2.sig", "1/2.tgz"]  # 1 is now a reverse delta against 2
    assert await _files_become(server, want) == want


async def test_integrity_failure_twice_is_failed_and_stores_nothing(server: Server, agent: ScriptedAgent) -> None:
    agent.content["/srv/app"] = os.urandom(50_000)
    await _register(server, agent)
    agent.content["/srv/app"] += b"x"
    agent.corrupt_next = 2
    rec = await ctl(server.address, "backup-now", node=agent.address, path="/srv/app", wait=True)
    assert rec["outcome"] == "failed" and agent.address in rec["error"] and "/srv/app" in rec["error"]
    assert "blake3" in rec["error"] or "differs" in rec["error"]
    assert len(await ctl(server.address, "list", node=agent.address, path="/srv/app")) == 1
    assert _files(server) == ["1/1.sig", "1/1.tgz"]
    [t] = await ctl(server.address, "targets")
    assert t["state"] == "retrying" and t["last_outcome"] == "failed"


async def test_hang_up_mid_stream_leaves_no_partial_file(server: Server, agent: ScriptedAgent) -> None:
    agent.content["/srv/app"] = os.urandom(400_000)
    agent.hang_up_after_chunks = 2
    await _register(server, agent)
    [e] = await ctl(server.address, "log")
    assert e["outcome"] == "failed" and "connection" in e["error"]
    assert e["transferred"] > 100_000  # what did cross is still accounted
    assert _files(server) == []
    assert await ctl(server.address, "list", node=agent.address, path="/srv/app") == []


async def test_refusal_by_the_agent_is_logged(server: Server, agent: ScriptedAgent) -> None:
    agent.content["/srv/app"] = b"x"
    agent.refuse = "not under an allowed root"
    await _register(server, agent)
    [e] = await ctl(server.address, "log")
    assert e["outcome"] == "failed" and "path-not-allowed" in e["error"] and "/srv/app" in e["error"]
    # A refusal is not an outage: no retry storm, the next try is the next period.
    [t] = await ctl(server.address, "targets")
    # "failing": the last finished execution failed, and no retry is pending.
    assert t["state"] == "failing" and t["last_outcome"] == "failed" and "path-not-allowed" in t["last_error"]
    assert t["next_due"] > e["ended"]
    assert len(agent.requests) == 1


async def test_retention_keeps_newest_and_lists_all(server: Server, agent: ScriptedAgent) -> None:
    agent.content["/srv/app"] = b"v0" * 1000
    await _register(server, agent)
    for i in range(1, 5):
        agent.content["/srv/app"] = f"v{i}".encode() * 1000
        rec = await ctl(server.address, "backup-now", node=agent.address, path="/srv/app", wait=True)
        assert rec["outcome"] == "stored"
    # --wait answers at the commit; the signature, retention (rows first) and the conversion
    # follow it: once the older versions are converted, the rows are rotated too.
    want = ["1/3.rdelta", "1/4.rdelta", "1/5.sig", "1/5.tgz"]  # older ones: reverse deltas
    assert await _files_become(server, want) == want
    listed = await ctl(server.address, "list", node=agent.address, path="/srv/app")
    assert [a["seq"] for a in listed] == [5, 4, 3, 2, 1]
    assert [a["retained"] for a in listed] == [True, True, True, False, False]  # keep=3 here
    # A rotated-out version cannot be fetched; a retained one can, byte for byte.
    with pytest.raises(RequestRefused) as ei:
        await ctl(server.address, "fetch", node=agent.address, path="/srv/app", seq=1)
    assert ei.value.code == "not-found" and "rotated out" in ei.value.message
    async with await net.connect(net.Address.parse(server.address), key=KEY, role="ctl") as chan:
        await chan.send(protocol.Request("fetch", {"node": agent.address, "path": "/srv/app"}))
        meta = (await chan.receive_a(protocol.Response)).data
        got = b""
        while not isinstance(m := await chan.receive(), protocol.DataEnd):
            assert isinstance(m, protocol.DataChunk)
            got += m.data
    assert meta["seq"] == 5 and got == b"v4" * 1000


async def test_bad_requests_are_refused_and_change_nothing(server: Server, agent: ScriptedAgent) -> None:
    agent.content["/srv/app"] = b"x" * 100
    await _register(server, agent)
    before = (await ctl(server.address, "targets"), await ctl(server.address, "log"))
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("register", {"node": agent.address, "path": "/srv/app", "every": "5"}, "exists"),
        ("register", {"node": agent.address, "path": "/srv/other", "every": "0"}, "invalid"),
        ("register", {"node": agent.address, "path": "/srv/other", "every": "soon"}, "invalid"),
        ("register", {"node": "no-port", "path": "/srv/other", "every": "5"}, "invalid"),
        ("register", {"node": agent.address, "path": "relative", "every": "5"}, "invalid"),
        ("register", {"node": agent.address, "path": "/etc", "every": "5"}, "refused"),
        ("register", {"node": agent.address, "every": "5"}, "invalid"),
        ("unregister", {"node": agent.address, "path": "/srv/nope"}, "not-found"),
        ("list", {"node": agent.address, "path": "/srv/nope"}, "not-found"),
        ("backup-now", {"node": agent.address, "path": "/srv/nope"}, "not-found"),
        ("log", {"limit": -1}, "invalid"),
        ("log", {"limit": "5"}, "invalid"),
        ("log", {"outcome": "exploded"}, "invalid"),
        ("log", {"since": "yesterday"}, "invalid"),
        ("log", {"node": agent.address, "path": "/srv/nope"}, "not-found"),
        ("frobnicate", {}, "invalid"),
    ]
    for op, args, code in cases:
        with pytest.raises(RequestRefused) as ei:
            await ctl(server.address, op, **args)
        assert ei.value.code == code, (op, args, ei.value.message)
        if "node" in args and args.get("path", "").startswith("/"):
            assert args["path"] in ei.value.message
    assert (await ctl(server.address, "targets"), await ctl(server.address, "log")) == before


async def test_register_unreachable_agent_is_accepted_with_a_warning(server: Server) -> None:
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reg = await ctl(server.address, "register", node=f"127.0.0.1:{port}", path="/srv/app", every="1h")
    assert "warning" in reg and f"127.0.0.1:{port}" in reg["warning"]
    with trio.fail_after(20):
        while not (log := await ctl(server.address, "log")) or log[0]["outcome"] is None:
            await trio.sleep(0.02)
    assert log[0]["outcome"] == "failed" and "cannot connect" in log[0]["error"]
    [t] = await ctl(server.address, "targets")
    assert t["state"] == "retrying"


async def test_unregister_stops_backups(server: Server, agent: ScriptedAgent) -> None:
    agent.content["/srv/app"] = b"x" * 100
    await _register(server, agent, every="1s")
    out = await ctl(server.address, "unregister", node=agent.address, path="/srv/app")
    assert out == {"node": agent.address, "path": "/srv/app"}
    # Executions, not rows: unchanged checks fold into one row whose count grows.
    n = sum(e["count"] for e in await ctl(server.address, "log", limit=0))
    await trio.sleep(2.5)  # more than two periods: nothing more may run
    assert sum(e["count"] for e in await ctl(server.address, "log", limit=0)) == n
    assert await ctl(server.address, "targets") == []
    # History stays queryable after unregister.
    assert len(await ctl(server.address, "list", node=agent.address, path="/srv/app")) == 1


async def test_wrong_key_gets_nothing(server: Server) -> None:
    address = net.Address.parse(server.address)
    with pytest.raises(AuthError):
        await net.connect(address, key=OTHER_KEY, role="ctl")
    # Raw bytes without a handshake: an error frame at most, then the connection closes.
    stream = await trio.open_tcp_stream(address.host, address.port)
    async with stream:
        await stream.send_all(protocol.encode(protocol.Request("targets", {})))
        got = b""
        with trio.fail_after(15):
            while chunk := await stream.receive_some(65536):
                got += chunk
    dec = protocol.FrameDecoder()
    dec.feed(got)
    msgs = []
    while (m := dec.next_message()) is not None:
        msgs.append(m)
    assert all(isinstance(m, protocol.Error) for m in msgs) and len(msgs) <= 1
    assert (await ctl(server.address, "status"))["targets"] == 0  # still serving


async def test_status(server: Server) -> None:
    st = await ctl(server.address, "status")
    assert st["listen"] == server.address and st["targets"] == 0 and st["running"] == 0
    assert st["data_dir"] == str(server.data_dir)


async def test_announce_runs_a_pending_retry_at_once(server: Server, nursery: trio.Nursery) -> None:
    first = ScriptedAgent(key=KEY, content={"/srv/app": b"one" * 100})
    await nursery.start(first.serve)
    port = net.Address.parse(first.address).port
    await _register(server, first)
    first.cancel_scope.cancel()  # the node goes down
    await trio.sleep(0.1)
    rec = await ctl(server.address, "backup-now", node=first.address, path="/srv/app", wait=True)
    assert rec["outcome"] == "failed"
    [t] = await ctl(server.address, "targets")
    assert t["state"] == "retrying"
    second = ScriptedAgent(key=KEY, content={"/srv/app": b"two" * 100}, port=port)
    await nursery.start(second.serve)
    async with await net.connect(net.Address.parse(server.address), key=KEY, role="agent") as chan:
        await chan.send(protocol.Announce("127.0.0.1", port))
        await chan.receive_a(protocol.Ack)
    with trio.fail_after(20):
        while (log := await ctl(server.address, "log"))[0]["outcome"] != "stored":
            await trio.sleep(0.02)
    assert log[0]["trigger"] in ("announce", "retry")
    # The execution is recorded before its lease is released: "running" until then.
    with trio.fail_after(20):
        while (t := (await ctl(server.address, "targets"))[0])["state"] == "running":
            await trio.sleep(0.02)
    assert t["state"] == "ok" and t["last_error"] is None
    second.cancel_scope.cancel()


@pytest.mark.parametrize(("overall", "per_node"), [(4, 1), (1, 3), (2, 2)])
async def test_concurrency_limits_per_node_and_overall(
    nursery: trio.Nursery, tmp_path: Path, overall: int, per_node: int
) -> None:
    shared, gate = [0, 0], trio.Event()
    agent = ScriptedAgent(key=KEY, gate=gate, shared=shared)
    await nursery.start(agent.serve)
    other = ScriptedAgent(key=KEY, gate=gate, shared=shared)
    await nursery.start(other.serve)
    srv = Server(data_dir=tmp_path / "d", key=KEY, host="127.0.0.1", port=0,
                 max_concurrent=overall, max_per_node=per_node)
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await srv.run(task_status=task_status)

    await nursery.start(run)
    for i in range(3):
        for a in (agent, other):
            a.content[f"/srv/p{i}"] = os.urandom(1000)
            await ctl(srv.address, "register", node=a.address, path=f"/srv/p{i}", every="1h")
    # Six targets are due; the limits admit exactly this many, which then wait at the gate.
    expected = min(overall, 2 * per_node)
    with trio.fail_after(30):
        # The server claims as many as it has slots for (leaving the rest to other servers);
        # of those, the per-node limits let only `expected` reach the agents.
        while shared[0] < expected or (await ctl(srv.address, "status"))["running"] < min(overall, 6):
            await trio.sleep(0.01)
    gate.set()
    with trio.fail_after(30):
        while len([e for e in await ctl(srv.address, "log") if e["outcome"] == "stored"]) < 6:
            await trio.sleep(0.05)
    assert agent.max_active <= per_node and other.max_active <= per_node
    assert shared[1] == expected
    scope.cancel()


def test_backoff_is_capped_by_the_cap_and_the_period() -> None:
    rng = random.Random(1)
    for attempt in range(1, 40):
        d = backoff_delay(attempt, 3600, rng)
        raw = min(RETRY_CAP_S, 2 ** (attempt - 1))
        assert raw / 2 <= d <= raw
    assert all(backoff_delay(a, 5, rng) <= 5 for a in range(1, 20))


async def test_reregister_during_a_running_execution_runs_one_at_a_time(
    server: Server, nursery: trio.Nursery
) -> None:
    gate = trio.Event()
    agent = ScriptedAgent(key=KEY, content={"/srv/app": b"data" * 100}, gate=gate)
    await nursery.start(agent.serve)
    await ctl(server.address, "register", node=agent.address, path="/srv/app", every="1h")
    with trio.fail_after(20):
        while agent.active < 1:
            await trio.sleep(0.01)
    await ctl(server.address, "unregister", node=agent.address, path="/srv/app")
    await ctl(server.address, "register", node=agent.address, path="/srv/app", every="1h")
    [t] = await ctl(server.address, "targets")
    assert t["state"] == "running"
    await trio.sleep(0.3)  # give a wrongly started second execution time to show up
    assert agent.max_active == 1
    gate.set()
    with trio.fail_after(20):
        while len(log := await ctl(server.address, "log")) < 2 or any(e["outcome"] is None for e in log):
            await trio.sleep(0.02)
    assert [e["outcome"] for e in log] == ["unchanged", "stored"]
    assert agent.max_active == 1


# -- the deltabkp-server command -------------------------------------------------------------


def _server_cmd(*args: str, timeout: float = 30) -> "subprocess.CompletedProcess[str]":
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "deltabkp_server", *args], capture_output=True, text=True, timeout=timeout
    )


def test_server_cli_help_names_the_defaults() -> None:
    res = _server_cmd("--help")
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    assert "127.0.0.1:7470" in text and "~/.local/share/deltabkp" in text and "./deltabkp-data" in text


def test_server_cli_errors_are_one_clear_line(tmp_path: Path) -> None:
    import socket

    res = _server_cmd("--listen", "nonsense:x", "--data-dir", str(tmp_path / "d"))
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "deltabkp-server: error: bad address 'nonsense:x': port 'x' is not a number"
    ]
    key = tmp_path / "k"
    key.write_text("k" * 40)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = _server_cmd("--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "d"), "--key-file", str(key))
    assert res.returncode == 1 and "cannot listen" in res.stderr and "Traceback" not in res.stderr
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "catalog.sqlite3").write_bytes(b"this is not a database" * 100)
    res = _server_cmd("--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "bad"), "--key-file", str(key))
    assert res.returncode == 1 and "catalog" in res.stderr and "Traceback" not in res.stderr
    res = _server_cmd("--max-concurrent", "0", "--data-dir", str(tmp_path / "d"), "--key-file", str(key))
    assert res.returncode == 2 and "--max-concurrent" in res.stderr


async def test_a_base_left_unsigned_is_signed_by_the_next_backup_not_missing(
    server: Server, agent: ScriptedAgent
) -> None:
    """A crash between the archive's commit and its signature's write (here: the signature
    removed): the next backup still patches against that base, whose signature the server
    makes again from the archive; nothing is marked missing, no full transfer."""
    base = os.urandom(300_000)
    agent.content["/srv/app"] = base
    await _register(server, agent)
    assert await _files_become(server, ["1/1.sig", "1/1.tgz"]) == ["1/1.sig", "1/1.tgz"]
    (server.data_dir / "archives" / "1" / "1.sig").unlink()
    new = base[:100_000] + b"a small edit" + base[100_000:]
    agent.content["/srv/app"] = new
    rec = await ctl(server.address, "backup-now", node=agent.address, path="/srv/app", wait=True)
    assert rec["outcome"] == "stored" and rec["note"] is None, rec
    assert rec["transferred"] < len(new) // 10  # a delta against the base, not a full transfer
    assert agent.signatures_received == 1
    assert agent.requests[-1].base_hash == blake3.blake3(base).digest()
    listed = await ctl(server.address, "list", node=agent.address, path="/srv/app")
    assert [(a["seq"], a["retained"], a["missing"]) for a in listed] == [(2, True, False), (1, True, False)]
    assert (server.data_dir / "archives/1/2.tgz").read_bytes() == new
    want = ["1/1.rdelta", "1/2.sig", "1/2.tgz"]  # 1 converted against 2 (signed too)
    assert await _files_become(server, want) == want
    sig2 = deltabkp.Signature.parse((server.data_dir / "archives/1/2.sig").read_bytes())
    assert sig2.base_hash == blake3.blake3(new).digest()


async def test_a_lost_base_archive_falls_back_to_a_full_transfer(server: Server, agent: ScriptedAgent) -> None:
    agent.content["/srv/app"] = os.urandom(50_000)
    await _register(server, agent)
    assert await _files_become(server, ["1/1.sig", "1/1.tgz"]) == ["1/1.sig", "1/1.tgz"]
    (server.data_dir / "archives" / "1" / "1.tgz").unlink()  # e.g. removed by hand
    agent.content["/srv/app"] += b"more"
    rec = await ctl(server.address, "backup-now", node=agent.address, path="/srv/app", wait=True)
    assert rec["outcome"] == "stored" and "full transfer" in rec["note"] and "unreadable" in rec["note"]
    assert agent.requests[-1].base_hash is None
    listed = await ctl(server.address, "list", node=agent.address, path="/srv/app")
    assert [(a["seq"], a["retained"], a["missing"]) for a in listed] == [(2, True, False), (1, False, True)]
    assert (server.data_dir / "archives/1/2.tgz").read_bytes() == agent.content["/srv/app"]


async def test_an_archive_over_the_size_limit_is_refused_and_not_stored(
    nursery: trio.Nursery, tmp_path: Path, agent: ScriptedAgent
) -> None:
    srv, scope = await _start_server(
        nursery, tmp_path / "data",
        ExecutionSettings(connect_timeout=5, idle_timeout=10, max_archive_size=100_000),
    )
    agent.content["/srv/app"] = os.urandom(150_000)
    await _register(srv, agent)
    [ex] = await ctl(srv.address, "log", node=agent.address, path="/srv/app")
    assert ex["outcome"] == "failed" and "100000" in ex["error"], ex
    assert await ctl(srv.address, "list", node=agent.address, path="/srv/app") == []
    assert _files(srv) == []
    scope.cancel()


async def test_a_log_larger_than_a_frame_streams_and_a_row_too_large_is_a_clear_refusal(
    server: Server, agent: ScriptedAgent
) -> None:
    agent.content["/srv/app"] = b"x" * 100
    await _register(server, agent)
    [target] = await server.catalog.call(lambda c: c.targets())

    def fill(c: Any) -> None:  # a long history: 300 failures with long errors (> 1 MiB)
        for i in range(300):
            eid = c.start_execution(target.id, 10.0 + i, "manual")
            c.finish_execution(eid, ExecutionResult(outcome="failed", ended=11.0 + i, error="e" * 4000))

    await server.catalog.call(fill)
    everything = await ctl(server.address, "log", limit=0)  # > 1 MiB: many rows messages
    assert len(everything) == 301 and everything[-1]["outcome"] == "stored"
    assert [e["id"] for e in everything] == sorted((e["id"] for e in everything), reverse=True)
    assert len(await ctl(server.address, "log")) == 50  # the default: the newest 50
    assert await ctl(server.address, "log", limit=7, outcome="stored") == everything[-1:]

    def huge(c: Any) -> None:  # one row that no frame can carry
        eid = c.start_execution(target.id, 400.0, "manual")
        c.finish_execution(eid, ExecutionResult(outcome="failed", ended=401.0, error="e" * (1 << 21)))

    await server.catalog.call(huge)
    with pytest.raises(RequestRefused) as ei:
        await ctl(server.address, "log", limit=3)
    assert ei.value.code == "refused" and "too large to send" in ei.value.reason
    # Nothing else is broken: rows around it still come, and the server keeps serving.
    since = "1970-01-01T00:05:00+00:00"  # 300 s: the last ten of the fill, and the big one
    with pytest.raises(RequestRefused, match="too large to send"):
        await ctl(server.address, "log", limit=0, since=since)
    assert await ctl(server.address, "log", limit=7, outcome="stored") == everything[-1:]
    assert (await ctl(server.address, "status"))["targets"] == 1


async def test_backup_now_wait_answers_when_the_row_closes_not_at_a_poll(
    server: Server, agent: ScriptedAgent, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With the catalog poll an hour apart, only the executor's wake-up can answer --wait:
    # for a stored archive (closed at its commit, before retention) and for a failure.
    monkeypatch.setattr(control, "WAIT_POLL_S", 3600.0)
    agent.content["/srv/app"] = os.urandom(50_000)
    await _register(server, agent)
    for content, refuse, outcome in ((os.urandom(60_000), None, "stored"), (b"", "no", "failed")):
        agent.content["/srv/app"], agent.refuse = content, refuse
        agent.gate = trio.Event()
        got: dict[str, Any] = {}

        async def wait(got: dict[str, Any] = got) -> None:
            got["rec"] = await ctl(server.address, "backup-now", node=agent.address,
                                   path="/srv/app", wait=True)

        nursery.start_soon(wait)
        with trio.fail_after(30):
            while not agent.active:  # the execution runs, held at the agent: --wait waits
                await trio.sleep(0.01)
        await trio.sleep(0.1)  # let --wait look at the catalog first (either order passes)
        agent.gate.set()
        with trio.fail_after(30):  # an hour if nothing woke it
            while "rec" not in got:
                await trio.sleep(0.01)
        assert got["rec"]["outcome"] == outcome


async def test_a_stored_row_stays_stored_when_its_rotation_fails(
    server: Server, agent: ScriptedAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    # --wait answers at the archive's commit; retention and conversion come after. Their
    # failure is logged, and must not rewrite the row --wait already reported as stored.
    from deltabkp.errors import CatalogError
    from deltabkp_server import execution

    async def failing_rotate(*args: Any, **kwargs: Any) -> None:
        raise CatalogError("catalog went away during retention")

    agent.content["/srv/app"] = os.urandom(50_000)
    await _register(server, agent)
    monkeypatch.setattr(execution, "rotate", failing_rotate)
    agent.content["/srv/app"] = os.urandom(60_000)
    rec = await ctl(server.address, "backup-now", node=agent.address, path="/srv/app", wait=True)
    assert rec["outcome"] == "stored", rec
    with trio.fail_after(30):  # the execution's end, after its (failed) rotation
        while server.scheduler.executor.live:
            await trio.sleep(0.01)
    log = await ctl(server.address, "log", node=agent.address, path="/srv/app")
    assert [e["outcome"] for e in log] == ["stored", "stored"], log
