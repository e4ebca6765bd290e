"""The ``deltabkp-agent`` process: start-up line, bad arguments, a port in use, announce,
SIGTERM mid-backup.

Each test starts the real console script on 127.0.0.1 port 0 and talks to it over TCP as a
server would (``deltabkp.net``), or listens as a server for its announcement.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import trio

from deltabkp import net, protocol
from helpers_proc import Daemon, exe, wait_for

KEY = b"p" * 32


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    p = tmp_path / "cluster.key"
    p.write_bytes(KEY + b"\n")
    p.chmod(0o600)
    return p


def agent_cmd(key_file: Path, *extra: str) -> list[str]:
    return [exe("deltabkp-agent"), "--listen", "127.0.0.1:0", "--key-file", str(key_file), *extra]


def env_for(tmp: Path) -> dict[str, str]:
    return {**os.environ, "HOME": str(tmp / "home"), "PYTHONUNBUFFERED": "1"}


def test_help_and_bad_arguments(tmp_path: Path, key_file: Path) -> None:
    res = subprocess.run([exe("deltabkp-agent"), "--help"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0
    assert "--allow" in res.stdout and "examples:" in res.stdout and "agent-PORT" in res.stdout
    for args, needle in [
        ([], "--allow"),
        (["--allow", str(tmp_path / "missing")], "not an existing directory"),
        (["--allow", str(tmp_path), "--listen", "nohost:"], "missing port"),
        (["--allow", str(tmp_path), "--max-builds", "0"], "--max-builds"),
    ]:
        cmd = [exe("deltabkp-agent"), "--key-file", str(key_file), *args]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=env_for(tmp_path))
        assert res.returncode == 2, (args, res)
        assert needle in res.stderr, (args, res.stderr)


async def test_announces_itself_to_a_server_that_comes_up_late(tmp_path: Path, key_file: Path) -> None:
    """The server is down when the agent starts; the announcement arrives once it is up."""
    # Reserve a port for the "server", then free it: the agent starts while nothing listens.
    probe = trio.socket.socket()
    await probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    agent = await trio.to_thread.run_sync(lambda: Daemon(
        "deltabkp-agent",
        agent_cmd(key_file, "--allow", str(tmp_path), "--server", f"127.0.0.1:{port}",
                  "--cache-dir", str(tmp_path / "cache")),
        tmp_path / "agent.log", env_for(tmp_path),
    ))
    try:
        # The first attempt fails against the closed port (and says so) before we listen.
        await trio.to_thread.run_sync(lambda: wait_for(
            lambda: "announce to server" in agent.log_text() and "failed" in agent.log_text(),
            what="a failed announce in the agent's log",
        ))
        got: list[protocol.Announce] = []
        done = trio.Event()

        async def handle(stream: trio.SocketStream) -> None:
            async with stream:
                chan = await net.accept(stream, key=KEY, role="server", roles=("agent",))
                msg = await chan.receive_a(protocol.Announce)
                await chan.send(protocol.Ack())
                got.append(msg)
                done.set()

        with trio.fail_after(60):
            listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
            async with trio.open_nursery() as n:
                await n.start(trio.serve_listeners, handle, listeners)
                await done.wait()
                n.cancel_scope.cancel()
        assert (got[0].host, got[0].port) == ("127.0.0.1", agent.port)
    finally:
        assert agent.stop() == 0, agent.log_text()


async def test_sigterm_during_a_backup_stops_cleanly(tmp_path: Path, key_file: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    for i in range(30):
        (app / f"blob{i:02}.bin").write_bytes(os.urandom(1_000_000))
    cache = tmp_path / "cache"
    agent = await trio.to_thread.run_sync(lambda: Daemon(
        "deltabkp-agent", agent_cmd(key_file, "--allow", str(app), "--cache-dir", str(cache)),
        tmp_path / "agent.log", env_for(tmp_path),
    ))
    try:
        with trio.fail_after(60):
            async with await net.connect(agent.endpoint, key=KEY, role="server") as chan:
                await chan.send(protocol.BackupRequest(str(app), None, ()))
                assert isinstance(await chan.receive(timeout=30), protocol.DeltaChunk)
                # Mid-stream (the agent waits for us to read): stop it.
                agent.proc.send_signal(signal.SIGTERM)
                rc = await trio.to_thread.run_sync(agent.proc.wait, 30)
        assert rc == 0, agent.log_text()
        assert "SIGTERM: shutting down" in agent.log_text()
        # Nothing half-done was cached.
        assert not list((cache / "sigs").iterdir())
    finally:
        agent.stop()


def test_port_in_use_is_one_line_of_error(tmp_path: Path, key_file: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cmd = [exe("deltabkp-agent"), "--listen", f"127.0.0.1:{port}", "--key-file", str(key_file),
               "--allow", str(tmp_path), "--cache-dir", str(tmp_path / "cache")]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=env_for(tmp_path))
    assert res.returncode == 1, res
    assert "Traceback" not in res.stderr and "ExceptionGroup" not in res.stderr, res.stderr
    [line] = res.stderr.strip().splitlines()
    assert line.startswith("deltabkp-agent: error: cannot listen on") and str(port) in line
    assert res.stdout == ""


def test_listening_line_and_default_cache_dir(tmp_path: Path, key_file: Path) -> None:
    env = env_for(tmp_path)
    env.pop("XDG_CACHE_HOME", None)
    agent = Daemon("deltabkp-agent", agent_cmd(key_file, "--allow", str(tmp_path)),
                   tmp_path / "agent.log", env)
    try:
        assert agent.address.startswith("127.0.0.1:") and agent.port > 0
        deadline = time.monotonic() + 30
        cache = tmp_path / "home" / ".cache" / "deltabkp" / f"agent-{agent.port}"
        while not cache.is_dir():
            assert time.monotonic() < deadline, "the default cache dir was not created"
            time.sleep(0.05)
    finally:
        assert agent.stop() == 0
