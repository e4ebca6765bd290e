"""The agent in-process over real TCP on 127.0.0.1, driven as a server would drive it
(``deltabkp.testing.backup_exchange`` and hand-written exchanges over ``deltabkp.net``).

Covers: the path allowlist (outside a root, ``..``, symlink escape, missing), peers that do
not prove the key (wrong key, garbage, an oversized frame, a request before the handshake)
get one error frame and nothing else, and full backup exchanges checked byte for byte
against a fresh archive build: first backup (all literals), unchanged by fingerprint, a
small delta after a change, the NeedSignature path with an empty cache, unchanged by hash,
a server cancelling, hanging up or no longer reading mid-stream (the build slot and the
path lock are freed), a second backup of a busy path, a server's own error not echoed back,
two paths at once, pings answered during a large backup, and the connection budgets
(silent sockets cannot lock a real server out).
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import attrs
import blake3
import pytest
import trio

import deltabkp
from deltabkp import net, protocol
from deltabkp.errors import AuthError, ErrorCode, PeerUnavailable, RequestRefused
from deltabkp.testing import BackupResult, backup_exchange
from deltabkp_agent import Agent, AgentConfig, Allowlist
from deltabkp_agent.agent import configure_logging

KEY = b"k" * 32
OTHER_KEY = b"x" * 32

configure_logging()


# -- fixtures and the test client ---------------------------------------------------------------


@attrs.define
class Env:
    agent: Agent
    root: Path  # the allowed root
    outside: Path
    cache: Path

    @property
    def endpoint(self) -> net.Address:
        return net.Address.parse(self.agent.address)


async def start_agent(
    nursery: trio.Nursery, tmp: Path, cache: Path | None = None, **config: object
) -> Env:
    root = tmp / "allowed"
    outside = tmp / "outside"
    root.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    cache = cache or tmp / "cache"
    cfg = AgentConfig(
        key=KEY, allow=Allowlist.from_args([str(root)]), host="127.0.0.1", port=0,
        cache_dir=cache, **{"handshake_timeout": 5, **config},  # type: ignore[arg-type]
    )
    agent = Agent(cfg)
    await nursery.start(agent.run)
    return Env(agent, root, outside, cache)


@pytest.fixture
async def env(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Env]:
    yield await start_agent(nursery, tmp_path)


async def connect(env: Env, key: bytes = KEY) -> net.Channel:
    return await net.connect(env.endpoint, key=key, role="server", timeout=5)


async def backup(
    env: Env, path: Path | str, base: bytes | None = None, *, base_sig: bytes | None = None
) -> BackupResult:
    """One BackupRequest as a server makes it; ``base`` is the server's last archive."""
    return await backup_exchange(
        env.endpoint, KEY, str(path), base, base_sig=base_sig, chunk=1000,  # many small chunks
    )


def fresh_archive(root: Path) -> bytes:
    from deltabkp.archive import TgzBuilder

    return b"".join(TgzBuilder(str(root)))


def make_tree(root: Path, files: int = 30, size: int = 4000) -> None:
    (root / "sub" / "deeper").mkdir(parents=True, exist_ok=True)
    for i in range(files):
        d = root / ("sub" if i % 2 else "sub/deeper")
        (d / f"f{i:03}.txt").write_text("".join(f"file {i} line {j}\n" for j in range(size // 16)))
    (root / "bin.dat").write_bytes(os.urandom(50_000))


async def settle(root: Path) -> None:
    """Wait until the tree's fingerprint is no longer racy (its newest change is > 2 s old).

    Only the tests that expect an "unchanged (fingerprint)" answer need this: a racy tree is
    (rightly) never answered from its fingerprint.
    """
    from deltabkp.archive import tree_fingerprint

    with trio.fail_after(30):
        while (await trio.to_thread.run_sync(tree_fingerprint, root)).racy:
            await trio.sleep(0.1)


# -- allowlist ----------------------------------------------------------------------------------


async def test_ping_is_answered_with_the_allowed_roots(env: Env) -> None:
    async with await connect(env) as chan:
        await chan.send(protocol.Ping())
        pong = await chan.receive_a(protocol.Pong)
    assert str(env.root) in pong.info["roots"]
    assert pong.info["node"] == env.agent.address


async def test_ping_with_a_path_gets_the_allowlist_verdict(env: Env) -> None:
    # A link from outside into the root is a legitimate spelling: the agent resolves it.
    os.symlink(env.root, env.outside / "app-link")
    os.symlink(env.outside, env.root / "escape")
    verdicts = {}
    async with await connect(env) as chan:
        for path in (str(env.root), str(env.outside / "app-link"), str(env.root / "escape"),
                     str(env.outside), str(env.root / "missing")):
            await chan.send(protocol.Ping(path))
            verdicts[path] = (await chan.receive_a(protocol.Pong)).info["path_check"]
    assert verdicts[str(env.root)] == {"ok": True}
    assert verdicts[str(env.outside / "app-link")] == {"ok": True}
    assert verdicts[str(env.root / "escape")]["code"] == "path-not-allowed"
    assert verdicts[str(env.outside)]["code"] == "path-not-allowed"
    assert verdicts[str(env.root / "missing")]["code"] == "not-found"
    # The verdict names the path asked about as a field; its message is the bare reason.
    escape = verdicts[str(env.root / "escape")]
    assert escape["path"] == str(env.root / "escape") and "allowed roots" in escape["message"]
    # Where a path really leads is not the server's business (Ping("/proc/1/cwd")).
    assert str(env.outside) not in str(escape)


@pytest.mark.parametrize("how", ["outside", "dotdot", "symlink", "symlink-inside-path", "relative"])
async def test_paths_outside_the_allowed_roots_are_refused(env: Env, how: str) -> None:
    (env.outside / "secret.txt").write_text("not yours\n")
    os.symlink(env.outside, env.root / "escape")
    path = {
        "outside": str(env.outside),
        "dotdot": f"{env.root}/../outside",
        "symlink": str(env.root / "escape"),
        "symlink-inside-path": str(env.root / "escape" / "."),
        "relative": "allowed",
    }[how]
    async with await connect(env) as chan:
        await chan.send(protocol.BackupRequest(path, None, ()))
        with pytest.raises(RequestRefused) as info:
            await chan.receive()
    code = "invalid" if how == "relative" else "path-not-allowed"
    assert info.value.code == code
    assert path in info.value.message and env.agent.address in info.value.message
    # Nothing was archived and nothing was cached.
    assert not any((env.cache / "sigs").iterdir())


async def test_missing_path_inside_a_root_is_not_found(env: Env) -> None:
    async with await connect(env) as chan:
        await chan.send(protocol.BackupRequest(str(env.root / "nope"), None, ()))
        with pytest.raises(RequestRefused) as info:
            await chan.receive()
    assert info.value.code == "not-found" and "nope" in info.value.message


async def test_symlink_that_stays_inside_the_root_is_served(env: Env) -> None:
    make_tree(env.root / "app")
    os.symlink(env.root / "app", env.root / "alias")
    r = await backup(env, env.root / "alias")
    assert r.kind == "delta" and r.done is not None
    assert deltabkp.patch(b"", r.delta) == fresh_archive(env.root / "app")


# -- unauthenticated peers ----------------------------------------------------------------------


def _raw_exchange(address: str, payload: bytes, then: bytes = b"") -> list[protocol.Message]:
    """Send raw bytes inside TLS, read until the agent hangs up; return every frame it sent."""
    endpoint = net.Address.parse(address)
    tls = net.tls_contexts(net.installed_tls(), KEY, "server").client
    with tls.wrap_socket(socket.create_connection((endpoint.host, endpoint.port), timeout=10)) as s:
        s.sendall(payload)
        got = bytearray()
        while True:
            try:
                data = s.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                break
            if not data:
                break
            got += data
            if then:
                try:
                    s.sendall(then)
                except OSError:
                    pass
                then = b""
    dec = protocol.FrameDecoder()
    dec.feed(bytes(got))
    out = []
    while (m := dec.next_message()) is not None:
        out.append(m)
    assert dec.buffered == 0
    return out


async def test_wrong_key_gets_an_auth_error_and_nothing_else(env: Env) -> None:
    # Through deltabkp.net: the agent's proof does not verify under the other key.
    with pytest.raises(AuthError):
        await connect(env, key=OTHER_KEY)
    # Byte by byte: a peer with the wrong key gets the challenge, then one error, then EOF.
    nonce = protocol.new_nonce()
    hello = protocol.encode(
        protocol.Hello(protocol.PROTOCOL_MAGIC, protocol.PROTOCOL_VERSION, "server", nonce)
    )
    bad_auth = protocol.encode(protocol.Auth(b"\0" * 32))
    request = protocol.encode(protocol.BackupRequest(str(env.root), None, ()))
    frames = await trio.to_thread.run_sync(
        _raw_exchange, env.agent.address, hello, bad_auth + request
    )
    assert [type(f) for f in frames] == [protocol.Challenge, protocol.Error]
    assert isinstance(frames[1], protocol.Error) and frames[1].code == "auth"


@pytest.mark.parametrize(
    "payload",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        struct.pack(">I", protocol.MAX_FRAME + 1) + b"\0" * 100,
        protocol.encode(protocol.BackupRequest("/", None, ())),  # a request before the handshake
        protocol.encode(protocol.Hello("NOTDELTA", 1, "server", b"n" * 32)),
        protocol.encode(protocol.Hello(protocol.PROTOCOL_MAGIC, 1, "ctl", b"n" * 32)),  # not served here
    ],
    ids=["http", "oversized-frame", "request-first", "bad-magic", "wrong-role"],
)
async def test_garbage_gets_one_error_frame_then_the_connection_closes(env: Env, payload: bytes) -> None:
    frames = await trio.to_thread.run_sync(_raw_exchange, env.agent.address, payload)
    assert len(frames) == 1 and isinstance(frames[0], protocol.Error), frames
    # And the agent is still fine.
    async with await connect(env) as chan:
        await chan.send(protocol.Ping())
        await chan.receive_a(protocol.Pong)


# -- backups ------------------------------------------------------------------------------------


async def test_backup_exchange_first_unchanged_changed(env: Env) -> None:
    app = env.root / "app"
    make_tree(app)
    await settle(app)
    # First backup: no base, so the delta is all literals and rebuilds the archive from nothing.
    r1 = await backup(env, app)
    assert r1.kind == "delta" and r1.done is not None and not r1.asked_signature
    a1 = bytes(deltabkp.patch(b"", r1.delta))
    assert a1 == fresh_archive(app)
    assert r1.done.archive_hash == blake3.blake3(a1).digest()
    assert r1.done.archive_size == len(a1) and r1.done.files >= 30

    # Nothing changed: answered from the tree fingerprint, no file read, nothing sent.
    r2 = await backup(env, app, a1)
    assert (r2.kind, r2.reason) == ("unchanged", "fingerprint")
    # The archive itself is kept, so no signature of it was made by its build (r1's cache
    # writes are done: they precede the release of the path r2 was served under).
    sig_a1 = env.cache / "sigs" / f"{r1.done.archive_hash.hex()}.sig"
    assert not sig_a1.exists()

    # A small change: the agent's own signature is used (no NeedSignature), made now from
    # the kept archive (and filed), and the delta is small.
    p = app / "sub" / "f001.txt"
    p.write_text(p.read_text().replace("line 100\n", "line one hundred, edited\n"))
    r3 = await backup(env, app, a1)
    assert r3.kind == "delta" and not r3.asked_signature and r3.done is not None
    assert deltabkp.Signature.parse(sig_a1.read_bytes()).base_hash == r1.done.archive_hash
    a2 = bytes(deltabkp.patch(a1, r3.delta))
    assert a2 == fresh_archive(app) and a2 != a1
    assert r3.done.archive_hash == blake3.blake3(a2).digest()
    assert len(r3.delta) < len(a2) // 5, (len(r3.delta), len(a2))

    # The server asking with an old base still gets a correct delta against that base.
    r4 = await backup(env, app, a1)
    assert r4.kind == "delta" and deltabkp.patch(a1, r4.delta) == a2


async def test_empty_cache_asks_for_the_signature(nursery: trio.Nursery, tmp_path: Path) -> None:
    env = await start_agent(nursery, tmp_path)
    app = env.root / "app"
    make_tree(app)
    await settle(app)
    a1 = fresh_archive(app)  # as if another agent (or a lost cache) produced the base

    # Same tree: the agent needs the signature, rebuilds, finds the same hash → unchanged.
    r = await backup(env, app, a1)
    assert r.asked_signature and (r.kind, r.reason) == ("unchanged", "hash")
    # The fingerprint was recorded with that answer: the next check reads no file.
    r = await backup(env, app, a1)
    assert (r.kind, r.reason) == ("unchanged", "fingerprint") and not r.asked_signature

    # A change, on an agent with an empty cache: signature asked for, delta correct.
    env2 = await start_agent(nursery, tmp_path / "second", cache=tmp_path / "cache2")
    app2 = env2.root / "app"
    make_tree(app2)
    b1 = fresh_archive(app2)
    (app2 / "sub" / "new.txt").write_text("new file\n" * 100)
    r = await backup(env2, app2, b1)
    assert r.asked_signature and r.kind == "delta"
    assert deltabkp.patch(b1, r.delta) == fresh_archive(app2)


async def test_a_signature_for_another_base_is_refused(env: Env) -> None:
    app = env.root / "app"
    make_tree(app)
    a1 = fresh_archive(app)
    async with await connect(env) as chan:
        await chan.send(protocol.BackupRequest(str(app), blake3.blake3(a1).digest(), ()))
        assert isinstance(await chan.receive(), protocol.NeedSignature)
        await chan.send(protocol.SignatureChunk(deltabkp.signature(b"something else" * 100)))
        await chan.send(protocol.SignatureEnd())
        with pytest.raises(RequestRefused) as info:
            await chan.receive()
    assert info.value.code == "protocol" and str(app) in info.value.message


async def test_oversized_signature_is_refused(nursery: trio.Nursery, tmp_path: Path) -> None:
    root = tmp_path / "allowed"
    make_tree(root / "app")
    cfg = AgentConfig(key=KEY, allow=Allowlist.from_args([str(root)]), port=0,
                      cache_dir=tmp_path / "cache", max_signature=10_000)
    agent = Agent(cfg)
    await nursery.start(agent.run)
    async with await net.connect(net.Address.parse(agent.address), key=KEY, role="server") as chan:
        await chan.send(protocol.BackupRequest(str(root / "app"), b"h" * 32, ()))
        assert isinstance(await chan.receive(), protocol.NeedSignature)
        await chan.send(protocol.SignatureChunk(b"s" * 6000))
        await chan.send(protocol.SignatureChunk(b"s" * 6000))  # over the limit: refused at once
        with pytest.raises(RequestRefused) as info:
            await chan.receive()
    assert info.value.code == "refused" and "limit" in info.value.message


async def test_change_during_the_build_makes_the_next_check_miss(env: Env) -> None:
    """The fingerprint recorded is the one taken before the build, never one taken after it."""
    app = env.root / "app"
    app.mkdir()
    (app / "a-early.txt").write_text("archived first\n" * 100)
    for i in range(6):
        (app / f"z-blob{i}.bin").write_bytes(os.urandom(1_000_000))
    await settle(app)
    with trio.fail_after(60):
        async with await connect(env) as chan:
            await chan.send(protocol.BackupRequest(str(app), None, ()))
            msg = await chan.receive(timeout=30)
            assert isinstance(msg, protocol.DeltaChunk)
            # The build is under way (paced by us): change a file it has already read.
            (app / "a-early.txt").write_text("changed during the build\n" * 100)
            # Hold the build (it waits for us) until the change is no longer racy, so that a
            # fingerprint taken after the build would look trustworthy - and be wrong.
            await settle(app)
            delta = bytearray()
            while isinstance(msg, protocol.DeltaChunk):
                delta += msg.data
                msg = await chan.receive(timeout=30)
            assert isinstance(msg, protocol.BackupDone)
    a1 = bytes(deltabkp.patch(b"", bytes(delta)))
    await settle(app)
    r2 = await backup(env, app, a1)
    # Never "unchanged (fingerprint)": the tree is not what the pre-build fingerprint saw.
    assert r2.reason != "fingerprint"
    fresh = fresh_archive(app)
    if r2.kind == "delta":
        assert deltabkp.patch(a1, r2.delta) == fresh
    else:  # the build happened to read the file after the change: same archive
        assert (r2.reason, a1) == ("hash", fresh)


async def test_server_cancelling_mid_stream_stops_the_build(env: Env) -> None:
    app = env.root / "big"
    app.mkdir()
    for i in range(8):
        (app / f"r{i}.bin").write_bytes(os.urandom(1_000_000))
    with trio.fail_after(30):
        async with await connect(env) as chan:
            await chan.send(protocol.BackupRequest(str(app), None, ()))
            assert isinstance(await chan.receive(), protocol.DeltaChunk)
            await chan.send(protocol.Cancel())
        # The agent stops; the cache learnt nothing and the agent still answers.
        while env.agent.active:
            await trio.sleep(0.05)
    assert not any((env.cache / "sigs").iterdir())
    r = await backup(env, app)
    assert r.kind == "delta" and deltabkp.patch(b"", r.delta) == fresh_archive(app)


async def test_two_paths_at_once(env: Env) -> None:
    apps = [env.root / "one", env.root / "two"]
    for a in apps:
        make_tree(a)
    results: dict[Path, BackupResult] = {}

    async def one(a: Path) -> None:
        results[a] = await backup(env, a)

    async with trio.open_nursery() as n:
        for a in apps:
            n.start_soon(one, a)
    for a in apps:
        assert deltabkp.patch(b"", results[a].delta) == fresh_archive(a)


async def test_ping_is_answered_while_a_large_backup_runs(env: Env) -> None:
    app = env.root / "large"
    app.mkdir()
    # Incompressible data: the build is CPU-bound for a while.
    for i in range(24):
        (app / f"blob{i:02}.bin").write_bytes(os.urandom(1_000_000))
    pongs = 0
    with trio.fail_after(120):
        async with await connect(env) as chan:
            await chan.send(protocol.BackupRequest(str(app), None, ()))
            first = await chan.receive(timeout=30)
            assert isinstance(first, protocol.DeltaChunk)
            delta = bytearray(first.data)
            # The backup is under way (and blocked on us, its reader): the agent still answers.
            for _ in range(5):
                async with await connect(env) as ping_chan:
                    await ping_chan.send(protocol.Ping())
                    pong = await ping_chan.receive_a(protocol.Pong, timeout=5)
                    assert pong.info["active"] == 1
                    pongs += 1
            # And while it builds at full speed, too.
            async with trio.open_nursery() as n:

                async def drain() -> None:
                    nonlocal delta
                    msg = await chan.receive(timeout=30)
                    while isinstance(msg, protocol.DeltaChunk):
                        delta += msg.data
                        msg = await chan.receive(timeout=30)
                    assert isinstance(msg, protocol.BackupDone)
                    n.cancel_scope.cancel()

                n.start_soon(drain)
                while True:
                    async with await connect(env) as ping_chan:
                        await ping_chan.send(protocol.Ping())
                        await ping_chan.receive_a(protocol.Pong, timeout=5)
                        pongs += 1
                    await trio.sleep(0.01)
    assert pongs >= 5
    assert deltabkp.patch(b"", bytes(delta)) == fresh_archive(app)


async def test_keep_alive_gives_up_holding_and_stays_patchable(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the keep-alive due at every chunk, held bytes (even none) go out at once: the
    server then sees delta-chunks (some empty) instead of "unchanged (hash)", and the delta
    still rebuilds the archive exactly."""
    import deltabkp_agent.backup as backup_mod

    monkeypatch.setattr(backup_mod, "KEEPALIVE_S", -1.0)
    app = env.root / "app"
    make_tree(app, files=400)  # several archive chunks
    a1 = fresh_archive(app)
    base_hash = blake3.blake3(a1).digest()
    chunks: list[bytes] = []
    with trio.fail_after(60):
        async with await connect(env) as chan:
            await chan.send(protocol.BackupRequest(str(app), base_hash, ()))
            assert isinstance(await chan.receive(), protocol.NeedSignature)
            await chan.send(protocol.SignatureChunk(deltabkp.signature(a1)))
            await chan.send(protocol.SignatureEnd())
            msg = await chan.receive()
            while isinstance(msg, protocol.DeltaChunk):
                chunks.append(msg.data)
                msg = await chan.receive()
    assert isinstance(msg, protocol.BackupDone) and msg.archive_hash == base_hash
    assert b"" in chunks  # a keep-alive went out while the encoder had nothing to say
    assert deltabkp.patch(a1, b"".join(chunks)) == a1


# -- servers that go away, busy paths, connection budgets -----------------------------------------


@pytest.fixture
def agent_log() -> Iterator[list[logging.LogRecord]]:
    """Every record the agent logs during the test."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.DEBUG)
    logger = logging.getLogger("deltabkp_agent")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def big_tree(app: Path, mb: int = 8) -> None:
    app.mkdir()
    for i in range(mb):
        (app / f"r{i:02}.bin").write_bytes(os.urandom(1_000_000))


async def until_idle(agent: Agent) -> None:
    """Wait until no backup runs (its build thread has returned: the slot is free again)."""
    with trio.fail_after(30):
        while agent.active:
            await trio.sleep(0.02)
    assert agent.builds.borrowed_tokens == 0
    assert agent._locks == {}  # unused path locks are dropped


async def test_server_closing_the_socket_mid_stream_frees_the_build(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    env = await start_agent(nursery, tmp_path, max_builds=1)  # a leaked slot would hang below
    app = env.root / "big"
    big_tree(app)
    with trio.fail_after(30):
        chan = await connect(env)
        await chan.send(protocol.BackupRequest(str(app), None, ()))
        assert isinstance(await chan.receive(), protocol.DeltaChunk)
        await chan.aclose()  # a real hang-up: no cancel, no error, the socket is gone
    await until_idle(env.agent)
    assert not any((env.cache / "sigs").iterdir())
    r = await backup(env, app)
    assert r.kind == "delta" and deltabkp.patch(b"", r.delta) == fresh_archive(app)


async def connect_small_window(env: Env) -> net.Channel:
    """An authenticated channel whose socket buffers little: it stops reading for real."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect((env.endpoint.host, env.endpoint.port))
    conn = protocol.Connection(key=KEY, our_role="server", initiator=True, peer=env.agent.address)
    ctx = net.tls_contexts(net.installed_tls(), KEY, "server").client
    tls = trio.SSLStream(trio.SocketStream(sock), ctx, https_compatible=True)
    chan = net.Channel(tls, conn)
    with trio.fail_after(10):
        await tls.do_handshake()
        await chan.handshake()
    return chan


async def test_server_that_stops_reading_is_dropped(
    nursery: trio.Nursery, tmp_path: Path, agent_log: list[logging.LogRecord]
) -> None:
    env = await start_agent(nursery, tmp_path, max_builds=1, send_timeout=0.3)
    app = env.root / "big"
    big_tree(app, mb=16)
    async with await connect_small_window(env) as chan:
        await chan.send(protocol.BackupRequest(str(app), None, ()))
        assert isinstance(await chan.receive(), protocol.DeltaChunk)
        # Read nothing more: the agent's send deadline must free the slot and the path lock.
        await until_idle(env.agent)
    # A dead peer, not a bug (the failed send must not escape as an ExceptionGroup).
    assert not [r for r in agent_log if r.levelno >= logging.ERROR]
    assert any("abandoned" in r.getMessage() and "stopped reading" in r.getMessage()
               for r in agent_log), [r.getMessage() for r in agent_log]
    r = await backup(env, app)
    assert r.kind == "delta" and deltabkp.patch(b"", r.delta) == fresh_archive(app)


async def test_a_second_backup_of_a_busy_path_is_told_busy(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    env = await start_agent(nursery, tmp_path, path_lock_timeout=0.2)
    app = env.root / "big"
    big_tree(app)
    with trio.fail_after(30):
        async with await connect(env) as first:
            await first.send(protocol.BackupRequest(str(app), None, ()))
            assert isinstance(await first.receive(), protocol.DeltaChunk)
            # The first backup holds the path (it waits for us to read); a second one waits
            # for it only so long.
            async with await connect(env) as second:
                await second.send(protocol.BackupRequest(str(app), None, ()))
                with pytest.raises(RequestRefused) as info:
                    await second.receive()
                assert info.value.code == "busy"
                assert env.agent.address in info.value.message and str(app) in info.value.message
                # The connection is still in step: it answers a ping.
                await second.send(protocol.Ping())
                await second.receive_a(protocol.Pong)
    await until_idle(env.agent)


async def test_a_servers_own_error_is_not_echoed_back(
    env: Env, agent_log: list[logging.LogRecord]
) -> None:
    app = env.root / "app"
    make_tree(app)
    with trio.fail_after(30):
        async with await connect(env) as chan:
            await chan.send(protocol.BackupRequest(str(app), b"h" * 32, ()))
            assert isinstance(await chan.receive(), protocol.NeedSignature)
            await chan.send(protocol.Error(ErrorCode.FAILED.value, "cannot read the base archive"))
            # The agent stops and hangs up without a word (no error frame of its own).
            with pytest.raises(PeerUnavailable):
                await chan.receive(raise_errors=False)
    await until_idle(env.agent)
    assert not [r for r in agent_log if r.levelno >= logging.WARNING]


async def test_silent_sockets_cannot_lock_a_real_server_out(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # Silent peers would each hold a handshake slot for 60 s here; there are only 4 slots.
    env = await start_agent(nursery, tmp_path, max_handshakes=4, handshake_timeout=60)
    silent = []
    try:
        with trio.fail_after(20):
            for _ in range(12):
                s = trio.socket.socket()
                await s.connect((env.endpoint.host, env.endpoint.port))
                silent.append(s)
            while env.agent.gate.pending < 4:
                await trio.sleep(0.02)
            # A real server still gets in (it evicts the oldest silent socket) ...
            async with await connect(env) as chan:
                await chan.send(protocol.Ping())
                await chan.receive_a(protocol.Pong)
            # ... and the evicted silent sockets were closed without a byte.
            assert await silent[0].recv(100) == b""
            assert env.agent.gate.pending <= 4
    finally:
        for s in silent:
            s.close()


async def test_authenticated_sessions_have_their_own_budget(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    env = await start_agent(nursery, tmp_path, max_connections=1)
    with trio.fail_after(20):
        async with await connect(env) as first:
            await first.send(protocol.Ping())
            await first.receive_a(protocol.Pong)
            async with await connect(env) as second:  # authenticated, then told why not
                with pytest.raises(RequestRefused) as info:
                    await second.receive()
                assert info.value.code == "busy" and env.agent.address in info.value.message
        async with await connect(env) as again:  # the session slot was given back
            await again.send(protocol.Ping())
            await again.receive_a(protocol.Pong)
