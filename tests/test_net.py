"""deltabkp.net, the Trio edge: real TCP on 127.0.0.1 (port 0) under deadlines, key files and
addresses.  Raw-frame tests speak inside TLS (``net.open_secure_stream``), as any client must;
TLS itself is tests/test_tls.py's."""

from __future__ import annotations

import functools
import logging
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import blake3
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from deltabkp import net
from deltabkp import protocol as p
from deltabkp.errors import (
    AuthError,
    DeltabkpError,
    ErrorCode,
    IntegrityError,
    PeerUnavailable,
    RemoteProtocolError,
    RequestRefused,
    UsageError,
)
from deltabkp.net import Address

KEY = b"k" * 32
LOCAL = "127.0.0.1"
Handler = Callable[[trio.SocketStream], Awaitable[None]]


async def _serve(nursery: trio.Nursery, handler: Handler) -> Address:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host=LOCAL))
    return Address(LOCAL, listeners[0].socket.getsockname()[1])


async def _echo_server(
    nursery: trio.Nursery, key: bytes = KEY, tls: net.TlsSettings | None = None
) -> Address:
    """A server-role responder: pong, ack, and ``echo`` requests answered; anything else is
    refused with ``invalid``."""

    async def handler(stream: trio.SocketStream) -> None:
        try:
            chan = await net.accept(
                stream, key=key, role="server", timeout=5, info={"name": "echo"}, tls=tls
            )
        except DeltabkpError:
            await stream.aclose()
            return
        async with chan:
            while True:
                try:
                    msg = await chan.receive(timeout=5)
                except DeltabkpError:
                    return
                if isinstance(msg, p.Ping):
                    await chan.send(p.Pong({"role": chan.peer_role}))
                elif isinstance(msg, p.Announce):
                    await chan.send(p.Ack())
                elif isinstance(msg, p.Request) and msg.op == "echo":
                    await chan.send(p.Response({"role": chan.peer_role, "peer": chan.peer, "args": msg.args}))
                else:
                    await chan.send(p.Error(str(ErrorCode.INVALID), f"unexpected {msg.TYPE}"))

    return await _serve(nursery, handler)


async def _raw_answer(addr: Address, opening: bytes) -> list[p.Message]:
    """Send ``opening`` inside TLS; every frame the responder sends until it hangs up."""
    stream = await net.open_secure_stream(addr, key=KEY, role="ctl", timeout=5)
    async with stream:
        await stream.send_all(opening)
        return await _frames_until_eof(stream)


async def _frames_until_eof(stream: trio.abc.Stream, dec: p.FrameDecoder | None = None) -> list[p.Message]:
    dec = dec or p.FrameDecoder()
    with trio.fail_after(5):
        while chunk := await stream.receive_some(65536):
            dec.feed(chunk)
    out = list(iter(dec.next_message, None))
    assert dec.buffered == 0
    return out


def _hello(version: int = p.PROTOCOL_VERSION, role: str = "ctl", nonce: bytes = b"n" * 32) -> bytes:
    return p.encode(p.Hello(p.PROTOCOL_MAGIC, version, role, nonce))


PLAIN = net.TlsSettings(plaintext=True)


async def test_authenticated_round_trip_counts_bytes() -> None:
    async with trio.open_nursery() as nursery:
        addr = await _echo_server(nursery, tls=PLAIN)  # plaintext: the frames are the bytes
        chan = await net.connect(addr, key=KEY, role="ctl", timeout=5, tls=PLAIN)
        async with chan:
            assert chan.peer == str(addr) and chan.peer_role == "server"
            assert chan.peer_info == {"name": "echo"}
            request = p.Request("echo", {"x": [1, "two", b"3"]})
            await chan.send(request)
            response = await chan.receive_a(p.Response)
            assert response.data["role"] == "ctl" and response.data["args"] == request.args
            assert Address.parse(response.data["peer"]).host == LOCAL  # the responder names us
            # The counters are the real bytes on the wire, handshake and frame headers included.
            z = b"\0" * 32
            sent = [_hello(), p.encode(p.Auth(z)), p.encode(request)]
            received = [p.encode(p.Challenge(z, z)), p.encode(p.Welcome({"name": "echo"})), p.encode(response)]
            assert chan.bytes_sent == sum(map(len, sent))
            assert chan.bytes_received == sum(map(len, received))
            await chan.send(p.Request("nonsense"))
            with pytest.raises(RequestRefused) as ei:
                await chan.receive()
            assert ei.value.code is ErrorCode.INVALID and str(ei.value).endswith("[invalid]")
        nursery.cancel_scope.cancel()


async def test_announce_conversation_over_tcp() -> None:
    async with trio.open_nursery() as nursery:
        addr = await _echo_server(nursery)
        async with await net.connect(addr, key=KEY, role="agent", timeout=5) as chan:
            await chan.send(p.Announce(LOCAL, 7471))
            await chan.receive_a(p.Ack)
            await chan.send(p.Ping())
            assert (await chan.receive_a(p.Pong)).info == {"role": "agent"}
        nursery.cancel_scope.cancel()


async def test_wrong_key_is_detected_by_the_initiator() -> None:
    async with trio.open_nursery() as nursery:
        addr = await _echo_server(nursery)
        # TLS first: the responder's certificate is not from our key's CA.
        with pytest.raises(AuthError, match="from another cluster") as ei:
            await net.connect(addr, key=b"x" * 32, role="ctl", timeout=5)
        assert f"server {addr}" in str(ei.value)
        # The key handshake inside TLS checks the key too (here alone, in plaintext): the
        # initiator notices the responder's proof does not match its own key.
        plain = await _echo_server(nursery, tls=PLAIN)
        with pytest.raises(AuthError, match="does not hold our cluster key") as ei:
            await net.connect(plain, key=b"x" * 32, role="ctl", timeout=5, tls=PLAIN)
        assert f"server {plain}" in str(ei.value)
        nursery.cancel_scope.cancel()


async def test_responder_refuses_a_bad_initiator_proof() -> None:
    async with trio.open_nursery() as nursery:
        addr = await _echo_server(nursery)
        stream = await net.open_secure_stream(addr, key=KEY, role="ctl", timeout=5)
        async with stream:
            await stream.send_all(_hello())
            dec = p.FrameDecoder()
            with trio.fail_after(5):
                while (challenge := dec.next_message()) is None:
                    dec.feed(await stream.receive_some(65536))
            assert isinstance(challenge, p.Challenge)
            await stream.send_all(p.encode(p.Auth(b"\0" * 32)))
            # One auth error, and nothing else follows: the responder hangs up.
            [err] = await _frames_until_eof(stream, dec)
            assert isinstance(err, p.Error) and err.code == "auth"
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("opening, code", [
    (p.encode(p.Ping()), "protocol"),  # skipping the handshake
    (p.encode(p.Request("targets", {})), "protocol"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "protocol"),  # a foreign protocol
    (struct.pack(">I", p.MAX_FRAME * 4), "protocol"),  # an oversized frame
    (_hello(version=99), "version"),
], ids=["ping", "request", "foreign", "oversized", "version"])
async def test_unauthenticated_requests_get_only_one_error(opening: bytes, code: str) -> None:
    async with trio.open_nursery() as nursery:
        msgs = await _raw_answer(await _echo_server(nursery), opening)
        nursery.cancel_scope.cancel()
    assert len(msgs) == 1 and isinstance(msgs[0], p.Error), msgs
    assert msgs[0].code == code


async def test_handshake_refusals_are_protocol_errors_not_refused_requests() -> None:
    async with trio.open_nursery() as nursery:
        # The echo responder serves every role; a responder that does not (a ctl pointed at an
        # agent's port) answers with a handshake error, which must not read as "refused".
        [err] = await _raw_answer(await _echo_server(nursery), _hello(version=99))
        assert isinstance(err, p.Error) and err.code == "version" and "version 99" in err.message

        async def agent_like(stream: trio.SocketStream) -> None:
            try:
                await net.accept(stream, key=KEY, role="agent", roles=("server",), timeout=5)
            except DeltabkpError:
                pass
            await stream.aclose()

        agent = await _serve(nursery, agent_like)
        with pytest.raises(RemoteProtocolError, match="role 'ctl' is not served") as ei:
            await net.connect(agent, key=KEY, role="ctl", timeout=5)
        assert not isinstance(ei.value, (RequestRefused, AuthError))
        nursery.cancel_scope.cancel()


async def test_big_frames_are_refused_before_authentication() -> None:
    async with trio.open_nursery() as nursery:
        addr = await _echo_server(nursery)
        # Well under MAX_FRAME, but no handshake frame is this big: refused before buffering.
        msgs = await _raw_answer(addr, struct.pack(">I", 100_000))
        nursery.cancel_scope.cancel()
    assert len(msgs) == 1 and isinstance(msgs[0], p.Error) and "exceeds" in msgs[0].message, msgs


async def test_a_silent_peer_is_dropped_at_the_handshake_deadline() -> None:
    async with trio.open_nursery() as nursery:
        outcome: list[BaseException] = []

        async def handler(stream: trio.SocketStream) -> None:
            try:
                await net.accept(stream, key=KEY, role="server", timeout=0.3)
            except DeltabkpError as exc:
                outcome.append(exc)
            await stream.aclose()

        addr = await _serve(nursery, handler)
        # Silent inside TLS: told why in one error frame.
        [err] = await _raw_answer(addr, b"")
        assert err.code == "protocol" and "not completed" in err.message  # type: ignore[attr-defined]
        # Silent before TLS (no ClientHello): the same deadline, then a bare hang-up.
        with trio.fail_after(5):
            async with await trio.open_tcp_stream(addr.host, addr.port) as raw:
                assert await raw.receive_some(100) == b""
        assert len(outcome) == 2 and all(isinstance(o, PeerUnavailable) for o in outcome)
        assert "TLS handshake not completed" in str(outcome[1])
        nursery.cancel_scope.cancel()


async def test_a_fetch_with_a_wrong_hash_fails_the_download_not_the_server() -> None:
    data = b"archive bytes" * 1000

    async def lying_server(stream: trio.SocketStream) -> None:
        async with await net.accept(stream, key=KEY, role="server", timeout=5) as chan:
            await chan.receive_a(p.Request)
            await chan.send(p.Response({"seq": 1, "size": len(data), "hash": "00" * 32}))
            await chan.send(p.DataChunk(data))  # the server's machine does not hash what it sends
            await chan.send(p.DataEnd())

    async with trio.open_nursery() as nursery:
        addr = await _serve(nursery, lying_server)
        async with await net.connect(addr, key=KEY, role="ctl", timeout=5) as chan:
            await chan.send(p.Request("fetch", {"node": "n:1", "path": "/srv/app", "seq": 1}))
            assert (await chan.receive_a(p.Response)).data["size"] == len(data)
            assert blake3.blake3((await chan.receive_a(p.DataChunk)).data).digest() != b"\0" * 32
            with pytest.raises(IntegrityError, match="n:1 /srv/app: archive 1 arrived with blake3"):
                await chan.receive()
        nursery.cancel_scope.cancel()


async def test_a_peer_that_stops_reading_unblocks_the_sender() -> None:
    async with trio.open_nursery() as nursery:

        async def never_reads(stream: trio.SocketStream) -> None:
            await trio.sleep_forever()

        addr = await _serve(nursery, never_reads)
        # An agent-side connection, past the handshake and asked for a backup (in memory), so
        # that it may stream delta chunks; its bytes then go to a peer that reads nothing.
        server = p.Connection(key=KEY, our_role="server", initiator=True)
        agent = p.Connection(key=KEY, our_role="agent", initiator=False)
        server.initiate()
        for src, dst in ((server, agent), (agent, server), (server, agent), (agent, server)):
            dst.receive_data(src.data_to_send())
        server.send(p.BackupRequest("/srv/app"))
        agent.receive_data(server.data_to_send())
        assert isinstance(agent.next_event(), p.BackupRequest)
        stream = await trio.open_tcp_stream(addr.host, addr.port)
        chan = net.Channel(stream, agent, send_timeout=0.5)
        with trio.fail_after(60):
            with pytest.raises(PeerUnavailable, match="stopped reading"):
                while True:  # fills both socket buffers, then the deadline fires
                    await chan.send(p.DeltaChunk(b"x" * p.MAX_CHUNK))
        await chan.aclose()
        nursery.cancel_scope.cancel()


async def test_connect_to_closed_port_is_peer_unavailable() -> None:
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        port = s.getsockname()[1]
    with pytest.raises(PeerUnavailable, match=f"{LOCAL}:{port}"):
        await net.connect(Address(LOCAL, port), key=KEY, role="ctl", timeout=5)


# --- refusal logs ---------------------------------------------------------------------------


def test_refusal_logs_are_one_line_per_key_and_period_plus_a_summary(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    log = net.RateLimitedLog(logging.getLogger("test.refusals"), every=60, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, "test.refusals"):
        for i in range(1000):  # a flood from one address, and one other peer
            log("10.0.0.1 wrong key", "refused %d", i)
        log("10.0.0.2 wrong key", "refused other")
        log.summary()
        now[0] = 61.0
        log("10.0.0.1 wrong key", "refused again")
        log.summary()  # nothing held back since the last one: no line
    assert [r.getMessage() for r in caplog.records] == [
        "refused 0", "refused other",
        "suppressed 999 more refused connection(s) from 1 address(es) in the last 60 s",
        "refused again",
    ]


# --- keys -----------------------------------------------------------------------------------


def test_load_key_creates_private_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DELTABKP_KEY_FILE", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    key = net.load_key()
    path = tmp_path / "deltabkp" / "cluster.key"
    assert net.default_key_path() == path and len(key) == 64
    assert path.stat().st_mode & 0o777 == 0o600
    assert net.load_key() == key  # created once, then reused
    with pytest.raises(UsageError, match="does not exist"):
        net.load_key(tmp_path / "missing.key")
    short = tmp_path / "short.key"
    short.write_bytes(b"abc")
    with pytest.raises(UsageError, match="fewer than"):
        net.load_key(short)
    big = tmp_path / "big.key"
    big.write_bytes(b"k" * 5000)
    with pytest.raises(UsageError, match="larger than"):
        net.load_key(big)
    explicit = tmp_path / "explicit.key"
    explicit.write_bytes(b"  " + b"e" * 20 + b"\n")
    monkeypatch.setenv("DELTABKP_KEY_FILE", str(explicit))
    assert net.load_key() == b"e" * 20  # the environment's file, stripped
    monkeypatch.setenv("DELTABKP_KEY_FILE", str(tmp_path / "typo.key"))
    with pytest.raises(UsageError, match="does not exist"):  # never created silently
        net.load_key()


def test_concurrent_first_use_creates_one_whole_key(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path)}
    env.pop("DELTABKP_KEY_FILE", None)
    code = "from deltabkp.net import load_key; print(load_key().hex())"
    for round_no in range(3):
        (tmp_path / "deltabkp" / "cluster.key").unlink(missing_ok=True)
        procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(3)]
        outs = [p.communicate(timeout=60) for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        assert len({o for o, _ in outs}) == 1, (round_no, outs)
    assert not [p for p in (tmp_path / "deltabkp").iterdir() if p.name != "cluster.key"]


# --- addresses ------------------------------------------------------------------------------


def test_address_parsing() -> None:
    parse = Address.parse
    assert parse("127.0.0.1:7470") == Address("127.0.0.1", 7470)
    assert parse("[::1]:80") == Address("::1", 80)
    assert parse("[::1]", default_port=7470) == Address("::1", 7470)
    assert parse("node1", default_port=7470) == Address("node1", 7470)
    assert parse("node1:1", default_port=7470) == Address("node1", 1)
    assert parse(" node1:0 ") == Address("node1", 0)
    assert str(Address("::1", 80)) == "[::1]:80" and str(Address("node1", 7470)) == "node1:7470"
    for bad in ["node1", ":80", "h:port", "h:70000", "h:-1", "[::1", "[::1]", "[::1]:", "[::1]80",
                "[]:80", ""]:
        with pytest.raises(UsageError, match="bad address"):
            parse(bad)
    assert Address.parse_node("Node1.Example:7471") == Address("node1.example", 7471)
    assert Address.parse_node("[FE80::1]:7471") == Address("fe80::1", 7471)
    # The one rule: a node without a port is its agent's default port (7471).
    assert Address.parse_node("Node1") == Address("node1", 7471)
    for bad_node in ["node1:0", "node1:", 7471, None]:
        with pytest.raises(UsageError):
            Address.parse_node(bad_node)


def test_an_unbracketed_ipv6_literal_is_not_misread() -> None:
    # "::1" is neither HOST:PORT nor [V6]:PORT: refuse it, or read it as the v6 host it is,
    # but never as host ":" on port 1.
    try:
        got = Address.parse("::1", default_port=7470)
    except UsageError:
        return
    assert got == Address("::1", 7470)


_hosts = (st.ip_addresses().map(str)
          | st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True))


@given(_hosts, st.integers(0, 65535))
def test_address_text_round_trips(host: str, port: int) -> None:
    addr = Address(host, port)
    assert Address.parse(str(addr)) == addr
    assert Address.parse(str(addr), default_port=1) == addr
    if ":" in host:
        assert str(addr).startswith("[")


def test_normalise_path() -> None:
    assert net.normalise_path("/srv//app/../data/") == "/srv/data"
    for bad in ["", "  ", "srv/app", "/a\x00b", None, 5]:
        with pytest.raises(UsageError):
            net.normalise_path(bad)


async def _idle_from(source: str, addr: Address) -> trio.SocketStream:
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect((addr.host, addr.port))
    return trio.SocketStream(sock)


async def _hung_up(stream: trio.SocketStream) -> bool:
    with trio.move_on_after(0.2):
        try:
            return await stream.receive_some(1) == b""
        except trio.BrokenResourceError:
            return True
    return False  # still open: its handshake is still pending


async def test_a_full_handshake_budget_favours_hosts_holding_less_of_it() -> None:
    # A flood from one host must not push out the pending handshake of a peer on another,
    # nor make it wait: the flood's own new connections are closed unserved at accept.
    # A frozen clock: every arrival falls in the same second, however slow the machine.
    gate = net.HandshakeGate(logging.getLogger("test"), max_pending=4, timeout=30, clock=lambda: 0.0)

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            await gate.admit(stream, key=KEY, role="server", roles=("ctl",), tls=net.TlsSettings(plaintext=True))

    async def pending(n: int) -> None:
        with trio.fail_after(5):
            while gate.pending < n:
                await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host=LOCAL)
        await nursery.start(net.serve, handler, listeners, gate)
        addr = Address(LOCAL, listeners[0].socket.getsockname()[1])
        flood = []
        for _ in range(4):
            flood.append(await _idle_from("127.0.0.2", addr))
            await pending(len(flood))
        # Beyond the budget, up to FLOOD_FACTOR x the budget in a second is a burst: each new
        # one evicts the oldest ...
        burst = net.FLOOD_FACTOR * 4
        flood += [await _idle_from("127.0.0.2", addr) for _ in range(burst - 4)]
        with trio.fail_after(5):
            while gate.evicted < burst - 4:
                await trio.sleep(0.01)
        # ... beyond that it is a flood: closed unserved, the pending ones stay.
        flood += [await _idle_from("127.0.0.2", addr) for _ in range(4)]
        with trio.fail_after(5):
            while gate.shed < 4:
                await trio.sleep(0.01)
        peer = await _idle_from("127.0.0.3", addr)  # another host: admitted, evicting one
        with trio.fail_after(5):
            while gate.evicted < burst - 3:
                await trio.sleep(0.01)
        assert gate.pending == 4 and gate.shed == 4
        assert not await _hung_up(peer)
        hung_up = [await _hung_up(s) for s in flood]
        assert hung_up == [True] * (burst - 3) + [False] * 3 + [True] * 4, hung_up
        for s in [peer, *flood]:
            await s.aclose()
        nursery.cancel_scope.cancel()
