"""ctl in a blink (issue 10): the blocking edge and the ctl's TLS material cache.

The cache (``net._certcache``): reused while valid, and re-minted — never used — when it is
expired, corrupt, under another key, not a private file of ours, or unreadable; written 0600
in a 0700 directory; its format pinned by a golden file.  The blocking edge
(``net.connect_blocking``) against a real server: a one-shot ctl command imports neither Trio
nor ``cryptography`` once its cache is warm, and every failure reads as on the Trio edge.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from deltabkp import net, protocol
from deltabkp.errors import AuthError, DeltabkpError, PeerUnavailable
from deltabkp.net import _certcache
from helpers_proc import Cluster, cluster  # noqa: F401

KEY = b"0123456789abcdef0123456789abcdef"
GOLDEN = Path(__file__).parent / "golden" / "tls" / "cache-v1.bin"
T0 = 1_800_000_000  # a fixed "now" for the cache's clock


def material(minted: int = T0, tag: bytes = b"a") -> _certcache.Material:
    return _certcache.Material(
        ca_pem=b"-----BEGIN CERTIFICATE-----\nCA " + tag + b"\n-----END CERTIFICATE-----\n",
        chain_pem=b"-----BEGIN CERTIFICATE-----\nleaf " + tag + b"\n-----END CERTIFICATE-----\n"
        b"-----BEGIN PRIVATE KEY-----\nkey " + tag + b"\n-----END PRIVATE KEY-----\n",
        minted=minted, not_after=minted + 86400,
    )


class Mint:
    """A mint that counts its calls (the cache's logic, not the certificates, is tested here;
    real certificates go through the cache in the ctl tests below)."""

    def __init__(self, minted: int = T0) -> None:
        self.calls = 0
        self.minted = minted

    def __call__(self) -> _certcache.Material:
        self.calls += 1
        return material(self.minted, tag=str(self.calls).encode())


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return _certcache.cache_path(tmp_path / "cache" / "tls", KEY, (), "ctl", b"params")


# -- the cache ------------------------------------------------------------------------------------


def test_golden_file_pins_the_format() -> None:
    assert _certcache.encode(material(), KEY) == GOLDEN.read_bytes()
    assert _certcache.decode(GOLDEN.read_bytes(), KEY) == material()
    assert GOLDEN.read_bytes().startswith(_certcache.MAGIC)


def test_minted_once_then_reused_from_a_private_file(path: Path) -> None:
    mint = Mint()
    first = _certcache.load_or_mint(path, KEY, mint, now=T0 + 10)
    again = _certcache.load_or_mint(path, KEY, mint, now=T0 + 20)
    assert mint.calls == 1 and again == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    # The name depends on the key, the trusted extra keys, the role and the parameters.
    names = {
        _certcache.cache_path(path.parent, k, extra, role, params).name
        for k, extra, role, params in [
            (KEY, (), "ctl", b"params"), (b"another key, 32 bytes long......", (), "ctl", b"params"),
            (KEY, (b"extra",), "ctl", b"params"), (KEY, (), "agent", b"params"),
            (KEY, (), "ctl", b"other params"),
        ]
    }
    assert len(names) == 5 and path.name in names and KEY.hex() not in path.name


def test_expired_or_expiring_material_is_minted_again(path: Path) -> None:
    mint = Mint()
    _certcache.load_or_mint(path, KEY, mint, now=T0)
    # Less than the margin left: peers with a clock ahead could refuse it.
    later = T0 + 86400 - _certcache.REUSE_MARGIN_S + 1
    mint.minted = int(later)
    fresh = _certcache.load_or_mint(path, KEY, mint, now=later)
    assert mint.calls == 2 and fresh.minted == int(later)
    assert _certcache.load_or_mint(path, KEY, mint, now=later + 1) == fresh  # rewritten
    # A clock gone back before the mint: not used either.
    _certcache.load_or_mint(path, KEY, mint, now=later - 100)
    assert mint.calls == 3


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "empty", "other key", "garbage"])
def test_corrupt_or_foreign_material_is_never_used(path: Path, damage: str) -> None:
    mint = Mint()
    _certcache.load_or_mint(path, KEY, mint, now=T0)
    data = path.read_bytes()
    bad = {
        "flipped byte": data[:40] + bytes([data[40] ^ 1]) + data[41:],
        "truncated": data[: len(data) // 2],
        "empty": b"",
        # A file with the right name but written under another key (a planted CA).
        "other key": _certcache.encode(material(tag=b"planted"), b"x" * 32),
        "garbage": os.urandom(2000),
    }[damage]
    path.write_bytes(bad)
    got = _certcache.load_or_mint(path, KEY, mint, now=T0 + 1)
    assert mint.calls == 2 and got.chain_pem.count(b"leaf 2")
    assert _certcache.decode(path.read_bytes(), KEY) == got  # replaced by the fresh one


@pytest.mark.parametrize("how", ["group-readable", "world-readable", "someone else's", "a symlink",
                                 "a directory"])
def test_a_file_that_is_not_private_and_ours_is_never_used(path: Path, how: str) -> None:
    mint = Mint()
    first = _certcache.load_or_mint(path, KEY, mint, now=T0)
    if how == "group-readable":
        path.chmod(0o640)
    elif how == "world-readable":
        path.chmod(0o604)
    elif how == "someone else's":
        os.chown(path, 65534, 65534)
    elif how == "a symlink":
        real = path.with_name("elsewhere")
        path.rename(real)
        path.symlink_to(real)
    else:  # unreadable as a file, even for root
        path.unlink()
        path.mkdir()
    got = _certcache.load_or_mint(path, KEY, mint, now=T0 + 1)
    assert mint.calls == 2 and got != first
    if how != "a directory":  # replaced by a private file of ours
        st = path.lstat()
        assert stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()
        assert stat.S_IMODE(st.st_mode) == 0o600


def test_an_unwritable_cache_only_means_minting(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    mint = Mint()
    p = _certcache.cache_path(blocker / "tls", KEY, (), "ctl", b"")
    assert _certcache.load_or_mint(p, KEY, mint, now=T0) == material(tag=b"1")
    assert _certcache.load_or_mint(p, KEY, mint, now=T0) == material(tag=b"2")


def test_real_material_from_the_cache_makes_the_same_contexts(tmp_path: Path) -> None:
    settings = net.TlsSettings(cache_dir=tmp_path / "tls")
    net.tls_client_context(settings, KEY, "ctl")
    (cached,) = (tmp_path / "tls").iterdir()
    got = _certcache.decode(cached.read_bytes(), KEY)
    assert got is not None and got.ca_pem == net.cluster_ca_pem(KEY)
    assert b"PRIVATE KEY" in got.chain_pem


# -- the blocking edge against a real server -------------------------------------------------------


def _ctl_in_process(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    """One ctl command in a fresh interpreter that reports which heavy packages it imported."""
    code = (
        "import sys\n"
        "from deltabkp import cli\n"
        f"rc = cli.main(['ctl', '--server', {cluster.server.address!r}, '--key-file', "  # type: ignore[union-attr]
        f"{str(cluster.key_file)!r}, *{list(args)!r}])\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'trio', 'cryptography'})\n"
        # the backup side of the protocol (server <-> agent) is built only for the daemons
        "heavy += sorted({'deltabkp.protocol._backup'} & set(sys.modules))\n"
        "print('IMPORTED', ','.join(heavy) or '-', file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=cluster.env, timeout=60, check=False)


def test_one_shot_commands_need_neither_trio_nor_a_mint_once_cached(cluster: Cluster) -> None:
    cluster.start_server()
    first = _ctl_in_process(cluster, "status")
    assert first.returncode == 0, first.stderr
    assert "IMPORTED cryptography\n" in first.stderr  # minted once, on the blocking edge
    cached = list((Path(cluster.env["HOME"]) / ".cache" / "deltabkp" / "tls").iterdir())
    assert len(cached) == 1 and stat.S_IMODE(cached[0].stat().st_mode) == 0o600
    for args in (["--json", "targets"], ["log", "--limit", "0"]):  # an answer, a stream
        res = _ctl_in_process(cluster, *args)
        assert res.returncode == 0 and "IMPORTED -\n" in res.stderr, (args, res.stderr)


def _both_edges(address: net.Address, key: bytes, timeout: float,
                tls: net.TlsSettings | None = None) -> list[str]:
    """What each edge says when connecting as ctl fails (``ok`` if it does not)."""
    out = []

    async def trio_edge() -> None:
        chan = await net.connect(address, key=key, role="ctl", timeout=timeout, tls=tls)
        await chan.aclose()

    for edge in ("trio", "blocking"):
        try:
            if edge == "trio":
                trio.run(trio_edge)
            else:
                net.connect_blocking(address, key=key, role="ctl", timeout=timeout, tls=tls).close()
            out.append("ok")
        except DeltabkpError as exc:
            out.append(f"{type(exc).__name__}: {exc}")
    return out


def test_the_blocking_edge_answers_and_fails_as_the_trio_edge_does(cluster: Cluster) -> None:
    server = cluster.start_server()
    key = cluster.key_file.read_bytes().strip()
    assert _both_edges(server.endpoint, key, 10) == ["ok", "ok"]
    with net.connect_blocking(server.endpoint, key=key, role="ctl", timeout=10) as chan:
        chan.send(protocol.Request("status", {}))
        assert chan.receive_a(protocol.Response, 10).data["server_id"]
    with net.connect_blocking(server.endpoint, key=key, role="ctl", timeout=10) as chan:
        chan.send(protocol.Request("unregister", {"node": "10.0.0.5:7471", "path": "/nowhere"}))
        with pytest.raises(DeltabkpError) as info:
            chan.receive(10)
    assert info.value.exit_code == 3 and info.value.path == "/nowhere"  # a refusal
    wrong = _both_edges(server.endpoint, b"f" * 64, 10)
    assert wrong[0] == wrong[1] and wrong[0].startswith(AuthError.__name__), wrong
    assert "wrong cluster key" in wrong[0]
    plain = _both_edges(server.endpoint, key, 10, net.TlsSettings(plaintext=True))
    assert plain[0] == plain[1] and plain[0].startswith(PeerUnavailable.__name__), plain
    with socket.socket() as silent:  # accepts (the kernel does) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        mute = net.Address("127.0.0.1", silent.getsockname()[1])
        said = _both_edges(mute, key, 0.3)
    assert said[0] == said[1] == (
        f"PeerUnavailable: server {mute}: handshake timed out after 0.3 s"
    ), said
    # A refused connection: both say so and name the server (the blocking edge also says why).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = net.Address("127.0.0.1", s.getsockname()[1])
    refused = _both_edges(closed, key, 5)
    assert all(r.startswith(f"PeerUnavailable: server {closed}: cannot connect") for r in refused)
    assert "Connection refused" in refused[1]
