"""TLS 1.3 on every connection, as an operator runs it: real daemons and ``deltabkp ctl`` on
127.0.0.1, a recording proxy on the wire, ``openssl s_client``, another cluster's key, an own
PKI, a key rotation, a descriptor-starved server, and the plaintext flag's limits.

The proxy test runs twice: with TLS it must see a TLS 1.3 handshake and then nothing but
encrypted records; with ``--insecure-plaintext`` (the control) the same needles must be seen,
so the proxy demonstrably records what crosses it.
"""

from __future__ import annotations

import datetime
import functools
import json
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers_proc import Cluster, Daemon, cluster, exe, wait_for  # noqa: F401

from deltabkp import net
from deltabkp.errors import DeltabkpError, PeerUnavailable
from deltabkp.net import _tls
from deltabkp.protocol import PROTOCOL_MAGIC, Ping, Pong

# -- a recording TCP proxy -------------------------------------------------------------------------


class RecordingProxy:
    """Forwards 127.0.0.1:``port`` to ``target`` (a trio loop in a thread, so that the
    synchronous process helpers can run beside it) and keeps every byte of every connection:
    ``conns`` holds (client → target, target → client) per connection."""

    def __init__(self, target: str) -> None:
        self.target = net.Address.parse(target)
        self.conns: list[tuple[bytearray, bytearray]] = []
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope = trio.CancelScope()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> RecordingProxy:
        self._thread.start()
        assert self._ready.wait(10), "proxy did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(10)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with self._scope:
            async with trio.open_nursery() as nursery:
                listeners = await nursery.start(functools.partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1"))
                self.port = listeners[0].socket.getsockname()[1]
                self._ready.set()

    async def _handle(self, client: trio.SocketStream) -> None:
        up, down = bytearray(), bytearray()
        self.conns.append((up, down))
        try:
            upstream = await trio.open_tcp_stream(self.target.host, self.target.port)
        except OSError:
            await client.aclose()
            return
        async with client, upstream, trio.open_nursery() as nursery:

            async def pump(src: trio.SocketStream, dst: trio.SocketStream, rec: bytearray) -> None:
                try:
                    while data := await src.receive_some(65536):
                        rec += data
                        await dst.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                nursery.cancel_scope.cancel()  # one side hung up: so does the proxy

            nursery.start_soon(pump, client, upstream, up)
            nursery.start_soon(pump, upstream, client, down)


def tls_records(data: bytes) -> list[tuple[int, bytes]]:
    """(content type, body) of each TLS record in a recorded direction."""
    out, i = [], 0
    while i + 5 <= len(data):
        n = int.from_bytes(data[i + 3 : i + 5], "big")
        out.append((data[i], bytes(data[i + 5 : i + 5 + n])))
        i += 5 + n
    return out


def negotiated_version(server_hello: bytes) -> bytes:
    """The ``supported_versions`` extension of a ServerHello handshake message (TLS 1.3 puts
    its version there; the legacy field says 1.2)."""
    assert server_hello[0] == 2, "not a ServerHello"
    i = 4 + 2 + 32  # handshake header, legacy version, random
    i += 1 + server_hello[i]  # session id
    i += 2 + 1  # cipher suite, compression
    end = i + 2 + int.from_bytes(server_hello[i : i + 2], "big")
    i += 2
    while i < end:
        kind, n = int.from_bytes(server_hello[i : i + 2], "big"), int.from_bytes(server_hello[i + 2 : i + 4], "big")
        if kind == 0x002B:
            return server_hello[i + 4 : i + 4 + n]
        i += 4 + n
    return b""


def assert_tls13_only(proxy: RecordingProxy) -> int:
    """Every connection through ``proxy`` is a TLS 1.3 handshake, then encrypted records only."""
    checked = 0
    for up, down in proxy.conns:
        if not up or not down:
            continue
        ups, downs = tls_records(bytes(up)), tls_records(bytes(down))
        assert ups[0][0] == 22 and ups[0][1][0] == 1, "the client's first record is not a ClientHello"
        assert downs[0][0] == 22, "the server's first record is not a handshake"
        assert negotiated_version(downs[0][1]) == b"\x03\x04", "not TLS 1.3"
        # After the hellos: application data (23) and the compatibility ChangeCipherSpec (20)
        # only; in TLS 1.3 even the certificates and alerts travel encrypted as type 23.
        assert {t for t, _ in ups[1:] + downs[1:]} <= {20, 23}
        checked += 1
    return checked


# -- helpers ------------------------------------------------------------------------------------


def start_agent(c: Cluster, allow: Path, *extra: str, server: str | None = None,
                key_file: Path | None = None) -> Daemon:
    """An agent with ``extra`` flags (Cluster.start_agent takes none)."""
    cmd = [exe("deltabkp-agent"), "--listen", "127.0.0.1:0", "--key-file",
           str(key_file or c.key_file), "--allow", str(allow), "--cache-dir",
           str(c.root / f"cache-{len(c.agents)}"), *extra]
    if server:
        cmd += ["--server", server]
    agent = Daemon("deltabkp-agent", cmd, c._log("agent"), c.env)
    c.agents.append(agent)
    return agent


def make_tree(root: Path, secret: str) -> Path:
    app = root / f"ledger-{secret}"
    (app / "q3").mkdir(parents=True)
    for i in range(20):
        (app / "q3" / f"invoice-{secret}-{i}.txt").write_text(f"customer {secret} owes {i}\n" * 50)
    return app


def log_of(d: Daemon) -> str:
    return d.log_text()


# -- the wire carries TLS 1.3 and nothing readable ----------------------------------------------


@pytest.mark.parametrize("secure", [True, False], ids=["tls", "plaintext-control"])
def test_a_recording_proxy_sees_tls13_and_no_plaintext(cluster: Cluster, tmp_path: Path,
                                                      secure: bool) -> None:
    flags = () if secure else (net.PLAINTEXT_FLAG,)
    secret = "c0ffee5eed"
    app = make_tree(tmp_path / "apps", secret)
    server = cluster.start_server(*flags)
    with RecordingProxy(server.address) as to_server:
        agent = start_agent(cluster, app.parent, *flags, server=to_server.address)
        with RecordingProxy(agent.address) as to_agent:
            # The announce went through ``to_server``; ctl talks through it too, and the server
            # reaches the agent through ``to_agent`` (the node as registered).
            wait_for(lambda: "announced" in log_of(agent), what="the agent's announce")
            node = to_agent.address
            ctl = ["--server", to_server.address, *flags]
            cluster.ctl(*ctl, "register", node, str(app), "--every", "60")
            if secure:  # the control needs no more than this to show what a proxy can read
                # (A new target is due at once: this run may find the first archive unchanged.)
                done = cluster.ctl(*ctl, "backup-now", node, str(app), "--wait")
                assert done["outcome"] in ("stored", "unchanged"), done
                assert len(cluster.ctl(*ctl, "list", node, str(app))) == 1
    wire = b"".join(bytes(b) for conn in to_server.conns + to_agent.conns for b in conn)
    needles = [str(app).encode(), f"invoice-{secret}-7.txt".encode(), f"customer {secret}".encode(),
               PROTOCOL_MAGIC.encode(), b"backup-done"]
    assert len(to_agent.conns) >= 1 and len(to_server.conns) >= 2  # ping; announce + register
    if secure:
        assert [n for n in needles if n in wire] == []
        assert assert_tls13_only(to_server) >= 4 and assert_tls13_only(to_agent) >= 2
    else:  # the control: the same proxy, and what it records is readable
        assert str(app).encode() in wire and PROTOCOL_MAGIC.encode() in wire


# -- strangers get nothing, and are logged as what they are --------------------------------------


def _other_cluster_cert(tmp_path: Path) -> Path:
    """A chain file holding a certificate and key minted under another cluster's CA: what a
    node of another cluster presents."""
    cert, key = _tls._mint_leaf(b"another cluster's key, 32 bytes!", "ctl")
    p = tmp_path / "other-cluster.pem"
    p.write_bytes(cert + key)
    return p


def _tls_probe(address: str, chain: Path | None) -> tuple[str, bytes]:
    """Connect without checking the daemon's certificate, presenting ``chain`` (or nothing),
    send a protocol hello; (how it ended, what the daemon sent)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if chain is not None:
        ctx.load_cert_chain(chain)
    a = net.Address.parse(address)
    got = b""
    with socket.create_connection((a.host, a.port), timeout=10) as raw, ctx.wrap_socket(raw) as s:
        try:
            s.sendall(PROTOCOL_MAGIC.encode() * 4)
            while data := s.recv(4096):
                got += data
        except ssl.SSLError as exc:
            return exc.reason or str(exc), got
        except OSError as exc:
            return str(exc), got
    return "eof", got


def test_strangers_get_nothing_and_are_logged_as_what_they_are(
    cluster: Cluster, tmp_path: Path
) -> None:
    server = cluster.start_server()
    agent = start_agent(cluster, tmp_path, server=server.address)
    other_key = tmp_path / "other.key"
    other_key.write_text("f" * 64 + "\n")
    # ctl with another cluster's key: one clear line, exit 4, on both ends a wrong key.
    res = cluster.ctl_run("status", key_file=other_key)
    assert res.returncode == 4, res
    assert "presented a certificate from another cluster (wrong cluster key?)" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    wait_for(lambda: "refused our certificate as one from another cluster (wrong cluster key?)"
             in log_of(server), what="the server's wrong-key line")
    # A raw TLS client with no certificate, or another cluster's: an alert, not a byte of ours.
    for d in (server, agent):
        how, got = _tls_probe(d.address, None)
        assert got == b"" and "CERTIFICATE_REQUIRED" in how, (how, got)
        how, got = _tls_probe(d.address, _other_cluster_cert(tmp_path))
        assert got == b"" and "UNKNOWN_CA" in how, (how, got)
        wait_for(lambda d=d: "presented no certificate" in log_of(d)  # type: ignore[misc]
                 and "presented a certificate from another cluster (wrong cluster key?)" in log_of(d),
                 what=f"{d.name}'s refusal lines")
        # What an operator sees with openssl: TLS 1.3, and our lack of a certificate refused.
        res = subprocess.run(["openssl", "s_client", "-connect", d.address, "-tls1_3", "-ign_eof"],
                             input="", capture_output=True, text=True, timeout=30, check=False)
        assert "New, TLSv1.3" in res.stdout, res
        assert "alert certificate required" in res.stderr, res  # TLS 1.3 alert 116
        assert "deltabkp cluster CA" in res.stdout  # the issuer the daemon chains to


# -- an operator's own PKI, and a key rotation --------------------------------------------------


def _pki(tmp_path: Path, names: list[str]) -> dict[str, tuple[Path, Path]]:
    """An operator's CA (P-256) and one certificate per name; {"ca": (ca.pem, ca.key), ...}."""
    now = datetime.datetime.now(datetime.UTC)

    def build(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
              signer: ec.EllipticCurvePrivateKey, ca: bool) -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(signer, hashes.SHA256())
        )

    def write(name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
        c, k = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
        c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
        return c, k

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = build("ops CA", ca_key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ops CA")]),
               ca_key, True)
    out = {"ca": write("ca", ca, ca_key)}
    for n in names:
        k = ec.generate_private_key(ec.SECP256R1())
        out[n] = write(n, build(n, k, ca.subject, ca_key, False), k)
    return out


def test_an_operators_own_pki_replaces_the_derived_ca(cluster: Cluster, tmp_path: Path) -> None:
    (tmp_path / "pki").mkdir()
    pki = _pki(tmp_path / "pki", ["server", "agent", "ctl"])

    def flags(name: str) -> list[str]:
        cert, key = pki[name]
        return ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(pki["ca"][0])]

    app = make_tree(tmp_path / "apps", "0p5")
    server = cluster.start_server(*flags("server"))
    agent = start_agent(cluster, app.parent, *flags("agent"), server=server.address)
    wait_for(lambda: "announced" in log_of(agent), what="the agent's announce")
    # register pings the agent (no warning: it answered), server → agent over the PKI too.
    reg = cluster.ctl(*flags("ctl"), "register", agent.address, str(app), "--every", "60")
    assert "warning" not in reg, reg
    # A ctl with only the derived cluster CA is a stranger here.
    res = cluster.ctl_run("status")
    assert res.returncode == 4 and "another cluster" in res.stderr, res
    # Half a PKI is a usage error, said at once.
    res = cluster.ctl_run("--tls-cert", str(pki["ctl"][0]), "status")
    assert res.returncode == 2 and "go together" in res.stderr, res


def test_a_key_rotation_accepts_both_keys_while_it_runs(cluster: Cluster, tmp_path: Path) -> None:
    old, new = cluster.key_file, tmp_path / "new.key"
    new.write_text("9" * 64 + "\n")
    app = make_tree(tmp_path / "apps", "r0t")
    # Mid-rotation: the server still on the old key, the agent already on the new one, each
    # accepting the other; a ctl on the new key with the old one accepted.
    server = cluster.start_server("--extra-key-file", str(new))
    agent = start_agent(cluster, app.parent, "--extra-key-file", str(old), key_file=new,
                        server=server.address)
    wait_for(lambda: "announced" in log_of(agent), what="the agent's announce")
    ctl = ["--key-file", str(new), "--extra-key-file", str(old)]
    res = cluster.ctl_run(*ctl, "--json", "register", agent.address, str(app), "--every", "60")
    # No warning: the server's ping reached the agent (old-key server → new-key agent).
    assert res.returncode == 0 and "warning" not in json.loads(res.stdout), res
    # Without the old key accepted, a new-key ctl cannot talk to the old-key server.
    res = cluster.ctl_run("status", key_file=new)
    assert res.returncode == 4 and "wrong cluster key" in res.stderr, res


# -- a descriptor-starved server, and the plaintext flag ----------------------------------------


def test_a_server_out_of_descriptors_keeps_answering_and_logs_little(cluster: Cluster) -> None:
    # 128 descriptors and room for 256 pending handshakes: 200 idle sockets exhaust the
    # descriptors (EMFILE on accept), which must cost neither tracebacks nor the ctl.
    cmd = ["prlimit", "--nofile=128", exe("deltabkp-server"), "--listen", "127.0.0.1:0",
           "--data-dir", str(cluster.data_dir), "--key-file", str(cluster.key_file),
           "--max-handshakes", "256"]
    server = cluster.server = Daemon("deltabkp-server", cmd, cluster._log("server"), cluster.env)
    a = server.endpoint
    idle = []
    try:
        for _ in range(200):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex((a.host, a.port))
            idle.append(s)
        wait_for(lambda: "EMFILE" in log_of(server), what="the server to run out of descriptors")
        res = cluster.ctl_run("--json", "status", timeout=120)
        assert res.returncode == 0, (res, log_of(server)[-3000:])
    finally:
        for s in idle:
            s.close()
    text = log_of(server)
    assert "Traceback" not in text
    assert text.count("EMFILE") <= 2, text[-3000:]  # one rate-limited warning (per minute)
    assert len(text.splitlines()) < 30, text[-3000:]


@pytest.fixture
def in_process() -> Iterator[None]:
    """The commands below run in this process: undo their TLS settings (their logging
    set-up is undone by conftest's autouse fixture)."""
    yield
    net.install_tls(net.TlsSettings())


def test_the_plaintext_flag_is_refused_off_loopback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], in_process: None
) -> None:
    from deltabkp.cli import main as deltabkp_main
    from deltabkp_agent.__main__ import main as agent_main
    from deltabkp_server.__main__ import main as server_main

    key = ["--key-file", str(tmp_path / "k"), net.PLAINTEXT_FLAG]
    (tmp_path / "k").write_text("a" * 64)
    runs = [
        (server_main, ["--listen", "0.0.0.0:0", "--data-dir", str(tmp_path / "d"), *key]),
        (agent_main, ["--listen", "127.0.0.1:0", "--allow", str(tmp_path), "--server",
                      "10.1.2.3:7470", *key]),
        (deltabkp_main, ["ctl", "--server", "10.1.2.3:7470", *key, "status"]),
    ]
    for main, argv in runs:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"{net.PLAINTEXT_FLAG} refused" in err and "loopback" in err, err
    assert not (tmp_path / "d").exists()  # refused before anything started


async def test_tls_and_plaintext_peers_do_not_mix() -> None:
    key = b"k" * 32
    refused: list[DeltabkpError] = []
    async with trio.open_nursery() as nursery:

        async def handler(stream: trio.SocketStream) -> None:
            try:
                await net.accept(stream, key=key, role="server", timeout=5)
            except DeltabkpError as exc:
                refused.append(exc)
            await stream.aclose()

        listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        addr = net.Address("127.0.0.1", listeners[0].socket.getsockname()[1])
        with pytest.raises(PeerUnavailable):
            await net.connect(addr, key=key, role="ctl", timeout=5, tls=net.TlsSettings(plaintext=True))
        nursery.cancel_scope.cancel()
    [err] = refused
    assert "does not speak TLS" in str(err) and net.PLAINTEXT_FLAG in str(err)


async def test_counters_are_the_bytes_on_the_wire_tls_included() -> None:
    key = b"k" * 32
    async with trio.open_nursery() as nursery:

        async def handler(stream: trio.SocketStream) -> None:
            async with await net.accept(stream, key=key, role="server", timeout=5) as chan:
                await chan.receive()
                await chan.send(Pong({}))

        listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        addr = net.Address("127.0.0.1", listeners[0].socket.getsockname()[1])
        async with await net.connect(addr, key=key, role="agent", timeout=5) as chan:
            await chan.send(Ping())
            await chan.receive_a(Pong)
            # Frames alone are under 200 bytes each way; TLS adds the handshake (certificates
            # both ways) and a record header and tag per record: all of it is counted.
            assert chan.bytes_sent > 500 and chan.bytes_received > 500
        nursery.cancel_scope.cancel()


def test_the_cluster_ca_is_the_same_for_every_holder_of_a_key_and_only_for_them() -> None:
    a, b = b"a" * 32, b"b" * 32
    pem = net.cluster_ca_pem(a)
    assert pem == net.cluster_ca_pem(a)  # built, not stored: every node derives the same CA
    assert pem != net.cluster_ca_pem(b)
    ca = x509.load_pem_x509_certificate(pem)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert, _ = _tls._mint_leaf(a, "agent")
    leaf = x509.load_pem_x509_certificate(cert)
    assert leaf.issuer == ca.subject and "deltabkp-agent" in leaf.subject.rfc4514_string()
    leaf.verify_directly_issued_by(ca)
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert life <= datetime.timedelta(seconds=_tls.LEAF_LIFETIME_S + 3600)  # short-lived
    # A different minting gives another key: nothing per node is derived from the cluster key
    # but the CA.
    assert _tls._mint_leaf(a, "agent")[1] != _tls._mint_leaf(a, "agent")[1]
