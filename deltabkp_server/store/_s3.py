"""``S3Store``: the archive store on S3-compatible object storage, shared by several servers.

Job: hold ``(target id, seq) → archive + signature`` as objects, for servers that share one
catalog and one bucket (AWS S3, SeaweedFS, MinIO…).  boto3 is synchronous: the server calls
every method from worker threads, never on the event loop.

Layout: ``s3://BUCKET/PREFIX/archives/<target-id>/<seq>.tgz`` and ``<seq>.sig`` (a whole
version), ``<seq>.rdelta`` (one held as a reverse delta: spooled locally, then one PUT, so it
appears whole or not at all; a PUT over a crash's orphan is harmless).  An archive
being written is a multipart upload on its final ``.tgz`` key (``_s3part``): not an object
until completed, so no listing sees it — S3 keeps incomplete uploads in a key space of
their own, and completion is the atomic "rename" that S3 otherwise lacks.  A whole version
exists (``keys``, ``exists``) when its ``.tgz`` does; its ``.sig`` is put after the catalog
commit (one PUT: whole or absent), so a crash may leave a committed ``.tgz`` without one,
which its first reader signs (``_signature``); a lone ``.sig`` is an orphan.
As for ``LocalStore``, the catalog commit (after ``commit``) is the point of truth: a crash
at any instant leaves either a committed archive or garbage that ``reconcile`` removes.

Reconciliation with several servers — the invariant that makes sharing a bucket safe:
``reconcile`` removes only what is older than a grace period (``grace_s``, default 1 h), so
it never deletes another server's write in flight:
- an incomplete multipart upload is aborted only when neither its start nor its newest part
  is younger than the grace period (a live upload adds a part every 8 MiB);
- ``.tgz``/``.sig`` objects with no catalog row are deleted only when the youngest object
  of the version is older than the grace period, and each is checked again (HEAD) just
  before its delete.  A completed upload may be dated by its start (AWS does): an archive
  whose upload outlasted the grace period has, from its completion to its ``.sig`` (the
  catalog commit, then its signing), only its age by start; start-up reconciles a shared
  store only when no other server is alive on the catalog (``Server.reconcile``), which
  covers that window;
- ages are measured on the store's clock (the ``Date`` of its answers), never this
  server's, so clock skew between servers cannot shorten the grace period.
The grace period must exceed the longest pause between two parts of one upload and the
delay from a store commit to its catalog commit; an hour is far above both.

Bases: ``base`` serves an mmap of a local copy from a bounded cache (``_cache``: the newest
base per target under an LRU byte cap), checked at every use: ETag and size against a HEAD,
blake3 against the catalog's digest when the caller passes it; a bad copy is fetched again.
"""

from __future__ import annotations

import contextlib
import mmap
import re
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import blake3

from deltabkp.errors import StoreError
from deltabkp_server.store._cache import BaseCache
from deltabkp_server.store._protocol import ReconcileReport
from deltabkp_server.store._s3io import Bucket, error_code, is_not_found, make_client, server_now
from deltabkp_server.store._s3part import S3Part
from deltabkp_server.store._spool import Spool

__all__ = ["S3Store", "PART_SIZE"]

PART_SIZE = 8 << 20  # S3 wants >= 5 MiB for every part but the last
_NAME = re.compile(r"^(\d+)/(\d+)\.(tgz|sig|rdelta)$")
#: The objects a whole version must have, and may have (its signature is put after its commit).
_WHOLE = frozenset({"tgz"})
_WHOLE_ALLOWED = frozenset({"tgz", "sig"})
_DELTA = frozenset({"rdelta"})


class S3Store:
    """``Store`` on ``s3://bucket/prefix``; the bucket is created if missing.

    ``cache_dir`` holds the base cache and the spools (one directory per store, at most
    about ``cache_bytes`` plus the archives being written).  Credentials come from boto3's
    default chain (environment, shared config and profiles, instance role).
    """

    def __init__(
        self, bucket: str, prefix: str = "", *, cache_dir: str | Path,
        endpoint: str | None = None, region: str | None = None,
        cache_bytes: int = 2 << 30, grace_s: float = 3600.0, part_size: int = PART_SIZE,
        connect_timeout: float = 5.0, read_timeout: float = 60.0, max_attempts: int = 5,
    ) -> None:
        if part_size < 5 << 20:
            raise StoreError(f"S3 part size {part_size} is below the 5 MiB minimum")
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._root = f"{self.prefix}/archives/" if self.prefix else "archives/"
        self.grace_s = grace_s
        self.part_size = part_size
        client, endpoint_url = make_client(
            endpoint=endpoint, region=region, connect_timeout=connect_timeout,
            read_timeout=read_timeout, max_attempts=max_attempts, max_connections=32,
        )
        self.bucket = Bucket(client, endpoint_url, bucket)
        self.cache = BaseCache(cache_dir, cache_bytes)
        self._ensure_bucket()

    @property
    def client(self) -> Any:
        """The boto3 client (thread-safe; tests hook its events)."""
        return self.bucket.client

    @property
    def endpoint(self) -> str:
        return self.bucket.endpoint

    def key(self, target_id: int, seq: int, kind: str) -> str:
        return f"{self._root}{int(target_id)}/{int(seq)}.{kind}"

    def _ensure_bucket(self) -> None:
        b = self.bucket
        with b.translate("cannot open the bucket of", self.url):
            try:
                b.client.head_bucket(Bucket=b.name)
                return
            except Exception as exc:
                if error_code(exc) not in {"404", "NoSuchBucket", "NotFound"}:
                    raise
            region = b.client.meta.region_name
            extra: dict[str, Any] = {}
            if region != "us-east-1":  # AWS refuses an explicit us-east-1 constraint
                extra["CreateBucketConfiguration"] = {"LocationConstraint": region}
            try:
                b.client.create_bucket(Bucket=b.name, **extra)
            except Exception as exc:
                if error_code(exc) != "BucketAlreadyOwnedByYou":  # another server was first
                    raise

    # -- the Store protocol -------------------------------------------------------------------

    def begin(self, target_id: int, seq: int) -> S3Part:
        tgz = self.key(target_id, seq, "tgz")
        if self.bucket.head(tgz) is not None:
            raise StoreError(f"{self.bucket.url(tgz)} already exists")
        return S3Part(self.bucket, self.cache, target_id=target_id, seq=seq, tgz_key=tgz,
                      part_size=self.part_size)

    @contextlib.contextmanager
    def base(
        self, target_id: int, seq: int, *, size: int | None = None, digest: bytes | None = None
    ) -> Iterator[memoryview | bytes]:
        """The archive as a read-only buffer: an mmap of its checked local copy."""
        key = self.key(target_id, seq, "tgz")
        url = self.bucket.url(key)
        actual, etag = self.bucket.size_and_etag(key, "cannot open base archive")
        if size is not None and actual != size:
            raise StoreError(f"base archive {url} has {actual} bytes, the catalog says {size}")
        if actual == 0:
            yield b""
            return
        f = self.cache.open_entry(target_id, seq, etag, actual)
        if f is not None and digest is not None and _blake3_of(f) != digest:
            f.close()
            self.cache.discard(target_id, seq, etag)  # a damaged copy: fetch it again
            f = None
        if f is None:
            f = self._fetch(key, target_id, seq, actual, etag)
            if digest is not None and _blake3_of(f) != digest:
                f.close()
                self.cache.discard(target_id, seq, etag)
                raise StoreError(f"base archive {url} does not match the catalog's blake3")
        with BaseCache.mapped(f) as buf:
            yield buf

    def _fetch(self, key: str, target_id: int, seq: int, size: int, etag: str) -> BinaryIO:
        """Download into the cache; the entry, open (it stays readable if evicted at once)."""
        temp, out = self.cache.new_temp()
        try:
            with out:
                for block in self.bucket.stream(key, size=size, etag=etag, chunk_size=1 << 20):
                    out.write(block)
            f = open(temp, "rb")
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise StoreError(f"cannot write the cached base {temp}: {exc.strerror}") from None
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        try:
            self.cache.install(temp, target_id, seq, etag)
        except BaseException:
            f.close()
            raise
        return f

    def read_signature(self, target_id: int, seq: int) -> bytes:
        b, key = self.bucket, self.key(target_id, seq, "sig")
        with b.translate("cannot read signature", b.url(key)):
            body = b.client.get_object(Bucket=b.name, Key=key)["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()

    def write_signature(self, target_id: int, seq: int, data: bytes) -> None:
        b, key = self.bucket, self.key(target_id, seq, "sig")
        with b.translate("cannot put the signature", b.url(key)):
            # One PUT: the object appears whole or not at all; replacing one is harmless.
            b.client.put_object(Bucket=b.name, Key=key, Body=data)

    def read_chunks(self, target_id: int, seq: int, chunk_size: int) -> Iterator[bytes]:
        key = self.key(target_id, seq, "tgz")
        size, etag = self.bucket.size_and_etag(key, "cannot open archive")
        yield from self.bucket.stream(key, size=size, etag=etag, chunk_size=chunk_size)

    def exists(self, target_id: int, seq: int) -> bool:
        return self.bucket.head(self.key(target_id, seq, "tgz")) is not None

    def begin_delta(self, target_id: int, seq: int) -> _S3DeltaPart:
        return _S3DeltaPart(self.bucket, self.cache, self.key(target_id, seq, "rdelta"))

    def read_delta_chunks(self, target_id: int, seq: int, chunk_size: int) -> Iterator[bytes]:
        key = self.key(target_id, seq, "rdelta")
        size, etag = self.bucket.size_and_etag(key, "cannot open reverse delta")
        yield from self.bucket.stream(key, size=size, etag=etag, chunk_size=chunk_size)

    def delta_exists(self, target_id: int, seq: int) -> bool:
        return self.bucket.head(self.key(target_id, seq, "rdelta")) is not None

    def stored_size(self, target_id: int, seq: int) -> int:
        """Bytes the version takes in the store, whatever its form (0 if none)."""
        total = 0
        for kind in ("tgz", "sig", "rdelta"):
            head = self.bucket.head(self.key(target_id, seq, kind))
            total += int(head["ContentLength"]) if head is not None else 0
        return total

    def scratch(self) -> tuple[Path, BinaryIO]:
        """A temp file for a rebuilt version (open for writing and reading; caller removes)."""
        return self.cache.scratch.new_temp()

    def delete_whole(self, target_id: int, seq: int) -> None:
        """Remove the whole copy of a version now held as a reverse delta."""
        self.cache.drop(target_id, seq)
        for kind in ("tgz", "sig"):
            self.bucket.delete(self.key(target_id, seq, kind))

    def delete(self, target_id: int, seq: int) -> None:
        """Remove the version in every form (idempotent)."""
        self.cache.drop(target_id, seq)
        # The .tgz first: a lone .sig is an orphan, never a key.
        for kind in ("tgz", "sig", "rdelta"):
            self.bucket.delete(self.key(target_id, seq, kind))

    def _list(self) -> tuple[dict[tuple[int, int], dict[str, datetime]], datetime]:
        """``(target, seq) → {kind: LastModified}`` under ``archives/``, and the store's now."""
        b = self.bucket
        found: dict[tuple[int, int], dict[str, datetime]] = {}
        now: datetime | None = None
        with b.translate("cannot list", b.url(self._root)):
            for page in b.client.get_paginator("list_objects_v2").paginate(
                Bucket=b.name, Prefix=self._root
            ):
                now = now or server_now(page)
                for obj in page.get("Contents", ()):
                    m = _NAME.match(str(obj["Key"])[len(self._root):])
                    if m:
                        k = (int(m.group(1)), int(m.group(2)))
                        found.setdefault(k, {})[m.group(3)] = obj["LastModified"]
        return found, now or datetime.now().astimezone()

    def keys(self) -> set[tuple[int, int]]:
        """Versions in place in some form: .tgz (its .sig may come later), or .rdelta
        (uploads in flight are not objects)."""
        return {k for k, kinds in self._list()[0].items()
                if _WHOLE <= kinds.keys() or _DELTA <= kinds.keys()}

    def reconcile(
        self, committed: AbstractSet[tuple[int, int]],
        deltas: AbstractSet[tuple[int, int]] = frozenset(), *, grace_s: float | None = None,
    ) -> ReconcileReport:
        """Abort stale uploads, delete stale objects the catalog does not expect (a version
        of ``committed`` is whole, .tgz and .sig once made, unless it is in ``deltas``,
        .rdelta; only what is older than ``grace_s``: see the module docstring), report
        committed versions whose objects are not there, and whole ones not signed yet."""
        grace = self.grace_s if grace_s is None else grace_s
        parts = self._abort_stale_uploads(grace)
        found, now = self._list()
        orphans: list[str] = []
        for k, kinds in sorted(found.items()):
            expected = (
                (_DELTA if k in deltas else _WHOLE_ALLOWED) if k in committed else frozenset()
            )
            extra = {kind: t for kind, t in kinds.items() if kind not in expected}
            if not extra or (now - max(extra.values())).total_seconds() < grace:
                continue
            # tgz before sig (a lone .sig is an orphan, never a key), rdelta last.
            order = [kind for kind in ("tgz", "sig", "rdelta") if kind in extra]
            keys = [self.key(*k, kind) for kind in order]
            if not all(self._stale(key, now, grace) for key in keys):
                continue  # written again since the listing: someone's fresh commit
            if "tgz" in extra:
                self.cache.drop(*k)
            for kind, key in zip(order, keys, strict=True):
                self.bucket.delete(key)
                orphans.append(self.bucket.url(key))
                del kinds[kind]
        missing = tuple(sorted(
            k for k in committed
            if not (_DELTA if k in deltas else _WHOLE) <= found.get(k, {}).keys()
        ))
        unsigned = tuple(sorted(
            k for k in committed - deltas if found.get(k, {}).keys() == _WHOLE
        ))
        return ReconcileReport(tuple(parts), tuple(orphans), missing, unsigned)

    def _stale(self, key: str, now: datetime, grace: float) -> bool:
        head = self.bucket.head(key)
        return head is None or (now - head["LastModified"]).total_seconds() >= grace

    def _abort_stale_uploads(self, grace: float) -> list[str]:
        b = self.bucket
        aborted: list[str] = []
        with b.translate("cannot reconcile the uploads under", b.url(self._root)):
            for page in b.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=b.name, Prefix=self._root
            ):
                now = server_now(page) or datetime.now().astimezone()
                for up in page.get("Uploads", ()):
                    key, uid = str(up["Key"]), str(up["UploadId"])
                    if (now - up["Initiated"]).total_seconds() < grace:
                        continue
                    if (now - self._last_part(key, uid, up["Initiated"])).total_seconds() < grace:
                        continue  # a long upload, still adding parts: alive
                    try:
                        b.client.abort_multipart_upload(Bucket=b.name, Key=key, UploadId=uid)
                    except Exception as exc:
                        if not is_not_found(exc):  # completed or aborted meanwhile: not ours
                            raise
                        continue
                    aborted.append(f"{b.url(key)} (upload {uid})")
        return aborted

    def _last_part(self, key: str, upload_id: str, initiated: datetime) -> datetime:
        """When the upload last made progress: its start or its newest part."""
        b = self.bucket
        last = initiated
        try:
            for page in b.client.get_paginator("list_parts").paginate(
                Bucket=b.name, Key=key, UploadId=upload_id
            ):
                for p in page.get("Parts", ()):
                    last = max(last, p["LastModified"])
        except Exception as exc:
            if not is_not_found(exc):
                raise
        return last


class _S3DeltaPart(Spool):
    """``DeltaWriter`` for ``S3Store``: a local spool, then one PUT of the ``.rdelta`` key."""

    def __init__(self, bucket: Bucket, cache: BaseCache, key: str) -> None:
        self._b, self.key = bucket, key
        self.url = bucket.url(key)
        self._path, self._f = cache.new_temp()
        super().__init__(self._path, self._f)
        self._done = False

    def commit(self) -> None:
        if self._done:
            raise StoreError(f"{self.url}: already committed or aborted")
        b = self._b
        try:
            self._f.flush()
            self._f.seek(0)
            with b.translate("cannot put the reverse delta", self.url):
                # Unconditional: a .rdelta the catalog does not name is a crash's orphan.
                b.client.put_object(Bucket=b.name, Key=self.key, Body=self._f)
        except OSError as exc:
            raise StoreError(f"cannot read the spool {self._path}: {exc.strerror}") from None
        finally:
            self.abort()

    def abort(self) -> None:
        self._done = True
        with contextlib.suppress(OSError):
            self._f.close()
        self._path.unlink(missing_ok=True)


def _blake3_of(f: BinaryIO) -> bytes:
    """blake3 of a whole non-empty open file (through an mmap: no copy, threads share it)."""
    try:
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return bytes(blake3.blake3(m, max_threads=blake3.blake3.AUTO).digest())
    except OSError as exc:
        raise StoreError(f"cannot hash {f.name}: {exc.strerror}") from None
