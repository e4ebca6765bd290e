"""deltabkp.protocol, sans-I/O: golden frames, codec round trips, fuzzing, the handshake and
every conversation driven as a state machine between two in-memory ``Connection``s.

Longer than ~450 lines on purpose: the codec, handshake and conversation tests share ``SAMPLES``
and the in-memory pair helpers (``connected``, ``deliver``, ``say``); split, each file would
define them again.
"""

from __future__ import annotations

import struct
from pathlib import Path

import attrs
import blake3
import msgpack
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from deltabkp import protocol as p
from deltabkp.errors import (
    AuthError,
    ErrorCode,
    IntegrityError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    RequestRefused,
)
from deltabkp.protocol._messages import MAX_DEPTH, REGISTRY

GOLDEN = Path(__file__).parent / "golden" / "wire" / "v1-all-messages.bin"
KEY = b"k" * 32

# One instance of every message type, with fixed field values: the golden file pins their bytes.
SAMPLES: list[p.Message] = [
    p.Hello("DELTABKP", 1, "server", b"\x01" * 32),
    p.Challenge(b"\x02" * 32, b"\x03" * 32),
    p.Auth(b"\x04" * 32),
    p.Welcome({"name": "agent", "version": "0.1.0"}),
    p.Error("not-found", "no target 127.0.0.1:7471 /srv/app"),
    p.Ping(),
    p.Pong({"paths": 1}),
    p.BackupRequest("/srv/app", b"\x05" * 32, ("*.tmp",)),
    p.BackupRequest("/srv/app"),
    p.Unchanged(b"\x06" * 32, "fingerprint"),
    p.NeedSignature(),
    p.SignatureChunk(b"sig"),
    p.SignatureEnd(),
    p.DeltaChunk(b"delta"),
    p.BackupDone(b"\x07" * 32, 1234, 3, (("log.txt", "grew while read"),), ()),
    p.Cancel(),
    p.Announce("127.0.0.1", 7471),
    p.Ack(),
    p.Request("register", {"node": "127.0.0.1:7471", "path": "/srv/app", "every": "5"}),
    p.Response([{"seq": 1, "size": 10}]),
    p.DataChunk(b"tgz"),
    p.DataEnd(),
    # Added later in v1 (streamed log / list): appended, so the earlier frames keep their bytes.
    p.Rows([{"id": 7, "outcome": "unchanged", "count": 3}]),
    p.RowsEnd({"rows": 1}),
]
BASE, TGZ = b"\x05" * 32, b"tgz"  # the first backup sample's base; the data-chunk sample's bytes
WITH_BASE, NO_BASE = SAMPLES[7], SAMPLES[8]
FETCH = p.Request("fetch", {"node": "127.0.0.1:7471", "path": "/srv/app", "seq": 1})
LOG = p.Request("log", {"limit": 2})


def head(data: bytes = TGZ, *, size: int | None = None, digest: bytes | None = None) -> p.Response:
    """The server's answer to ``FETCH``: the archive's size and blake3."""
    h = digest if digest is not None else blake3.blake3(data).digest()
    return p.Response({"seq": 1, "size": len(data) if size is None else size, "hash": h.hex()})


# The samples plus what lets a conversation go further: a matching unchanged, a fetch and its head.
CONV_SAMPLES = [*SAMPLES, p.Unchanged(BASE, "hash"), p.Ping("/srv/app"), FETCH, head(), LOG,
                p.RowsEnd({"rows": 0}), p.Rows([{"id": 6}, {"id": 5}])]


def _decode_all(data: bytes, step: int | None = None) -> list[p.Message]:
    dec, out = p.FrameDecoder(), []
    for i in range(0, len(data), step or max(len(data), 1)):
        dec.feed(data[i : i + (step or len(data))])
        out += list(iter(dec.next_message, None))
    assert dec.buffered == 0
    return out


# --- codec ----------------------------------------------------------------------------------


def test_every_message_type_has_a_sample() -> None:
    assert {type(m) for m in SAMPLES} == set(REGISTRY.values())


def test_golden_frames_v1() -> None:
    stream = b"".join(p.encode(m) for m in SAMPLES)
    if not GOLDEN.exists():  # written once per protocol version, never rewritten
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_bytes(stream)
        pytest.fail(f"{GOLDEN} was missing and has been written: review and commit it")
    golden = GOLDEN.read_bytes()
    assert stream == golden
    assert _decode_all(golden) == _decode_all(golden, 1) == SAMPLES


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_round_trip_fed_in_pieces(step: int) -> None:
    assert _decode_all(b"".join(p.encode(m) for m in SAMPLES), step) == SAMPLES


def _tree(floats: st.SearchStrategy[float], size: int) -> st.SearchStrategy[object]:
    """JSON-like values: what free-form fields (info, args, response data) may hold."""
    leaves = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | floats | st.text(max_size=size)
    return st.recursive(leaves | st.binary(max_size=size), lambda kids: st.lists(kids, max_size=4)
                        | st.dictionaries(st.text(max_size=4), kids, max_size=4), max_leaves=16)


_text, _bin, _plain = st.text(max_size=12), st.binary(max_size=40), _tree(st.floats(allow_nan=False), 12)
_pairs = st.lists(st.tuples(_text, _text), max_size=3).map(tuple)
_BY_TYPE = {"bytes": _bin, "str": _text, "int": st.integers(0, 2**64 - 1), "bytes | None": st.none() | _bin,
            "str | None": st.none() | _text, "int | None": st.none() | st.integers(1, 2**64 - 1), "dict[str, Any]": st.dictionaries(_text, _plain, max_size=4),
            "Any": _plain, "tuple[str, ...]": st.lists(_text, max_size=3).map(tuple),
            "tuple[tuple[str, ...], ...]": _pairs,
            "list[Any]": st.lists(st.dictionaries(_text, _plain, max_size=3), max_size=3)}
_BY_NAME = {"role": st.sampled_from(p.ROLES), "port": st.integers(0, 65535)}
# Every registered message type, from its attrs fields: a new type is covered without edits here.
MESSAGES = st.one_of(*(st.builds(cls, **{f.name: _BY_NAME.get(f.name, _BY_TYPE[str(f.type)])
                                         for f in attrs.fields(cls)})  # type: ignore[arg-type]
                       for cls in REGISTRY.values()))


@given(st.lists(MESSAGES, min_size=1, max_size=8), st.integers(1, 64))
def test_generated_messages_round_trip_whole_and_in_pieces(msgs: list[p.Message], step: int) -> None:
    stream = b"".join(p.encode(m) for m in msgs)
    assert _decode_all(stream) == _decode_all(stream, step) == msgs


def test_oversize_length_prefix_is_refused_before_buffering() -> None:
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        p.FrameDecoder().feed(struct.pack(">I", p.MAX_FRAME + 1))
    p.FrameDecoder().feed(struct.pack(">I", p.MAX_FRAME))  # the limit itself is fine


def test_foreign_protocol_is_refused() -> None:
    with pytest.raises(RemoteProtocolError):
        p.FrameDecoder().feed(b"GET / HTTP/1.1\r\n\r\n")


def test_encoding_an_oversize_message_blames_us() -> None:
    with pytest.raises(LocalProtocolError):
        p.encode(p.DeltaChunk(b"x" * (p.MAX_FRAME + 1)))


@pytest.mark.parametrize("payload", [
    {"t": "nope"}, {"x": 1}, {"t": "backup", "path": 5}, {"t": "backup", "path": "/a", "extra": 1},
    {"t": "backup-done", "archive_hash": b"", "archive_size": -1, "files": 0},
    {"t": "announce", "host": "h", "port": True},
    {"t": "hello", "magic": "DELTABKP", "version": 1, "role": "root", "nonce": b"n" * 32}, [1, 2, 3],
])
def test_invalid_messages_are_protocol_errors(payload: object) -> None:
    with pytest.raises(RemoteProtocolError):
        p.decode_payload(msgpack.packb(payload, use_bin_type=True))


def _drain(data: bytes, step: int) -> None:
    """Feed ``data`` to a decoder and to fresh responders and initiators: only protocol errors."""
    for target in (p.FrameDecoder(), p.Connection(key=KEY, our_role="agent", initiator=False),
                   p.Connection(key=KEY, our_role="ctl", initiator=True)):
        try:
            for i in range(0, len(data), step):
                if isinstance(target, p.FrameDecoder):
                    target.feed(data[i : i + step])
                    assert all(attrs.has(type(m)) for m in iter(target.next_message, None))
                else:
                    target.receive_data(data[i : i + step])
        except ProtocolError:
            pass


@given(st.binary(max_size=2048), st.sampled_from([1, 7, 4096]))
def test_fuzz_random_bytes_only_raise_protocol_errors(data: bytes, step: int) -> None:
    _drain(data, step)


@given(
    st.sampled_from(sorted(REGISTRY)) | st.text(max_size=6),
    st.dictionaries(st.sampled_from(["path", "data", "code", "message", "info", "args", "op", "port",
                                     "host", "archive_hash", "base_hash", "changed", "nonce",
                                     "version", "role", "magic", "x"]), _tree(st.floats(), 8), max_size=5),
    st.sampled_from([1, 5, 100_000]),
)
def test_fuzz_well_framed_payloads_reach_the_validators(tag: str, fields: dict[str, object], step: int) -> None:
    payload = msgpack.packb({"t": tag, **fields}, use_bin_type=True)
    _drain(struct.pack(">I", len(payload)) + payload, step)


def _nested(levels: int) -> object:
    value: object = 1
    for i in range(levels):
        value = [value] if i % 2 else {"k": value}
    return value


def test_free_form_data_must_be_plain_and_shallow() -> None:
    for data in (_nested(MAX_DEPTH + 1), _nested(MAX_DEPTH + 500), msgpack.ExtType(5, b"x")):
        with pytest.raises(RemoteProtocolError):
            p.decode_payload(msgpack.packb({"t": "response", "data": data}, use_bin_type=True))
    with pytest.raises(RemoteProtocolError):
        p.decode_payload(msgpack.packb({"t": "announce", "host": "h", "port": 70000}))
    shallow = _nested(MAX_DEPTH)  # exactly at the limit: accepted both ways
    assert p.decode_payload(msgpack.packb({"t": "response", "data": shallow})) == p.Response(shallow)
    with pytest.raises(ValueError):  # ...and a sender cannot build a deeper one
        p.Response(_nested(MAX_DEPTH + 1))


@given(st.sampled_from(SAMPLES), st.data())
def test_fuzz_mutated_frames_only_raise_protocol_errors(msg: p.Message, data: st.DataObject) -> None:
    frame = bytearray(p.encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    _drain(bytes(frame), len(frame))


# --- the handshake --------------------------------------------------------------------------

PAIRS = {p.AgentSession: ("server", "agent"), p.AnnounceSession: ("agent", "server"),
         p.ControlSession: ("ctl", "server")}


def deliver(src: p.Connection, dst: p.Connection, step: int | None = None) -> list[p.Message]:
    """Move ``src``'s queued bytes into ``dst`` (whole or ``step`` bytes at a time); its events."""
    data = src.data_to_send()
    for i in range(0, len(data), step or max(len(data), 1)):
        dst.receive_data(data[i : i + (step or len(data))])
    return list(iter(dst.next_event, None))


def connected(kind: type[p.Conversation], step: int | None = None) -> tuple[p.Connection, p.Connection]:
    """An initiator and a responder of ``kind``'s roles, through the handshake in memory."""
    ini_role, resp_role = PAIRS[kind]
    ini = p.Connection(key=KEY, our_role=ini_role, initiator=True, peer="R")
    resp = p.Connection(key=KEY, our_role=resp_role, initiator=False, peer="I", info={"name": resp_role})
    ini.initiate()
    for src, dst in ((ini, resp), (resp, ini), (ini, resp), (resp, ini)):
        assert deliver(src, dst, step) == []
    assert not ini.data_to_send() and not resp.data_to_send()
    return ini, resp


@pytest.mark.parametrize("step", [None, 1])
@pytest.mark.parametrize("kind", list(PAIRS))
def test_handshake_in_memory_opens_the_initiators_conversation(kind: type[p.Conversation], step: int | None) -> None:
    ini, resp = connected(kind, step)
    assert ini.authenticated and resp.authenticated
    assert (ini.peer_role, resp.peer_role) == (PAIRS[kind][1], PAIRS[kind][0])
    assert ini.peer_info == {"name": PAIRS[kind][1]}
    assert type(ini.conversation) is type(resp.conversation) is kind
    assert ini.conversation.state == resp.conversation.state == "idle"


def _hello(**kw: object) -> bytes:
    fields = {"magic": p.PROTOCOL_MAGIC, "version": p.PROTOCOL_VERSION, "role": "ctl", "nonce": b"n" * 32}
    return p.encode(p.Hello(**{**fields, **kw}))  # type: ignore[arg-type]


@pytest.mark.parametrize("opening, code", [
    (p.encode(p.Ping()), "protocol"),  # skipping the handshake
    (p.encode(p.Request("targets", {})), "protocol"),
    (_hello(magic="HTTP"), "protocol"),
    (_hello(version=99), "version"),
    (_hello(role="server"), "protocol"),  # the responder's own role
    (_hello(nonce=b"n"), "protocol"),
    (_hello() + p.encode(p.Auth(b"\0" * 32)), "auth"),
    (_hello() + _hello(), "auth"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "protocol"),  # a foreign protocol
    (struct.pack(">I", p.MAX_FRAME * 4), "protocol"),  # an oversized frame
    (struct.pack(">I", p.HANDSHAKE_MAX_FRAME + 1), "protocol"),  # too big for a handshake
    (struct.pack(">I", 3) + b"\xc1\xc1\xc1", "protocol"),  # not msgpack
], ids=["ping", "request", "magic", "version", "own-role", "nonce", "bad-proof", "hello-twice",
        "foreign", "oversized", "big-handshake-frame", "not-msgpack"])
def test_a_failed_handshake_queues_exactly_one_error(opening: bytes, code: str) -> None:
    resp = p.Connection(key=KEY, our_role="server", initiator=False)
    with pytest.raises(ProtocolError) as ei:
        resp.receive_data(opening)
    assert not resp.authenticated
    answer = _decode_all(resp.data_to_send())
    if code == "auth":  # the challenge went out before the initiator failed
        assert isinstance(answer.pop(0), p.Challenge)
    assert len(answer) == 1 and isinstance(answer[0], p.Error), answer
    assert answer[0].code == code
    assert isinstance(ei.value, AuthError) == (code == "auth")
    assert isinstance(ei.value, p.UnsupportedPeerVersion) == (code == "version")


def test_handshake_frames_above_the_limit_are_refused_before_authentication() -> None:
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        p.Connection(key=KEY, our_role="agent", initiator=False).receive_data(
            struct.pack(">I", p.HANDSHAKE_MAX_FRAME + 1))
    p.Connection(key=KEY, our_role="agent", initiator=False).receive_data(
        struct.pack(">I", p.HANDSHAKE_MAX_FRAME))  # the limit itself is fine
    ini, resp = connected(p.ControlSession)  # after the handshake, MAX_FRAME is the limit
    big = p.Request("x", {"blob": b"x" * p.HANDSHAKE_MAX_FRAME * 4})
    ini.send(big)
    assert deliver(ini, resp) == [big]


def test_bytes_after_welcome_are_judged_by_the_conversation_however_they_are_split() -> None:
    # The responder's welcome and an error (too many sessions) in one segment: the frame
    # after welcome is a conversation frame, whatever its size, fed whole or byte by byte.
    for step in (1, None):
        ini = p.Connection(key=KEY, our_role="ctl", initiator=True)
        resp = p.Connection(key=KEY, our_role="server", initiator=False)
        ini.initiate()
        deliver(ini, resp), deliver(resp, ini), deliver(ini, resp)
        resp.send_error(ErrorCode.BUSY, "too many sessions: " + "x" * p.HANDSHAKE_MAX_FRAME)
        [err] = deliver(resp, ini, step)
        assert isinstance(err, p.Error) and err.code == "busy", step
        assert ini.conversation is not None and ini.conversation.state == p.CLOSED


_keys = st.binary(min_size=16, max_size=64)


@given(_keys, _keys, _keys, st.sampled_from(list(PAIRS)))
def test_mismatched_keys_fail_on_both_sides(k_ini: bytes, k_resp: bytes, nonce: bytes, kind: type[p.Conversation]) -> None:
    # HMAC zero-pads keys up to its block size: keys that differ only in trailing NULs are one key.
    assume(k_ini.rstrip(b"\0") != k_resp.rstrip(b"\0"))
    ini = p.Connection(key=k_ini, our_role=PAIRS[kind][0], initiator=True, nonce=nonce)
    resp = p.Connection(key=k_resp, our_role=PAIRS[kind][1], initiator=False)
    ini.initiate()
    resp.receive_data(ini.data_to_send())
    [challenge] = _decode_all(resp.data_to_send())
    assert isinstance(challenge, p.Challenge)
    with pytest.raises(AuthError):  # the initiator sees the responder does not hold its key
        ini.receive_data(p.encode(challenge))
    assert not ini.data_to_send() and not ini.authenticated
    # An initiator that pressed on anyway, proving its own key, is refused with one "auth".
    with pytest.raises(AuthError):
        resp.receive_data(p.encode(p.Auth(p.handshake_proof(k_ini, "initiator", nonce, challenge.nonce))))
    [err] = _decode_all(resp.data_to_send())
    assert isinstance(err, p.Error) and err.code == "auth" and not resp.authenticated
    assert isinstance(ini.refusal(err), AuthError)


def test_a_refused_handshake_is_a_protocol_error_not_a_refused_request() -> None:
    ini = p.Connection(key=KEY, our_role="ctl", initiator=True, peer="127.0.0.1:7471")
    agent = p.Connection(key=KEY, our_role="agent", initiator=False, serve_roles=("server",))
    ini.initiate()
    with pytest.raises(RemoteProtocolError):
        agent.receive_data(ini.data_to_send())
    with pytest.raises(RemoteProtocolError, match="role 'ctl' is not served") as ei:
        ini.receive_data(agent.data_to_send())
    assert not isinstance(ei.value, (RequestRefused, AuthError))
    assert "server 127.0.0.1:7471" in str(ei.value)


def test_connection_misuse_is_a_local_error() -> None:
    ini = p.Connection(key=KEY, our_role="ctl", initiator=True)
    with pytest.raises(LocalProtocolError):
        ini.send(p.Request("targets"))  # before the handshake
    ini.initiate()
    for misuse in (ini.initiate, p.Connection(key=KEY, our_role="agent", initiator=False).initiate,
                   lambda: p.Connection(key=KEY, our_role="root", initiator=True)):
        with pytest.raises(LocalProtocolError):
            misuse()


# --- the conversations ----------------------------------------------------------------------


def say(src: p.Connection, dst: p.Connection, *msgs: p.Message) -> str:
    """``src`` sends ``msgs``; ``dst`` receives exactly them; both machines agree on the state."""
    for m in msgs:
        src.send(m)
    assert deliver(src, dst, 7) == list(msgs)
    assert src.conversation is not None and dst.conversation is not None
    assert src.conversation.state == dst.conversation.state
    return src.conversation.state


def test_agent_session_ping_and_unchanged() -> None:
    srv, agt = connected(p.AgentSession)
    assert say(srv, agt, p.Ping("/srv/app")) == "pinged"
    assert say(agt, srv, p.Pong({"allowed": True})) == "idle"
    assert say(srv, agt, WITH_BASE) == "requested"
    assert say(agt, srv, p.Unchanged(BASE, "fingerprint")) == "idle"
    assert say(srv, agt, WITH_BASE) == "requested"
    assert say(agt, srv, p.NeedSignature()) == "sending signature"
    assert say(srv, agt, p.SignatureEnd()) == "awaiting delta"
    assert say(agt, srv, p.Unchanged(BASE, "hash")) == "idle"  # the same bytes after all


@pytest.mark.parametrize("base", [BASE, None], ids=["base", "no-base"])
def test_agent_session_full_backup(base: bytes | None) -> None:
    srv, agt = connected(p.AgentSession)
    say(srv, agt, p.BackupRequest("/srv/app", base, ("*.tmp",)))
    if base is not None:
        assert say(agt, srv, p.NeedSignature()) == "sending signature"
        assert say(srv, agt, p.SignatureChunk(b"s1"), p.SignatureChunk(b"s2"), p.SignatureEnd()) == "awaiting delta"
    assert say(agt, srv, *[p.DeltaChunk(b"d%d" % i) for i in range(3)]) == "streaming delta"
    assert say(agt, srv, p.BackupDone(b"\x07" * 32, 9, 2)) == "idle"
    assert say(srv, agt, p.Ping()) == "pinged"  # one connection carries many exchanges
    assert say(agt, srv, p.Pong()) == "idle"


def test_agent_error_mid_stream_answers_the_request() -> None:
    srv, agt = connected(p.AgentSession)
    say(srv, agt, WITH_BASE), say(agt, srv, p.NeedSignature()), say(srv, agt, p.SignatureEnd())
    say(agt, srv, p.DeltaChunk(b"d"))
    err = p.Error(str(ErrorCode.FAILED), "disk full")
    assert say(agt, srv, err) == "idle"
    refusal = srv.refusal(err)
    assert isinstance(refusal, RequestRefused) and refusal.code is ErrorCode.FAILED
    assert (refusal.node, refusal.path, str(refusal)) == ("R", "/srv/app", "R /srv/app: disk full [failed]")


def test_server_cancel_closes_the_conversation() -> None:
    srv, agt = connected(p.AgentSession)
    say(srv, agt, NO_BASE), say(agt, srv, p.DeltaChunk(b"d"))
    assert say(srv, agt, p.Cancel()) == p.CLOSED
    with pytest.raises(LocalProtocolError, match="agent sent delta-chunk while closed"):
        agt.send(p.DeltaChunk(b"d"))
    srv.receive_data(p.encode(p.DeltaChunk(b"d")))
    with pytest.raises(RemoteProtocolError, match="agent sent delta-chunk while closed"):
        srv.next_event()


def test_announce_session() -> None:
    agt, srv = connected(p.AnnounceSession)
    assert say(agt, srv, p.Announce("127.0.0.1", 7471)) == "announced"
    assert say(srv, agt, p.Ack()) == "idle"
    assert say(agt, srv, p.Ping()) == "pinged"
    assert say(srv, agt, p.Pong({"version": "1"})) == "idle"
    assert say(agt, srv, p.Announce("::1", 1)) == "announced"
    assert say(srv, agt, p.Error("refused", "unknown node")) == "idle"
    assert say(srv, agt, p.Error("busy", "shutting down")) == p.CLOSED


def test_control_request_response_and_refusal() -> None:
    ctl, srv = connected(p.ControlSession)
    assert say(ctl, srv, p.Request("targets")) == "answering"
    assert say(srv, ctl, p.Response([{"node": "n:1"}])) == "idle"
    say(ctl, srv, p.Request("unregister", {"node": "n:1", "path": "/srv/app"}))
    err = p.Error("not-found", "no such target")
    assert say(srv, ctl, err) == "idle"
    refusal = ctl.refusal(err)
    assert isinstance(refusal, RequestRefused) and refusal.code is ErrorCode.NOT_FOUND
    assert str(refusal) == "n:1 /srv/app: no such target [not-found]"


def test_control_fetch_with_matching_size_and_hash() -> None:
    data = bytes(range(256)) * 40
    ctl, srv = connected(p.ControlSession)
    assert say(ctl, srv, FETCH) == "fetch head"
    assert say(srv, ctl, head(data)) == "downloading"
    assert say(srv, ctl, *[p.DataChunk(data[i : i + 999]) for i in range(0, len(data), 999)]) == "downloading"
    assert say(srv, ctl, p.DataEnd()) == "idle"
    assert ctl.conversation.got == len(data)  # type: ignore[union-attr]
    assert say(ctl, srv, FETCH) == "fetch head"  # the next download starts afresh
    assert say(srv, ctl, head(b""), p.DataEnd()) == "idle"


@pytest.mark.parametrize("header, chunks, sender_notices", [
    (head(digest=b"\0" * 32), [TGZ], False), (head(size=2), [TGZ], True),
    (head(size=5), [TGZ], True), (head(size=3), [b"t", b"g", b"z", b"!"], True),
], ids=["wrong-hash", "too-many", "too-few", "one-too-many"])
def test_fetch_integrity_is_checked_on_the_receiving_side_only(
    header: p.Response, chunks: list[bytes], sender_notices: bool
) -> None:
    ctl, srv = connected(p.ControlSession)
    say(ctl, srv, FETCH), say(srv, ctl, header)
    frames = [p.DataChunk(c) for c in chunks] + [p.DataEnd()]
    noticed = False
    for m in frames:  # the server's machine never raises IntegrityError: it is no receiver
        try:
            srv.send(m)
        except LocalProtocolError:  # it knows the size it announced: a mismatch is its own bug
            noticed = True
            break
    assert noticed is sender_notices
    with pytest.raises(IntegrityError, match="archive 1 arrived|longer than") as ei:
        for m in frames:
            ctl.receive_data(p.encode(m))
            ctl.next_event()
    assert (ei.value.node, ei.value.path) == ("127.0.0.1:7471", "/srv/app")


@pytest.mark.parametrize("meta", ["x", {"size": -1, "hash": ""}, {"size": True, "hash": ""},
                                  {"size": 1, "hash": "zz"}, {"hash": ""}, None])
def test_a_malformed_fetch_header_is_the_servers_fault(meta: object) -> None:
    ctl, srv = connected(p.ControlSession)
    say(ctl, srv, FETCH)
    with pytest.raises(LocalProtocolError):
        srv.send(p.Response(meta))
    ctl.receive_data(p.encode(p.Response(meta)))
    with pytest.raises(RemoteProtocolError, match="server sent a malformed archive header"):
        ctl.next_event()


def test_control_log_and_list_stream_rows_then_end() -> None:
    ctl, srv = connected(p.ControlSession)
    assert say(ctl, srv, p.Request("log", {"limit": 0})) == "streaming rows"
    rows = [{"id": i} for i in range(5, 0, -1)]
    assert say(srv, ctl, p.Rows(rows[:2]), p.Rows(rows[2:])) == "streaming rows"
    assert say(srv, ctl, p.RowsEnd({"rows": 5})) == "idle"
    assert say(ctl, srv, p.Request("list", {"node": "n:1", "path": "/srv/app"})) == "streaming rows"
    assert say(srv, ctl, p.RowsEnd({"rows": 0})) == "idle"  # an empty answer: no rows at all
    # A stream ended by an error (refused up front, or failing part-way) is an answer too.
    say(ctl, srv, LOG), say(srv, ctl, p.Rows([{"id": 9}]))
    err = p.Error("internal", "log failed: the catalog went away")
    assert say(srv, ctl, err) == "idle"
    assert (ctl.refusal(err).node, say(ctl, srv, p.Request("targets"))) == (None, "answering")


def test_ops_answered_otherwise_are_one_table_entry() -> None:
    assert p.ControlSession.ANSWERS == {
        "fetch": "fetch head", "log": "streaming rows", "list": "streaming rows",
    }
    for op, state in p.ControlSession.ANSWERS.items():
        assert any(s == state for s, _, _ in p.ControlSession.TABLE), op


@pytest.mark.parametrize("prefix, bad, blame", [
    ([p.Rows([{"id": 3}, {"id": 2}])], p.Rows([{"id": 1}]), "sent 3 log rows, more than the 2 asked for"),
    ([p.Rows([{"id": 3}])], p.RowsEnd({"rows": 2}), "ended log saying 2 rows, but 1 were sent"),
    ([], p.RowsEnd({}), "ended log saying None rows, but 0 were sent"),
    ([], p.RowsEnd({"rows": True}), "saying True rows"),
    ([], p.Rows([{"id": 1}, 2]), "sent log rows that are not maps"),
], ids=["over-limit", "miscounted", "uncounted", "bool-count", "not-maps"])
def test_row_streams_are_counted_by_both_machines(
    prefix: list[p.Message], bad: p.Message, blame: str
) -> None:
    ctl, srv = connected(p.ControlSession)
    say(ctl, srv, LOG)
    if prefix:
        say(srv, ctl, *prefix)
    with pytest.raises(LocalProtocolError, match=blame):  # the server's own machine stops it
        srv.send(bad)
    assert not srv.data_to_send()
    ctl.receive_data(p.encode(bad))
    with pytest.raises(RemoteProtocolError, match=blame):  # and the ctl's blames the server
        ctl.next_event()


def test_the_row_count_restarts_with_each_request() -> None:
    ctl, srv = connected(p.ControlSession)
    for _ in range(3):  # a limit of 2 per request, not per connection
        say(ctl, srv, LOG)
        assert say(srv, ctl, p.Rows([{"id": 2}, {"id": 1}]), p.RowsEnd({"rows": 2})) == "idle"


@given(st.lists(st.dictionaries(st.text(max_size=5), st.text(max_size=300), max_size=4), max_size=60),
       st.integers(64, 4096))
def test_row_packer_keeps_every_row_in_order_within_the_budget(rows: list[dict[str, str]], budget: int) -> None:
    packer, batches = p.RowPacker(budget), []
    for r in rows:
        if (b := packer.add(r)) is not None:
            batches.append(b)
    if (b := packer.flush()) is not None:
        batches.append(b)
    assert [r for b in batches for r in b.rows] == rows
    for b in batches:
        assert b.rows  # never an empty batch
        size = sum(len(msgpack.packb(r, use_bin_type=True)) for r in b.rows)
        assert size <= budget or len(b.rows) == 1  # a row above the budget travels alone
    assert packer.flush() is None


A, N, C, I, R = p.AgentSession, p.AnnounceSession, p.ControlSession, "ini", "resp"
OUT_OF_ORDER = [
    # (conversation, valid prefix as (side, message), side breaking the rules, its message, blame)
    (A, [], I, p.Unchanged(BASE, "hash"), "sent unchanged while idle"),
    (A, [], R, p.DeltaChunk(b"d"), "sent delta-chunk while idle"),
    (A, [], R, p.Pong(), "sent pong while idle"),
    (A, [(I, p.Ping())], R, p.BackupDone(b"h", 1, 1), "sent backup-done while pinged"),
    (A, [(I, WITH_BASE)], I, p.SignatureChunk(b"s"), "sent sig-chunk while requested"),
    (A, [(I, WITH_BASE)], I, p.BackupRequest("/x"), "sent backup while requested"),
    (A, [(I, WITH_BASE), (R, p.NeedSignature())], R, p.NeedSignature(), "sent need-sig while sending"),
    (A, [(I, NO_BASE), (R, p.DeltaChunk(b""))], R, p.Unchanged(BASE, "x"), "sent unchanged while streaming"),
    (A, [(I, NO_BASE)], R, p.Unchanged(BASE, "hash"), "unchanged for /srv/app but the server offered no base"),
    (A, [(I, WITH_BASE)], R, p.Unchanged(b"\x06" * 32, "hash"), "offered another base hash"),
    (A, [(I, NO_BASE)], R, p.NeedSignature(), "asked for the signature of /srv/app but no base"),
    (N, [], R, p.Ack(), "sent ack while idle"),
    (N, [], I, p.Ack(), "sent ack while idle"),
    (N, [(I, p.Announce("h", 1))], I, p.Announce("h", 1), "sent announce while announced"),
    (N, [(I, p.Announce("h", 1))], R, p.Pong(), "sent pong while announced"),
    (C, [], R, p.Response(1), "sent response while idle"),
    (C, [(I, SAMPLES[18])], I, p.Request("x"), "sent request while answering"),
    (C, [(I, SAMPLES[18])], R, p.DataChunk(b"x"), "sent data-chunk while answering"),
    (C, [(I, FETCH)], R, p.DataEnd(), "sent data-end while fetch head"),
    (C, [(I, FETCH), (R, head())], I, p.DataChunk(b"x"), "sent data-chunk while downloading"),
    (C, [(I, SAMPLES[18])], R, p.Rows([]), "sent rows while answering"),
    (C, [], R, p.RowsEnd({"rows": 0}), "sent rows-end while idle"),
    (C, [(I, LOG)], R, p.Response([]), "sent response while streaming rows"),
    (C, [(I, LOG)], R, p.DataChunk(b"x"), "sent data-chunk while streaming rows"),
    (C, [(I, LOG), (R, p.Rows([{"id": 1}]))], I, p.Request("log"), "sent request while streaming rows"),
    (C, [(I, FETCH)], R, p.Rows([]), "sent rows while fetch head"),
]


@pytest.mark.parametrize("kind, prefix, side, msg, blame", OUT_OF_ORDER)
def test_out_of_order_blames_the_side_that_broke_the_rules(
    kind: type[p.Conversation], prefix: list[tuple[str, p.Message]], side: str, msg: p.Message, blame: str
) -> None:
    ini, resp = connected(kind)
    for who, m in prefix:
        say(*((ini, resp) if who == I else (resp, ini)), m)
    sender, receiver = (ini, resp) if side == I else (resp, ini)
    state = sender.conversation.state  # type: ignore[union-attr]
    with pytest.raises(LocalProtocolError, match=blame) as local:  # sending it is our bug
        sender.send(msg)
    assert local.value.reason.startswith(f"{sender.our_role} ")
    assert sender.conversation.state == state and not sender.data_to_send()  # type: ignore[union-attr]
    receiver.receive_data(p.encode(msg))
    with pytest.raises(RemoteProtocolError, match=blame) as remote:  # receiving it is theirs
        receiver.next_event()
    assert remote.value.reason.startswith(f"{sender.our_role} ")
    assert f"{sender.our_role} " in str(remote.value)
    assert receiver.conversation.state == state  # type: ignore[union-attr]


_actions = st.sampled_from(["send-ini", "send-resp", "recv-ini", "recv-resp"])


@given(st.sampled_from(list(PAIRS)), st.lists(st.tuples(_actions, st.sampled_from(CONV_SAMPLES)), max_size=30))
def test_random_message_sequences_only_raise_protocol_or_integrity_errors(
    kind: type[p.Conversation], steps: list[tuple[str, p.Message]]
) -> None:
    ini, resp = connected(kind)
    states = {s for s, _, _ in kind.TABLE} | set(kind.TABLE.values())
    for action, msg in steps:
        conn = ini if action.endswith("ini") else resp
        try:
            if action.startswith("send"):
                conn.send(msg)
            else:
                conn.receive_data(p.encode(msg))
                list(iter(conn.next_event, None))
        except (ProtocolError, IntegrityError):
            pass
        assert conn.conversation is not None and conn.conversation.state in states


@given(st.sampled_from(list(PAIRS)), st.data())
def test_whatever_one_machine_lets_out_the_other_accepts(kind: type[p.Conversation], data: st.DataObject) -> None:
    ini, resp = connected(kind)
    for _ in range(data.draw(st.integers(0, 25))):
        state = ini.conversation.state  # type: ignore[union-attr]
        moves = sorted({(who, t.TYPE) for s, who, t in kind.TABLE if s == state})
        if not moves:
            assert state == p.CLOSED
            break
        who, tag = data.draw(st.sampled_from(moves))
        msg = data.draw(st.sampled_from([m for m in CONV_SAMPLES if m.TYPE == tag]))
        sender, receiver = (ini, resp) if who == ini.our_role else (resp, ini)
        try:
            sender.send(msg)
        except LocalProtocolError:  # a semantic rule (base hash, sizes): nothing went out
            assert not sender.data_to_send()
            continue
        assert deliver(sender, receiver) == [msg]
        assert ini.conversation.state == resp.conversation.state  # type: ignore[union-attr]
