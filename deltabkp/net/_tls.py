"""TLS 1.3 with mutual authentication: the cluster CA derived from the cluster key, this
process's own short-lived certificate under it, or an operator's own PKI; and the one
translation of TLS failures into errors a user can act on.

Trust model (docs/security.md): the cluster CA's Ed25519 key is HKDF-SHA256 of the cluster
key, and its self-signed certificate is built deterministically (fixed dates and serial,
deterministic Ed25519 signatures), so every holder of the key builds the same CA byte for
byte without any file to distribute.  Each process mints a fresh Ed25519 leaf under it for
its role (valid ``LEAF_LIFETIME_S``, re-minted after ``REFRESH_S``), never per connection;
``deltabkp ctl``, a process that lives for one request, reuses the one it minted in an earlier
run (``TlsSettings.cache_dir``, ``_certcache``: MAC'ed under the cluster key, mode 0600).
Trust is that CA only (plus the CAs of ``extra_keys`` during a key rotation), or exactly the
operator's ``--tls-ca`` bundle; there is no hostname check: membership is the identity.

Invariants: only TLS 1.3, both sides present a certificate and verify the other's; private
keys are loaded into OpenSSL through an anonymous memfd, and a daemon's never touch a file
system (ctl's leaf key is in its private cache file, nowhere else); plaintext is only ever
the explicit ``TlsSettings(plaintext=True)`` and only to loopback addresses.
Longer than ~450 lines on purpose: the certificates, the contexts and the reading of TLS
failures are one trust model, read together with docs/security.md; and each minting function
imports ``cryptography`` itself, so that a ctl whose material is cached never loads it.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import ssl
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from deltabkp.errors import (
    AuthError,
    DeltabkpError,
    PeerUnavailable,
    RemoteProtocolError,
    UsageError,
)
from deltabkp.net import _certcache
from deltabkp.net._address import is_loopback
from deltabkp.net._keys import load_key

if TYPE_CHECKING:  # imported where a certificate is minted (below), not at start
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ed25519

__all__ = [
    "LEAF_LIFETIME_S",
    "PLAINTEXT_FLAG",
    "Contexts",
    "TlsSettings",
    "add_tls_arguments",
    "check_plaintext_address",
    "cluster_ca_pem",
    "describe_tls_failure",
    "install_tls",
    "installed_tls",
    "prepare_tls",
    "tls_client_context",
    "tls_contexts",
    "tls_from_args",
]

#: A minted leaf is valid this long (and from an hour back: clocks of nodes differ a little).
LEAF_LIFETIME_S = 24 * 3600.0
#: Contexts (a minted leaf, or an operator's files re-read) are rebuilt this often.
REFRESH_S = 3600.0
_SKEW_S = 3600.0
PLAINTEXT_FLAG = "--insecure-plaintext"
_CA_SALT = b"deltabkp/1 cluster CA"
_MAX_PEM = 1 << 20  # an operator's certificate, key or CA bundle: 1 MiB is plenty


@attrs.frozen
class TlsSettings:
    """How this process secures its connections (the ``--tls-*`` flags of daemons and ctl).

    Default: certificates derived from the cluster key.  ``cert_file``/``key_file``/``ca_file``
    (all three) replace both our certificate and what we trust with an operator's PKI.
    ``extra_keys``: other cluster keys accepted too, by TLS (their CAs are trusted) and by the
    key handshake (key rotation).  ``plaintext``: no TLS at all, loopback only.
    """

    plaintext: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    extra_keys: tuple[bytes, ...] = attrs.field(default=(), repr=False)
    #: Keep minted material here between runs (``_certcache``: ctl, a short-lived process);
    #: None: mint in memory at start (daemons).
    cache_dir: Path | None = None

    def __attrs_post_init__(self) -> None:
        pki = (self.cert_file, self.key_file, self.ca_file)
        if any(p is not None for p in pki) and not all(p is not None for p in pki):
            raise UsageError("--tls-cert, --tls-key and --tls-ca go together (an own PKI)")
        if self.plaintext and self.pki:
            raise UsageError(f"{PLAINTEXT_FLAG} cannot be combined with TLS options")

    @property
    def pki(self) -> bool:
        return self.cert_file is not None

    @property
    def mode(self) -> str:
        """For logs: what secures our connections."""
        if self.plaintext:
            return "PLAINTEXT (no encryption, loopback only)"
        if self.pki:
            return f"TLS 1.3, certificate {self.cert_file}, CA {self.ca_file}"
        extra = f" (+{len(self.extra_keys)} other key(s) trusted)" if self.extra_keys else ""
        return f"TLS 1.3, cluster CA from the cluster key{extra}"


@attrs.frozen
class Contexts:
    """The two ``ssl.SSLContext``s of one identity: accepting and connecting."""

    server: ssl.SSLContext
    client: ssl.SSLContext
    built: float


_installed = TlsSettings()
_cache: dict[tuple[TlsSettings, bytes, str], Contexts] = {}
_client_cache: dict[tuple[TlsSettings, bytes, str], ssl.SSLContext] = {}


def install_tls(settings: TlsSettings) -> None:
    """This process's TLS settings (a daemon or ctl, from its flags, once at start): a process
    has one identity, so ``connect``/``accept`` use these unless given others."""
    global _installed
    _installed = settings


def installed_tls() -> TlsSettings:
    return _installed


def prepare_tls(key: bytes, role: str) -> None:
    """Build this process's contexts for ``role`` now (a daemon at start: a bad file or a
    minting failure shows at once, and no connection waits for it)."""
    tls_contexts(_installed, key, role)


def tls_contexts(settings: TlsSettings, key: bytes, role: str) -> Contexts:
    """The contexts for ``role`` under ``key``: built once, rebuilt after ``REFRESH_S``."""
    k = (settings, key, role)
    got = _cache.get(k)
    if got is None:
        got = _cache[k] = _build(settings, key, role)
    elif time.monotonic() - got.built > REFRESH_S:
        try:
            got = _cache[k] = _build(settings, key, role)
        except UsageError:
            # An operator's file caught mid-replacement: keep serving with what works, and
            # try again at the next refresh.
            got = _cache[k] = attrs.evolve(got, built=time.monotonic())
    return got


def add_tls_arguments(p: argparse.ArgumentParser, default: object = None) -> None:
    """The TLS flags of both daemons and ctl (``default``: ctl's subcommands pass SUPPRESS)."""
    p.add_argument("--tls-cert", metavar="PEM", default=default,
                   help="own PKI: this node's certificate (with --tls-key and --tls-ca; default: "
                   "a short-lived certificate minted under the CA derived from the cluster key)")
    p.add_argument("--tls-key", metavar="PEM", default=default,
                   help="own PKI: the private key of --tls-cert")
    p.add_argument("--tls-ca", metavar="PEM", default=default,
                   help="own PKI: the CA certificate(s) peers must chain to (a bundle of two "
                   "during a CA rotation)")
    p.add_argument("--extra-key-file", metavar="F", action="append",
                   default=default if default is not None else [],
                   help="another cluster key whose members are accepted too (key rotation: "
                   "docs/security.md); repeatable")
    p.add_argument(PLAINTEXT_FLAG, action="store_true",
                   default=default if default is not None else False,
                   help="DEBUGGING ONLY: no TLS, every byte in clear; refused unless every "
                   "address is loopback; every peer must use it too")


def tls_from_args(args: argparse.Namespace) -> TlsSettings:
    """The settings the TLS flags ask for (files checked now: a bad flag fails at start)."""

    def path(name: str) -> Path | None:
        v = getattr(args, name, None)
        return Path(v) if v else None

    settings = TlsSettings(
        plaintext=bool(getattr(args, "insecure_plaintext", False)),
        cert_file=path("tls_cert"), key_file=path("tls_key"), ca_file=path("tls_ca"),
        extra_keys=tuple(load_key(f) for f in getattr(args, "extra_key_file", None) or ()),
    )
    if settings.pki:
        _build(settings, b"", "check")  # unreadable or mismatched files: an error now
    return settings


# -- the cluster CA and minted leaves ------------------------------------------------------------
# ``cryptography`` is imported inside these functions: only a process that mints pays for it
# (a daemon at start and every hour; ctl when its cached material is missing or expiring).


def _ca_key(cluster_key: bytes) -> ed25519.Ed25519PrivateKey:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=_CA_SALT, info=b"ed25519 CA key").derive(
        cluster_key
    )
    return ed25519.Ed25519PrivateKey.from_private_bytes(seed)


def _ca_name(ca_key: ed25519.Ed25519PrivateKey) -> x509.Name:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    raw = ca_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    # The fingerprint in the name: another cluster's CA is another issuer ("unknown CA").
    fp = hashlib.sha256(raw).hexdigest()[:16]
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "deltabkp"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"deltabkp cluster CA {fp}"),
    ])


def _ca_cert(ca_key: ed25519.Ed25519PrivateKey) -> x509.Certificate:
    """Byte-identical on every holder of the key: fixed dates and serial, Ed25519 is
    deterministic."""
    from cryptography import x509

    name = _ca_name(ca_key)
    pub = ca_key.public_key()
    serial = int.from_bytes(hashlib.sha256(name.public_bytes()).digest()[:16], "big") >> 1
    return (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(pub).serial_number(serial)
        .not_valid_before(datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(datetime.datetime(9999, 12, 31, tzinfo=datetime.UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .sign(ca_key, None)
    )


def cluster_ca_pem(cluster_key: bytes) -> bytes:
    """The cluster CA's certificate (PEM), e.g. for an operator's ``openssl`` checks."""
    from cryptography.hazmat.primitives import serialization

    return _ca_cert(_ca_key(cluster_key)).public_bytes(serialization.Encoding.PEM)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    from cryptography import x509

    return x509.KeyUsage(
        digital_signature=not cert_sign, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
        crl_sign=cert_sign, encipher_only=False, decipher_only=False,
    )


def _mint_leaf(
    cluster_key: bytes, role: str, now: datetime.datetime | None = None
) -> tuple[bytes, bytes]:
    """A fresh key and a certificate for ``role`` under the cluster CA, valid from ``now``
    (default: the clock) less the skew: (cert PEM, key PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key = _ca_key(cluster_key)
    ca = _ca_cert(ca_key)
    leaf_key = ed25519.Ed25519PrivateKey.generate()
    now = now or datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "deltabkp"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"deltabkp-{role}"),
        ]))
        .issuer_name(ca.subject).public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(seconds=_SKEW_S))
        .not_valid_after(now + datetime.timedelta(seconds=LEAF_LIFETIME_S))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(
            # One certificate for both ends: a daemon accepts and connects.
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, None)
    )
    key_pem = leaf_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


# -- contexts ------------------------------------------------------------------------------------


def _read_pem(path: Path, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_PEM + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from None
    if len(data) > _MAX_PEM:
        raise UsageError(f"{what} {path} is larger than {_MAX_PEM} bytes")
    if b"-----BEGIN" not in data:
        raise UsageError(f"{what} {path} is not PEM")
    return data


@contextmanager
def _private_file(data: bytes) -> Iterator[str]:
    """A path to ``data`` that no other process can read, gone afterwards (``ssl`` loads
    certificates and keys from paths only): an anonymous memfd, else a private temp file."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("deltabkp-tls", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="deltabkp-tls-") as d:  # mode 0700
        p = Path(d) / "chain.pem"
        p.write_bytes(data)
        yield str(p)


def _context(server_side: bool, ca_pem: bytes, chain_pem: bytes, where: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # cluster membership (the CA) is the identity, not a name
    ctx.verify_mode = ssl.CERT_REQUIRED  # on the server side: a client certificate is required
    if server_side:
        ctx.num_tickets = 0  # one conversation per connection: resumption buys nothing
    try:
        ctx.load_verify_locations(cadata=ca_pem.decode("ascii", errors="replace"))
        with _private_file(chain_pem) as path:
            ctx.load_cert_chain(path)
    except ssl.SSLError as exc:
        raise UsageError(f"unusable TLS material ({where}): {exc.reason or exc}") from None
    return ctx


def _material(settings: TlsSettings, key: bytes, role: str) -> tuple[bytes, bytes, str]:
    """What we trust and what we present, PEM: (CA bundle, certificate + key, where from)."""
    if settings.pki:
        assert settings.cert_file and settings.key_file and settings.ca_file
        ca = _read_pem(settings.ca_file, "--tls-ca file")
        chain = _read_pem(settings.cert_file, "--tls-cert file") + b"\n" + _read_pem(
            settings.key_file, "--tls-key file"
        )
        return ca, chain, f"{settings.cert_file}, {settings.key_file}, {settings.ca_file}"
    if settings.cache_dir is None:
        got = _mint(settings, key, role)
    else:
        path = _certcache.cache_path(
            settings.cache_dir, key, settings.extra_keys, role,
            b"%s %d %d" % (_CA_SALT, LEAF_LIFETIME_S, _SKEW_S),  # what a mint depends on
        )
        got = _certcache.load_or_mint(path, key, lambda: _mint(settings, key, role))
    return got.ca_pem, got.chain_pem, "minted from the cluster key"


def _mint(settings: TlsSettings, key: bytes, role: str) -> _certcache.Material:
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    ca = b"".join(cluster_ca_pem(k) for k in dict.fromkeys((key, *settings.extra_keys)))
    cert, leaf_key = _mint_leaf(key, role, now)
    minted = int(now.timestamp())
    return _certcache.Material(ca, cert + leaf_key, minted, minted + int(LEAF_LIFETIME_S))


def _build(settings: TlsSettings, key: bytes, role: str) -> Contexts:
    ca, chain, where = _material(settings, key, role)
    return Contexts(
        server=_context(True, ca, chain, where),
        client=_context(False, ca, chain, where),
        built=time.monotonic(),
    )


def tls_client_context(settings: TlsSettings, key: bytes, role: str) -> ssl.SSLContext:
    """Only the connecting context for ``role`` (a one-shot client: ctl's blocking edge),
    built once per process; a long-lived process uses ``tls_contexts``, which refreshes."""
    k = (settings, key, role)
    got = _client_cache.get(k)
    if got is None:
        ca, chain, where = _material(settings, key, role)
        got = _client_cache[k] = _context(False, ca, chain, where)
    return got


# -- plaintext and failures ------------------------------------------------------------------------


def check_plaintext_address(host: str, what: str) -> None:
    """Plaintext is for debugging on one machine: any other address is refused."""
    if not is_loopback(host):
        raise UsageError(
            f"{PLAINTEXT_FLAG} refused for {what} {host}: plaintext is only allowed on loopback "
            "addresses (127.0.0.1, ::1, localhost); drop the flag to use TLS"
        )


_FOREIGN_CA = {2, 7, 18, 19, 20, 21, 30}  # X509_V_ERR_* of a chain not under our CA


def describe_tls_failure(
    exc: BaseException, peer: str, peer_role: str | None
) -> DeltabkpError | None:
    """The error for a failed TLS exchange (``exc`` or its cause an ``ssl.SSLError``), None if
    it was no TLS failure."""
    err = exc if isinstance(exc, ssl.SSLError) else exc.__cause__
    if not isinstance(err, ssl.SSLError):
        return None
    reason = err.reason or ""
    ctx = {"peer": peer, "peer_role": peer_role}
    if isinstance(err, ssl.SSLCertVerificationError):
        if err.verify_code in _FOREIGN_CA:
            return AuthError(
                "presented a certificate from another cluster (wrong cluster key?)", **ctx
            )
        return AuthError(f"presented a certificate we refuse: {err.verify_message}", **ctx)
    if reason in ("TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE",
                  "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "TLSV1_ALERT_DECRYPT_ERROR"):
        return AuthError(
            "refused our certificate as one from another cluster (wrong cluster key?)", **ctx
        )
    if isinstance(err, ssl.SSLEOFError) or reason == "UNEXPECTED_EOF_WHILE_READING":
        return PeerUnavailable("hung up during the TLS handshake", **ctx)
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return AuthError("presented no certificate (not a member of this cluster)", **ctx)
    if reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED":
        return AuthError("requires a certificate and we presented none", **ctx)
    if reason in ("SSLV3_ALERT_CERTIFICATE_EXPIRED", "TLSV1_ALERT_CERTIFICATE_EXPIRED"):
        return AuthError("refused our certificate as expired (clocks differ?)", **ctx)
    if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST",
                  "PACKET_LENGTH_TOO_LONG",
                  "RECORD_LAYER_FAILURE"):
        return RemoteProtocolError(
            f"does not speak TLS (a peer started with {PLAINTEXT_FLAG}, or not deltabkp)", **ctx
        )
    if reason in ("UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION", "NO_PROTOCOLS_AVAILABLE"):
        return RemoteProtocolError("does not speak TLS 1.3", **ctx)
    return RemoteProtocolError(f"TLS failed ({reason or err})", **ctx)
