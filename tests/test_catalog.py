"""Contract suite for ``Catalog`` backends, run on every engine for real: SQLite and PostgreSQL.

Every contract test runs once per engine (the ``cat``/``backend`` fixtures); PostgreSQL is a
throwaway server for the session (``tests/conftest.py``) with a fresh database per test.  Then
the lease API under contention, engine specifics (SQLite: WAL, migration from v1, kill -9 of a
writer; PostgreSQL: outage and recovery, lock timeouts, concurrent migration) and URLs.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pytest
import trio

from deltabkp.errors import CatalogError, RequestRefused
from deltabkp.testing import PostgresServer
from deltabkp_server.catalog import (
    SCHEMA_VERSION,
    AsyncCatalog,
    Catalog,
    PostgresCatalog,
    SqliteCatalog,
    lease_server,
    open_catalog,
    upkeep_owner,
    redact,
)
from deltabkp_server.catalog._schema import steps_after
from deltabkp_server.model import ExecutionResult, iso, parse_every

ENGINES = ("sqlite", "postgresql")
NODE, PATH = "127.0.0.1:7471", "/srv/app"


@attrs.define
class Backend:
    """One engine's database for one test: open as many catalogs on it as the test needs."""

    name: str
    open_one: Callable[[], Catalog]
    sql: Callable[[str], None]
    opened: list[Catalog] = attrs.field(factory=list)
    #: PostgreSQL: the database's URL (for a direct look at it).
    url: str = ""

    def open(self) -> Catalog:
        c = self.open_one()
        self.opened.append(c)
        return c


def _sqlite_sql(path: Path) -> Callable[[str], None]:
    def run(stmt: str) -> None:
        db = sqlite3.connect(path)
        db.execute(stmt)
        db.commit()
        db.close()
    return run


def _postgres_sql(url: str) -> Callable[[str], None]:
    def run(stmt: str) -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(stmt.encode())
    return run


@pytest.fixture(params=ENGINES)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        path = tmp_path / "catalog.sqlite3"
        b = Backend("sqlite", lambda: SqliteCatalog(path), _sqlite_sql(path))
    else:
        url: str = request.getfixturevalue("postgres_url")
        b = Backend("postgresql", lambda: PostgresCatalog(url), _postgres_sql(url), url=url)
    yield b
    for c in b.opened:
        c.close()


@pytest.fixture
def cat(backend: Backend) -> Catalog:
    return backend.open()


def _stored(seq: int, *, t: float = 100.0, size: int = 1000, sent: int = 10, received: int = 90) -> ExecutionResult:
    return ExecutionResult(
        outcome="stored", ended=t, bytes_sent=sent, bytes_received=received, archive_size=size,
        archive_seq=seq, archive_hash=bytes([seq % 256]) * 32, files=3,
        changed=(("log.txt", "grew while read"),),
    )


def _store_one(cat: Catalog, tid: int, t: float) -> int:
    eid = cat.start_execution(tid, t, "schedule")
    seq = cat.next_seq(tid)
    cat.commit_archive(eid, tid, seq, _stored(seq, t=t + 1))
    return seq


# -- targets ---------------------------------------------------------------------------------


def test_register_find_and_refuse_twice(cat: Catalog) -> None:
    t = cat.register(NODE, PATH, 300, 10.0)
    assert (t.node, t.path, t.every_s, t.state, t.active) == (NODE, PATH, 300, "ok", True)
    assert t.next_due == 10.0
    assert cat.find_target(NODE, PATH) == t
    assert cat.get_target(t.id) == t
    with pytest.raises(RequestRefused) as ei:
        cat.register(NODE, PATH, 60, 11.0)
    assert ei.value.code == "exists" and NODE in ei.value.message and PATH in ei.value.message
    assert cat.find_target(NODE, PATH) == t  # the refusal changed nothing
    assert [x.id for x in cat.targets()] == [t.id]


def test_unregister_keeps_history_and_reregister_continues_it(cat: Catalog) -> None:
    t = cat.register(NODE, PATH, 300, 10.0)
    _store_one(cat, t.id, 20.0)
    gone = cat.unregister(NODE, PATH)
    assert not gone.active
    assert cat.find_target(NODE, PATH) is None
    assert cat.find_target(NODE, PATH, active_only=False) is not None
    assert cat.targets() == []
    assert len(cat.archives(t.id)) == 1 and len(cat.executions(t.id)) == 1
    with pytest.raises(RequestRefused) as ei:
        cat.unregister(NODE, PATH)
    assert ei.value.code == "not-found"
    again = cat.register(NODE, PATH, 60, 30.0)
    assert again.id == t.id and again.every_s == 60 and again.active
    assert cat.next_seq(t.id) == 2


def test_schedule_state_round_trips(cat: Catalog) -> None:
    t = cat.register(NODE, PATH, 300, 10.0)
    cat.set_schedule(t.id, state="retrying", next_due=55.5, last_outcome="failed", last_error="boom")
    got = cat.get_target(t.id)
    assert (got.state, got.next_due, got.last_outcome, got.last_error) == ("retrying", 55.5, "failed", "boom")
    cat.set_schedule(t.id, state="ok", next_due=99.0)  # outcome/error untouched when not given
    got = cat.get_target(t.id)
    assert (got.state, got.next_due, got.last_error) == ("ok", 99.0, "boom")


def test_unknown_target_id_is_a_catalog_error(cat: Catalog) -> None:
    with pytest.raises(CatalogError):
        cat.get_target(12345)


# -- executions and archives -----------------------------------------------------------------


def test_commit_archive_logs_execution_and_archive_together(cat: Catalog) -> None:
    t = cat.register(NODE, PATH, 300, 10.0)
    eid = cat.start_execution(t.id, 20.0, "manual")
    running = cat.execution(eid)
    assert running.outcome is None and running.ended is None
    archive, record = cat.commit_archive(eid, t.id, 1, _stored(1, t=21.0))
    assert (archive.seq, archive.size, archive.transferred, archive.retained) == (1, 1000, 100, True)
    assert archive.execution_id == eid and archive.created == 21.0
    assert (record.outcome, record.archive_seq, record.transferred, record.trigger) == ("stored", 1, 100, "manual")
    assert record.changed == (("log.txt", "grew while read"),)
    assert (record.node, record.path) == (NODE, PATH)
    assert cat.newest_retained(t.id) == archive
    with pytest.raises(CatalogError):  # an execution finishes once
        cat.finish_execution(eid, ExecutionResult(outcome="failed", ended=22.0, error="x"))


def test_a_failed_commit_leaves_no_row(cat: Catalog) -> None:
    t = cat.register(NODE, PATH, 300, 10.0)
    _store_one(cat, t.id, 20.0)
    eid = cat.start_execution(t.id, 30.0, "schedule")
    with pytest.raises(CatalogError):
        cat.commit_archive(eid, t.id, 1, _stored(1, t=31.0))  # seq 1 exists: constraint error
    assert len(cat.archives(t.id)) == 1
    assert cat.execution(eid).outcome is None  # rolled back together with the archive row


def test_failed_and_unchanged_executions_add_no_archive(cat: Catalog) -> None:
    t = cat.register(NODE, PATH, 300, 10.0)
    for outcome in ("failed", "unchanged", "skipped"):
        eid = cat.start_execution(t.id, 20.0, "schedule")
        rec = cat.finish_execution(eid, ExecutionResult(outcome=outcome, ended=21.0, error="e" if outcome == "failed" else None))
        assert rec.outcome == outcome
    assert cat.archives(t.id) == [] and cat.newest_retained(t.id) is None
    assert [e.outcome for e in cat.executions(t.id)] == ["skipped", "unchanged", "failed"]
    assert len(cat.executions(limit=2)) == 2


def test_retire_keeps_newest_and_never_forgets(cat: Catalog) -> None:
    t = cat.register(NODE, PATH, 300, 10.0)
    seqs = [_store_one(cat, t.id, 20.0 + i) for i in range(12)]
    assert seqs == list(range(1, 13))
    retired = cat.retire(t.id, 10, 99.0)
    assert sorted(a.seq for a in retired) == [1, 2]
    assert all(not a.retained and a.deleted_at == 99.0 for a in retired)
    rows = cat.archives(t.id)
    assert [a.seq for a in rows] == list(range(12, 0, -1))  # newest first, all twelve
    assert [a.retained for a in rows] == [True] * 10 + [False] * 2
    assert cat.count_retained(t.id) == 10
    assert cat.retained_keys() == {(t.id, s) for s in range(3, 13)}
    assert cat.retire(t.id, 10, 100.0) == []
    assert len(cat.executions(t.id)) == 12  # the log is never trimmed


def test_missing_archives_are_never_a_base(cat: Catalog) -> None:
    t = cat.register(NODE, PATH, 300, 10.0)
    _store_one(cat, t.id, 20.0)
    _store_one(cat, t.id, 30.0)
    cat.mark_missing(t.id, 2)
    base = cat.newest_retained(t.id)
    assert base is not None and base.seq == 1
    assert (t.id, 2) not in cat.retained_keys()
    assert cat.next_seq(t.id) == 3  # a missing seq is never reused


def test_fail_unfinished_closes_open_executions(cat: Catalog) -> None:
    t = cat.register(NODE, PATH, 300, 10.0)
    eid = cat.start_execution(t.id, 20.0, "schedule")
    _store_one(cat, t.id, 30.0)
    assert cat.fail_unfinished(40.0, "server crashed") == 1
    rec = cat.execution(eid)
    assert (rec.outcome, rec.ended, rec.error) == ("failed", 40.0, "server crashed")
    assert cat.fail_unfinished(41.0, "again") == 0


def test_integrity_check_is_ok(cat: Catalog) -> None:
    assert cat.integrity_check() == "ok"


async def test_async_wrapper_runs_in_threads(cat: Catalog) -> None:
    acat = AsyncCatalog(cat)
    t = await acat.call(lambda c: c.register(NODE, PATH, 60, 1.0))
    async with trio.open_nursery() as n:
        for i in range(5):
            n.start_soon(acat.call, lambda c, i=i: c.register(f"10.0.0.{i}:1", PATH, 60, 1.0))
    assert len(await acat.call(lambda c: c.targets())) == 6
    assert (await acat.call(lambda c: c.get_target(t.id))).node == NODE


def test_async_wrapper_takes_its_thread_count_from_the_backend(cat: Catalog) -> None:
    assert AsyncCatalog(cat).limiter.total_tokens == cat.max_threads >= 1


def test_unknown_schema_version_is_refused_untouched(backend: Backend) -> None:
    backend.open().close()
    backend.sql("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(CatalogError, match="schema version 99"):
        backend.open()


# -- leases, the queue, servers --------------------------------------------------------------


def _due(cat: Catalog, n: int, now: float = 0.0, node: str = "10.0.0.1:1") -> list[int]:
    return [cat.register(node, f"/p{i:04d}", 60, now + i).id for i in range(n)]


def test_claim_takes_due_targets_once_in_order_with_their_trigger(cat: Catalog) -> None:
    t1, t2, t3, t4, t5 = _due(cat, 5, now=10.0)  # due at 10, 11, 12, 13, 14
    cat.set_schedule(t2, state="retrying", next_due=11.0)
    cat.set_schedule(t5, state="ok", next_due=1000.0)  # not due
    cat.request_now(t4, "announce")
    cat.request_now(t5, "manual")
    got = cat.claim_due("s1", 100.0, 130.0, 3)
    # Queued first (by next_due: t4 at 13, t5 at 1000), then the due ones by next_due.
    assert [(t.id, trig) for t, trig in got] == [(t4, "announce"), (t5, "manual"), (t1, "schedule")]
    assert all((t.lease_owner, t.lease_until, t.queued) == ("s1", 130.0, None) for t, _ in got)
    assert [(t.id, trig) for t, trig in cat.claim_due("s2", 100.0, 130.0, 10)] == [
        (t2, "retry"), (t3, "schedule"),
    ]
    assert cat.claim_due("s3", 100.0, 130.0, 10) == []
    stored = cat.get_target(t4)
    assert (stored.lease_owner, stored.lease_until, stored.queued) == ("s1", 130.0, None)
    assert cat.claim_due("s1", 100.0, 130.0, 0) == []


def test_claim_skips_inactive_and_not_yet_due(cat: Catalog) -> None:
    t = cat.register(NODE, PATH, 60, 50.0)
    assert cat.claim_due("s1", 49.9, 80.0, 5) == []
    cat.unregister(NODE, PATH)
    assert cat.claim_due("s1", 60.0, 90.0, 5) == []
    cat.request_now(t.id, "manual")  # queued, but inactive: never claimed
    assert cat.claim_due("s1", 60.0, 90.0, 5) == []


def test_an_expired_lease_is_claimable_by_another_server(cat: Catalog) -> None:
    t = cat.register(NODE, PATH, 60, 0.0)
    [(mine, trigger)] = cat.claim_due("a", 10.0, 40.0, 5)
    eid = cat.start_execution(t.id, 10.0, trigger, due=mine.next_due)
    assert cat.claim_due("b", 39.0, 69.0, 5) == []  # a's lease is live
    assert cat.claim_due("b", 40.0, 70.0, 5) == []  # ... up to and including its end
    [(theirs, trigger)] = cat.claim_due("b", 41.0, 71.0, 5)
    assert (theirs.lease_owner, theirs.lease_until, trigger) == ("b", 71.0, "schedule")
    # Nobody runs a's execution any more: the claim closed it.
    rec = cat.execution(eid)
    assert (rec.outcome, rec.ended) == ("failed", 41.0) and rec.error and "lease" in rec.error
    # a finds out: it can neither renew nor release what b holds now.
    assert cat.renew("a", [t.id], 100.0) == set()
    assert cat.release("a", t.id, state="ok", next_due=999.0, last_outcome="stored") is False
    now = cat.get_target(t.id)
    assert (now.lease_owner, now.lease_until, now.next_due, now.last_outcome) == ("b", 71.0, 0.0, None)


def test_renew_and_release_only_for_the_holder(cat: Catalog) -> None:
    a, b, free = _due(cat, 3)
    cat.claim_due("s1", 100.0, 130.0, 1)  # a
    cat.claim_due("s2", 100.0, 130.0, 1)  # b
    assert cat.renew("s1", [a, b, free, 424242], 160.0) == {a}
    assert cat.renew("s1", [], 160.0) == set()
    assert (cat.get_target(a).lease_until, cat.get_target(b).lease_until) == (160.0, 130.0)
    assert cat.release("s2", a, state="ok", next_due=500.0) is False
    assert cat.release("s1", a, state="retrying", next_due=105.0, last_outcome="failed",
                       last_error="boom") is True
    got = cat.get_target(a)
    assert (got.state, got.next_due, got.last_outcome, got.last_error) == ("retrying", 105.0, "failed", "boom")
    assert (got.lease_owner, got.lease_until) == (None, None)
    assert cat.release("s1", a, state="ok", next_due=1.0) is False  # released once
    assert cat.release("s2", b, state="ok", next_due=200.0) is True
    assert cat.get_target(b).last_outcome is None  # untouched when not given
    assert [t.id for t, _ in cat.claim_due("s3", 106.0, 136.0, 5)] == [free, a]


def test_release_keeps_a_target_unregistered_during_its_run_inactive(cat: Catalog) -> None:
    t = cat.register(NODE, PATH, 60, 0.0)
    cat.claim_due("s1", 1.0, 31.0, 1)
    cat.unregister(NODE, PATH)
    assert cat.release("s1", t.id, state="ok", next_due=61.0, last_outcome="stored")
    got = cat.get_target(t.id)
    assert not got.active and got.lease_owner is None and got.last_outcome == "stored"
    assert cat.find_target(NODE, PATH) is None


def test_drop_leases_hands_targets_over_at_once(cat: Catalog) -> None:
    ids = _due(cat, 3)
    cat.claim_due("s1", 100.0, 130.0, 2)
    cat.claim_due("s2", 100.0, 130.0, 1)
    assert cat.drop_leases("s1") == 2
    assert sorted(t.id for t, _ in cat.claim_due("s3", 101.0, 131.0, 5)) == ids[:2]


async def test_drop_leases_drops_the_servers_upkeep_leases_too(cat: Catalog) -> None:
    """A server restarting after a crash mid-verification drops that upkeep's lease (its
    own owner, ``upkeep_owner``), not another server's whose id it prefixes."""
    a, b, c = _due(cat, 3)
    assert cat.lease_target(upkeep_owner("s1", "verification"), a, 100.0, 130.0)
    assert cat.lease_target(upkeep_owner("s11", "verification"), b, 100.0, 130.0)
    assert cat.lease_target("s1", c, 100.0, 130.0)
    assert cat.drop_leases("s1") == 2
    assert [cat.get_target(t).lease_owner is None for t in (a, b, c)] == [True, False, True]


def test_request_now_queues_and_manual_outranks_announce(cat: Catalog) -> None:
    a, b = _due(cat, 2, now=500.0)
    cat.request_now(a, "manual")
    cat.request_now(a, "announce")
    assert cat.get_target(a).queued == "manual"
    cat.request_now(b, "announce")
    cat.request_now(b, "manual")
    assert cat.get_target(b).queued == "manual"
    with pytest.raises(CatalogError):
        cat.request_now(424242, "manual")
    with pytest.raises(ValueError):
        cat.request_now(a, "schedule")
    assert {(t.id, trig) for t, trig in cat.claim_due("s1", 1.0, 31.0, 5)} == {(a, "manual"), (b, "manual")}


def test_a_request_during_a_run_waits_for_its_release(cat: Catalog) -> None:
    t = cat.register(NODE, PATH, 60, 0.0)
    cat.claim_due("s1", 1.0, 31.0, 1)
    cat.request_now(t.id, "manual")
    assert cat.claim_due("s2", 2.0, 32.0, 5) == []  # still leased by s1
    assert cat.release("s1", t.id, state="ok", next_due=61.0)
    assert cat.get_target(t.id).queued == "manual"  # the release did not eat the request
    [(got, trigger)] = cat.claim_due("s2", 3.0, 33.0, 5)
    assert (got.id, trigger, got.lease_owner) == (t.id, "manual", "s2")


def test_announce_queues_the_retrying_targets_of_those_nodes(cat: Catalog) -> None:
    r1 = cat.register("n1:1", "/a", 60, 0.0).id
    ok = cat.register("n1:1", "/b", 60, 0.0).id
    other = cat.register("n2:1", "/a", 60, 0.0).id
    gone = cat.register("n1:1", "/c", 60, 0.0).id
    r2 = cat.register("n3:1", "/a", 60, 0.0).id
    for tid in (r1, other, gone, r2):
        cat.set_schedule(tid, state="retrying", next_due=1e9)
    cat.set_schedule(ok, state="ok", next_due=1e9)
    cat.unregister("n1:1", "/c")
    cat.request_now(r2, "manual")
    hit = cat.announce({"n1:1", "n3:1", "nobody:1"})
    assert [(t.id, t.queued) for t in hit] == [(r1, "announce"), (r2, "manual")]
    assert cat.announce([]) == []
    assert cat.get_target(other).queued is None and cat.get_target(ok).queued is None
    got = {t.id: trig for t, trig in cat.claim_due("s1", 100.0, 130.0, 10)}
    assert got == {r1: "announce", r2: "manual"}


def test_heartbeats_tell_which_servers_are_alive(cat: Catalog) -> None:
    assert cat.servers(100.0, 30.0) == []
    cat.heartbeat("s1", "10.0.0.1:7470", 100.0, 0)
    cat.heartbeat("s2", "10.0.0.2:7470", 105.0, 2)
    assert [s.id for s in cat.servers(110.0, 30.0)] == ["s1", "s2"]
    cat.heartbeat("s1", "10.0.0.9:7470", 120.0, 3)
    [s1] = cat.servers(136.0, 30.0)  # s2's last heartbeat is 31 s old
    assert (s1.id, s1.address, s1.started, s1.heartbeat, s1.running) == ("s1", "10.0.0.9:7470", 100.0, 120.0, 3)
    assert s1.to_wire()["started"] == iso(100.0) and s1.to_wire()["running"] == 3


def test_executions_of_a_target_and_the_due_time(cat: Catalog) -> None:
    t = cat.register(NODE, PATH, 60, 0.0)
    u = cat.register(NODE, "/other", 60, 0.0)
    e1 = cat.start_execution(t.id, 10.0, "schedule", due=9.5)
    e2 = cat.start_execution(t.id, 11.0, "manual")
    cat.start_execution(u.id, 12.0, "schedule")
    assert [e.id for e in cat.executions(t.id)] == [e2, e1]
    rec = cat.execution(e1)
    assert rec.due == 9.5 and rec.to_wire()["due"] == iso(9.5)
    assert cat.execution(e2).due is None and cat.execution(e2).to_wire()["due"] is None


def _ended(cat: Catalog, eid: int, t: float, outcome: str = "failed") -> None:
    cat.finish_execution(eid, ExecutionResult(
        outcome=outcome, ended=t, error="down" if outcome == "failed" else None,
    ))


def test_a_run_answers_the_requests_made_before_its_claim_and_no_later_one(cat: Catalog) -> None:
    t = cat.register(NODE, PATH, 60, 0.0)
    u = cat.register(NODE, "/other", 60, 1e9)
    assert cat.get_target(t.id).request_seq == 0
    # Two requests before a claim: numbered in order, and one run answers both.
    r1, r2 = cat.request_now(t.id, "manual"), cat.request_now(t.id, "announce")
    assert (r1, r2) == (1, 2) and cat.get_target(t.id).queued == "manual"
    assert cat.request_now(u.id, "manual") == 1  # each target numbers its own
    [(run, trigger)] = [x for x in cat.claim_due("s1", 1.0, 31.0, 5) if x[0].id == t.id]
    assert (run.request_seq, trigger) == (2, "manual")
    # A request while that run is claimed (or running) is not answered by it.
    r3 = cat.request_now(t.id, "manual")
    e1 = cat.start_execution(t.id, 2.0, trigger, request_seq=run.request_seq)
    assert cat.execution(e1).request_seq == 2
    assert cat.answer_to(t.id, r1) is None  # running: no answer yet
    _ended(cat, e1, 3.0)
    # A verification's row (made under no claim) answers nothing.
    _ended(cat, cat.start_execution(t.id, 3.5, "verify"), 3.6, "unchanged")
    answered = {r: cat.answer_to(t.id, r) for r in (r1, r2, r3)}
    assert [a.id if a else None for a in answered.values()] == [e1, e1, None]
    assert cat.answer_to(u.id, 1) is None  # another target's run is no answer
    assert cat.release("s1", t.id, state="ok", next_due=61.0)
    [(again, trigger)] = cat.claim_due("s2", 4.0, 34.0, 5)
    assert (again.id, again.request_seq, trigger) == (t.id, 3, "manual")
    e2 = cat.start_execution(t.id, 5.0, trigger, request_seq=again.request_seq)
    _ended(cat, e2, 6.0, "unchanged")
    assert [cat.answer_to(t.id, r).id for r in (r1, r2, r3)] == [e1, e1, e2]  # type: ignore[union-attr]
    assert cat.answer_to(t.id, 4) is None
    # A scheduled claim carries the number too: a request whose own run never started (its
    # server died between claim and start) is answered by the next run claimed after it.
    assert cat.release("s2", t.id, state="ok", next_due=61.0)
    [(sched, trigger)] = cat.claim_due("s1", 100.0, 130.0, 5)
    assert (sched.request_seq, trigger) == (3, "schedule")


def _check(cat: Catalog, tid: int, t: float, outcome: str = "unchanged", trigger: str = "schedule",
           *, note: str | None = "unchanged (fingerprint)", sent: int = 40) -> int:
    eid = cat.start_execution(tid, t, trigger)
    cat.finish_execution(eid, ExecutionResult(
        outcome=outcome, ended=t + 0.5, bytes_sent=sent, bytes_received=60, archive_seq=1,
        archive_size=1000, note=note, error="down" if outcome == "failed" else None,
    ))
    return eid


def test_consecutive_unchanged_checks_fold_into_the_newest_row(cat: Catalog) -> None:
    t = cat.register(NODE, PATH, 60, 0.0)
    u = cat.register(NODE, "/other", 60, 0.0)
    _store_one(cat, t.id, 1.0)
    ids = [_check(cat, t.id, 10.0 + i, sent=40 + i) for i in range(5)]
    _check(cat, u.id, 12.5)  # another target's checks in between do not break t's run
    run, _stored_row = cat.executions(t.id)  # the newest id stays
    assert (run.id, run.count, run.first, run.started, run.outcome) == (ids[-1], 5, 10.0, 14.0, "unchanged")
    assert run.transferred == 44 + 60 and run.earlier_bytes == sum(40 + i + 60 for i in range(4))
    wire = run.to_wire()
    assert (wire["count"], wire["first"], wire["last"]) == (5, iso(10.0), iso(14.0))
    assert wire["run_transferred"] == sum(40 + i + 60 for i in range(5))
    for gone in ids[:-1]:
        with pytest.raises(CatalogError):
            cat.execution(gone)
    # What breaks a run: another trigger, a failure, another verdict; each starts a new row.
    _check(cat, t.id, 20.0, trigger="manual")
    _check(cat, t.id, 21.0, "failed", note=None)
    _check(cat, t.id, 22.0)
    _check(cat, t.id, 23.0, note="unchanged (hash)")
    _check(cat, t.id, 24.0, note="unchanged (hash)")
    rows = cat.executions(t.id)
    assert [(e.outcome, e.trigger, e.count) for e in rows] == [
        ("unchanged", "schedule", 2), ("unchanged", "schedule", 1), ("failed", "schedule", 1),
        ("unchanged", "manual", 1), ("unchanged", "schedule", 5), ("stored", "schedule", 1),
    ]
    assert sum(e.count for e in rows) == 11  # every execution is in the record
    assert rows[-1].to_wire()["count"] == 1 and rows[-1].to_wire()["first"] == iso(1.0)


def test_the_log_is_read_in_keyset_pages_with_filters(cat: Catalog) -> None:
    t = cat.register(NODE, PATH, 60, 0.0)
    u = cat.register(NODE, "/other", 60, 0.0)
    for i in range(6):
        _store_one(cat, t.id, 10.0 * i)
        _check(cat, u.id, 10.0 * i + 1, "failed", note=None)
    every = cat.executions()
    assert len(every) == 12

    def pages(limit: int, **kw: object) -> list[list[int]]:
        out: list[list[int]] = []
        before = None
        while page := cat.execution_page(limit=limit, before_id=before, **kw):  # type: ignore[arg-type]
            out.append([e.id for e in page])
            before = page[-1].id
        return out

    assert pages(5) == [[e.id for e in every[i:i + 5]] for i in (0, 5, 10)]
    assert [i for p in pages(4, target_id=u.id) for i in p] == [e.id for e in every if e.target_id == u.id]
    assert [i for p in pages(2, outcome="stored") for i in p] == [e.id for e in every if e.outcome == "stored"]
    assert [i for p in pages(3, since=30.0) for i in p] == [e.id for e in every if e.started >= 30.0]
    assert pages(3, since=30.0, outcome="failed", target_id=t.id) == []


def test_list_is_read_in_keyset_pages_and_targets_show_what_was_skipped(cat: Catalog) -> None:
    t = cat.register(NODE, PATH, 60, 0.0)
    for i in range(7):
        _store_one(cat, t.id, 10.0 * i)
    seqs, before = [], None
    while page := cat.archive_page(t.id, limit=3, before_seq=before):
        seqs.append([a.seq for a in page])
        before = page[-1].seq
    assert seqs == [[7, 6, 5], [4, 3, 2], [1]]
    assert cat.newest_skipped(t.id) == () and cat.newest_skipped(999) == ()
    eid = cat.start_execution(t.id, 100.0, "schedule")
    skipped = (("run/app.sock", "socket"), ("db/lock", "permission denied"))
    cat.commit_archive(eid, t.id, 8, attrs.evolve(_stored(8, t=101.0), skipped=skipped))
    assert cat.newest_skipped(t.id) == skipped
    wire = cat.execution(eid).to_wire()
    assert (wire["skipped_count"], wire["skipped"]) == (2, [list(s) for s in skipped])


def test_fail_unfinished_of_one_target(cat: Catalog) -> None:
    t = cat.register(NODE, PATH, 60, 0.0)
    u = cat.register(NODE, "/other", 60, 0.0)
    et = cat.start_execution(t.id, 1.0, "schedule")
    eu = cat.start_execution(u.id, 1.0, "schedule")
    assert cat.fail_unfinished(2.0, "gone", target_id=t.id) == 1
    assert cat.execution(et).outcome == "failed" and cat.execution(eu).outcome is None


def _claim_all(cats: list[Catalog], now: float, until: float) -> dict[str, list[int]]:
    """Every catalog claims from its own thread, all at once, until nothing is left."""
    claims: dict[str, list[int]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(cats))

    def worker(sid: str, c: Catalog) -> None:
        got: list[int] = []
        try:
            start.wait(timeout=30)
            while batch := c.claim_due(sid, now, until, 7):
                got += [t.id for t, _ in batch]
        except BaseException as exc:
            errors.append(exc)
        claims[sid] = got

    threads = [threading.Thread(target=worker, args=(f"s{i}", c)) for i, c in enumerate(cats)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors, errors
    assert not any(th.is_alive() for th in threads)
    return claims


def test_one_register_wins_when_servers_race(backend: Backend) -> None:
    cats = [backend.open() for _ in range(4)]
    results: list[object] = []
    start = threading.Barrier(len(cats))

    def register(c: Catalog) -> None:
        start.wait(timeout=30)
        try:
            results.append(c.register(NODE, PATH, 60, 1.0))
        except (RequestRefused, CatalogError) as exc:
            results.append(exc)

    threads = [threading.Thread(target=register, args=(c,)) for c in cats]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    refused = [r for r in results if isinstance(r, RequestRefused)]
    assert len(results) == 4 and len(refused) == 3, results
    assert all(r.code == "exists" for r in refused)


def test_leases_are_exclusive_under_contention(backend: Backend) -> None:
    first = backend.open()
    ids = _due(first, 300)
    cats = [first, *(backend.open() for _ in range(3))]
    for now, until in ((1000.0, 1030.0), (1031.0, 1061.0)):  # then again, once all expired
        claims = _claim_all(cats, now, until)
        taken = [tid for got in claims.values() for tid in got]
        assert len(taken) == len(set(taken)), "a target was claimed twice"
        assert sorted(taken) == ids, "a due target was missed"
        owners = {t.id: t.lease_owner for t in first.targets()}
        assert all(owners[tid] == sid for sid, got in claims.items() for tid in got)


# -- frequency parsing (the catalog stores seconds) ------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5", 300), ("1", 60), ("90s", 90), ("5m", 300), ("2h", 7200), ("1d", 86400), (" 7 ", 420), (3, 180)],
)
def test_parse_every(text: object, seconds: int) -> None:
    assert parse_every(text) == seconds


@pytest.mark.parametrize("text", ["0", "0s", "-5", "5x", "", "m", "1.5", "5 minutes", None, True, "9999999d"])
def test_parse_every_refuses(text: object) -> None:
    with pytest.raises(RequestRefused) as ei:
        parse_every(text)
    assert ei.value.code == "invalid"


# -- SQLite specifics ------------------------------------------------------------------------


def test_sqlite_is_wal_and_versioned_and_durable(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    c = SqliteCatalog(path)
    t = c.register(NODE, PATH, 60, 1.0)
    _store_one(c, t.id, 2.0)
    c.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    db.close()
    c2 = SqliteCatalog(path)
    assert c2.find_target(NODE, PATH) is not None and len(c2.archives(t.id)) == 1
    c2.close()


def test_sqlite_refuses_an_unknown_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    SqliteCatalog(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    db.commit()
    db.close()
    with pytest.raises(CatalogError, match="schema version 99"):
        SqliteCatalog(path)


_WRITER = textwrap.dedent(
    """
    import sys
    from deltabkp_server.catalog import SqliteCatalog
    from deltabkp_server.model import ExecutionResult
    c = SqliteCatalog(sys.argv[1])
    t = c.register("127.0.0.1:1", "/p", 60, 1.0)
    print("ready", flush=True)
    i = 0
    while True:
        i += 1
        eid = c.start_execution(t.id, float(i), "schedule")
        seq = c.next_seq(t.id)
        c.commit_archive(eid, t.id, seq, ExecutionResult(outcome="stored", ended=float(i),
            archive_size=i, archive_seq=seq, archive_hash=b"h" * 32))
        c.retire(t.id, 10, float(i))
    """
)


def test_sqlite_survives_kill_9_of_a_writer(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"ready"
    # Let it commit a good number of transactions, then kill it without warning.
    db = sqlite3.connect(path, timeout=30)
    while db.execute("SELECT COUNT(*) FROM archives").fetchone()[0] < 30:
        pass
    db.close()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    c = SqliteCatalog(path)
    assert c.integrity_check() == "ok"
    t = c.find_target("127.0.0.1:1", "/p")
    assert t is not None
    archives = c.archives(t.id)
    # Every committed archive is paired with its finished execution, none dangling.
    assert all(c.execution(a.execution_id).outcome == "stored" for a in archives if a.execution_id)
    assert c.count_retained(t.id) <= 11  # at most one commit ahead of its retire
    c.fail_unfinished(0.0, "crash")
    assert all(e.outcome is not None for e in c.executions(t.id))
    c.close()


def test_sqlite_migrates_a_v1_catalog_in_place(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    db = sqlite3.connect(path)
    [(_v1, v1_statements)] = steps_after("sqlite", 0, "test")[:1]
    for stmt in v1_statements:  # the v1 schema exactly as released (steps are never edited)
        db.execute(stmt)
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    db.execute("INSERT INTO targets (node, path, every_s, state, next_due, active, created)"
               " VALUES ('127.0.0.1:1', '/p', 60, 'retrying', 5.0, 1, 1.0)")
    db.execute("INSERT INTO executions (target_id, trigger, started, ended, outcome)"
               " VALUES (1, 'schedule', 2.0, 3.0, 'failed')")
    db.commit()
    db.close()
    c = SqliteCatalog(path)
    t = c.get_target(1)
    assert (t.node, t.state, t.next_due, t.queued, t.lease_owner, t.lease_until) == (
        "127.0.0.1:1", "retrying", 5.0, None, None, None)
    assert [(e.outcome, e.due) for e in c.executions(1)] == [("failed", None)]
    assert [(x.id, trig) for x, trig in c.claim_due("s1", 10.0, 40.0, 5)] == [(1, "retry")]
    c.heartbeat("s1", "a:1", 10.0, 1)
    assert [s.id for s in c.servers(10.0, 30.0)] == ["s1"]
    c.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    db.close()
    SqliteCatalog(path).close()  # a second open finds nothing to do


def _schema_version(backend: Backend, where: Path) -> str:
    sql = "SELECT value FROM meta WHERE key='schema_version'"
    if backend.name == "sqlite":
        db = sqlite3.connect(where / "catalog.sqlite3")
        try:
            return str(db.execute(sql).fetchone()[0])
        finally:
            db.close()
    with psycopg.connect(backend.url) as conn:
        row = conn.execute(sql.encode()).fetchone()
        assert row is not None
        return str(row[0])


def test_a_v4_catalog_migrates_to_v5_in_place(backend: Backend, tmp_path: Path) -> None:
    # The v4 schema exactly as released (steps are never edited), with a queued request and
    # a finished run in it, as a v4 server left them.
    for _v, statements in steps_after(backend.name, 0, "test")[:4]:
        for stmt in statements:
            backend.sql(stmt)
    for stmt in (
        "INSERT INTO meta VALUES ('schema_version', '4')",
        ("INSERT INTO targets (node, path, every_s, state, next_due, active, created, queued,"
         " bwlimit) VALUES ('127.0.0.1:1', '/p', 60, 'ok', 5.0, 1, 1.0, 'manual', 1000)"),
        ("INSERT INTO executions (target_id, trigger, started, ended, outcome)"
         " VALUES (1, 'manual', 2.0, 3.0, 'failed')"),
    ):
        backend.sql(stmt)
    c = backend.open()
    assert _schema_version(backend, tmp_path) == str(SCHEMA_VERSION) == "5"
    t = c.get_target(1)
    assert (t.queued, t.bwlimit, t.request_seq) == ("manual", 1000, 0)
    [old] = c.executions(1)
    assert (old.outcome, old.request_seq) == ("failed", None)
    # The request queued before the upgrade is run (and numbered 0: any run answers it);
    # a new one gets number 1, answered by the run claimed after it, not by the old row.
    assert c.request_now(1, "manual") == 1
    assert c.answer_to(1, 1) is None
    [(run, trigger)] = c.claim_due("s1", 10.0, 40.0, 5)
    assert (run.request_seq, trigger) == (1, "manual")
    eid = c.start_execution(1, 11.0, trigger, request_seq=run.request_seq)
    _ended(c, eid, 12.0)
    assert c.answer_to(1, 1).id == eid  # type: ignore[union-attr]
    backend.open()  # a second open finds nothing to do
    assert _schema_version(backend, tmp_path) == "5"


# -- PostgreSQL specifics --------------------------------------------------------------------


def test_postgres_migrates_once_when_servers_start_together(postgres_url: str) -> None:
    opened: list[Catalog] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            opened.append(PostgresCatalog(postgres_url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    try:
        assert not errors, errors
        assert len(opened) == 4
        opened[0].register(NODE, PATH, 60, 1.0)
        assert all(c.find_target(NODE, PATH) is not None for c in opened)
    finally:
        for c in opened:
            c.close()


def test_postgres_a_claim_takes_a_request_whole_or_not_at_all(postgres_url: str) -> None:
    # Another server's request, caught mid-transaction (its UPDATE done, not committed), on
    # a due target: a claim must not take the target with the old number (its clearing of
    # ``queued`` would then eat the request after it commits), nor wait for it: it skips.
    c = PostgresCatalog(postgres_url)
    try:
        t = c.register(NODE, PATH, 60, 0.0)
        with psycopg.connect(postgres_url) as other:
            other.execute(
                "UPDATE targets SET request_seq=request_seq+1, queued='manual' WHERE id=%s",
                (t.id,),
            )
            assert c.claim_due("s1", 1.0, 31.0, 5) == []  # skipped, not half-seen
            other.commit()
        [(run, trigger)] = c.claim_due("s1", 2.0, 32.0, 5)
        assert (run.id, run.request_seq, trigger) == (t.id, 1, "manual")
    finally:
        c.close()


def test_postgres_lock_wait_is_bounded(postgres_url: str) -> None:
    c = PostgresCatalog(postgres_url, lock_timeout=1.0)
    try:
        t = c.register(NODE, PATH, 60, 0.0)
        c.claim_due("s1", 1.0, 31.0, 1)
        with psycopg.connect(postgres_url) as other:  # holds the row lock, never commits
            other.execute("SELECT * FROM targets FOR UPDATE")
            t0 = time.monotonic()
            with pytest.raises(CatalogError, match="lock timeout"):
                c.release("s1", t.id, state="ok", next_due=61.0)
            assert time.monotonic() - t0 < 10
            # claim_due skips a locked row instead of waiting for it.
            assert c.claim_due("s2", 100.0, 130.0, 5) == []
            other.rollback()
        assert c.release("s1", t.id, state="ok", next_due=61.0)
    finally:
        c.close()


def test_postgres_outage_is_a_catalog_error_and_the_catalog_recovers() -> None:
    with PostgresServer() as pg:
        url = pg.create_database("outage")
        c = PostgresCatalog(url, call_timeout=2.0, connect_timeout=2.0)
        try:
            t = c.register(NODE, PATH, 60, 0.0)
            pg.stop()
            for call in (lambda: c.get_target(t.id), lambda: c.claim_due("s1", 1.0, 31.0, 5),
                         lambda: c.heartbeat("s1", "a:1", 1.0, 0)):
                t0 = time.monotonic()
                with pytest.raises(CatalogError) as ei:
                    call()
                assert time.monotonic() - t0 < 2.0 + 5.0, "a call hung on a dead database"
                assert f"127.0.0.1:{pg.port}/outage" in str(ei.value)
            pg.start()
            t0 = time.monotonic()
            deadline = t0 + 20.0
            while True:
                try:
                    got = c.get_target(t.id)
                    break
                except CatalogError:
                    assert time.monotonic() < deadline, "the catalog did not come back"
                    time.sleep(0.2)
            assert got.id == t.id
            [(claimed, _)] = c.claim_due("s1", 1.0, 31.0, 5)
            assert claimed.lease_owner == "s1"
        finally:
            c.close()


# -- URLs ------------------------------------------------------------------------------------


def test_open_catalog_by_url(tmp_path: Path, postgres_url: str) -> None:
    cases = {
        "": tmp_path / "catalog.sqlite3",
        "sqlite:": tmp_path / "catalog.sqlite3",
        f"sqlite://{tmp_path}/abs.db": tmp_path / "abs.db",
        f"sqlite:///{tmp_path}/abs.db": tmp_path / "abs.db",  # SQLAlchemy's four slashes
        "sqlite:rel.db": tmp_path / "rel.db",
        "sqlite:sub%20dir.db": tmp_path / "sub dir.db",
    }
    for url, path in cases.items():
        c = open_catalog(url, default_dir=tmp_path)
        assert isinstance(c, SqliteCatalog) and c.path == path, url
        c.close()
    pc = open_catalog(postgres_url, default_dir=tmp_path)
    assert isinstance(pc, PostgresCatalog) and pc.max_threads > 1
    pc.close()
    for bad in ("sqlite://host/x.db", "mysql://u@h/db", "sqlite:///", "/just/a/path"):
        with pytest.raises(CatalogError, match="catalog URL"):
            open_catalog(bad, default_dir=tmp_path)


def test_postgres_errors_name_the_url_without_its_password(tmp_path: Path) -> None:
    url = "postgresql://bob:s3cret@127.0.0.1:1/db"
    t0 = time.monotonic()
    with pytest.raises(CatalogError) as ei:
        open_catalog(url, default_dir=tmp_path)
    assert time.monotonic() - t0 < 15
    assert "s3cret" not in str(ei.value)
    assert "postgresql://bob:***@127.0.0.1:1/db" in str(ei.value)
    assert redact("host=h password=s3cret dbname=d") == "host=h password=*** dbname=d"
    assert redact("postgresql://h/d?password=s3cret&x=1") == "postgresql://h/d?password=***&x=1"
    assert redact("postgresql://bob@h/d") == "postgresql://bob@h/d"


# -- version storage and verification (schema v3: storage) ----------------------------------------


def test_versions_turn_into_reverse_deltas_only_while_whole_and_sound(cat: Catalog) -> None:
    t = cat.register(NODE, PATH, 300, 10.0)
    for i in range(3):
        _store_one(cat, t.id, 20.0 + i)
    assert all(a.form == "whole" and a.corrupt is None and a.verified_at is None
               for a in cat.archives(t.id))
    assert cat.set_delta(t.id, 1, 2, 123, 50.0)
    assert not cat.set_delta(t.id, 1, 2, 123, 51.0)  # already a delta: nothing changes
    [a3, a2, a1] = cat.archives(t.id)
    assert (a1.form, a1.base_seq, a1.stored_size, a1.verified_at) == ("delta", 2, 123, 50.0)
    assert a1.to_wire()["storage"] == "delta" and a1.to_wire()["base_seq"] == 2
    assert a2.form == "whole" and a3.form == "whole"
    assert cat.delta_keys() == {(t.id, 1)}
    assert cat.retained_keys() == {(t.id, 1), (t.id, 2), (t.id, 3)}
    # A corrupt version is never converted, never a base, and says why.
    cat.record_verify(t.id, [(3, "version 3: blake3 differs"), (2, None)], 60.0)
    assert not cat.set_delta(t.id, 3, 4, 1, 61.0)
    [a3, a2, _a1] = cat.archives(t.id)
    assert a3.corrupt == "version 3: blake3 differs" and a3.verified_at == 60.0
    assert a3.to_wire()["corrupt"] is True and a2.to_wire()["corrupt"] is False
    base = cat.newest_retained(t.id)
    assert base is not None and base.seq == 2  # whole and sound
    cat.set_delta(t.id, 2, 3, 5, 62.0)
    assert cat.newest_retained(t.id) is None  # nothing whole and sound: a full transfer
    cat.record_verify(t.id, [(3, None)], 70.0)  # found sound again
    assert cat.newest_retained(t.id) is not None and cat.archives(t.id)[0].corrupt is None
    # Retired versions are never converted.
    cat.retire(t.id, 1, 80.0)
    assert cat.delta_keys() == set()


def test_scrub_due_picks_the_least_recently_checked(cat: Catalog) -> None:
    a = cat.register(NODE, PATH, 300, 10.0)
    b = cat.register(NODE, "/srv/other", 300, 10.0)
    _store_one(cat, a.id, 100.0)  # created 101
    _store_one(cat, b.id, 200.0)  # created 201
    assert cat.scrub_due(50.0) == []
    assert cat.scrub_due(150.0) == [a.id]
    assert cat.scrub_due(300.0) == [a.id, b.id]
    cat.record_verify(a.id, [(1, None)], 400.0)
    assert cat.scrub_due(300.0) == [b.id]
    cat.record_verify(b.id, [(1, "version 1: corrupt")], 500.0)  # checked, even if bad
    assert cat.scrub_due(300.0) == []


async def test_leased_holds_renews_and_drops_a_targets_lease(cat: Catalog) -> None:
    """``AsyncCatalog.leased``, upkeep's lease: taken (a second taker gets False), the
    body's error raised as itself with the lease dropped, the body cancelled once the lease
    is lost (another server took the target after ours ran out)."""
    t = cat.register(NODE, PATH, 300, 10.0)
    acat = AsyncCatalog(cat)
    now = [100.0]
    # Lease times on a clock of the test's own; renewals every ttl/3 = 0.1 s of real time.
    kw: dict[str, Any] = {"ttl": 0.3, "clock": lambda: now[0]}
    with pytest.raises(CatalogError, match="the body's"):
        async with acat.leased("s1", t.id, **kw) as held:
            assert held
            async with acat.leased("s2", t.id, **kw) as other:
                assert not other
            raise CatalogError("the body's own error")
    assert cat.get_target(t.id).lease_owner is None  # dropped on the way out
    ran_on = False
    async with acat.leased("s1", t.id, **kw) as held:
        assert held
        now[0] += 60  # ours ran out; another server takes the target (no await between)
        assert cat.lease_target("s2", t.id, now[0], now[0] + 30)
        with trio.fail_after(30):  # a deadline, not a timing assertion
            await trio.sleep_forever()  # the next renewal finds it gone: cancelled here
        ran_on = True
    assert not ran_on and cat.get_target(t.id).lease_owner == "s2"


async def test_leased_stops_the_body_when_renewals_fail_until_it_runs_out(
    cat: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Renewals that keep failing (the catalog unreachable) stop the body one renewal
    period before the lease runs out, as the scheduler stops an execution, and the lease is
    left to run out (not dropped: by then it may be this server's again for another holder)."""
    t = cat.register(NODE, PATH, 300, 10.0)
    acat = AsyncCatalog(cat)
    now = [100.0]
    kw: dict[str, Any] = {"ttl": 0.3, "clock": lambda: now[0]}

    def unreachable(*args: object) -> set[int]:
        raise CatalogError("the catalog is unreachable")

    ran_on = False
    async with acat.leased("s1", t.id, **kw) as held:
        assert held
        monkeypatch.setattr(cat, "renew", unreachable)
        now[0] += 0.25  # taken until 100.3: less than ttl/3 left
        with trio.fail_after(30):  # a deadline, not a timing assertion
            await trio.sleep_forever()  # the next failed renewal cancels the body here
        ran_on = True
    monkeypatch.undo()
    owner = cat.get_target(t.id).lease_owner
    assert not ran_on and owner is not None and lease_server(owner) == "s1"
    assert owner != "s1"  # upkeep's own owner, not the server's


async def test_an_upkeep_lease_is_lost_when_its_own_servers_scheduler_claims_the_target(
    cat: Catalog,
) -> None:
    """A stalled catalog lets an upkeep's lease run out and the same server's scheduler
    claims the target for a backup: the upkeep's next renewal must find the lease gone
    (it is held under its own owner, not the server's id), so the two never both run."""
    t = cat.register(NODE, PATH, 300, 10.0)
    acat = AsyncCatalog(cat)
    now = [100.0]
    kw: dict[str, Any] = {"ttl": 0.3, "clock": lambda: now[0], "what": "verification"}
    ran_on = False
    async with acat.leased("s1", t.id, **kw) as held:
        assert held
        owner = cat.get_target(t.id).lease_owner
        assert owner is not None and owner.startswith("s1#verification-")
        assert cat.renew("s1", [t.id], now[0] + 0.3) == set()  # not the scheduler's to renew
        now[0] += 60  # the lease ran out; the scheduler of the same server claims the target
        [(claimed, _)] = cat.claim_due("s1", now[0], now[0] + 30, 5)
        assert claimed.id == t.id
        with trio.fail_after(30):  # a deadline, not a timing assertion
            await trio.sleep_forever()  # the upkeep's next renewal finds it gone: cancelled
        ran_on = True
    assert not ran_on and cat.get_target(t.id).lease_owner == "s1"  # the scheduler's, kept


def test_a_verification_lease_excludes_backups_and_keeps_the_schedule(cat: Catalog) -> None:
    t = cat.register(NODE, PATH, 300, 10.0)
    cat.request_now(t.id, "manual")
    assert cat.lease_target("s1", t.id, 20.0, 50.0)
    assert not cat.lease_target("s2", t.id, 21.0, 51.0)
    assert not cat.lease_target("s1", t.id, 21.0, 51.0)  # not even its own server's again
    assert cat.claim_due("s2", 22.0, 52.0, 10) == []  # a backup waits for it
    held = cat.get_target(t.id)
    assert (held.lease_owner, held.queued, held.next_due) == ("s1", "manual", 10.0)
    assert not cat.drop_lease("s2", t.id)
    assert cat.drop_lease("s1", t.id)
    [(claimed, trigger)] = cat.claim_due("s2", 23.0, 53.0, 10)
    assert claimed.id == t.id and trigger == "manual"
    assert cat.lease_target("s3", t.id, 60.0, 90.0)  # a lease that ran out is free
