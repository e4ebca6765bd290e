"""The archive store: where archive bytes and their signatures live, behind one protocol.

Job: hold ``(target id, seq) → archive + signature`` (a whole version) or ``→ reverse delta``
(an older version, ``deltabkp_server.versions``) with atomic writes, on a local directory
(``LocalStore``, the embedded default) or on S3-compatible object storage (``S3Store``, for
several servers sharing one catalog); ``open_store`` picks one by URL.
Invariants (``_protocol``; each backend's module says how it keeps them):
- the catalog commit is the point of truth: a crash at any instant leaves either a committed
  archive or garbage that ``reconcile`` removes; the catalog also says which form of a
  version is real (``reconcile(committed, deltas)``);
- the signature is stored beside its archive, but made after the catalog commit (off the
  backup's critical path): a committed whole version may lack one after a crash, and is
  signed by its first reader — ``signature(store, tid, seq, size=, digest=)`` (``_signature``,
  the one home of "this version's signature, made if missing"), used by ingest, the
  reverse-delta conversion, verify and scrub;
- every failure is a ``StoreError`` naming the file or object; every method blocks (the
  server calls them from worker threads).
Both backends pass the one contract suite, ``tests/test_store.py``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import unquote, urlsplit

from deltabkp.errors import StoreError
from deltabkp_server.store._local import LocalStore
from deltabkp_server.store._protocol import DeltaWriter, PartWriter, ReconcileReport, Store
from deltabkp_server.store._s3 import S3Store
from deltabkp_server.store._signature import sign, signature

__all__ = [
    "Store", "PartWriter", "DeltaWriter", "LocalStore", "S3Store", "ReconcileReport", "open_store",
    "sign", "signature",
]

_USAGE = "expected file:///ABSOLUTE/DIR or s3://BUCKET[/PREFIX]"


def open_store(url: str, *, default_dir: Path, s3_endpoint: str | None = None) -> Store:
    """The store named by ``url``.

    - ``""``: ``LocalStore(default_dir)``, the embedded default (the server's data dir);
    - ``file:///ABS/DIR``: ``LocalStore(DIR)``;
    - ``s3://BUCKET/PREFIX``: ``S3Store`` on ``s3_endpoint`` (else boto3's choice:
      ``AWS_ENDPOINT_URL``, the shared config, else AWS), credentials from boto3's default
      chain, its base cache under ``default_dir/s3-cache/`` (one directory per endpoint,
      bucket and prefix, so two stores never share entries).
    """
    if not url:
        return LocalStore(default_dir)
    parts = urlsplit(url)
    if parts.scheme == "file":
        path = unquote(parts.path)
        if parts.netloc not in ("", "localhost") or not path.startswith("/"):
            raise StoreError(f"store URL {url!r} is not an absolute file URL: {_USAGE}")
        return LocalStore(Path(path))
    if parts.scheme == "s3":
        if not parts.netloc or parts.query or parts.fragment:
            raise StoreError(f"store URL {url!r} names no bucket, or has extra parts: {_USAGE}")
        prefix = unquote(parts.path).strip("/")
        ident = f"{s3_endpoint or ''}\0{parts.netloc}\0{prefix}".encode()
        cache = Path(default_dir) / "s3-cache" / hashlib.sha256(ident).hexdigest()[:16]
        return S3Store(parts.netloc, prefix, endpoint=s3_endpoint, cache_dir=cache)
    raise StoreError(f"unsupported store URL {url!r}: {_USAGE}")
