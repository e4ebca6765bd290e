"""The boto3 edge of ``S3Store``: one configured client, a bucket handle, errors translated.

Job: everything that touches botocore directly, so that ``_s3`` and ``_s3part`` read as
storage logic.
Invariants:
- every call has connect and read timeouts and a bounded number of attempts (botocore's
  ``standard`` retry mode: throttling, 5xx and connection errors, with backoff);
- no botocore or urllib3 exception leaves ``translate``: each becomes a ``StoreError`` that
  names the operation, the object's ``s3://`` URL and, when the endpoint or the credentials
  are the problem, the endpoint and where credentials come from;
- ``Bucket.stream`` yields an object's bytes in order exactly once: a body that breaks
  mid-way is resumed with a ranged GET from the first byte not yet yielded, pinned to the
  object's ETag (``If-Match``), so a replaced object can never be spliced onto the old one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any

import boto3  # type: ignore[import-untyped, unused-ignore]
import urllib3.exceptions
from botocore.config import Config  # type: ignore[import-untyped, unused-ignore]
from botocore.exceptions import (  # type: ignore[import-untyped, unused-ignore]
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
)

from deltabkp.errors import MissingObject, StoreError, StoreUnavailable

__all__ = ["Bucket", "make_client", "translate", "error_code", "is_not_found", "etag_of",
           "server_now"]

_CREDENTIALS_HINT = (
    "check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or AWS_PROFILE and "
    "the shared config files)"
)
_DENIED = {"AccessDenied", "403", "SignatureDoesNotMatch", "InvalidAccessKeyId",
           "InvalidToken", "ExpiredToken", "AuthorizationHeaderMalformed"}
_NOT_FOUND = {"NoSuchKey", "404", "NotFound", "NoSuchUpload"}
# Mid-body failures that a ranged re-GET can recover from (botocore wraps most of urllib3's).
_STREAM_ERRORS = (BotoCoreError, urllib3.exceptions.HTTPError, OSError)


def make_client(
    *, endpoint: str | None, region: str | None, connect_timeout: float, read_timeout: float,
    max_attempts: int, max_connections: int,
) -> tuple[Any, str]:
    """An S3 client and the endpoint it talks to.  ``endpoint=None`` lets boto3 pick it
    (``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, the shared config, else AWS)."""
    try:
        # A session of our own: boto3's default session is shared, mutable, not thread-safe.
        session = boto3.session.Session()
        config = Config(
            region_name=region or session.region_name or "us-east-1",
            signature_version="s3v4",
            # Path style works on every S3-compatible server (no wildcard DNS for buckets).
            s3={"addressing_style": "path"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            max_pool_connections=max_connections,
            tcp_keepalive=True,
            # botocore >= 1.36 adds CRC checksums to every upload by default; several
            # S3-compatible servers reject them.  Integrity is ours anyway: blake3 in the
            # catalog, checked on the base and by every restore.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        client = session.client("s3", endpoint_url=endpoint, config=config)
    except (BotoCoreError, ValueError) as exc:
        raise StoreError(f"cannot configure the S3 client (endpoint {endpoint}): {exc}") from None
    return client, str(client.meta.endpoint_url)


def error_code(exc: BaseException) -> str:
    """The S3 error code of a ``ClientError`` (HEAD answers carry only the status: "404")."""
    response: Any = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def is_not_found(exc: BaseException) -> bool:
    return isinstance(exc, ClientError) and error_code(exc) in _NOT_FOUND


def etag_of(response: dict[str, Any]) -> str:
    return str(response.get("ETag", ""))


def server_now(response: dict[str, Any]) -> datetime | None:
    """The store's clock: the ``Date`` header of one of its answers."""
    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    try:
        return parsedate_to_datetime(str(date)) if date else None
    except (TypeError, ValueError):
        return None


@contextmanager
def translate(what: str, url: str, endpoint: str) -> Iterator[None]:
    """Turn any botocore failure inside the block into ``StoreError("{what} {url}: …")``."""
    try:
        yield
    except ClientError as exc:
        code = error_code(exc)
        message = str(exc.response.get("Error", {}).get("Message", "") or exc)
        if code in _DENIED:
            raise StoreUnavailable(
                f"{what} {url}: access denied by {endpoint} ({code}): {_CREDENTIALS_HINT}"
            ) from None
        if code in _NOT_FOUND:
            raise MissingObject(f"{what} {url}: no such object") from None
        reason = "no such bucket" if code == "NoSuchBucket" else f"{code or 'error'}: {message}"
        raise StoreError(f"{what} {url}: {reason}") from None
    except (NoCredentialsError, PartialCredentialsError) as exc:
        raise StoreUnavailable(f"{what} {url}: no usable AWS credentials ({exc}); "
                               f"{_CREDENTIALS_HINT}") from None
    except EndpointConnectionError:
        raise StoreUnavailable(f"{what} {url}: cannot reach the S3 endpoint {endpoint}") from None
    except _STREAM_ERRORS as exc:
        raise StoreUnavailable(f"{what} {url}: {type(exc).__name__}: {exc} "
                               f"(endpoint {endpoint})") from None


class Bucket:
    """One bucket through one client: object URLs, HEAD, delete, resumable reads."""

    def __init__(self, client: Any, endpoint: str, name: str) -> None:
        self.client, self.endpoint, self.name = client, endpoint, name

    def url(self, key: str) -> str:
        return f"s3://{self.name}/{key}"

    def translate(self, what: str, url: str) -> AbstractContextManager[None]:
        return translate(what, url, self.endpoint)

    def head(self, key: str) -> dict[str, Any] | None:
        """The object's metadata, or None when there is no such object."""
        with self.translate("cannot look up", self.url(key)):
            try:
                return dict(self.client.head_object(Bucket=self.name, Key=key))
            except Exception as exc:
                if is_not_found(exc):
                    return None
                raise

    def size_and_etag(self, key: str, what: str) -> tuple[int, str]:
        head = self.head(key)
        if head is None:
            raise MissingObject(f"{what} {self.url(key)}: no such object")
        return int(head["ContentLength"]), etag_of(head)

    def delete(self, key: str) -> None:
        """Idempotent, as S3's DELETE is."""
        with self.translate("cannot delete", self.url(key)):
            self.client.delete_object(Bucket=self.name, Key=key)

    def stream(
        self, key: str, *, size: int, etag: str, chunk_size: int,
        window: int = 64 << 20, attempts: int = 4,
    ) -> Iterator[bytes]:
        """The object's ``size`` bytes, ``chunk_size`` at a time, as ranged GETs of ``window``
        bytes (a broken body costs one window's re-read at most, never the whole object)."""
        url = self.url(key)
        offset = failures = 0
        while offset < size:
            end = min(size, offset + window) - 1
            with self.translate("cannot read", url):
                body = self.client.get_object(
                    Bucket=self.name, Key=key, Range=f"bytes={offset}-{end}", IfMatch=etag
                )["Body"]
            try:
                while offset <= end:
                    try:
                        block = body.read(min(chunk_size, end + 1 - offset))
                    except _STREAM_ERRORS as exc:
                        failures += 1
                        if failures >= attempts:
                            raise StoreError(f"cannot read {url}: the body broke {failures} "
                                             f"times (last: {type(exc).__name__}: {exc})") from None
                        break  # re-GET from ``offset``
                    if not block:
                        raise StoreError(f"cannot read {url}: it ended at byte {offset} of {size}")
                    offset += len(block)
                    yield block
            finally:
                body.close()
