"""The catalog: targets, archives and the execution log, behind one small protocol.

Job: be the server's point of truth.  An archive exists when, and only when, its catalog row
is committed; the store's files follow the catalog, never the other way round.
Invariants:
- the execution log and the archive rows are never trimmed (retention only flips
  ``retained`` and sets ``deleted_at``), so ``list`` shows every backup ever made;
- one (node, path) has one target row for ever; unregister deactivates it and a later
  register reactivates it, so the history and the sequence numbers continue;
- every method is blocking and runs in a worker thread (see ``AsyncCatalog``), never on the
  event loop; the SQLite backend serialises its calls on one connection.

Long on purpose: the protocol, the schema and the SQLite backend are one unit a second
backend is checked against.  Today's backend is SQLite in WAL mode (``SqliteCatalog``); PostgreSQL can plug in behind the
same ``Catalog`` protocol and must pass ``tests/test_catalog.py``.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

import trio

from deltabkp.errors import CatalogError, ErrorCode, RequestRefused
from deltabkp_server.model import (
    ArchiveRecord,
    ExecutionRecord,
    ExecutionResult,
    Target,
    pairs_from_json,
    pairs_to_json,
)

__all__ = ["Catalog", "SqliteCatalog", "AsyncCatalog", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
T = TypeVar("T")


class Catalog(Protocol):
    """What the server needs from a catalog backend (blocking calls; see ``AsyncCatalog``)."""

    def close(self) -> None: ...

    # targets
    def register(self, node: str, path: str, every_s: int, now: float) -> Target: ...
    def unregister(self, node: str, path: str) -> Target: ...
    def find_target(self, node: str, path: str, *, active_only: bool = True) -> Target | None: ...
    def get_target(self, target_id: int) -> Target: ...
    def targets(self, *, active_only: bool = True) -> list[Target]: ...
    def set_schedule(
        self, target_id: int, *, state: str, next_due: float,
        last_outcome: str | None = ..., last_error: str | None = ...,
    ) -> None: ...

    # executions
    def start_execution(self, target_id: int, started: float, trigger: str) -> int: ...
    def finish_execution(self, execution_id: int, result: ExecutionResult) -> ExecutionRecord: ...
    def commit_archive(
        self, execution_id: int, target_id: int, seq: int, result: ExecutionResult
    ) -> tuple[ArchiveRecord, ExecutionRecord]: ...
    def execution(self, execution_id: int) -> ExecutionRecord: ...
    def executions(
        self, target_id: int | None = None, *, limit: int | None = None
    ) -> list[ExecutionRecord]: ...
    def fail_unfinished(self, now: float, reason: str) -> int: ...

    # archives
    def archives(self, target_id: int) -> list[ArchiveRecord]: ...
    def newest_retained(self, target_id: int) -> ArchiveRecord | None: ...
    def next_seq(self, target_id: int) -> int: ...
    def retire(self, target_id: int, keep: int, now: float) -> list[ArchiveRecord]: ...
    def retained_keys(self) -> set[tuple[int, int]]: ...
    def mark_missing(self, target_id: int, seq: int) -> None: ...
    def count_retained(self, target_id: int) -> int: ...

    # health
    def integrity_check(self) -> str: ...


_SCHEMA = [
    """CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
    """CREATE TABLE targets (
        id INTEGER PRIMARY KEY,
        node TEXT NOT NULL,
        path TEXT NOT NULL,
        every_s INTEGER NOT NULL CHECK (every_s > 0),
        state TEXT NOT NULL DEFAULT 'ok' CHECK (state IN ('ok', 'retrying')),
        next_due REAL NOT NULL,
        last_outcome TEXT,
        last_error TEXT,
        active INTEGER NOT NULL DEFAULT 1,
        created REAL NOT NULL,
        UNIQUE (node, path)
    )""",
    """CREATE TABLE executions (
        id INTEGER PRIMARY KEY,
        target_id INTEGER NOT NULL REFERENCES targets(id),
        trigger TEXT NOT NULL,
        started REAL NOT NULL,
        ended REAL,
        outcome TEXT CHECK (outcome IS NULL OR outcome IN ('stored', 'unchanged', 'failed', 'skipped')),
        bytes_sent INTEGER NOT NULL DEFAULT 0,
        bytes_received INTEGER NOT NULL DEFAULT 0,
        archive_size INTEGER,
        archive_seq INTEGER,
        files INTEGER,
        changed_count INTEGER NOT NULL DEFAULT 0,
        changed_json TEXT,
        skipped_json TEXT,
        error TEXT,
        note TEXT
    )""",
    "CREATE INDEX executions_target ON executions(target_id, id)",
    """CREATE TABLE archives (
        target_id INTEGER NOT NULL REFERENCES targets(id),
        seq INTEGER NOT NULL,
        created REAL NOT NULL,
        size INTEGER NOT NULL,
        hash BLOB NOT NULL,
        transferred INTEGER NOT NULL,
        execution_id INTEGER REFERENCES executions(id),
        tgz_path TEXT NOT NULL,
        sig_path TEXT NOT NULL,
        retained INTEGER NOT NULL DEFAULT 1,
        deleted_at REAL,
        missing INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (target_id, seq)
    )""",
]


def _target(row: sqlite3.Row) -> Target:
    return Target(
        id=row["id"], node=row["node"], path=row["path"], every_s=row["every_s"],
        state=row["state"], next_due=row["next_due"], last_outcome=row["last_outcome"],
        last_error=row["last_error"], active=bool(row["active"]), created=row["created"],
    )


def _archive(row: sqlite3.Row) -> ArchiveRecord:
    return ArchiveRecord(
        target_id=row["target_id"], seq=row["seq"], created=row["created"], size=row["size"],
        hash=bytes(row["hash"]), transferred=row["transferred"],
        execution_id=row["execution_id"], retained=bool(row["retained"]),
        deleted_at=row["deleted_at"], missing=bool(row["missing"]),
    )


def _execution(row: sqlite3.Row) -> ExecutionRecord:
    return ExecutionRecord(
        id=row["id"], target_id=row["target_id"], node=row["node"], path=row["path"],
        trigger=row["trigger"], started=row["started"], ended=row["ended"],
        outcome=row["outcome"], bytes_sent=row["bytes_sent"],
        bytes_received=row["bytes_received"], archive_size=row["archive_size"],
        archive_seq=row["archive_seq"], files=row["files"],
        changed=pairs_from_json(row["changed_json"]),
        skipped=pairs_from_json(row["skipped_json"]),
        error=row["error"], note=row["note"],
    )


_EXEC_SELECT = (
    "SELECT e.*, t.node AS node, t.path AS path FROM executions e "
    "JOIN targets t ON t.id = e.target_id"
)
_UNSET: Any = object()


class SqliteCatalog:
    """``Catalog`` on one SQLite file in WAL mode with full fsync on commit.

    One connection, guarded by a lock, so calls from several worker threads are serialised
    (SQLite would serialise the writes anyway; the lock keeps the connection's state sane).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._db = sqlite3.connect(
                str(self.path), isolation_level=None, check_same_thread=False, timeout=30
            )
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk when it returns, since the commit is the point of truth.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as exc:
            raise CatalogError(f"cannot open catalog {self.path}: {exc}") from None
        self._lock = threading.RLock()
        self._migrate()

    # -- plumbing ----------------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: take the write lock up front)."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise CatalogError(f"catalog {self.path}: {exc}") from None

    def _q(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise CatalogError(f"catalog {self.path}: {exc}") from None

    def _migrate(self) -> None:
        with self._tx() as db:
            has_meta = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
            ).fetchone()
            if not has_meta:
                for stmt in _SCHEMA:
                    db.execute(stmt)
                db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                return
            row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            version = int(row["value"]) if row else 0
        if version != SCHEMA_VERSION:
            # Newer files must not be touched by an older server; older ones would be migrated here.
            raise CatalogError(
                f"catalog {self.path} has schema version {version}; this server knows "
                f"version {SCHEMA_VERSION}"
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- targets -----------------------------------------------------------------------------

    def register(self, node: str, path: str, every_s: int, now: float) -> Target:
        with self._tx() as db:
            row = db.execute(
                "SELECT * FROM targets WHERE node=? AND path=?", (node, path)
            ).fetchone()
            if row is not None and row["active"]:
                raise RequestRefused(ErrorCode.EXISTS, "is already registered", node=node, path=path)
            if row is None:
                cur = db.execute(
                    "INSERT INTO targets (node, path, every_s, state, next_due, active, created)"
                    " VALUES (?, ?, ?, 'ok', ?, 1, ?)",
                    (node, path, every_s, now, now),
                )
                tid = cur.lastrowid
            else:
                tid = row["id"]
                db.execute(
                    "UPDATE targets SET active=1, every_s=?, state='ok', next_due=?,"
                    " last_error=NULL WHERE id=?",
                    (every_s, now, tid),
                )
            out = db.execute("SELECT * FROM targets WHERE id=?", (tid,)).fetchone()
        return _target(out)

    def unregister(self, node: str, path: str) -> Target:
        with self._tx() as db:
            row = db.execute(
                "SELECT * FROM targets WHERE node=? AND path=? AND active=1", (node, path)
            ).fetchone()
            if row is None:
                raise RequestRefused(ErrorCode.NOT_FOUND, "is not registered", node=node, path=path)
            db.execute("UPDATE targets SET active=0 WHERE id=?", (row["id"],))
            out = db.execute("SELECT * FROM targets WHERE id=?", (row["id"],)).fetchone()
        return _target(out)

    def find_target(self, node: str, path: str, *, active_only: bool = True) -> Target | None:
        rows = self._q("SELECT * FROM targets WHERE node=? AND path=?", (node, path))
        if not rows or (active_only and not rows[0]["active"]):
            return None
        return _target(rows[0])

    def get_target(self, target_id: int) -> Target:
        rows = self._q("SELECT * FROM targets WHERE id=?", (target_id,))
        if not rows:
            raise CatalogError(f"catalog {self.path}: no target with id {target_id}")
        return _target(rows[0])

    def targets(self, *, active_only: bool = True) -> list[Target]:
        where = " WHERE active=1" if active_only else ""
        return [_target(r) for r in self._q(f"SELECT * FROM targets{where} ORDER BY node, path")]

    def set_schedule(
        self, target_id: int, *, state: str, next_due: float,
        last_outcome: str | None = _UNSET, last_error: str | None = _UNSET,
    ) -> None:
        sets, args = ["state=?", "next_due=?"], [state, next_due]
        if last_outcome is not _UNSET:
            sets.append("last_outcome=?")
            args.append(last_outcome)
        if last_error is not _UNSET:
            sets.append("last_error=?")
            args.append(last_error)
        with self._tx() as db:
            db.execute(f"UPDATE targets SET {', '.join(sets)} WHERE id=?", (*args, target_id))

    # -- executions --------------------------------------------------------------------------

    def start_execution(self, target_id: int, started: float, trigger: str) -> int:
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO executions (target_id, trigger, started) VALUES (?, ?, ?)",
                (target_id, trigger, started),
            )
            assert cur.lastrowid is not None
            return cur.lastrowid

    def _finish(self, db: sqlite3.Connection, execution_id: int, r: ExecutionResult) -> None:
        cur = db.execute(
            "UPDATE executions SET ended=?, outcome=?, bytes_sent=?, bytes_received=?,"
            " archive_size=?, archive_seq=?, files=?, changed_count=?, changed_json=?,"
            " skipped_json=?, error=?, note=? WHERE id=? AND outcome IS NULL",
            (
                r.ended, r.outcome, r.bytes_sent, r.bytes_received, r.archive_size,
                r.archive_seq, r.files, len(r.changed), pairs_to_json(r.changed),
                pairs_to_json(r.skipped), r.error, r.note, execution_id,
            ),
        )
        if cur.rowcount != 1:
            raise CatalogError(
                f"catalog {self.path}: execution {execution_id} is unknown or already finished"
            )

    def finish_execution(self, execution_id: int, result: ExecutionResult) -> ExecutionRecord:
        with self._tx() as db:
            self._finish(db, execution_id, result)
        return self.execution(execution_id)

    def commit_archive(
        self, execution_id: int, target_id: int, seq: int, result: ExecutionResult
    ) -> tuple[ArchiveRecord, ExecutionRecord]:
        """Make a stored archive real: archive row + finished execution, in one transaction."""
        if result.outcome != "stored" or result.archive_hash is None or result.archive_size is None:
            raise CatalogError(f"catalog {self.path}: commit_archive needs a stored result")
        with self._tx() as db:
            db.execute(
                "INSERT INTO archives (target_id, seq, created, size, hash, transferred,"
                " execution_id, tgz_path, sig_path) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    target_id, seq, result.ended, result.archive_size, result.archive_hash,
                    result.transferred, execution_id,
                    f"archives/{target_id}/{seq}.tgz", f"archives/{target_id}/{seq}.sig",
                ),
            )
            self._finish(db, execution_id, result)
            row = db.execute(
                "SELECT * FROM archives WHERE target_id=? AND seq=?", (target_id, seq)
            ).fetchone()
        return _archive(row), self.execution(execution_id)

    def execution(self, execution_id: int) -> ExecutionRecord:
        rows = self._q(_EXEC_SELECT + " WHERE e.id=?", (execution_id,))
        if not rows:
            raise CatalogError(f"catalog {self.path}: no execution {execution_id}")
        return _execution(rows[0])

    def executions(
        self, target_id: int | None = None, *, limit: int | None = None
    ) -> list[ExecutionRecord]:
        sql, args = _EXEC_SELECT, []
        if target_id is not None:
            sql += " WHERE e.target_id=?"
            args.append(target_id)
        sql += " ORDER BY e.id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [_execution(r) for r in self._q(sql, tuple(args))]

    def fail_unfinished(self, now: float, reason: str) -> int:
        """Close executions a crash left open, so the log says what happened to them."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE executions SET ended=?, outcome='failed', error=? WHERE outcome IS NULL",
                (now, reason),
            )
            return cur.rowcount

    # -- archives ----------------------------------------------------------------------------

    def archives(self, target_id: int) -> list[ArchiveRecord]:
        return [
            _archive(r)
            for r in self._q(
                "SELECT * FROM archives WHERE target_id=? ORDER BY seq DESC", (target_id,)
            )
        ]

    def newest_retained(self, target_id: int) -> ArchiveRecord | None:
        rows = self._q(
            "SELECT * FROM archives WHERE target_id=? AND retained=1 AND missing=0"
            " ORDER BY seq DESC LIMIT 1",
            (target_id,),
        )
        return _archive(rows[0]) if rows else None

    def next_seq(self, target_id: int) -> int:
        rows = self._q("SELECT MAX(seq) AS m FROM archives WHERE target_id=?", (target_id,))
        return int(rows[0]["m"] or 0) + 1

    def retire(self, target_id: int, keep: int, now: float) -> list[ArchiveRecord]:
        """Flip all but the newest ``keep`` retained archives to not retained; return them."""
        with self._tx() as db:
            rows = db.execute(
                "SELECT * FROM archives WHERE target_id=? AND retained=1 ORDER BY seq DESC"
                " LIMIT -1 OFFSET ?",
                (target_id, keep),
            ).fetchall()
            for r in rows:
                db.execute(
                    "UPDATE archives SET retained=0, deleted_at=? WHERE target_id=? AND seq=?",
                    (now, target_id, r["seq"]),
                )
            out = [
                _archive(db.execute(
                    "SELECT * FROM archives WHERE target_id=? AND seq=?", (target_id, r["seq"])
                ).fetchone())
                for r in rows
            ]
        return out

    def retained_keys(self) -> set[tuple[int, int]]:
        return {
            (r["target_id"], r["seq"])
            for r in self._q("SELECT target_id, seq FROM archives WHERE retained=1 AND missing=0")
        }

    def mark_missing(self, target_id: int, seq: int) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE archives SET missing=1 WHERE target_id=? AND seq=?", (target_id, seq)
            )

    def count_retained(self, target_id: int) -> int:
        rows = self._q(
            "SELECT COUNT(*) AS n FROM archives WHERE target_id=? AND retained=1 AND missing=0",
            (target_id,),
        )
        return int(rows[0]["n"])

    def integrity_check(self) -> str:
        rows = self._q("PRAGMA integrity_check")
        return "; ".join(str(r[0]) for r in rows)


class AsyncCatalog:
    """Runs a blocking ``Catalog`` in worker threads behind a capacity limiter.

    Usage: ``await acat.call(lambda c: c.targets())``.  The limiter keeps the number of
    threads bounded; SQLite serialises writes anyway, so one thread is enough for it.
    """

    def __init__(self, catalog: Catalog, limiter: trio.CapacityLimiter | None = None) -> None:
        self.sync = catalog
        self._limiter = limiter or trio.CapacityLimiter(1)

    async def call(self, fn: Callable[[Catalog], T]) -> T:
        return await trio.to_thread.run_sync(fn, self.sync, limiter=self._limiter)
