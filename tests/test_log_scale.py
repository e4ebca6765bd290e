"""A log that scales: 100,000 executions in a real catalog, a real server process, real ctl.

The catalog is filled in bulk with SQL (as years of a busy installation would leave it: a
mix of outcomes, long error texts, folded runs of ``unchanged`` checks — 60,000 rows for
100,000 executions — and one target with 10,000 backups), then ``ctl log``, ``ctl log --limit 0 --json`` (every row, streamed) and
``ctl list`` must all work.  Memory is the property under test: the peak RSS of the server
(``VmHWM``) and of ctl (``wait4`` rusage) must stay flat — about the same whether 50 rows or
every row go through them.  The bounds are generous; nothing here is about time.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from helpers_proc import Cluster, cluster, exe  # noqa: F401

from deltabkp_server.catalog import SqliteCatalog

EXECUTIONS = 100_000
TARGETS = 200
#: Rows standing for two executions (a folded pair of unchanged checks): most of a real log
#: is unchanged checks; and fewer rows keep this test within its time budget.
FOLDED = 40_000
ROWS = EXECUTIONS - FOLDED
#: Backups of target 1 (archive rows; the list answer).
ARCHIVES = 10_000
#: Peak RSS may grow by at most this much between a 50-row answer and the whole log (MiB).
#: Holding the 60,000 rows (or their 40 MB of JSON) at once would take hundreds of MiB.
FLAT_MIB = 40


def _fill(path: Path) -> None:
    """Targets (unregistered: nothing runs), executions and archives, in a few statements."""
    SqliteCatalog(path).close()  # the schema, as the server makes it
    db = sqlite3.connect(path)
    with db:
        db.executemany(
            "INSERT INTO targets (id, node, path, every_s, next_due, active, created)"
            " VALUES (?, ?, ?, 60, 0, 0, 0)",
            [(t, f"10.0.{t // 250}.{t % 250}:7471", f"/srv/app{t}", ) for t in range(1, TARGETS + 1)],
        )

        def rows() -> Iterator[tuple[object, ...]]:
            folds = FOLDED  # the first FOLDED unchanged rows stand for two checks each
            for i in range(1, ROWS + 1):
                tid, t, kind = i % TARGETS + 1, 1_700_000_000.0 + 60 * i, i % 20
                if kind == 0:
                    error = f"cannot connect to node {tid}: " + "x" * 200
                    yield (i, tid, t, "failed", None, error, 1, None, 0)
                elif kind == 1:
                    yield (i, tid, t, "stored", i, None, 1, None, 0)
                else:
                    folded, folds = folds > 0, folds - 1
                    yield (i, tid, t, "unchanged", None, None, 2 if folded else 1,
                           t - 60 if folded else None, 1500 if folded else 0)

        db.executemany(
            "INSERT INTO executions (id, target_id, trigger, started, ended, outcome, bytes_sent,"
            " bytes_received, archive_seq, archive_size, error, note, fold_count, fold_first,"
            " fold_bytes) VALUES (?1, ?2, 'schedule', ?3, ?3 + 1, ?4, 700, 800, ?5, 4096, ?6,"
            " CASE ?4 WHEN 'unchanged' THEN 'unchanged (fingerprint)' END, ?7, ?8, ?9)",
            rows(),
        )
        db.executemany(
            "INSERT INTO archives (target_id, seq, created, size, hash, transferred, tgz_path,"
            " sig_path, retained, deleted_at) VALUES (1, ?, ?, 4096, ?, 1500, '-', '-', 0, ?)",
            ((s, 1e9 + s, bytes(32), 1e9 + s + 1) for s in range(1, ARCHIVES + 1)),
        )
    folded = db.execute("SELECT SUM(fold_count) - COUNT(*) FROM executions").fetchone()[0]
    db.close()
    assert folded == FOLDED  # the fill itself: 60,000 rows for 100,000 executions


def _vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for {pid}")


# Linux starts a child's max RSS at its parent's high-water mark (kept across fork and exec),
# so ctl is started by this small process, which reports RUSAGE_CHILDREN: ctl's own peak,
# not the test process's (which holds 60 MB of JSON at one point).
_MEASURE = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


def _ctl(c: Cluster, out: Path, *args: str) -> float:
    """Run ``deltabkp ctl ARGS`` with stdout to ``out``; its peak RSS in MiB."""
    assert c.server is not None
    with out.open("wb") as f:
        res = subprocess.run(
            [sys.executable, "-c", _MEASURE, exe("deltabkp"), "ctl", "--server",
             c.server.address, "--key-file", str(c.key_file), "--timeout", "120", *args],
            stdout=f, stderr=subprocess.PIPE, env=c.env, timeout=600, text=True, check=False,
        )
    *err, maxrss = res.stderr.splitlines() or [""]
    assert res.returncode == 0, f"ctl {args} exited {res.returncode}: {err}\n{c.logs()}"
    return int(maxrss) / 1024  # KiB on Linux


def test_100000_executions_log_and_list_stream_with_flat_memory(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    c.data_dir.mkdir()
    _fill(c.data_dir / "catalog.sqlite3")
    server = c.start_server()

    small = tmp_path / "log.txt"
    ctl_small = _ctl(c, small, "log")  # the newest 50 of all targets, as a table
    lines = small.read_text().splitlines()
    assert lines[0].split()[:2] == ["ID", "STARTED"] and len(lines) == 1 + 50 + 1
    assert lines[1].split()[0] == str(ROWS) and "--limit 0 shows all" in lines[-1]
    server_small = _vm_hwm_mib(server.pid)

    everything = tmp_path / "log.json"
    ctl_all = _ctl(c, everything, "--json", "log", "--limit", "0")
    server_all = _vm_hwm_mib(server.pid)
    with everything.open() as f:  # the same JSON the whole list would give, row by row
        rows = json.load(f)
    assert len(rows) == ROWS and sum(r["count"] for r in rows) == EXECUTIONS
    assert [r["id"] for r in rows[:3]] == [ROWS, ROWS - 1, ROWS - 2] and rows[-1]["id"] == 1
    assert sum(1 for r in rows if r["count"] == 2 and r["first"] < r["last"]) == FOLDED
    del rows

    listed = tmp_path / "list.txt"
    ctl_list = _ctl(c, listed, "list", "10.0.0.1:7471", "/srv/app1")
    text = listed.read_text().splitlines()
    assert len(text) == 1 + ARCHIVES + 1 and text[1].split()[0] == str(ARCHIVES)
    assert text[-1].endswith(f"{ARCHIVES} backup(s), 0 retained")
    failed = tmp_path / "failed.json"
    _ctl(c, failed, "--json", "log", "10.0.0.1:7471", "/srv/app1", "--outcome", "failed",
         "--limit", "0")
    got = json.loads(failed.read_text())
    assert len(got) == sum(1 for i in range(1, ROWS + 1) if i % 20 == 0 and i % TARGETS == 0)
    assert got and all(r["outcome"] == "failed" and r["path"] == "/srv/app1" for r in got)

    print(f"rows {ROWS} for {EXECUTIONS} executions; --json bytes {everything.stat().st_size}; "
          f"server VmHWM {server_small:.1f} -> {server_all:.1f} MiB; ctl maxrss log {ctl_small:.1f}"
          f" / log --limit 0 --json {ctl_all:.1f} / list {ctl_list:.1f} MiB")
    assert server_all - server_small < FLAT_MIB, (server_small, server_all)
    assert ctl_all - ctl_small < FLAT_MIB, (ctl_small, ctl_all)
    assert ctl_list - ctl_small < FLAT_MIB, (ctl_small, ctl_list)
