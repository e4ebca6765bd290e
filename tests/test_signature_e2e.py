"""A version left without its signature, between real daemons.

The server makes an archive's rolling signature after the catalog commit (``ingest.sign``),
so a crash in between leaves a committed version without one: the server is killed (-9) at
that very step (``DELTABKP_TEST_CRASH_AT=archive-committed``) and restarted with its agent
down; start-up signs the version in the background, no backup asked.  A signature lost
while the server runs is made by its readers: the next backup, with the agent's cache lost
(rolling fallback: the agent asks for the base's signature), still patches against that base
(no full transfer, nothing marked missing) and stores a fresh build of the tree; the base is
converted, the new archive signed; ``ctl verify`` signs a whole version whose signature is
gone.  A base signed inside the conversation keeps its agent waiting with empty
``sig-chunk``s (on a mock clock: a signing as long as three of the agent's chunk timeouts).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import blake3
import pytest
import trio
import trio.testing
from helpers_net import channel_pair
from helpers_proc import Cluster, cluster, wait_for  # noqa: F401

import deltabkp
from deltabkp import protocol
from deltabkp.errors import IntegrityError
from deltabkp.archive import TgzBuilder
from deltabkp_agent import backup as agent_backup
from deltabkp_server import pull as pull_mod

STDLIB = Path(shutil.__file__).parent


def _server_log(c: Cluster) -> str:
    return "".join(p.read_text() for p in sorted(c.root.glob("*-server.log")))


def _sig(c: Cluster, seq: int) -> Path:
    return c.data_dir / "archives" / "1" / f"{seq}.sig"


def _tgz(c: Cluster, seq: int) -> Path:
    return c.data_dir / "archives" / "1" / f"{seq}.tgz"


def _signed(c: Cluster, seq: int) -> deltabkp.Signature | None:
    p = _sig(c, seq)
    return deltabkp.Signature.parse(p.read_bytes()) if p.exists() else None


def test_a_version_left_unsigned_by_a_crash_is_signed_at_start_up_then_by_its_readers(
    cluster: Cluster, tmp_path: Path  # noqa: F811 (the fixture)
) -> None:
    c = cluster
    app = tmp_path / "src"
    shutil.copytree(STDLIB / "json", app / "json", ignore=shutil.ignore_patterns("__pycache__"))
    # The crash: kill -9 between archive 1's catalog commit and its signature.
    server = c.start_server(crash="archive-committed")
    agent = c.start_agent(tmp_path)
    c.ctl("register", agent.address, str(app), "--every", "1h")
    wait_for(lambda: not server.alive(), timeout=120, what="the server to die after the commit")
    assert _tgz(c, 1).exists() and _signed(c, 1) is None

    # Restarted with its agent down, so no backup can run, let alone sign: start-up signs it.
    agent.stop()
    server = c.start_server(port=server.port)
    signed = wait_for(lambda: _signed(c, 1), timeout=60, what="start-up to sign archive 1")
    assert _sig(c, 1).read_bytes() == deltabkp.signature(_tgz(c, 1).read_bytes())
    assert signed.base_size == _tgz(c, 1).stat().st_size
    assert "1 archive(s) have no signature yet: signing them in the background" in _server_log(c)
    wait_for(lambda: f"start-up: {agent.address} {app}: archive 1 signed" in _server_log(c),
             what="the start-up signer's line")
    assert [(a["seq"], a["missing"]) for a in c.ctl("list", agent.address, str(app))] == [(1, False)]

    # A signature lost while the server runs has no start-up to sign it: the next backup's
    # rolling fallback asks for it (the agent's kept build and its signatures are gone), and
    # the server makes it inside the conversation.
    _sig(c, 1).unlink()
    home = tmp_path / "home" / ".cache" / "deltabkp"
    dropped = [*home.rglob("builds"), *home.rglob("sigs")]
    assert len(dropped) == 2, list(home.rglob("*"))
    for d in dropped:
        shutil.rmtree(d)
        d.mkdir()
    target = app / "json" / "encoder.py"
    target.write_text(target.read_text() + "\n# an edit after the crash\n")
    # Back, it announces itself: its target runs at once.
    agent = c.start_agent(tmp_path, port=agent.port)
    wait_for(lambda: "stored archive 2," in _server_log(c), timeout=120, what="backup 2")
    assert "full transfer" not in _server_log(c)  # a delta against archive 1
    wait_for(lambda: "signature from server" in "".join(
        p.read_text() for p in sorted(c.root.glob("*-agent.log"))), what="the agent's line")
    assert "archive 1 of target 1 has no signature yet: making it" in _server_log(c)
    assert _tgz(c, 2).read_bytes() == b"".join(TgzBuilder(app))
    listed = c.ctl("list", agent.address, str(app))
    assert [(a["seq"], a["missing"], a["retained"]) for a in listed] == [
        (2, False, True), (1, False, True)]
    # 2 signed after its commit; 1 (signed again for the agent) converted against 2.
    sig2 = wait_for(lambda: _signed(c, 2), what="archive 2's signature")
    assert sig2.base_size == listed[0]["size"] and sig2.base_hash.hex() == listed[0]["hash"]
    wait_for(lambda: sorted(p.name for p in c.archive_files()) == ["1.rdelta", "2.sig", "2.tgz"],
             what="version 1 to become a reverse delta")

    # verify on a whole version without its signature: sound, and signed again.
    _sig(c, 2).unlink()
    [verdict] = c.ctl("verify", agent.address, str(app))
    assert verdict["ok"] and [v["ok"] for v in verdict["versions"]] == [True, True], verdict
    assert _sig(c, 2).read_bytes() == deltabkp.signature(_tgz(c, 2).read_bytes())


async def test_the_agent_waits_out_a_base_signed_inside_the_pull(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A base left unsigned is signed inside the conversation when a backup needs it before
    start-up got to it: for a multi-GB base that takes minutes, longer than the agent waits
    for a signature chunk.  The pull keeps it waiting with empty ``sig-chunk``s (on a mock
    clock: the signing "takes" three of the agent's chunk timeouts, exactly)."""
    server, agent = await channel_pair(b"k" * 32)
    base = b"a base archive " * 5000
    base_hash, sig = blake3.blake3(base).digest(), deltabkp.signature(base)
    signing = 3 * agent_backup.SIG_CHUNK_TIMEOUT

    async def read_signature() -> bytes:
        await trio.sleep(signing)
        return sig

    class Sink:
        async def feed(self, data: bytes) -> None:
            raise AssertionError("no delta in this exchange")

    pulled: list[pull_mod.Pulled] = []

    async def server_side() -> None:
        pulled.append(await pull_mod.pull(
            server, "/srv/app", base_hash, idle=10 * signing, read_signature=read_signature,
            sink=Sink()))

    async with trio.open_nursery() as n:
        n.start_soon(server_side)
        req = await agent.receive_a(protocol.BackupRequest)
        assert req.base_hash == base_hash
        await agent.send(protocol.NeedSignature())
        start = trio.current_time()
        # The agent's own receiving loop, with its own deadline per chunk.
        ctx: Any = type("Ctx", (), {"node": "agent", "max_signature": 1 << 30})()
        got = await agent_backup._receive_signature(agent, ctx, "/srv/app")
        assert got == sig and trio.current_time() - start == signing
        await agent.send(protocol.Unchanged(base_hash, "hash"))
    assert pulled == [pull_mod.Unchanged("hash")]


async def test_a_base_that_cannot_be_signed_inside_the_pull_is_an_integrity_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The base proves unreadable while the agent is kept waiting: ``pull`` raises the
    ``IntegrityError`` itself (the executor retries it as a full transfer), not a group."""
    server, agent = await channel_pair(b"k" * 32)

    async def read_signature() -> bytes:
        await trio.sleep(2 * pull_mod.SIG_KEEPALIVE_S)  # a keep-alive went out first
        raise IntegrityError("base archive 1 is unreadable (test)")

    class Sink:
        async def feed(self, data: bytes) -> None:
            raise AssertionError("no delta in this exchange")

    async def agent_side() -> None:
        await agent.receive_a(protocol.BackupRequest)
        await agent.send(protocol.NeedSignature())
        got = await agent.receive_a(protocol.SignatureChunk, agent_backup.SIG_CHUNK_TIMEOUT)
        assert got == protocol.SignatureChunk(b"")

    async with trio.open_nursery() as n:
        n.start_soon(agent_side)
        with pytest.raises(IntegrityError, match="unreadable"):
            await pull_mod.pull(server, "/srv/app", b"h" * 32, idle=600,
                                read_signature=read_signature, sink=Sink())
