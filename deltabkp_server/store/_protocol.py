"""The ``Store`` protocol: what the server needs from an archive store backend, and nothing more.

Job: name the contract that ``LocalStore`` and ``S3Store`` both honour and that
``tests/test_store.py`` checks on each of them.
Invariants every backend keeps:
- a new archive is invisible (``exists``/``keys``) until ``PartWriter.commit`` returns, and
  becomes visible whole; a crash at any instant leaves either a committed archive or garbage
  that ``reconcile`` removes (the catalog commit, made after ``commit``, is the point of truth);
- its signature is written later, after the catalog commit (``write_signature``, atomic:
  absent or whole), so a committed whole version may have none: that is not a fault, the
  first reader makes it from the archive (``_signature.signature``, the one home);
  ``reconcile`` reports it (``unsigned``) and the server signs it once serving;
- a committed ``(target, seq)`` is never overwritten: ``begin`` on it raises ``StoreError``;
- a version is held whole (archive, and its signature once made) or as a reverse delta (``begin_delta``),
  which appears whole at ``DeltaWriter.commit`` or not at all; which form is the truth is
  the catalog's to say (``reconcile(committed, deltas)``), so a crash between writing one
  form, recording it and deleting the other leaves only garbage that ``reconcile`` removes;
- ``abort`` leaves nothing behind and is harmless after ``commit``;
- every failure is a ``deltabkp.errors.StoreError`` naming the file or object;
- every method blocks: the server calls them from worker threads, never on the event loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from contextlib import AbstractContextManager
from pathlib import Path
from typing import BinaryIO, Protocol

import attrs

__all__ = ["Store", "PartWriter", "DeltaWriter", "ReconcileReport"]


@attrs.frozen
class ReconcileReport:
    """What reconciliation found and did: in-flight writes and orphans removed (paths or URLs),
    committed keys whose archive (or reverse delta) is missing, and whole versions whose
    signature is not made yet (a crash after their commit: the server signs them in the
    background once serving, ``ingest.sign_unsigned``)."""

    removed_parts: tuple[str, ...] = ()
    removed_orphans: tuple[str, ...] = ()
    missing: tuple[tuple[int, int], ...] = ()
    unsigned: tuple[tuple[int, int], ...] = ()


class PartWriter(Protocol):
    """An archive being written; invisible until ``commit``; ``abort`` leaves nothing behind."""

    @property
    def size(self) -> int: ...
    def write(self, data: bytes | memoryview) -> None: ...
    def read_back(self, chunk_size: int) -> Iterator[bytes]: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


class DeltaWriter(Protocol):
    """A reverse delta being written; invisible until ``commit``; ``abort`` leaves nothing
    (and is harmless after ``commit``)."""

    @property
    def size(self) -> int: ...
    def write(self, data: bytes | memoryview) -> None: ...
    def read_back(self, chunk_size: int) -> Iterator[bytes]: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


class Store(Protocol):
    """What the server needs from an archive store backend (blocking calls).

    ``base`` may be told the archive's catalog ``size`` and blake3 ``digest``: a backend that
    serves the base from a copy (the S3 cache) checks the copy against them.
    """

    def begin(self, target_id: int, seq: int) -> PartWriter: ...
    def base(
        self, target_id: int, seq: int, *, size: int | None = None, digest: bytes | None = None
    ) -> AbstractContextManager[memoryview | bytes]: ...
    def read_signature(self, target_id: int, seq: int) -> bytes:
        """The stored signature as it is (``MissingObject`` if none): readers go through
        ``_signature.signature``, which checks it and makes a missing one."""
        ...

    def write_signature(self, target_id: int, seq: int, data: bytes) -> None:
        """Store (or replace) the signature of a committed whole version, atomically."""
        ...

    def read_chunks(self, target_id: int, seq: int, chunk_size: int) -> Iterator[bytes]: ...
    def exists(self, target_id: int, seq: int) -> bool: ...
    def delete(self, target_id: int, seq: int) -> None:
        """Remove the version in every form (idempotent)."""
        ...

    def begin_delta(self, target_id: int, seq: int) -> DeltaWriter: ...
    def read_delta_chunks(self, target_id: int, seq: int, chunk_size: int) -> Iterator[bytes]: ...
    def delta_exists(self, target_id: int, seq: int) -> bool: ...
    def delete_whole(self, target_id: int, seq: int) -> None:
        """Remove the archive and signature of a version now held as a reverse delta."""
        ...

    def stored_size(self, target_id: int, seq: int) -> int: ...
    def scratch(self) -> tuple[Path, BinaryIO]:
        """A new temp file (read/write) for a rebuilt version; start-up removes leftovers."""
        ...

    def keys(self) -> set[tuple[int, int]]:
        """Versions present in some form (archive, or reverse delta)."""
        ...

    def reconcile(
        self, committed: AbstractSet[tuple[int, int]],
        deltas: AbstractSet[tuple[int, int]] = ...,
    ) -> ReconcileReport: ...
