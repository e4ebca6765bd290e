"""Contract suite for ``Catalog`` backends (parametrised over every backend; SQLite today).

A new backend (PostgreSQL) joins by adding a factory to ``BACKENDS``; every test here must
pass unchanged.  Plus SQLite-specific checks: WAL, schema version, durability across a
reopen, and a crash of a writer process (kill -9) in the middle of transactions.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from deltabkp.errors import CatalogError, RequestRefused
from deltabkp_server.catalog import AsyncCatalog, Catalog, SqliteCatalog
from deltabkp_server.model import ExecutionResult, parse_every

BACKENDS: dict[str, Callable[[Path], Catalog]] = {
    "sqlite": lambda d: SqliteCatalog(d / "catalog.sqlite3"),
}

NODE, PATH = "127.0.0.1:7471", "/srv/app"


@pytest.fixture(params=sorted(BACKENDS))
def cat(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Catalog]:
    c = BACKENDS[request.param](tmp_path)
    yield c
    c.close()


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
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "1"
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
