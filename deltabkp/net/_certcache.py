"""The ctl's TLS material kept between runs: the cluster CA and a minted leaf, in one file.

Minting costs a short-lived process more than its whole request (importing ``cryptography``'s
x509, deriving the CA, signing a leaf: ~0.1-0.2 s of CPU), so ``deltabkp ctl`` keeps what it
minted in ``$XDG_CACHE_HOME/deltabkp/tls/`` (``~/.cache/deltabkp/tls/``) and reuses it while
the leaf has more than ``REUSE_MARGIN_S`` of validity left.  Daemons do not use this: they
mint once per start and keep the material in memory.

File (docs/formats.md, "TLS material cache"): ``DBKPTLS1\\n``, one header line
``MINTED NOT_AFTER CA_LEN CHAIN_LEN\\n`` (decimal), the CA bundle and the chain (leaf
certificate + leaf key, PEM), then the hex HMAC-SHA256 of everything before it and ``\\n``.

Invariants (the security reasoning is in docs/security.md):
- the file's name and its MAC key are HMACs of the cluster key: nothing in the name says which
  key it belongs to, and a file not written by a holder of that key (a planted CA, a swapped
  leaf, a torn write) fails its MAC and is replaced, never used;
- the file is created 0600 in a 0700 directory, atomically; a file that is not a regular file
  of ours, or that others may read, is never used (and is replaced);
- any problem with the cache (unreadable, corrupt, expired, a read-only home) only means a
  fresh mint: the cache can make a command faster, never make it fail;
- reading it needs no ``cryptography`` import (stdlib ``hmac`` only); a size limit applies.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

import attrs

from deltabkp._atomic import write_bytes_atomic
from deltabkp._xdg import user_dir

__all__ = [
    "MAGIC",
    "MAX_FILE",
    "REUSE_MARGIN_S",
    "Material",
    "cache_path",
    "decode",
    "encode",
    "load_or_mint",
    "mac_key",
    "tls_cache_dir",
]

MAGIC = b"DBKPTLS1\n"  # "1": the format's version
#: CA bundle + chain are a few KiB (an Ed25519 CA per trusted key); refuse anything larger.
MAX_FILE = 64 * 1024
#: A cached leaf is handed out only with this much validity left: peers whose clocks run up to
#: an hour ahead (the skew ``_tls`` allows) must still accept it.
REUSE_MARGIN_S = 3600.0
_NAME_LABEL = b"deltabkp/1 tls cache name\0"
_MAC_LABEL = b"deltabkp/1 tls cache mac\0"
_MAC_HEX = 64


@attrs.frozen
class Material:
    """What a ctl process needs for its TLS contexts: what it trusts and what it presents."""

    ca_pem: bytes  # the cluster CA(s), PEM
    chain_pem: bytes  # the leaf certificate then its private key, PEM
    minted: int  # Unix time the leaf was minted
    not_after: int  # Unix time the leaf expires (never later than its certificate says)


def tls_cache_dir() -> Path | None:
    """``$XDG_CACHE_HOME/deltabkp/tls`` (``~/.cache/deltabkp/tls``); None (no cache) without
    a home directory."""
    base = user_dir("cache")
    return None if base is None else base / "tls"


def mac_key(key: bytes) -> bytes:
    return hmac.new(key, _MAC_LABEL, hashlib.sha256).digest()


def cache_path(
    cache_dir: Path, key: bytes, extra_keys: tuple[bytes, ...], role: str, params: bytes
) -> Path:
    """The file for this key, trusted extra keys, role and certificate parameters (``params``:
    anything that changes what a mint produces, so a change never reuses an old file)."""
    h = hmac.new(key, _NAME_LABEL, hashlib.sha256)
    for part in (role.encode(), params, *(hashlib.sha256(k).digest() for k in extra_keys)):
        h.update(len(part).to_bytes(4, "big") + part)
    return cache_dir / f"{role}-{h.hexdigest()[:32]}.tls"


def encode(material: Material, key: bytes) -> bytes:
    body = (
        MAGIC
        + b"%d %d %d %d\n" % (
            material.minted, material.not_after, len(material.ca_pem), len(material.chain_pem)
        )
        + material.ca_pem
        + material.chain_pem
    )
    return body + hmac.new(mac_key(key), body, hashlib.sha256).hexdigest().encode() + b"\n"


def decode(data: bytes, key: bytes) -> Material | None:
    """The material in ``data``, or None if it is not a whole file written under ``key``."""
    if len(data) > MAX_FILE or not data.startswith(MAGIC) or len(data) < _MAC_HEX + 1:
        return None
    body, mac = data[: -_MAC_HEX - 1], data[-_MAC_HEX - 1 :]
    expected = hmac.new(mac_key(key), body, hashlib.sha256).hexdigest().encode() + b"\n"
    if not hmac.compare_digest(mac, expected):
        return None
    # Past the MAC the file is ours: a malformed header is still refused, never trusted.
    header, sep, rest = body[len(MAGIC) :].partition(b"\n")
    fields = header.split(b" ")
    if not sep or len(fields) != 4 or not all(f.isdigit() for f in fields):
        return None
    minted, not_after, ca_len, chain_len = (int(f) for f in fields)
    if ca_len + chain_len != len(rest):
        return None
    return Material(rest[:ca_len], rest[ca_len:], minted, not_after)


def _read_own(path: Path) -> bytes | None:
    """The file's bytes if it is a regular file of ours that only we may read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(MAX_FILE + 1)
    except OSError:
        return None
    finally:
        os.close(fd)


def _usable(m: Material, now: float) -> bool:
    return m.minted <= now < m.not_after - REUSE_MARGIN_S


def load_or_mint(
    path: Path, key: bytes, mint: Callable[[], Material], *, now: float | None = None
) -> Material:
    """The cached material at ``path`` when it is ours, intact and valid long enough; else
    ``mint()``'s, written to ``path`` for the next run (best effort)."""
    t = time.time() if now is None else now
    data = _read_own(path)
    cached = decode(data, key) if data is not None else None
    if cached is not None and _usable(cached, t):
        return cached
    fresh = mint()
    with contextlib.suppress(OSError):  # a read-only or full home: just no cache
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Not durable: a file lost or torn by a crash fails its MAC and is minted again.
        write_bytes_atomic(path, encode(fresh, key), durable=False, mode=0o600)
        _prune(path.parent, keep=path, older_than=t - (fresh.not_after - fresh.minted) - 3600)
    return fresh


def _prune(cache_dir: Path, *, keep: Path, older_than: float) -> None:
    """Remove files written before ``older_than`` (more than a leaf's lifetime ago: expired
    for sure), so other keys' and roles' files do not pile up (one per test cluster, say)."""
    for entry in os.scandir(cache_dir):
        if not entry.name.endswith(".tls") or entry.path == str(keep):
            continue
        with contextlib.suppress(OSError):
            if entry.stat(follow_symlinks=False).st_mtime < older_than:
                os.unlink(entry.path)
