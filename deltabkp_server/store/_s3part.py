"""``S3Part``: one new archive on its way into S3 (the ``PartWriter`` of ``S3Store``).

Job: stream an archive into a multipart upload on the final ``.tgz`` key with bounded
memory, and make it appear only at ``commit`` (its signature is put later, after the catalog
commit: ``S3Store.write_signature``).
Invariants:
- at most one part (8 MiB) is buffered in memory, whatever the writes' sizes;
- an upload in flight is not an object: no listing sees it until it is completed;
- ``commit`` completes the upload with ``If-None-Match: *`` (a committed archive is never
  overwritten; the loser of a race touches nothing): a crash after it leaves a ``.tgz`` that
  the catalog names (a version, its signature made at its first use) or does not (an orphan);
- ``abort`` aborts the upload and deletes what this writer completed; it is harmless after
  ``commit``; what it cannot remove (the store unreachable) is garbage for ``reconcile``;
- every byte is also written to a local spool: ``read_back`` reads it (bounded memory), and
  on commit it becomes the base cache's entry, so that the target's next backup patches
  against it without a download.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

from deltabkp.errors import StoreError
from deltabkp_server.store._cache import BaseCache
from deltabkp_server.store._s3io import Bucket, error_code, etag_of, is_not_found
from deltabkp_server.store._spool import Spool

__all__ = ["S3Part"]


class S3Part:
    """``PartWriter`` for ``S3Store``: a multipart upload on ``tgz_key`` + a local spool."""

    def __init__(
        self, bucket: Bucket, cache: BaseCache, *, target_id: int, seq: int,
        tgz_key: str, part_size: int,
    ) -> None:
        self._b, self._cache = bucket, cache
        self._tid, self._seq = target_id, seq
        self.key = tgz_key
        self.url = bucket.url(tgz_key)
        self._part_size = part_size
        self._buf = bytearray()
        self._parts: list[dict[str, Any]] = []
        self._state = "open"  # open → committing → committed | aborted
        self._completed = False  # the .tgz exists and is ours
        self._spool_path, self._spool = cache.new_temp()
        self._spooled = Spool(self._spool_path, self._spool)
        try:
            with bucket.translate("cannot start the upload of", self.url):
                self.upload_id = str(bucket.client.create_multipart_upload(
                    Bucket=bucket.name, Key=tgz_key, ContentType="application/gzip"
                )["UploadId"])
        except BaseException:
            self._drop_spool()
            raise

    @property
    def size(self) -> int:
        return self._spooled.size

    def write(self, data: bytes | memoryview) -> None:
        if self._state != "open":
            raise StoreError(f"{self.url}: write after commit or abort")
        self._spooled.write(data)
        view = memoryview(data).cast("B")
        # Fill the buffer up to one part, ship it, go on: memory stays at one part whatever
        # the size of ``data``.
        while len(view):
            room = self._part_size - len(self._buf)
            self._buf += view[:room]
            view = view[room:]
            if len(self._buf) >= self._part_size:
                self._ship()

    def _ship(self) -> None:
        number = len(self._parts) + 1
        b = self._b
        with b.translate(f"cannot upload part {number} of", self.url):
            # The bytearray itself: no second copy of the part in memory.
            r = b.client.upload_part(Bucket=b.name, Key=self.key, UploadId=self.upload_id,
                                     PartNumber=number, Body=self._buf)
        self._parts.append({"PartNumber": number, "ETag": etag_of(r)})
        self._buf.clear()

    def read_back(self, chunk_size: int) -> Iterator[bytes]:
        """What was written so far, from the local spool (bounded memory)."""
        return self._spooled.read_back(chunk_size)

    def commit(self) -> None:
        if self._state != "open":
            raise StoreError(f"{self.url}: already committed or aborted")
        self._state = "committing"
        try:
            if self._buf or not self._parts:
                self._ship()  # the last part (S3 needs at least one, even empty)
            etag = self._complete()
        except BaseException:
            # The first error is the one to report; what abort cannot remove is garbage
            # that reconcile removes later.
            with contextlib.suppress(StoreError):
                self.abort()
            raise
        self._state = "committed"
        try:
            self._spool.close()
            self._cache.install(self._spool_path, self._tid, self._seq, etag)
        except (OSError, StoreError):
            self._drop_spool()  # the cache is an optimisation: the archive is committed

    def _complete(self) -> str:
        """Complete the upload unless the key is taken (``If-None-Match``); the new ETag."""
        b = self._b
        with b.translate("cannot complete the upload of", self.url):
            try:
                done = b.client.complete_multipart_upload(
                    Bucket=b.name, Key=self.key, UploadId=self.upload_id,
                    MultipartUpload={"Parts": self._parts}, IfNoneMatch="*",
                )
                self._completed = True
                return etag_of(done)
            except Exception as exc:
                if error_code(exc) not in {"PreconditionFailed", "NoSuchUpload"}:
                    raise
        # A retry after a lost answer finds its own completion ("taken", "no such upload"):
        # the object is ours iff its ETag is the one our parts make.
        head = b.head(self.key)
        if head is not None and etag_of(head).strip('"') == self._multipart_etag():
            self._completed = True
            return etag_of(head)
        raise StoreError(f"{self.url} was committed by another writer first")

    def _multipart_etag(self) -> str:
        """S3's ETag of a multipart object: md5 of the parts' md5s, "-", the part count."""
        try:
            md5s = b"".join(bytes.fromhex(str(p["ETag"]).strip('"')) for p in self._parts)
        except ValueError:
            return ""  # a store whose part ETags are not md5s: no match, never a false one
        return f"{hashlib.md5(md5s, usedforsecurity=False).hexdigest()}-{len(self._parts)}"

    def abort(self) -> None:
        """Abort the upload and delete what this writer put; harmless after ``commit``."""
        if self._state == "committed":
            self._drop_spool()
            return
        self._state = "aborted"
        self._buf = bytearray()
        self._drop_spool()
        b = self._b
        with b.translate("cannot abort the upload of", self.url):
            try:
                b.client.abort_multipart_upload(Bucket=b.name, Key=self.key,
                                                UploadId=self.upload_id)
            except Exception as exc:
                if not is_not_found(exc):  # already aborted, or completed
                    raise
        if self._completed:
            # Completed, then interrupted before commit returned: the .tgz is ours (the key
            # was free).
            self._cache.drop(self._tid, self._seq)
            b.delete(self.key)

    def _drop_spool(self) -> None:
        with contextlib.suppress(OSError):
            self._spool.close()
        self._spool_path.unlink(missing_ok=True)
