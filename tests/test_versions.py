"""Reverse-delta version storage, ``ctl fetch``, ``ctl verify`` and the scrub.

- Library level, on both store backends (a local directory and a real SeaweedFS): versions
  converted to reverse deltas rebuild byte-identically, a flipped byte is found and named
  (with the versions that depend on it), a whole copy found corrupt is never converted, and
  a conversion interrupted after any step leaves the catalog and the store reconcilable into
  a state where every retained version rebuilds.
- End to end with real daemons: 12 backups of a ~1 %-change series → every retained version
  fetched with ``ctl fetch`` has the hash recorded when it was stored, and the store takes at
  most 1.5× the newest archive; a flipped byte → ``ctl verify`` names it and exits 1, ``list``
  shows it corrupt, ``restore`` refuses it, the log has the verification, and a corrupt newest
  makes the next backup a full transfer that stores a correct archive.
- kill -9 of the server at two steps of a conversion (``DELTABKP_TEST_CRASH_AT``; the others
  are replayed at library level): after a restart every retained version fetches with its
  hash and no object is orphaned; the scrub then completes the conversions and logs itself.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import pytest
import trio
from fixtures_s3 import new_s3_store, s3_env, seaweedfs  # noqa: F401
from helpers_proc import Cluster, Daemon, cluster, exe, wait_for  # noqa: F401

import deltabkp
from deltabkp import net
from deltabkp.ctl._client import Client
from deltabkp.ctl._restore import download as download_archive
from deltabkp.errors import DeltabkpError, MissingObject
from deltabkp_server import versions
from deltabkp_server._crash import CRASH_ENV
from deltabkp_server.catalog import AsyncCatalog, SqliteCatalog
from deltabkp_server.model import ArchiveRecord, ExecutionResult
from deltabkp_server.store import LocalStore, Store

STDLIB = Path(os.__file__).parent


# -- library level, both backends --------------------------------------------------------------


def _local(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return LocalStore(tmp_path / "data")


def _s3(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    request.getfixturevalue("s3_env")
    return new_s3_store(tmp_path, grace_s=0)


BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], Store]] = {"local": _local, "s3": _s3}


@pytest.fixture(params=sorted(BACKENDS))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return BACKENDS[request.param](request, tmp_path)


class Series:
    """A catalog + store with one target and ``n`` versions of a ~1 %-change byte series."""

    def __init__(self, tmp_path: Path, store: Store) -> None:
        self.cat = SqliteCatalog(tmp_path / "catalog.sqlite3")
        self.store = store
        self.target = self.cat.register("127.0.0.1:7471", "/srv/app", 60, 1.0)
        self.rng = random.Random(7)
        self.data = bytearray(self.rng.randbytes(300_000))
        self.versions: dict[int, bytes] = {}

    def add(self, *, settle: bool = True, signed: bool = True) -> int:
        """A new version; ``signed`` False: a crash came between its catalog commit and its
        signature's write (the server signs it after the commit)."""
        for _ in range(3):  # ~1 %: three 1 KB edits
            at = self.rng.randrange(len(self.data) - 1000)
            self.data[at:at + 1000] = self.rng.randbytes(1000)
        data = bytes(self.data)
        seq = self.cat.next_seq(self.target.id)
        w = self.store.begin(self.target.id, seq)
        w.write(data)
        w.commit()
        eid = self.cat.start_execution(self.target.id, 2.0, "manual")
        self.cat.commit_archive(eid, self.target.id, seq, ExecutionResult(
            outcome="stored", ended=3.0, archive_size=len(data),
            archive_hash=blake3.blake3(data).digest(), archive_seq=seq))
        if signed:
            self.store.write_signature(self.target.id, seq, deltabkp.signature(data))
        self.versions[seq] = data
        if settle:
            self.settle()
        return seq

    def settle(self) -> int:
        async def go() -> int:
            return await versions.settle(AsyncCatalog(self.cat), self.store, self.target,
                                         limiter=trio.CapacityLimiter(2))
        return trio.run(go)

    def rows(self) -> list[ArchiveRecord]:
        return self.cat.archives(self.target.id)

    def rebuilt(self, seq: int) -> bytes:
        rows = self.rows()
        rec = next(r for r in rows if r.seq == seq)
        with versions.open_version(self.store, self.target.id, rows, rec) as buf:
            return bytes(buf)

    def reconcile(self) -> Any:
        return self.store.reconcile(self.cat.retained_keys(), self.cat.delta_keys())


def _flip(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] ^= 0x40
    path.write_bytes(bytes(data))


def test_versions_become_reverse_deltas_and_rebuild_exactly(store: Store, tmp_path: Path) -> None:
    s = Series(tmp_path, store)
    for _ in range(5):
        s.add()
    rows = s.rows()
    assert [(r.seq, r.form, r.base_seq) for r in rows] == [
        (5, "whole", None), (4, "delta", 5), (3, "delta", 4), (2, "delta", 3), (1, "delta", 2)]
    tid = s.target.id
    assert all(not store.exists(tid, q) and store.delta_exists(tid, q) for q in range(1, 5))
    assert store.exists(tid, 5) and not store.delta_exists(tid, 5)
    for seq, data in s.versions.items():
        assert s.rebuilt(seq) == data
    # A delta costs a few edits, not an archive.
    assert all(r.stored_size is not None and r.stored_size < 30_000 for r in rows[1:]), rows
    assert store.keys() == {(tid, q) for q in range(1, 6)}
    assert s.reconcile() == type(s.reconcile())()  # nothing to clean, nothing missing
    assert [c.ok for c in versions.verify_versions(store, tid, rows)] == [True] * 5


def test_versions_left_unsigned_by_a_crash_convert_and_verify(store: Store, tmp_path: Path) -> None:
    """Every version committed without its signature (a crash after each catalog commit):
    the conversion signs its base from the base's checked bytes, verify signs a whole one;
    nothing is corrupt, missing or garbage, and every version rebuilds exactly."""
    s = Series(tmp_path, store)
    for _ in range(3):
        s.add(signed=False)  # each settle converts the previous one against this one
    s.add(signed=False, settle=False)
    tid = s.target.id
    assert s.reconcile() == type(s.reconcile())(unsigned=((tid, 4),))
    with pytest.raises(MissingObject):
        store.read_signature(tid, 4)
    assert s.settle() == 1  # 3 against 4, whose signature it made
    assert store.read_signature(tid, 4) == deltabkp.signature(s.versions[4])
    assert s.reconcile() == type(s.reconcile())()
    s.add(signed=False, settle=False)  # 4 and 5 whole, 5 unsigned
    rows = s.rows()
    assert [(r.form, r.corrupt, r.missing) for r in rows] == [("whole", None, False)] * 2 + [
        ("delta", None, False)] * 3
    assert [c.ok for c in versions.verify_versions(store, tid, rows)] == [True] * 5
    assert store.read_signature(tid, 5) == deltabkp.signature(s.versions[5])
    # A damaged one is no reason to call the archive corrupt: verify makes it again.
    store.write_signature(tid, 5, b"DBKS torn")
    assert [c.ok for c in versions.verify_versions(store, tid, rows)] == [True] * 5
    assert store.read_signature(tid, 5) == deltabkp.signature(s.versions[5])
    for seq, data in s.versions.items():
        assert s.rebuilt(seq) == data


def test_a_flipped_byte_is_named_with_the_versions_built_on_it(tmp_path: Path) -> None:
    s = Series(tmp_path, LocalStore(tmp_path / "data"))
    for _ in range(5):
        s.add()
    tid = s.target.id
    _flip(s.store.delta_path(tid, 3))  # type: ignore[attr-defined]
    checks = versions.verify_versions(s.store, tid, s.rows())
    verdict = {c.seq: c.reason for c in checks}
    assert verdict[5] is None and verdict[4] is None
    assert verdict[3] is not None and "version 3" in verdict[3]
    assert "base version 3 is corrupt" in (verdict[2] or "")
    assert "base version 2 is corrupt" in (verdict[1] or "")
    with pytest.raises(versions.Corrupt, match="version 3"):
        s.rebuilt(2)
    assert list((tmp_path / "data" / "tmp").iterdir()) == []  # spools removed on failure too


def test_a_corrupt_whole_copy_is_marked_not_converted(tmp_path: Path) -> None:
    s = Series(tmp_path, LocalStore(tmp_path / "data"))
    s.add()
    tid = s.target.id
    _flip(s.store.tgz_path(tid, 1))  # type: ignore[attr-defined]
    s.add()  # its settle meets version 1's bad bytes
    [v2, v1] = s.rows()
    assert v1.form == "whole" and v1.corrupt is not None and "blake3" in v1.corrupt
    assert v2.form == "whole" and v2.corrupt is None
    assert not s.store.delta_exists(tid, 1) and s.rebuilt(2) == s.versions[2]
    # Never a base again: the next backup patches against 2, or transfers whole.
    base = s.cat.newest_retained(tid)
    assert base is not None and base.seq == 2


@pytest.mark.parametrize("step", ["delta-written", "delta-committed", "recorded"])
def test_an_interrupted_conversion_is_reconciled(store: Store, tmp_path: Path, step: str) -> None:
    """What each step of ``settle`` leaves if the process dies right after it: replayed by
    hand (the end-to-end test below kills a real server)."""
    s = Series(tmp_path, store)
    s.add()
    s.add(settle=False)
    tid = s.target.id
    [(rec, base)] = versions.plan_conversions(s.rows())
    if step == "delta-written":  # the delta object never committed
        w = store.begin_delta(tid, rec.seq)
        w.write(b"half a delta")
        assert not store.delta_exists(tid, rec.seq)
    else:
        size = versions.make_delta(store, tid, s.rows(), rec, base)
        if step == "recorded":
            assert s.cat.set_delta(tid, rec.seq, base.seq, size, 9.0)
    report = s.reconcile()
    assert report.missing == ()
    whole_left = step != "recorded"
    assert store.exists(tid, 1) == whole_left and store.delta_exists(tid, 1) == (not whole_left)
    assert s.rebuilt(1) == s.versions[1] and s.rebuilt(2) == s.versions[2]
    s.settle()  # and the conversion completes later
    assert [r.form for r in s.rows()] == ["whole", "delta"]
    assert s.reconcile() == type(report)() and s.rebuilt(1) == s.versions[1]


# -- end to end: real daemons -------------------------------------------------------------------
#
# The server and the agent are real processes; most requests go through ctl's client in this
# process (a ctl process costs ~1 s of start-up on these machines), the CLI is run where its
# own behaviour is checked (exit codes, stdout, tables).


def make_series_tree(root: Path) -> Path:
    """~2.5 MB of real sources (stdlib packages, ~140 files) and a binary."""
    app = root / "app"
    for d in ("json", "email", "http", "logging", "urllib", "xml", "asyncio", "importlib"):
        shutil.copytree(STDLIB / d, app / d, ignore=shutil.ignore_patterns("__pycache__", "test*"))
    (app / "blob.bin").write_bytes(random.Random(3).randbytes(100_000))
    return app


def one_percent(app: Path, rng: random.Random) -> None:
    """Edit 1 % of the files (at least one): a line inserted mid-file."""
    files = sorted(app.rglob("*.py"))
    for p in rng.sample(files, max(1, len(files) // 100)):
        text = p.read_text()
        cut = text.find("\n", len(text) // 2) + 1
        p.write_text(text[:cut] + f"# edited {rng.randrange(10**9)}\n" + text[cut:])


class Ctl:
    """ctl's client, in this process, against the cluster's server."""

    def __init__(self, c: Cluster, node: str, app: Path) -> None:
        self.c, self.about = c, {"node": node, "path": str(app)}

    def client(self) -> Client:
        assert self.c.server is not None
        return Client(net.Address.parse(self.c.server.address),
                      net.load_key(str(self.c.key_file)), 120.0)

    def ask(self, op: str, **args: Any) -> Any:
        return trio.run(self.client().request, op, {**self.about, **args}, 300.0)

    def backup(self) -> dict[str, Any]:
        rec: dict[str, Any] = self.ask("backup-now", wait=True)
        return rec

    def fetch(self, seq: int) -> str:
        """The blake3 (hex) of version ``seq`` as ``fetch`` delivers it (checked on the way
        by the conversation against the header's hash, and here against the catalog's)."""
        sink = _Hasher()
        meta = download_archive(self.client(), {**self.about, "seq": seq}, sink)
        assert meta["seq"] == seq and meta["hash"] == sink.hexdigest()
        return sink.hexdigest()

    def archives(self) -> list[dict[str, Any]]:
        """The catalog's rows, newest first (read directly: SQLite allows a reader)."""
        db = sqlite3.connect(self.c.data_dir / "catalog.sqlite3")
        db.row_factory = sqlite3.Row
        try:
            rows = db.execute("SELECT * FROM archives ORDER BY seq DESC").fetchall()
        finally:
            db.close()
        return [{**dict(r), "hash": bytes(r["hash"]).hex()} for r in rows]


class _Hasher:
    def __init__(self) -> None:
        self.h = blake3.blake3()

    def write(self, data: bytes) -> int:
        self.h.update(data)
        return len(data)

    def flush(self) -> None:
        pass

    def hexdigest(self) -> str:
        return str(self.h.hexdigest())


def store_bytes(c: Cluster) -> int:
    return sum(p.stat().st_size for p in c.archive_files())


def test_twelve_backups_fetch_exactly_verify_finds_a_flipped_byte(
    cluster: Cluster, tmp_path: Path
) -> None:
    c = cluster
    app = make_series_tree(tmp_path)
    c.start_server("--scrub-every", "off")
    node = c.start_agent(tmp_path).address
    ctl = Ctl(c, node, app)
    ctl.ask("register", every="1d")
    rng = random.Random(11)
    while len(ctl.archives()) < 12:
        if ctl.archives():
            one_percent(app, rng)
        ctl.backup()
    # backup-now answers once the archive is committed; the conversion follows.
    kept = wait_for(lambda: _settled(ctl), what="the conversion of version 11")
    assert [r["seq"] for r in kept] == list(range(12, 2, -1))
    assert [r["base_seq"] for r in kept[1:]] == list(range(12, 3, -1))
    newest_size = kept[0]["size"]
    assert store_bytes(c) <= 1.5 * newest_size, (store_bytes(c), newest_size)
    for r in kept:  # the hash recorded when it was stored (checked then against the agent's)
        assert ctl.fetch(r["seq"]) == r["hash"]
    # The CLI: '-' is stdout, the same bytes, the confirmation on stderr; a file, atomically.
    res_b = subprocess.run(
        [exe("deltabkp"), "ctl", "--server", c.server.address,  # type: ignore[union-attr]
         "--key-file", str(c.key_file), "fetch", node, str(app), "-", "--version", "3"],
        capture_output=True, env=c.env, timeout=120,
    )
    assert res_b.returncode == 0, res_b.stderr
    assert blake3.blake3(res_b.stdout).hexdigest() == kept[-1]["hash"]
    assert b"archive 3" in res_b.stderr
    ok = ctl.ask("verify")
    assert ok[0]["ok"] and len(ok[0]["versions"]) == 10

    # Flip a byte in version 7 (a reverse delta): 7 and the older ones built on it are named.
    tdir = c.data_dir / "archives" / "1"
    _flip(tdir / "7.rdelta", at=(tdir / "7.rdelta").stat().st_size - 40)
    res = c.ctl_run("verify", node, str(app))
    assert res.returncode == 1, res.stdout + res.stderr
    assert "version 7 (delta" in res.stdout and "CORRUPT: version 7" in res.stdout
    assert "version 8 (delta" in res.stdout
    rows = {r["seq"]: r for r in ctl.archives()}
    assert sorted(s for s, r in rows.items() if r["corrupt"]) == [3, 4, 5, 6, 7]
    res = c.ctl_run("list", node, str(app))
    assert res.returncode == 0 and res.stdout.count("CORRUPT") == 5, res.stdout
    res = c.ctl_run("restore", node, str(app), str(tmp_path / "r7"), "--version", "7")
    assert res.returncode == 3 and "archive 7 is corrupt" in res.stderr, res.stderr
    assert not (tmp_path / "r7").exists() or not any((tmp_path / "r7").iterdir())
    assert "corrupt version(s) 7, 6, 5, 4, 3" in _failed_verify(c)

    # Flip a byte in the newest (whole): the next backup is a full transfer, stored right.
    _flip(tdir / "12.tgz")
    assert not ctl.ask("verify")[0]["ok"]
    assert ctl.archives()[0]["corrupt"]
    one_percent(app, rng)
    rec = ctl.backup()
    assert rec["outcome"] == "stored" and rec["seq"] == 13
    assert rec["transferred"] > 0.5 * rec["archive_size"]  # no base: the whole archive
    assert ctl.fetch(13) == ctl.archives()[0]["hash"]
    assert ctl.ask("verify")[0]["versions"][0] == {
        "seq": 13, "storage": "whole", "size": rec["archive_size"], "ok": True, "error": None}


def _settled(ctl: Ctl) -> list[dict[str, Any]] | None:
    kept = [r for r in ctl.archives() if r["retained"]]
    return kept if [r["form"] for r in kept] == ["whole"] + ["delta"] * (len(kept) - 1) else None


def _objects(rows: list[dict[str, Any]]) -> set[str]:
    """The store objects the catalog's rows name."""
    out: set[str] = set()
    for r in rows:
        if r["retained"]:
            s = r["seq"]
            out |= {f"{s}.rdelta"} if r["form"] == "delta" else {f"{s}.tgz", f"{s}.sig"}
    return out


def _failed_verify(c: Cluster) -> str:
    """The error of the newest failed verification in the execution log."""
    db = sqlite3.connect(c.data_dir / "catalog.sqlite3")
    try:
        row = db.execute("SELECT error FROM executions WHERE trigger='verify' AND"
                         " outcome='failed' ORDER BY id DESC LIMIT 1").fetchone()
    finally:
        db.close()
    assert row is not None
    return str(row[0])


def test_kill_9_during_conversions_then_restart(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    app = make_series_tree(tmp_path)
    rng = random.Random(5)

    def start(*extra: str, crash: str | None = None) -> Daemon:
        """A server; with ``crash``, one that kills itself (-9) at that step of its first
        conversion (until then it serves as any other)."""
        cmd = [exe("deltabkp-server"), "--listen", "127.0.0.1:0", "--data-dir",
               str(c.data_dir), "--key-file", str(c.key_file), *extra]
        env = {**c.env, CRASH_ENV: crash} if crash else c.env
        c.server = Daemon("deltabkp-server", cmd, c.root / f"server-{crash}.log", env)
        return c.server

    server = start("--scrub-every", "off", crash="delta-committed")
    node = c.start_agent(tmp_path).address
    ctl = Ctl(c, node, app)
    ctl.ask("register", every="1d")
    for step, then in (("delta-committed", "recorded"), ("recorded", None)):
        # The oldest whole version but the newest is the next to convert: after a backup.
        before = ctl.archives()
        pending = min((r["seq"] for r in before if r["form"] == "whole"), default=1)
        while len(ctl.archives()) < len(before) + (1 if before else 2):
            if ctl.archives():
                one_percent(app, rng)
            # backup-now answers once the archive is committed; the conversion, and the
            # kill, follow: the answer may or may not get out first.
            with contextlib.suppress(DeltabkpError):
                ctl.backup()
        wait_for(lambda: not server.alive(), timeout=60, what=f"the server to die at {step}")
        assert "now stored as reverse deltas" not in server.log_text()
        # Restarted (armed for the next step, or with a scrub at the end).
        server = start(*(("--scrub-every", "off") if then else ("--scrub-every", "1s")),
                       crash=then)
        if then is None:
            break
        rows = ctl.archives()
        assert all(r["retained"] and not r["missing"] for r in rows)
        # Every version restorable, exactly: the form the catalog names is in the store.
        for r in rows:
            assert ctl.fetch(r["seq"]) == r["hash"]
        # No orphan: exactly the objects the catalog names (reconciled at start-up).
        assert {p.name for p in c.archive_files()} == _objects(rows)
        form = next(r["form"] for r in rows if r["seq"] == pending)
        assert form == ("delta" if step == "recorded" else "whole"), (step, rows)
    # The conversions left undone complete with the next backup or verification: here the
    # scrub's, whose first round finds every version due (checked longer than 1 s ago).
    n = len(ctl.archives())
    wait_for(lambda: _scrubbed(c, n), timeout=60, what="a verification by the scrub")
    rows = ctl.archives()
    assert [r["form"] for r in rows] == ["whole"] + ["delta"] * (n - 1)
    # The start-up reconciliation removed the whole copy that the crash at "recorded" left.
    assert {p.name for p in c.archive_files()} == _objects(rows)
    assert all(r["verified_at"] and not r["corrupt"] for r in rows)
    for r in rows:
        assert ctl.fetch(r["seq"]) == r["hash"]


def _scrubbed(c: Cluster, n: int) -> bool:
    """The scrub logged a verification of all ``n`` versions, all sound."""
    db = sqlite3.connect(c.data_dir / "catalog.sqlite3")
    try:
        row = db.execute("SELECT outcome, note FROM executions WHERE trigger='verify'"
                         " AND outcome IS NOT NULL").fetchone()
    finally:
        db.close()
    assert row is None or row[0] == "unchanged", row
    return row is not None and f"verified {n} version(s)" in row[1]
