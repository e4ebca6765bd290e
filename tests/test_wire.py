"""Wire codec and transport: golden frames, round trips, fuzzing, and real-TCP authentication."""

from __future__ import annotations

import functools
import os
import socket
import struct
from pathlib import Path

import attrs
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from deltabkp import transport, wire
from deltabkp.errors import (
    AuthError,
    DeltabkpError,
    LocalProtocolError,
    PeerUnavailable,
    RemoteProtocolError,
    RequestRefused,
    UsageError,
)

GOLDEN = Path(__file__).parent / "golden" / "wire"
KEY = b"k" * 32

# One instance of every message type, with fixed field values: the golden file pins their bytes.
SAMPLES: list[wire.Message] = [
    wire.Hello("DELTABKP", 1, "server", b"\x01" * 32),
    wire.Challenge(b"\x02" * 32, b"\x03" * 32),
    wire.Auth(b"\x04" * 32),
    wire.Welcome({"name": "agent", "version": "0.1.0"}),
    wire.Error("not-found", "no target 127.0.0.1:7471 /srv/app"),
    wire.Ping(),
    wire.Pong({"paths": 1}),
    wire.BackupRequest("/srv/app", b"\x05" * 32, ("*.tmp",)),
    wire.BackupRequest("/srv/app"),
    wire.Unchanged(b"\x06" * 32, "fingerprint"),
    wire.NeedSignature(),
    wire.SignatureChunk(b"sig"),
    wire.SignatureEnd(),
    wire.DeltaChunk(b"delta"),
    wire.BackupDone(b"\x07" * 32, 1234, 3, (("log.txt", "grew while read"),), ()),
    wire.Cancel(),
    wire.Announce("127.0.0.1", 7471),
    wire.Ack(),
    wire.Request("register", {"node": "127.0.0.1:7471", "path": "/srv/app", "every": "5"}),
    wire.Response([{"seq": 1, "size": 10}]),
    wire.DataChunk(b"tgz"),
    wire.DataEnd(),
]


def _decode_all(data: bytes, step: int | None = None) -> list[wire.Message]:
    dec = wire.FrameDecoder()
    out: list[wire.Message] = []
    chunks = [data] if step is None else [data[i : i + step] for i in range(0, len(data), step)]
    for chunk in chunks:
        dec.feed(chunk)
        while (msg := dec.next_message()) is not None:
            out.append(msg)
    assert dec.buffered == 0
    return out


def test_every_message_type_has_a_sample() -> None:
    assert {type(m) for m in SAMPLES} == set(wire._REGISTRY.values())


def test_golden_frames_v1() -> None:
    stream = b"".join(wire.encode(m) for m in SAMPLES)
    golden = GOLDEN / "v1-all-messages.bin"
    if os.environ.get("DELTABKP_REGEN_GOLDEN"):  # only ever for a NEW protocol version
        golden.write_bytes(stream)
    assert stream == golden.read_bytes()
    assert _decode_all(golden.read_bytes()) == SAMPLES


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_round_trip_fed_in_pieces(step: int) -> None:
    stream = b"".join(wire.encode(m) for m in SAMPLES)
    assert _decode_all(stream, step) == SAMPLES


def test_oversize_length_prefix_is_refused_before_buffering() -> None:
    dec = wire.FrameDecoder()
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        dec.feed(struct.pack(">I", wire.MAX_FRAME + 1))


def test_foreign_protocol_is_refused() -> None:
    dec = wire.FrameDecoder()
    with pytest.raises(RemoteProtocolError):
        dec.feed(b"GET / HTTP/1.1\r\n\r\n")


def test_encoding_an_oversize_message_blames_us() -> None:
    with pytest.raises(LocalProtocolError):
        wire.encode(wire.DeltaChunk(b"x" * (wire.MAX_FRAME + 1)))


@pytest.mark.parametrize(
    "payload",
    [
        {"t": "nope"},
        {"x": 1},
        {"t": "backup", "path": 5},
        {"t": "backup", "path": "/a", "extra": 1},
        {"t": "backup-done", "archive_hash": b"", "archive_size": -1, "files": 0},
        {"t": "announce", "host": "h", "port": True},
        {"t": "hello", "magic": "DELTABKP", "version": 1, "role": "root", "nonce": b"n" * 32},
        [1, 2, 3],
    ],
)
def test_invalid_messages_are_protocol_errors(payload: object) -> None:
    import msgpack

    with pytest.raises(RemoteProtocolError):
        wire.decode_payload(msgpack.packb(payload, use_bin_type=True))


def _drain(data: bytes, step: int) -> None:
    dec = wire.FrameDecoder()
    try:
        for i in range(0, len(data), step):
            dec.feed(data[i : i + step])
            while (msg := dec.next_message()) is not None:
                assert attrs.has(type(msg))
    except RemoteProtocolError:
        pass


@given(st.binary(max_size=2048), st.sampled_from([1, 7, 4096]))
def test_fuzz_random_bytes_only_raise_protocol_errors(data: bytes, step: int) -> None:
    _drain(data, step)


_json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8) | st.binary(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=4), kids, max_size=4),
    max_leaves=20,
)


@given(
    st.sampled_from(sorted(wire._REGISTRY)) | st.text(max_size=6),
    st.dictionaries(
        st.sampled_from(["path", "data", "code", "message", "info", "args", "op", "port", "host",
                         "archive_hash", "base_hash", "changed", "nonce", "version", "role", "x"]),
        _json_like,
        max_size=5,
    ),
    st.sampled_from([1, 5, 100_000]),
)
def test_fuzz_well_framed_payloads_reach_the_validators(tag: str, fields: dict[str, object], step: int) -> None:
    import msgpack

    payload = msgpack.packb({"t": tag, **fields}, use_bin_type=True)
    _drain(struct.pack(">I", len(payload)) + payload, step)


def test_free_form_data_must_be_plain_and_shallow() -> None:
    import msgpack

    deep: object = 1
    for _ in range(wire.MAX_DEPTH + 5):
        deep = [deep]
    for data in (deep, msgpack.ExtType(5, b"x")):
        payload = msgpack.packb({"t": "response", "data": data}, use_bin_type=True)
        with pytest.raises(RemoteProtocolError):
            wire.decode_payload(payload)
    with pytest.raises(RemoteProtocolError):
        wire.decode_payload(msgpack.packb({"t": "announce", "host": "h", "port": 70000}))


@given(st.sampled_from(SAMPLES), st.data())
def test_fuzz_mutated_frames_only_raise_protocol_errors(msg: wire.Message, data: st.DataObject) -> None:
    frame = bytearray(wire.encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(frame) - 1))
        frame[i] = data.draw(st.integers(0, 255))
    dec = wire.FrameDecoder()
    try:
        dec.feed(bytes(frame))
        got = dec.next_message()
        if got is not None:
            assert attrs.has(type(got))
    except RemoteProtocolError:
        pass


def test_parse_hostport() -> None:
    assert transport.parse_hostport("127.0.0.1:7470") == ("127.0.0.1", 7470)
    assert transport.parse_hostport("[::1]:80") == ("::1", 80)
    assert transport.parse_hostport("node1", default_port=7470) == ("node1", 7470)
    for bad in ["node1", ":80", "h:port", "h:70000", "[::1"]:
        with pytest.raises(UsageError):
            transport.parse_hostport(bad)


def test_load_key_creates_private_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DELTABKP_KEY_FILE", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    key = transport.load_key()
    path = tmp_path / "deltabkp" / "cluster.key"
    assert path.stat().st_mode & 0o777 == 0o600
    assert transport.load_key() == key  # created once, then reused
    with pytest.raises(UsageError, match="does not exist"):
        transport.load_key(tmp_path / "missing.key")
    short = tmp_path / "short.key"
    short.write_bytes(b"abc")
    with pytest.raises(UsageError, match="fewer than"):
        transport.load_key(short)


# --- real TCP -------------------------------------------------------------------------------


async def _echo_server(nursery: trio.Nursery, key: bytes) -> int:
    """A responder that answers Ping with Pong after the handshake; returns its port."""

    async def handler(stream: trio.SocketStream) -> None:
        try:
            chan = await transport.accept(stream, key=key, timeout=5)
        except DeltabkpError:
            await stream.aclose()
            return
        async with chan:
            while True:
                try:
                    msg = await chan.receive(timeout=5)
                except DeltabkpError:
                    return
                if isinstance(msg, wire.Ping):
                    await chan.send(wire.Pong({"role": chan.role}))
                else:
                    await chan.send_error("invalid", f"unexpected {msg.TYPE}")

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def test_authenticated_round_trip_counts_bytes() -> None:
    async with trio.open_nursery() as nursery:
        port = await _echo_server(nursery, KEY)
        chan = await transport.connect("127.0.0.1", port, key=KEY, role="ctl")
        async with chan:
            await chan.send(wire.Ping())
            pong = await chan.receive_a(wire.Pong)
            assert pong.info == {"role": "ctl"}
            assert chan.bytes_sent > 0 and chan.bytes_received > 0
            await chan.send(wire.Ack())
            with pytest.raises(RequestRefused) as ei:
                await chan.receive()
            assert ei.value.code == "invalid"
        nursery.cancel_scope.cancel()


async def test_wrong_key_is_detected_by_the_initiator() -> None:
    async with trio.open_nursery() as nursery:
        port = await _echo_server(nursery, KEY)
        # The initiator notices the responder's proof does not match its own key.
        with pytest.raises(AuthError):
            await transport.connect("127.0.0.1", port, key=b"x" * 32, role="ctl")
        nursery.cancel_scope.cancel()


async def test_responder_refuses_a_bad_initiator_proof() -> None:
    async with trio.open_nursery() as nursery:
        port = await _echo_server(nursery, KEY)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        chan = transport.Channel(stream, "test")
        nonce = wire.new_nonce()
        await chan.send(wire.Hello(wire.PROTOCOL_MAGIC, 1, "ctl", nonce))
        await chan.receive_a(wire.Challenge)
        await chan.send(wire.Auth(b"\0" * 32))
        with pytest.raises(AuthError):
            await chan.receive()
        # ...and nothing else follows: the responder hangs up.
        with pytest.raises(PeerUnavailable):
            await chan.receive(timeout=5)
        await chan.aclose()
        nursery.cancel_scope.cancel()


async def test_unauthenticated_requests_get_only_an_error() -> None:
    async with trio.open_nursery() as nursery:
        port = await _echo_server(nursery, KEY)
        for opening in (
            wire.encode(wire.Ping()),  # skipping the handshake
            wire.encode(wire.Request("targets", {})),
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # a foreign protocol
            struct.pack(">I", wire.MAX_FRAME * 4),  # an oversized frame
            wire.encode(wire.Hello(wire.PROTOCOL_MAGIC, 99, "ctl", b"n" * 32)),
        ):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(opening)
            received = b""
            with trio.fail_after(5):
                while chunk := await stream.receive_some(65536):
                    received += chunk
            msgs = _decode_all(received)
            assert msgs and all(isinstance(m, wire.Error) for m in msgs), msgs
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_handshake_refusals_are_protocol_errors_not_refused_requests() -> None:
    async with trio.open_nursery() as nursery:
        port = await _echo_server(nursery, KEY)
        # The echo responder serves every role; a responder that does not (a ctl pointed at an
        # agent's port) answers with a handshake error, which must not read as "refused".
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        chan = transport.Channel(stream, "test")
        await chan.send(wire.Hello(wire.PROTOCOL_MAGIC, 99, "ctl", b"n" * 32))
        with pytest.raises(RequestRefused) as ei:
            await chan.receive()
        assert ei.value.code == "version"
        with pytest.raises(PeerUnavailable):  # exactly one Error frame, then the hang-up
            await chan.receive(timeout=5)
        await chan.aclose()

        async def agent_like(stream: trio.SocketStream) -> None:
            try:
                await transport.accept(stream, key=KEY, roles=("server",), timeout=5)
            except DeltabkpError:
                pass
            await stream.aclose()

        listeners = await nursery.start(functools.partial(trio.serve_tcp, agent_like, 0, host="127.0.0.1"))
        agent_port = listeners[0].socket.getsockname()[1]
        with pytest.raises(RemoteProtocolError, match="role 'ctl' is not served"):
            await transport.connect("127.0.0.1", agent_port, key=KEY, role="ctl")
        nursery.cancel_scope.cancel()


async def test_big_frames_are_refused_before_authentication() -> None:
    async with trio.open_nursery() as nursery:
        port = await _echo_server(nursery, KEY)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        # Well under MAX_FRAME, but no handshake frame is this big: refused before buffering.
        await stream.send_all(struct.pack(">I", 100_000))
        received = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                received += chunk
        [msg] = _decode_all(received)
        assert isinstance(msg, wire.Error) and "exceeds" in msg.message
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_a_peer_that_stops_reading_unblocks_the_sender() -> None:
    async with trio.open_nursery() as nursery:
        held: list[trio.SocketStream] = []

        async def never_reads(stream: trio.SocketStream) -> None:
            held.append(stream)
            await trio.sleep_forever()

        listeners = await nursery.start(functools.partial(trio.serve_tcp, never_reads, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        chan = transport.Channel(stream, f"127.0.0.1:{port}", send_timeout=0.5)
        with trio.fail_after(60):
            with pytest.raises(PeerUnavailable, match="stopped reading"):
                while True:  # fills both socket buffers, then the deadline fires
                    await chan.send(wire.DeltaChunk(b"x" * wire.MAX_CHUNK))
        await chan.aclose()
        nursery.cancel_scope.cancel()


def test_concurrent_first_use_creates_one_whole_key(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path)}
    env.pop("DELTABKP_KEY_FILE", None)
    code = "from deltabkp.transport import load_key; print(load_key().hex())"
    for round_no in range(3):
        (tmp_path / "deltabkp" / "cluster.key").unlink(missing_ok=True)
        procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(3)]
        outs = [p.communicate(timeout=60) for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        assert len({o for o, _ in outs}) == 1, (round_no, outs)
    assert not [p for p in (tmp_path / "deltabkp").iterdir() if p.name != "cluster.key"]


async def test_connect_to_closed_port_is_peer_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PeerUnavailable, match=f"127.0.0.1:{port}"):
        await transport.connect("127.0.0.1", port, key=KEY, role="ctl", timeout=5)
