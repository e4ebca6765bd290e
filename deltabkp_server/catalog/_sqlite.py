"""``Catalog`` on one SQLite file: the embedded default, for one server.

Job: give ``SqlCatalog`` its transactions on a single SQLite connection in WAL mode.
Invariants:
- one connection, guarded by a lock, so calls from several worker threads are serialised
  (SQLite serialises writes anyway; the lock keeps the connection's state sane);
- every write transaction is ``BEGIN IMMEDIATE``: the write lock is taken before the first
  read, so a read-modify-write (a lease claim) cannot interleave with another writer, even one
  in another process;
- ``synchronous=FULL``: a commit is on disk when it returns (the commit is the point of truth);
- an older catalog file is migrated in place on open; a newer one is refused untouched.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deltabkp.errors import CatalogError
from deltabkp_server.catalog._rows import Row, Tx
from deltabkp_server.catalog._sql import SqlCatalog

__all__ = ["SqliteCatalog"]


def _dict_row(cur: sqlite3.Cursor, row: tuple[Any, ...]) -> Row:
    return {d[0]: v for d, v in zip(cur.description, row)}


class _SqliteTx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def all(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return self._db.execute(sql, tuple(args)).fetchall()

    def one(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        row: Row | None = self._db.execute(sql, tuple(args)).fetchone()
        return row

    def run(self, sql: str, args: Sequence[Any] = ()) -> int:
        return self._db.execute(sql, tuple(args)).rowcount

    def insert(self, sql: str, args: Sequence[Any]) -> int | None:
        cur = self._db.execute(sql, tuple(args))
        return cur.lastrowid if cur.rowcount == 1 else None


class SqliteCatalog(SqlCatalog):
    """``Catalog`` on one SQLite file in WAL mode with full fsync on commit."""

    engine = "sqlite"
    max_threads = 1
    _has_meta_sql = "SELECT 1 AS x FROM sqlite_master WHERE type='table' AND name='meta'"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.where = str(self.path)
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(
                str(self.path), isolation_level=None, check_same_thread=False, timeout=30
            )
        except sqlite3.Error as exc:
            raise CatalogError(f"cannot open catalog {self.path}: {exc}") from None
        try:
            self._db.row_factory = _dict_row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.Error as exc:
            self._db.close()
            raise CatalogError(f"cannot open catalog {self.path}: {exc}") from None
        except BaseException:
            self._db.close()
            raise

    @contextmanager
    def _tx(self) -> Iterator[Tx]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield _SqliteTx(self._db)
                except BaseException:
                    # SQLite may have rolled back already (disk full, I/O error).
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise CatalogError(f"catalog {self.path}: {exc}") from None

    @contextmanager
    def _read(self) -> Iterator[Tx]:
        with self._lock:
            try:
                yield _SqliteTx(self._db)
            except sqlite3.Error as exc:
                raise CatalogError(f"catalog {self.path}: {exc}") from None

    def _integrity(self, tx: Tx) -> str:
        return "; ".join(str(r["integrity_check"]) for r in tx.all("PRAGMA integrity_check"))

    def close(self) -> None:
        with self._lock:
            self._db.close()
