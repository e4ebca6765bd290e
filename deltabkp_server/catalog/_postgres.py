"""``Catalog`` on PostgreSQL: one catalog shared by many servers.

Job: give ``SqlCatalog`` its transactions on a psycopg 3 connection pool (sync API: the
server calls it from worker threads; psycopg's asyncio API does not run under Trio).
Invariants:
- a caller never hangs on the database: every statement runs under ``statement_timeout`` and
  ``lock_timeout``, an idle transaction is ended by the server, connecting has a timeout, a
  connection is checked before use and waiting for one has a timeout, and TCP keepalives
  notice a peer that vanished;
- every failure of the database — refused, lost, timed out, constraint — is a
  ``CatalogError`` naming the catalog's URL without its password, never a psycopg error;
- after an outage the same object works again as soon as the database answers (broken
  connections are dropped and replaced by the pool);
- row locks (``FOR UPDATE``; ``SKIP LOCKED`` in ``claim_due``) make each read-modify-write
  exclusive under READ COMMITTED, so two servers never lease one target.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from deltabkp.errors import CatalogError
from deltabkp_server.catalog._rows import Row, Tx
from deltabkp_server.catalog._sql import SqlCatalog

__all__ = ["PostgresCatalog", "redact"]

#: Any number will do, so long as it is the same for every server: it serialises migrations.
_MIGRATION_LOCK = 0x64_62_6B_70  # "dbkp"


def redact(url: str) -> str:
    """``url`` with its password (URL or ``password=`` form) replaced by ``***``."""
    url = re.sub(r"(://[^:/@?#]*:)[^@/?#]*@", r"\1***@", url)
    return re.sub(r"(password\s*=\s*)('[^']*'|[^&\s]*)", r"\1***", url, flags=re.IGNORECASE)


@functools.lru_cache(maxsize=512)
def _pg(sql: str) -> str:
    """``?`` placeholders → psycopg's ``%s`` (our SQL has no other ``?`` and no ``%``)."""
    assert "%" not in sql, sql
    return sql.replace("?", "%s")


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return f"the database did not answer in time ({text})"
    if type(exc).__name__ == "PoolTimeout":
        return f"no working connection to the database ({text}; is PostgreSQL up?)"
    return text


class _PgTx:
    def __init__(self, cur: psycopg.Cursor[Row]) -> None:
        self._cur = cur

    def all(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        self._cur.execute(_pg(sql), tuple(args))
        return self._cur.fetchall()

    def one(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        self._cur.execute(_pg(sql), tuple(args))
        return self._cur.fetchone()

    def run(self, sql: str, args: Sequence[Any] = ()) -> int:
        self._cur.execute(_pg(sql), tuple(args))
        return self._cur.rowcount

    def insert(self, sql: str, args: Sequence[Any]) -> int | None:
        self._cur.execute(_pg(sql + " RETURNING id"), tuple(args))
        row = self._cur.fetchone()
        return None if row is None else int(row["id"])


class PostgresCatalog(SqlCatalog):
    """``Catalog`` on PostgreSQL at ``url`` (``postgresql://USER[:PASSWORD]@HOST:PORT/DB``
    or any libpq conninfo; the password may also come from ``PGPASSWORD``/``~/.pgpass``).

    ``max_threads`` connections at most (the ``AsyncCatalog`` limiter's size); a call waits at
    most ``call_timeout`` seconds for a working connection, then raises ``CatalogError``.
    """

    engine = "postgresql"
    _for_update = " FOR UPDATE"
    _skip_locked = " FOR UPDATE SKIP LOCKED"
    _has_meta_sql = (
        "SELECT 1 AS x FROM pg_catalog.pg_tables"
        " WHERE schemaname = current_schema() AND tablename = 'meta'"
    )

    def __init__(
        self,
        url: str,
        *,
        max_threads: int = 4,
        statement_timeout: float = 30.0,
        lock_timeout: float = 10.0,
        connect_timeout: float = 5.0,
        call_timeout: float = 10.0,
    ) -> None:
        self.url = url
        self.where = redact(url)
        self.max_threads = max(1, max_threads)
        try:
            params: dict[str, Any] = conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise CatalogError(f"bad catalog URL {self.where}: {_reason(exc)}") from None
        # Ours are appended, so an explicit -c in the URL's options loses to them: the bounds
        # are what keeps a worker thread from waiting for ever.
        params["options"] = " ".join(filter(None, [
            params.get("options"),
            f"-c statement_timeout={_ms(statement_timeout)}",
            f"-c lock_timeout={_ms(lock_timeout)}",
            f"-c idle_in_transaction_session_timeout={_ms(statement_timeout * 2)}",
        ]))
        params.setdefault("connect_timeout", str(max(2, round(connect_timeout))))
        params.setdefault("application_name", "deltabkp-server")
        for key, value in (("keepalives", "1"), ("keepalives_idle", "10"),
                           ("keepalives_interval", "5"), ("keepalives_count", "3")):
            params.setdefault(key, value)
        conninfo = make_conninfo("", **params)
        try:
            # One direct connection first: its error says what is wrong (refused, auth, no
            # such database) where the pool would only time out.
            psycopg.connect(conninfo).close()
        except psycopg.Error as exc:
            raise CatalogError(f"cannot open catalog {self.where}: {_reason(exc)}") from None
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            conninfo, min_size=1, max_size=self.max_threads, open=False,
            timeout=call_timeout, check=ConnectionPool.check_connection,
            # Give up a reconnection attempt after a while: the next call then starts a fresh
            # one at once instead of waiting out a long exponential backoff after an outage.
            reconnect_timeout=max(call_timeout, 10.0), name="deltabkp-catalog",
        )
        try:
            self._pool.open(wait=False)
            self._migrate()
        except BaseException:
            self._pool.close(timeout=5.0)
            raise

    @contextmanager
    def _tx(self) -> Iterator[Tx]:
        try:
            # The pool's block commits when it ends normally and rolls back on an exception.
            with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
                yield _PgTx(cur)
        except psycopg.Error as exc:
            raise CatalogError(f"catalog {self.where}: {_reason(exc)}") from None

    _read = _tx

    def _migration_lock(self, tx: Tx) -> None:
        tx.all("SELECT pg_advisory_xact_lock(?) AS x", (_MIGRATION_LOCK,))

    def _integrity(self, tx: Tx) -> str:
        # PostgreSQL checks its own pages (checksums, WAL); what we can see is that the
        # catalog answers and that the foreign keys hold (they are enforced).
        tx.all("SELECT 1 AS x")
        return "ok"

    def close(self) -> None:
        self._pool.close(timeout=5.0)
