"""The bandwidth cap: the rate parser, the token bucket on a virtual clock, a capped channel,
the wire field, the catalog column (SQLite and PostgreSQL), and the plumbing from
``ctl register --bwlimit`` through the server to a real agent started with ``--bwlimit``.

No wall-clock assertion here: pacing is checked on trio's ``MockClock`` (autojump), where it
is exact; the achieved rate on a real link is ``benchmarks/bench_bwlimit.py``'s figure."""

from __future__ import annotations

import re
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import trio
import trio.testing

from deltabkp import net
from deltabkp import protocol as p
from deltabkp.ctl._client import Client
from deltabkp.errors import ErrorCode, RemoteProtocolError, RequestRefused, UsageError
from deltabkp.net import TokenBucket, parse_rate
from deltabkp_server.catalog import SCHEMA_VERSION, Catalog, PostgresCatalog, SqliteCatalog
from deltabkp_server.catalog._schema import steps_after
from helpers_net import channel_pair
from helpers_proc import Cluster, cluster, exe, wait_for  # noqa: F401

KEY = b"b" * 32


@pytest.mark.parametrize("text, rate", [
    ("1M", 1 << 20), ("500K", 500 << 10), ("500k", 500 << 10), ("2MB", 2_000_000),
    ("1.5M", 3 << 19), ("65536", 65536), ("1G/s", 1 << 30), ("64 KiB", 64 << 10),
])
def test_rates_parse_like_rsync(text: str, rate: int) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "fast", "1X", "-1M", "100", "0.5K", "1M1", "2000G"])
def test_bad_rates_are_usage_errors_naming_the_flag(text: str) -> None:
    with pytest.raises(UsageError, match="--bwlimit"):
        parse_rate(text)


async def test_bucket_paces_takes_to_its_rate(autojump_clock: trio.testing.MockClock) -> None:
    bucket = TokenBucket(1000, burst=200)
    start = trio.current_time()
    for _ in range(10):
        await bucket.take(500)
    # 5000 bytes at 1000 B/s, the first 200 from the saved-up burst: exact on a mock clock.
    assert trio.current_time() - start == pytest.approx(4.8)
    await trio.sleep(100)  # idle: the bucket refills, but only up to its burst
    start = trio.current_time()
    await bucket.take(1200)
    assert trio.current_time() - start == pytest.approx(1.0)


async def test_concurrent_senders_share_one_cap(autojump_clock: trio.testing.MockClock) -> None:
    bucket = TokenBucket(1000, burst=1)
    done: list[float] = []

    async def sender() -> None:
        for _ in range(4):
            await bucket.take(250)
        done.append(trio.current_time())

    start = trio.current_time()
    async with trio.open_nursery() as n:
        for _ in range(3):
            n.start_soon(sender)
    # 3 × 1000 bytes through one 1000 B/s bucket: the last finishes after ~3 s, not ~1 s.
    assert max(done) - start == pytest.approx(3.0, abs=0.01)
    assert bucket.total == 3000


async def test_charge_is_repaid_by_the_next_take(autojump_clock: trio.testing.MockClock) -> None:
    bucket = TokenBucket(100, burst=0.001)
    bucket.charge(300)  # sent already (say, TLS records): the next sender pays for it
    start = trio.current_time()
    await bucket.take(100)
    assert trio.current_time() - start == pytest.approx(4.0, abs=0.01)


@pytest.mark.parametrize("caps", [(64 << 10,), (256 << 10, 64 << 10), (64 << 10, 1 << 20)])
async def test_a_capped_channel_sends_at_the_lowest_cap(
    autojump_clock: trio.testing.MockClock, caps: tuple[int, ...]
) -> None:
    server, agent = await channel_pair(KEY)
    await server.send(p.BackupRequest("/srv/app"))
    await agent.receive_a(p.BackupRequest)
    agent.limits = tuple(TokenBucket(c) for c in caps)
    lowest = min(caps)
    chunks, size = 12, 100_000
    start = trio.current_time()
    got = 0

    async def read() -> None:
        nonlocal got
        while got < chunks * size:
            got += len((await server.receive_a(p.DeltaChunk)).data)

    before = agent.bytes_sent
    async with trio.open_nursery() as n:
        n.start_soon(read)
        for _ in range(chunks):
            await agent.send(p.DeltaChunk(b"x" * size))
    elapsed = trio.current_time() - start
    wire = agent.bytes_sent - before
    # The wire bytes (frame headers included) minus the lowest bucket's burst, at its rate.
    assert elapsed == pytest.approx((wire - lowest * net._ratelimit.BURST_S) / lowest, rel=0.01)


def test_the_request_field_is_left_out_when_no_cap_is_set() -> None:
    plain = p.encode(p.BackupRequest("/srv/app"))
    capped = p.encode(p.BackupRequest("/srv/app", bwlimit=1 << 20))
    assert b"bwlimit" not in plain  # an agent that predates the field still parses it
    assert b"bwlimit" in capped
    assert p.decode_payload(capped[4:]) == p.BackupRequest("/srv/app", bwlimit=1 << 20)
    assert p.decode_payload(plain[4:]).bwlimit is None
    for bad in (0, -5, True, "1M"):
        with pytest.raises(RemoteProtocolError, match="bwlimit"):
            p.decode_payload(msgpack.packb({"t": "backup", "path": "/a", "base_hash": None,
                                            "exclude": [], "bwlimit": bad}, use_bin_type=True))


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Catalog]:
    if request.param == "sqlite":
        c: Catalog = SqliteCatalog(tmp_path / "catalog.sqlite3")
    else:
        c = PostgresCatalog(request.getfixturevalue("postgres_url"))
    try:
        yield c
    finally:
        c.close()


def test_the_catalog_keeps_each_targets_cap(catalog: Catalog) -> None:
    capped = catalog.register("10.0.0.5:7471", "/srv/media", 3600, 100.0, bwlimit=2 << 20)
    plain = catalog.register("10.0.0.5:7471", "/srv/app", 60, 100.0)
    assert (capped.bwlimit, plain.bwlimit) == (2 << 20, None)
    assert {t.path: t.bwlimit for t in catalog.targets()} == {"/srv/media": 2 << 20, "/srv/app": None}
    # Registered again after an unregister: the new registration's cap, not the old one.
    catalog.unregister("10.0.0.5:7471", "/srv/media")
    again = catalog.register("10.0.0.5:7471", "/srv/media", 3600, 200.0)
    assert again.id == capped.id and again.bwlimit is None


def test_a_v3_catalog_gains_the_column_with_no_caps(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    db = sqlite3.connect(path)
    for _version, statements in steps_after("sqlite", 0, "test")[:3]:  # v3, as released
        for stmt in statements:
            db.execute(stmt)
    db.execute("INSERT INTO meta VALUES ('schema_version', '3')")
    db.execute("INSERT INTO targets (node, path, every_s, state, next_due, active, created)"
               " VALUES ('127.0.0.1:1', '/p', 60, 'ok', 5.0, 1, 1.0)")
    db.commit()
    db.close()
    c = SqliteCatalog(path)
    try:
        assert c.get_target(1).bwlimit is None  # existing targets: no cap of their own
        assert c.register("127.0.0.1:1", "/q", 60, 9.0, bwlimit=4096).bwlimit == 4096
    finally:
        c.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    db.close()


def test_register_bwlimit_reaches_the_agent(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    src = tmp_path / "src"
    src.mkdir()
    (src / "data.bin").write_bytes(bytes(range(256)) * 64)
    server = c.start_server()
    agent = c.start_agent(src, announce=False)
    node = agent.address
    bad = c.ctl_run("register", node, str(src), "--every", "60", "--bwlimit", "fast")
    assert bad.returncode == 2 and "--bwlimit 'fast'" in bad.stderr
    out = c.ctl_run("register", node, str(src), "--every", "60", "--bwlimit", "4M")
    assert out.returncode == 0, out.stderr
    assert "at most 4.0 MiB/s" in out.stdout
    client = Client(net.Address.parse(server.address), net.load_key(str(c.key_file)), 60.0)
    [t] = trio.run(client.request, "targets", {})
    assert t["bwlimit"] == 4 << 20
    for bad in (0, 1 << 41, "4M", True):  # checked by the server too: nothing registered
        with pytest.raises(RequestRefused) as info:
            trio.run(client.request, "register",
                     {"node": node, "path": "/elsewhere", "every": "60", "bwlimit": bad})
        assert info.value.code == ErrorCode.INVALID and "bwlimit" in info.value.reason
    assert len(trio.run(client.request, "targets", {})) == 1
    # The first backup starts at once: the agent got the target's cap in the request.
    wait_for(lambda: re.search(r"at most 4194304 bytes/s \(the target's --bwlimit\)",
                               agent.log_text()), what="the agent's note of the cap")


def test_the_agent_refuses_a_bad_bwlimit(cluster: Cluster, tmp_path: Path) -> None:
    res = subprocess.run(
        [exe("deltabkp-agent"), "--listen", "127.0.0.1:0", "--allow", str(tmp_path),
         "--key-file", str(cluster.key_file), "--bwlimit", "10"],
        capture_output=True, text=True, env=cluster.env, timeout=60, check=False,
    )
    assert res.returncode == 2
    assert "--bwlimit '10': at least 1024 bytes per second" in res.stderr


def test_targets_show_a_targets_cap_beside_its_frequency() -> None:
    from deltabkp.ctl import _render

    text = _render.targets([
        {"node": "a:7471", "path": "/media", "every_seconds": 86400, "state": "ok",
         "bwlimit": 2 << 20},
        {"node": "a:7471", "path": "/app", "every_seconds": 900, "state": "ok", "bwlimit": None},
    ], {})
    media, app = (ln for ln in text.splitlines()[1:])
    assert "1d ≤2.0 MiB/s" in media and "≤" not in app
