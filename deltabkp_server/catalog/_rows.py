"""Rows to values, and the one small interface an engine gives the shared SQL.

Job: ``Tx`` (what ``SqlCatalog`` needs of an open transaction) and the conversions from rows
(plain dicts, on every engine) to the frozen values of ``deltabkp_server.model``.
Invariant: no engine-specific code here; rows carry the column names of ``_schema``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from deltabkp_server.catalog._protocol import UNSET
from deltabkp_server.model import (
    ArchiveRecord,
    ExecutionRecord,
    Target,
    pairs_from_json,
)

__all__ = [
    "Row", "Tx", "to_target", "to_archive", "to_execution", "chunks", "schedule_sets", "EXEC_SELECT",
]

Row = dict[str, Any]
#: Ids per ``IN (…)`` list: far below every engine's limit on bound parameters.
CHUNK = 500


class Tx(Protocol):
    """One open transaction (or read) on an engine."""

    def all(self, sql: str, args: Sequence[Any] = ()) -> list[Row]: ...
    def one(self, sql: str, args: Sequence[Any] = ()) -> Row | None: ...
    def run(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Execute; return the number of rows changed."""
        ...

    def insert(self, sql: str, args: Sequence[Any]) -> int | None:
        """Execute an INSERT; return the new row's ``id`` (None if ON CONFLICT skipped it)."""
        ...


def to_target(r: Row) -> Target:
    return Target(
        id=r["id"], node=r["node"], path=r["path"], every_s=r["every_s"],
        state=r["state"], next_due=r["next_due"], last_outcome=r["last_outcome"],
        last_error=r["last_error"], active=bool(r["active"]), created=r["created"],
        queued=r["queued"], lease_owner=r["lease_owner"], lease_until=r["lease_until"],
        bwlimit=r.get("bwlimit"), request_seq=r["request_seq"],
    )


def to_archive(r: Row) -> ArchiveRecord:
    return ArchiveRecord(
        target_id=r["target_id"], seq=r["seq"], created=r["created"], size=r["size"],
        hash=bytes(r["hash"]), transferred=r["transferred"],
        execution_id=r["execution_id"], retained=bool(r["retained"]),
        deleted_at=r["deleted_at"], missing=bool(r["missing"]),
        form=r.get("form") or "whole", base_seq=r.get("base_seq"),
        stored_size=r.get("stored_size"), verified_at=r.get("verified_at"),
        corrupt=(r.get("corrupt_reason") or "corrupt") if r.get("corrupt") else None,
    )


def to_execution(r: Row) -> ExecutionRecord:
    return ExecutionRecord(
        id=r["id"], target_id=r["target_id"], node=r["node"], path=r["path"],
        trigger=r["trigger"], started=r["started"], ended=r["ended"],
        outcome=r["outcome"], bytes_sent=r["bytes_sent"],
        bytes_received=r["bytes_received"], archive_size=r["archive_size"],
        archive_seq=r["archive_seq"], files=r["files"],
        changed=pairs_from_json(r["changed_json"]), skipped=pairs_from_json(r["skipped_json"]),
        error=r["error"], note=r["note"], due=r["due"],
        count=r["fold_count"], first=r["fold_first"], earlier_bytes=r["fold_bytes"],
        request_seq=r["request_seq"],
    )


def chunks(items: Sequence[Any]) -> Iterator[tuple[str, Sequence[Any]]]:
    """(``?, ?, …`` marks, items) per slice of at most ``CHUNK``."""
    for i in range(0, len(items), CHUNK):
        part = items[i:i + CHUNK]
        yield ", ".join("?" * len(part)), part


def schedule_sets(
    state: str, next_due: float, last_outcome: Any, last_error: Any
) -> tuple[str, list[Any]]:
    sets, args = ["state=?", "next_due=?"], [state, next_due]
    if last_outcome is not UNSET:
        sets.append("last_outcome=?")
        args.append(last_outcome)
    if last_error is not UNSET:
        sets.append("last_error=?")
        args.append(last_error)
    return ", ".join(sets), args


EXEC_SELECT = (
    "SELECT e.*, t.node AS node, t.path AS path FROM executions e "
    "JOIN targets t ON t.id = e.target_id"
)
