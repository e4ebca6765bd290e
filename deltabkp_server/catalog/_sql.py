"""The catalog in SQL, once, for every engine: targets, leases, servers, executions, archives.

Job: implement the ``Catalog`` protocol on top of two engine hooks — a write transaction and a
read — so SQLite and PostgreSQL run the very same statements and pass the same contract suite.
Invariants:
- an archive exists when, and only when, its row is committed; the store follows the catalog;
- the execution log and the archive rows are never trimmed (retention only flips ``retained``
  and sets ``deleted_at``), so ``list`` shows every backup ever made; a run of identical
  ``unchanged`` executions is folded into its newest row (``fold_count``), never dropped;
- one (node, path) has one target row for ever; unregister deactivates it and a later
  register reactivates it, so the history and the sequence numbers continue;
- every read-modify-write runs in one transaction that excludes other writers of the rows it
  reads: SQLite's ``BEGIN IMMEDIATE`` takes the database's write lock up front, PostgreSQL
  locks the rows (``_for_update``; ``claim_due`` skips rows other claimers hold instead of
  waiting for them), so a lease is never given twice;
- statements use ``?`` placeholders; an engine translates them if it must.
Longer than ~450 lines on purpose: every statement of both engines lives in this one class,
so the engines cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from contextlib import AbstractContextManager
from typing import Any

from deltabkp.errors import CatalogError, ErrorCode, RequestRefused
from deltabkp_server.catalog._protocol import UNSET, upkeep_prefix
from deltabkp_server.catalog._schema import SCHEMA_VERSION, steps_after, version_stmt
from deltabkp_server.catalog._rows import (
    EXEC_SELECT,
    Row,
    Tx,
    chunks,
    schedule_sets,
    to_archive,
    to_execution,
    to_target,
)
from deltabkp_server.model import (
    QUEUED,
    ArchiveRecord,
    ExecutionRecord,
    ExecutionResult,
    ServerRecord,
    Target,
    pairs_from_json,
    pairs_to_json,
)

__all__ = ["SqlCatalog"]

#: A server silent this long is forgotten by the next heartbeat of any server.
_FORGET_SERVERS_S = 86400.0
_LEASE_LOST = "the server running this execution stopped or lost its lease (it expired)"


class SqlCatalog:
    """The shared implementation; an engine subclass supplies ``_tx``/``_read`` and the
    few clauses that differ.  ``where`` names the catalog in every error (no password)."""

    engine: str
    where: str
    max_threads: int = 1
    #: Lock the rows a read-modify-write reads (PostgreSQL); SQLite's write lock covers it.
    _for_update = ""
    #: Lock what ``claim_due`` takes, skipping rows other claimers hold (PostgreSQL).
    _skip_locked = ""
    _has_meta_sql = ""

    def _tx(self) -> AbstractContextManager[Tx]:
        """A write transaction: committed if the block ends normally, else rolled back."""
        raise NotImplementedError

    def _read(self) -> AbstractContextManager[Tx]:
        """A read (its statements may see one snapshot or several: callers need not care)."""
        raise NotImplementedError

    def _migration_lock(self, tx: Tx) -> None:
        """Keep two servers starting at once from migrating together (PostgreSQL)."""

    def _integrity(self, tx: Tx) -> str:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _q(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        with self._read() as tx:
            return tx.all(sql, args)

    def _migrate(self) -> None:
        """Bring the catalog to ``SCHEMA_VERSION`` in one transaction (or refuse it)."""
        with self._tx() as tx:
            self._migration_lock(tx)
            found = 0
            if tx.one(self._has_meta_sql) is not None:
                row = tx.one("SELECT value FROM meta WHERE key='schema_version'")
                try:
                    found = int(row["value"]) if row else -1
                except ValueError:
                    found = -1
            steps = steps_after(self.engine, found, self.where)
            for _version, statements in steps:
                for stmt in statements:
                    tx.run(stmt)
            if steps:
                tx.run(version_stmt(), (str(SCHEMA_VERSION),))

    # -- targets -----------------------------------------------------------------------------

    def register(
        self, node: str, path: str, every_s: int, now: float, *, bwlimit: int | None = None
    ) -> Target:
        exists = RequestRefused(ErrorCode.EXISTS, "is already registered", node=node, path=path)
        with self._tx() as tx:
            row = tx.one(
                "SELECT * FROM targets WHERE node=? AND path=?" + self._for_update, (node, path)
            )
            if row is not None and row["active"]:
                raise exists
            if row is None:
                tid = tx.insert(
                    "INSERT INTO targets (node, path, every_s, state, next_due, active, created,"
                    " bwlimit) VALUES (?, ?, ?, 'ok', ?, 1, ?, ?) ON CONFLICT (node, path) DO NOTHING",
                    (node, path, every_s, now, now, bwlimit),
                )
                if tid is None:  # another server registered it since our SELECT
                    raise exists
            else:
                tid = row["id"]
                tx.run(
                    "UPDATE targets SET active=1, every_s=?, state='ok', next_due=?,"
                    " last_error=NULL, bwlimit=? WHERE id=?",
                    (every_s, now, bwlimit, tid),
                )
            out = tx.one("SELECT * FROM targets WHERE id=?", (tid,))
        assert out is not None
        return to_target(out)

    def unregister(self, node: str, path: str) -> Target:
        with self._tx() as tx:
            row = tx.one(
                "SELECT * FROM targets WHERE node=? AND path=? AND active=1" + self._for_update,
                (node, path),
            )
            if row is None:
                raise RequestRefused(ErrorCode.NOT_FOUND, "is not registered", node=node, path=path)
            tx.run("UPDATE targets SET active=0 WHERE id=?", (row["id"],))
            out = tx.one("SELECT * FROM targets WHERE id=?", (row["id"],))
        assert out is not None
        return to_target(out)

    def find_target(self, node: str, path: str, *, active_only: bool = True) -> Target | None:
        rows = self._q("SELECT * FROM targets WHERE node=? AND path=?", (node, path))
        if not rows or (active_only and not rows[0]["active"]):
            return None
        return to_target(rows[0])

    def get_target(self, target_id: int) -> Target:
        rows = self._q("SELECT * FROM targets WHERE id=?", (target_id,))
        if not rows:
            raise CatalogError(f"catalog {self.where}: no target with id {target_id}")
        return to_target(rows[0])

    def targets(self, *, active_only: bool = True) -> list[Target]:
        where = " WHERE active=1" if active_only else ""
        return [to_target(r) for r in self._q(f"SELECT * FROM targets{where} ORDER BY node, path")]

    def set_schedule(
        self, target_id: int, *, state: str, next_due: float,
        last_outcome: str | None = UNSET, last_error: str | None = UNSET,
    ) -> None:
        sets, args = schedule_sets(state, next_due, last_outcome, last_error)
        with self._tx() as tx:
            tx.run(f"UPDATE targets SET {sets} WHERE id=?", (*args, target_id))

    # -- leases and the queue ----------------------------------------------------------------

    def claim_due(
        self, server_id: str, now: float, until: float, limit: int
    ) -> list[tuple[Target, str]]:
        if limit <= 0:
            return []
        with self._tx() as tx:
            rows = tx.all(
                "SELECT * FROM targets WHERE active=1"
                " AND (lease_until IS NULL OR lease_until < ?)"
                " AND (queued IS NOT NULL OR next_due <= ?)"
                " ORDER BY CASE WHEN queued IS NULL THEN 1 ELSE 0 END, next_due, id"
                " LIMIT ?" + self._skip_locked,
                (now, now, limit),
            )
            ids = [r["id"] for r in rows]
            for marks, part in chunks(ids):
                tx.run(
                    "UPDATE targets SET lease_owner=?, lease_until=?, queued=NULL"
                    f" WHERE id IN ({marks})",
                    (server_id, until, *part),
                )
                # Open rows of a target nobody holds belong to a server that is gone.
                tx.run(
                    "UPDATE executions SET ended=?, outcome='failed', error=?"
                    f" WHERE outcome IS NULL AND target_id IN ({marks})",
                    (now, _LEASE_LOST, *part),
                )
        out = []
        for r in rows:
            trigger = r["queued"] or ("retry" if r["state"] == "retrying" else "schedule")
            # ``request_seq`` as read under the claim's lock: the requests this run answers
            # (a request after the claim waits for the row lock and queues the next run).
            claimed = {**r, "lease_owner": server_id, "lease_until": until, "queued": None}
            out.append((to_target(claimed), trigger))
        return out

    def renew(self, server_id: str, target_ids: Sequence[int], until: float) -> set[int]:
        ids = sorted(set(target_ids))
        held: set[int] = set()
        if not ids:
            return held
        with self._tx() as tx:
            for marks, part in chunks(ids):
                got = [r["id"] for r in tx.all(
                    f"SELECT id FROM targets WHERE lease_owner=? AND id IN ({marks})"
                    " ORDER BY id" + self._for_update,
                    (server_id, *part),
                )]
                for m2, p2 in chunks(got):
                    tx.run(f"UPDATE targets SET lease_until=? WHERE id IN ({m2})", (until, *p2))
                held.update(got)
        return held

    def release(
        self, server_id: str, target_id: int, *, state: str, next_due: float,
        last_outcome: str | None = UNSET, last_error: str | None = UNSET,
    ) -> bool:
        sets, args = schedule_sets(state, next_due, last_outcome, last_error)
        with self._tx() as tx:
            # One UPDATE guarded by the owner: atomic on both engines, no read needed.
            n = tx.run(
                f"UPDATE targets SET {sets}, lease_owner=NULL, lease_until=NULL"
                " WHERE id=? AND lease_owner=?",
                (*args, target_id, server_id),
            )
        return n == 1

    def drop_leases(self, server_id: str) -> int:
        with self._tx() as tx:
            prefix = upkeep_prefix(server_id)
            return tx.run(
                "UPDATE targets SET lease_owner=NULL, lease_until=NULL"
                " WHERE lease_owner=? OR substr(lease_owner, 1, ?)=?",
                (server_id, len(prefix), prefix),
            )

    def request_now(self, target_id: int, trigger: str) -> int:
        if trigger not in QUEUED:
            raise ValueError(f"cannot queue trigger {trigger!r} (one of {QUEUED})")
        with self._tx() as tx:
            # One UPDATE: it locks the row (both engines), so the number and the queue move
            # together, and a claim sees both or neither.  "manual" (someone waits for it)
            # outranks "announce"; the reverse never happens.
            n = tx.run(
                "UPDATE targets SET request_seq=request_seq+1,"
                " queued=CASE WHEN queued='manual' THEN queued ELSE ? END WHERE id=?",
                (trigger, target_id),
            )
            if n != 1:
                raise CatalogError(f"catalog {self.where}: no target with id {target_id}")
            row = tx.one("SELECT request_seq FROM targets WHERE id=?", (target_id,))
        assert row is not None
        return int(row["request_seq"])

    def announce(self, nodes: Collection[str]) -> list[Target]:
        names = sorted(set(nodes))
        out: list[Row] = []
        with self._tx() as tx:
            for marks, part in chunks(names):
                pick = f"active=1 AND state='retrying' AND node IN ({marks})"
                tx.run(f"UPDATE targets SET queued='announce' WHERE {pick} AND queued IS NULL",
                       part)
                out += tx.all(f"SELECT * FROM targets WHERE {pick}", part)
        return sorted((to_target(r) for r in out), key=lambda t: (t.node, t.path))

    # -- servers -----------------------------------------------------------------------------

    def heartbeat(self, server_id: str, address: str, now: float, running: int) -> None:
        with self._tx() as tx:
            tx.run(
                "INSERT INTO servers (id, address, started, heartbeat, running)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
                " address=excluded.address, heartbeat=excluded.heartbeat,"
                " running=excluded.running",
                (server_id, address, now, now, running),
            )
            # Every start is a new id: forget long-dead ones so the table stays small.
            tx.run("DELETE FROM servers WHERE heartbeat < ?", (now - _FORGET_SERVERS_S,))

    def servers(self, now: float, ttl: float) -> list[ServerRecord]:
        rows = self._q("SELECT * FROM servers WHERE heartbeat >= ? ORDER BY id", (now - ttl,))
        return [
            ServerRecord(id=r["id"], address=r["address"], started=r["started"],
                         heartbeat=r["heartbeat"], running=r["running"])
            for r in rows
        ]

    # -- executions --------------------------------------------------------------------------

    def start_execution(
        self, target_id: int, started: float, trigger: str, due: float | None = None, *,
        request_seq: int | None = None,
    ) -> int:
        with self._tx() as tx:
            eid = tx.insert(
                "INSERT INTO executions (target_id, trigger, started, due, request_seq)"
                " VALUES (?, ?, ?, ?, ?)",
                (target_id, trigger, started, due, request_seq),
            )
        assert eid is not None
        return eid

    def _finish(self, tx: Tx, execution_id: int, r: ExecutionResult) -> None:
        n = tx.run(
            "UPDATE executions SET ended=?, outcome=?, bytes_sent=?, bytes_received=?,"
            " archive_size=?, archive_seq=?, files=?, changed_count=?, changed_json=?,"
            " skipped_json=?, error=?, note=? WHERE id=? AND outcome IS NULL",
            (
                r.ended, r.outcome, r.bytes_sent, r.bytes_received, r.archive_size,
                r.archive_seq, r.files, len(r.changed), pairs_to_json(r.changed),
                pairs_to_json(r.skipped), r.error, r.note, execution_id,
            ),
        )
        if n != 1:
            raise CatalogError(
                f"catalog {self.where}: execution {execution_id} is unknown or already finished"
            )
        if r.outcome == "unchanged":
            self._fold(tx, execution_id)

    def _fold(self, tx: Tx, execution_id: int) -> None:
        """Fold a just-finished ``unchanged`` execution into the run of identical ones right
        before it: this (newest) row absorbs the previous one — count, first start, bytes —
        and the previous row goes, in the same transaction.  So a year of minute checks is
        one row, no execution is lost from the record (the count), and the newest execution
        keeps the newest id (``backup-now --wait`` and keyset pages see it)."""
        cur = tx.one("SELECT * FROM executions WHERE id=?", (execution_id,))
        assert cur is not None
        prev = tx.one(
            "SELECT * FROM executions WHERE target_id=? AND id<? ORDER BY id DESC LIMIT 1"
            + self._for_update,
            (cur["target_id"], execution_id),
        )
        # Only a run of the same check: same base, trigger, verdict and note, nothing skipped
        # differently (a manual check or a retry between scheduled ones stays its own row).
        if prev is None or prev["outcome"] != "unchanged" or any(
            prev[k] != cur[k] for k in ("archive_seq", "trigger", "note", "error", "skipped_json")
        ):
            return
        tx.run(
            "UPDATE executions SET fold_count=?, fold_first=?, fold_bytes=? WHERE id=?",
            (
                prev["fold_count"] + 1,
                prev["fold_first"] if prev["fold_first"] is not None else prev["started"],
                prev["fold_bytes"] + prev["bytes_sent"] + prev["bytes_received"],
                execution_id,
            ),
        )
        tx.run("DELETE FROM executions WHERE id=?", (prev["id"],))

    def finish_execution(self, execution_id: int, result: ExecutionResult) -> ExecutionRecord:
        with self._tx() as tx:
            self._finish(tx, execution_id, result)
        return self.execution(execution_id)

    def commit_archive(
        self, execution_id: int, target_id: int, seq: int, result: ExecutionResult
    ) -> tuple[ArchiveRecord, ExecutionRecord]:
        """Make a stored archive real: archive row + finished execution, in one transaction."""
        if result.outcome != "stored" or result.archive_hash is None or result.archive_size is None:
            raise CatalogError(f"catalog {self.where}: commit_archive needs a stored result")
        with self._tx() as tx:
            tx.run(
                "INSERT INTO archives (target_id, seq, created, size, hash, transferred,"
                " execution_id, tgz_path, sig_path) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    target_id, seq, result.ended, result.archive_size, result.archive_hash,
                    result.transferred, execution_id,
                    f"archives/{target_id}/{seq}.tgz", f"archives/{target_id}/{seq}.sig",
                ),
            )
            self._finish(tx, execution_id, result)
            row = tx.one("SELECT * FROM archives WHERE target_id=? AND seq=?", (target_id, seq))
        assert row is not None
        return to_archive(row), self.execution(execution_id)

    def execution(self, execution_id: int) -> ExecutionRecord:
        rows = self._q(EXEC_SELECT + " WHERE e.id=?", (execution_id,))
        if not rows:
            raise CatalogError(f"catalog {self.where}: no execution {execution_id}")
        return to_execution(rows[0])

    def executions(
        self, target_id: int | None = None, *, limit: int | None = None
    ) -> list[ExecutionRecord]:
        sql, args = EXEC_SELECT, []
        if target_id is not None:
            sql += " WHERE e.target_id=?"
            args.append(target_id)
        sql += " ORDER BY e.id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [to_execution(r) for r in self._q(sql, args)]

    def execution_page(
        self, *, limit: int, before_id: int | None = None, target_id: int | None = None,
        since: float | None = None, outcome: str | None = None,
    ) -> list[ExecutionRecord]:
        """One keyset page of the log, newest first: up to ``limit`` rows with id <
        ``before_id`` (the last id of the previous page), of one target / started at or after
        ``since`` / with one outcome.  Indexed: never the whole table in memory."""
        conds: list[str] = []
        args: list[Any] = []
        for cond, value in (("e.id<?", before_id), ("e.target_id=?", target_id),
                            ("e.started>=?", since), ("e.outcome=?", outcome)):
            if value is not None:
                conds.append(cond)
                args.append(value)
        where = (" WHERE " + " AND ".join(conds)) if conds else ""
        rows = self._q(f"{EXEC_SELECT}{where} ORDER BY e.id DESC LIMIT ?", (*args, limit))
        return [to_execution(r) for r in rows]

    def answer_to(self, target_id: int, request_seq: int) -> ExecutionRecord | None:
        # Rows claimed at or after the request are the newest few: a short index range
        # (``executions_request``), however long the target's history.
        rows = self._q(
            EXEC_SELECT + " WHERE e.target_id=? AND e.request_seq>=? AND e.outcome IS NOT NULL"
            " ORDER BY e.id LIMIT 1",
            (target_id, request_seq),
        )
        return to_execution(rows[0]) if rows else None

    def record_progress(self, progress: Sequence[tuple[int, int, int]]) -> None:
        with self._tx() as tx:
            for eid, sent, received in progress:
                tx.run(
                    "UPDATE executions SET bytes_sent=?, bytes_received=?"
                    " WHERE id=? AND outcome IS NULL", (sent, received, eid),
                )

    def running_executions(self, target_id: int | None = None) -> list[ExecutionRecord]:
        where = " WHERE e.outcome IS NULL AND t.lease_owner IS NOT NULL"
        args: tuple[int, ...] = ()
        if target_id is not None:
            where += " AND e.target_id=?"
            args = (target_id,)
        return [to_execution(r) for r in self._q(EXEC_SELECT + where + " ORDER BY e.id", args)]

    def fail_unfinished(self, now: float, reason: str, *, target_id: int | None = None) -> int:
        """Close executions a crash left open, so the log says what happened to them."""
        sql = "UPDATE executions SET ended=?, outcome='failed', error=? WHERE outcome IS NULL"
        args: list[Any] = [now, reason]
        if target_id is not None:
            sql += " AND target_id=?"
            args.append(target_id)
        with self._tx() as tx:
            return tx.run(sql, args)

    # -- archives ----------------------------------------------------------------------------

    def archives(self, target_id: int) -> list[ArchiveRecord]:
        rows = self._q("SELECT * FROM archives WHERE target_id=? ORDER BY seq DESC", (target_id,))
        return [to_archive(r) for r in rows]

    def archive_page(
        self, target_id: int, *, limit: int, before_seq: int | None = None
    ) -> list[ArchiveRecord]:
        """One keyset page of ``list``, newest first: up to ``limit`` archives with seq <
        ``before_seq`` (primary-key order: never the whole history in memory)."""
        sql, args = "SELECT * FROM archives WHERE target_id=?", [target_id]
        if before_seq is not None:
            sql += " AND seq<?"
            args.append(before_seq)
        rows = self._q(sql + " ORDER BY seq DESC LIMIT ?", (*args, limit))
        return [to_archive(r) for r in rows]

    def newest_skipped(self, target_id: int) -> tuple[tuple[str, ...], ...]:
        """What the build of the target's newest archive skipped (sockets, unreadable files…)."""
        rows = self._q(
            "SELECT e.skipped_json AS s FROM archives a JOIN executions e ON e.id = a.execution_id"
            " WHERE a.target_id=? ORDER BY a.seq DESC LIMIT 1",
            (target_id,),
        )
        return pairs_from_json(rows[0]["s"]) if rows else ()

    def newest_retained(self, target_id: int) -> ArchiveRecord | None:
        rows = self._q(
            # Only a whole, sound copy can be patched against (the newest is always whole;
            # a corrupt newest makes the next backup a full transfer).
            "SELECT * FROM archives WHERE target_id=? AND retained=1 AND missing=0"
            " AND corrupt=0 AND form='whole' ORDER BY seq DESC LIMIT 1",
            (target_id,),
        )
        return to_archive(rows[0]) if rows else None

    def next_seq(self, target_id: int) -> int:
        rows = self._q("SELECT MAX(seq) AS m FROM archives WHERE target_id=?", (target_id,))
        return int(rows[0]["m"] or 0) + 1

    def retire(self, target_id: int, keep: int, now: float) -> list[ArchiveRecord]:
        """Flip all but the newest ``keep`` retained archives to not retained; return them."""
        with self._tx() as tx:
            rows = tx.all(
                "SELECT seq FROM archives WHERE target_id=? AND retained=1 ORDER BY seq DESC"
                + self._for_update,
                (target_id,),
            )
            old = [r["seq"] for r in rows[max(keep, 0):]]
            out = []
            for seq in old:
                tx.run(
                    "UPDATE archives SET retained=0, deleted_at=? WHERE target_id=? AND seq=?",
                    (now, target_id, seq),
                )
                row = tx.one("SELECT * FROM archives WHERE target_id=? AND seq=?", (target_id, seq))
                assert row is not None
                out.append(to_archive(row))
        return out

    def retained_keys(self) -> set[tuple[int, int]]:
        return {
            (r["target_id"], r["seq"])
            for r in self._q("SELECT target_id, seq FROM archives WHERE retained=1 AND missing=0")
        }

    def mark_missing(self, target_id: int, seq: int) -> None:
        with self._tx() as tx:
            tx.run("UPDATE archives SET missing=1 WHERE target_id=? AND seq=?", (target_id, seq))

    def count_retained(self, target_id: int) -> int:
        rows = self._q(
            "SELECT COUNT(*) AS n FROM archives WHERE target_id=? AND retained=1 AND missing=0",
            (target_id,),
        )
        return int(rows[0]["n"])

    # -- version storage and verification (reverse deltas, scrub) ------------------------------

    def delta_keys(self) -> set[tuple[int, int]]:
        return {
            (r["target_id"], r["seq"])
            for r in self._q(
                "SELECT target_id, seq FROM archives WHERE retained=1 AND missing=0"
                " AND form='delta'"
            )
        }

    def set_delta(
        self, target_id: int, seq: int, base_seq: int, stored_size: int, now: float
    ) -> bool:
        """Record that version ``seq`` is now held as a reverse delta against ``base_seq``
        (checked ``now``); False (nothing changed) unless it was retained, whole and sound."""
        with self._tx() as tx:
            n = tx.run(
                "UPDATE archives SET form='delta', base_seq=?, stored_size=?, verified_at=?"
                " WHERE target_id=? AND seq=? AND retained=1 AND form='whole' AND corrupt=0",
                (base_seq, stored_size, now, target_id, seq),
            )
        return n == 1

    def record_verify(
        self, target_id: int, checks: Sequence[tuple[int, str | None]], now: float
    ) -> None:
        """Each (seq, None) checked sound at ``now``; each (seq, reason) found corrupt."""
        with self._tx() as tx:
            for seq, reason in checks:
                tx.run(
                    "UPDATE archives SET verified_at=?, corrupt=?, corrupt_reason=?"
                    " WHERE target_id=? AND seq=?",
                    (now, 0 if reason is None else 1, reason, target_id, seq),
                )

    def scrub_due(self, cutoff: float) -> list[int]:
        """Targets with a retained version not checked since ``cutoff``, least recent first."""
        rows = self._q(
            "SELECT target_id, MIN(COALESCE(verified_at, created)) AS v FROM archives"
            " WHERE retained=1 AND missing=0 GROUP BY target_id"
            " HAVING MIN(COALESCE(verified_at, created)) < ? ORDER BY v, target_id",
            (cutoff,),
        )
        return [int(r["target_id"]) for r in rows]

    def lease_target(self, server_id: str, target_id: int, now: float, until: float) -> bool:
        """Take the lease of one target if nobody (this server included) holds it, leaving
        its schedule and queue alone (a verification keeps backups of it waiting)."""
        with self._tx() as tx:
            # One guarded UPDATE: atomic on both engines, as ``release`` is.
            n = tx.run(
                "UPDATE targets SET lease_owner=?, lease_until=?"
                " WHERE id=? AND (lease_until IS NULL OR lease_until < ?)",
                (server_id, until, target_id, now),
            )
        return n == 1

    def drop_lease(self, server_id: str, target_id: int) -> bool:
        """Give back a lease taken by ``lease_target`` (schedule untouched)."""
        with self._tx() as tx:
            n = tx.run(
                "UPDATE targets SET lease_owner=NULL, lease_until=NULL"
                " WHERE id=? AND lease_owner=?",
                (target_id, server_id),
            )
        return n == 1

    def integrity_check(self) -> str:
        with self._read() as tx:
            return self._integrity(tx)
