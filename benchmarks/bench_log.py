"""Log size with and without folding: a day (or more) of minute checks, recorded for real.

    python benchmarks/bench_log.py [--targets 50] [--minutes 1440] [--change 0.01]
        [--fail 0.005] [--dir /dev/shm]

T targets checked every minute; each check stores a new archive with probability
``--change``, fails with ``--fail``, else is ``unchanged``.  The same sequence of executions
is recorded twice in SQLite catalogs:

- **folding in the catalog** (what the server does): through the real ``Catalog`` API
  (``start_execution`` / ``finish_execution`` / ``commit_archive``), so consecutive
  identical ``unchanged`` checks of a target become one row (count, first, last);
- **no folding** (what read-time folding would have to keep): the same executions inserted
  one row each.

For both: rows, catalog bytes (after a WAL checkpoint), ``ctl --json log --limit 0`` bytes
(the rows' wire form as ctl prints it), and the CPU to read the whole log in keyset pages
(what every ``log --limit 0`` — or a read-time folder — pays).  A benchmark, not a test: it
prints a markdown table and asserts nothing.  Its temp dir is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

from deltabkp_server.catalog import SqliteCatalog
from deltabkp_server.model import ExecutionResult


def _simulate(args: argparse.Namespace) -> list[tuple[int, float, str]]:
    """(target index, start time, outcome) of every execution, in start order."""
    rnd = random.Random(7)
    out = []
    for minute in range(args.minutes):
        for t in range(args.targets):
            x = rnd.random()
            outcome = "stored" if x < args.change else "failed" if x < args.change + args.fail else "unchanged"
            out.append((t, 1.7e9 + 60.0 * minute + t * 0.01, outcome))
    return out


def _record_folded(path: Path, runs: list[tuple[int, float, str]], targets: int) -> None:
    cat = SqliteCatalog(path)
    try:
        tids = [cat.register(f"10.0.0.{t % 250}:7471", f"/srv/app{t}", 60, 0.0).id for t in range(targets)]
        seq = dict.fromkeys(tids, 0)
        for t, start, outcome in runs:
            tid = tids[t]
            eid = cat.start_execution(tid, start, "schedule", due=start)
            if outcome == "stored":
                seq[tid] += 1
                cat.commit_archive(eid, tid, seq[tid], ExecutionResult(
                    outcome="stored", ended=start + 2, bytes_sent=2_000, bytes_received=40_000,
                    archive_size=1 << 20, archive_seq=seq[tid], archive_hash=bytes(32), files=120,
                ))
            elif outcome == "failed":
                cat.finish_execution(eid, ExecutionResult(
                    outcome="failed", ended=start + 1, bytes_sent=300, bytes_received=0,
                    error=f"10.0.0.{t % 250}:7471 /srv/app{t}: cannot connect (connection refused)",
                ))
            else:
                cat.finish_execution(eid, ExecutionResult(
                    outcome="unchanged", ended=start + 0.2, bytes_sent=900, bytes_received=700,
                    archive_size=1 << 20, archive_seq=seq[tid] or None, note="unchanged (fingerprint)",
                ))
    finally:
        cat.close()


def _copy_unfolded(folded: Path, unfolded: Path, runs: list[tuple[int, float, str]]) -> None:
    """The same executions, one row each: each folded row is expanded back into its checks."""
    shutil.copy(folded, unfolded)
    db = sqlite3.connect(unfolded)
    with db:
        rows = db.execute("SELECT * FROM executions WHERE fold_count > 1").fetchall()
        cols = [d[0] for d in db.execute("SELECT * FROM executions LIMIT 0").description]
        db.execute("DELETE FROM executions WHERE fold_count > 1")
        start_i, count_i = cols.index("started"), cols.index("fold_count")
        first_i, bytes_i, id_i = cols.index("fold_first"), cols.index("fold_bytes"), cols.index("id")
        marks = ", ".join("?" * (len(cols) - 1))
        names = ", ".join(c for c in cols if c != "id")
        for r in rows:
            n, first, last = r[count_i], r[first_i], r[start_i]
            for k in range(n):  # evenly between first and last: the size is what matters
                one = list(r)
                one[start_i] = first + (last - first) * k / max(n - 1, 1)
                one[count_i], one[first_i], one[bytes_i] = 1, None, 0
                del one[id_i]
                db.execute(f"INSERT INTO executions ({names}) VALUES ({marks})", one)
    db.execute("VACUUM")
    db.close()


def _measure(path: Path) -> tuple[int, int, int, float]:
    """rows, catalog bytes, log --json bytes, CPU seconds to read every row in pages."""
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    cat = SqliteCatalog(path)
    try:
        t0, rows, js, before = time.process_time(), 0, 0, None
        while page := cat.execution_page(limit=500, before_id=before):
            rows += len(page)
            js += sum(len(json.dumps(r.to_wire(), sort_keys=True)) + 2 for r in page)
            before = page[-1].id
        cpu = time.process_time() - t0
    finally:
        cat.close()
    return rows, size, js, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", type=int, default=50)
    ap.add_argument("--minutes", type=int, default=1440)
    ap.add_argument("--change", type=float, default=0.01)
    ap.add_argument("--fail", type=float, default=0.005)
    ap.add_argument("--dir", default="/dev/shm" if Path("/dev/shm").is_dir() else None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_log.", dir=args.dir))
    try:
        runs = _simulate(args)
        t0 = time.perf_counter()
        _record_folded(work / "folded.sqlite3", runs, args.targets)
        rec = time.perf_counter() - t0
        _copy_unfolded(work / "folded.sqlite3", work / "unfolded.sqlite3", runs)
        print(f"{len(runs):,} executions: {args.targets} targets x {args.minutes} minute checks, "
              f"{args.change:.1%} stored, {args.fail:.1%} failed (recorded through the catalog in "
              f"{rec:.1f} s)\n")
        print("| log | rows | catalog bytes | `log --limit 0 --json` bytes | CPU to read all rows |")
        print("|---|---|---|---|---|")
        for name in ("folded", "unfolded"):
            rows, size, js, cpu = _measure(work / f"{name}.sqlite3")
            label = "folded in the catalog" if name == "folded" else "no folding (one row per execution)"
            print(f"| {label} | {rows:,} | {size:,} | {js:,} | {cpu:.2f} s |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
