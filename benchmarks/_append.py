"""The driver of ``bench_system.sh --append``: a file appended every 100 ms, five consecutive
backups through the real daemons, each against a full build and checked against a fresh
build of what it captured; then the check of the unchanged tree.

    python benchmarks/_append.py [--repeat N] [--backups 5] [--period 0.1] [--tree DIR]
        [--log REL] [--log-size BYTES] [--keep-dir] [--work-dir DIR]
    python benchmarks/_append.py write LOG JOURNAL PERIOD    (the writer process)

Issue 10's done-when: "A tree with a file appended every 100 ms: five consecutive backups
each ≤ 1/5 of a full build; each stores an archive identical to a fresh build of what it
captured", and "an unchanged check after a racy build is a quick check".  Each repeat starts
from nothing:

1. the application's tree: a copy (``cp -a``) of the stdlib benchmark tree
   (``archive_data.py``'s ``base``) or of ``--tree``, plus a log file (``--log``, by default
   ``logging/app.log``: mid-archive, so the delta copies stretches before and after it)
   holding ``--log-size`` bytes of lines; a second copy of that state (``fresh``) for the
   checks; both settle past the racy window (2 s) before the first backup, as an
   application's tree predates its first backup;
2. ``deltabkp-server`` and ``deltabkp-agent`` started as ``bench_system.sh`` starts them
   (127.0.0.1, port 0, a data dir, the tree allowed, a cache dir); ``ctl register`` makes
   the first (full) backup;
3. a full build of the tree (``TgzBuilder``, in this process, as ``bench_system.sh`` times
   it: wall and CPU), before the writer starts and again once it stopped (the tree differs
   by the log's growth); wall ratios divide by the shorter wall of the two, CPU ratios by
   the smaller CPU (the larger ratios);
4. the writer, a process of its own, appends a line (~40–300 bytes) to the log every
   ``--period`` s on a fixed schedule, and journals the file's (size, mtime_ns) after each
   append; it runs from 1 s before the first of these backups to the end of the last;
5. ``--backups`` consecutive ``ctl backup-now --wait``: for each, the execution (the
   server's record, started → ended) and ctl's end to end (start-up, request, execution,
   answer) against the full build, the agent's and the server's CPU (their phases' totals)
   against the build's, the bytes on the wire both ways, what the agent's build read, the
   log's length in the stored archive, and both daemons' per-phase timelines.  Before the
   next backup, the server's end-of-execution line is awaited (after the commit come the
   signature, retention and reverse-delta conversion, the seek points: the lease's work,
   shown as "server after"), so each backup starts from a quiet server;
6. the writer stopped, the racy window (2 s) waited out, ``ctl backup-now --wait`` of the
   unchanged tree: its outcome, the agent's reason, whether its phases hold a build (a quick
   check has none: index and quick-check only) and its times;
7. the check, for the first backup and each of the appended ones: the stored version
   downloaded with ``ctl fetch --version N`` (the server rebuilds older versions from their
   reverse deltas and checks them; ctl checks the blake3 against the catalog's), the log's
   length N and PAX mtime M (to the nanosecond) read from it; then
   - (N, M) must be a state the log had: a line of the writer's journal (or its state
     before the writer started);
   - the ``fresh`` copy's log is set to the live log's first N bytes with mtime M and built
     afresh (``TgzBuilder``): its bytes must equal the stored archive's.
   The writer touches nothing but the log (and appending changes no directory), so every
   other entry of the live tree is as the ``fresh`` copy has it: the check proves that each
   stored archive is, byte for byte, the full build of the tree as it stood between two
   appends — the other files as they are, the log as the writer left it after one of its
   appends — i.e. the agent's incremental build, its layout delta and the server's patch
   lost, added and mixed nothing.  It does not prove *which* append the backup saw.

Measured 2026-11-30 (``bash benchmarks/bench_system.sh --append --repeat 3``, twice; 2 cores
shared with 5 other sessions, load 3.8–7.8; stdlib tree, 5,048 entries, 29.7 MB archive):
every one of the 36 stored versions (and the 6 first backups) identical to a fresh build of
a state the log had; each backup read 15 files (the log and the files of the deflate runs
it re-deflates; 0.1 MB of tar compressed, 29.7 MB of deflate copied), sent 4.3–4.6 KB (0.015
%); agent CPU 0.33–0.46 s = 0.066–0.086 of a full build's CPU (steady whatever the load);
the unchanged check after the racy build: ``unchanged (fingerprint)``, no build, 0.10–0.23 s.
Wall: execution 0.46–1.04 s, end to end 0.70–1.79 s, against full builds of 3.3–9.7 s — so
0.061–0.270 and 0.098–0.549 of a full build: over 1/5 for 5 (execution) and 10 (end to end)
of 15 backups in the first run (full builds 3.3–6.3 s: two compression threads that got both
cores), for 0 and 2 of 15 in the second (7.1–9.7 s: the load took the second core from the
build).  Why, from the phases: a backup here is a serial chain of fixed costs that do not
depend on what changed — the agent's quick check against the kept index (~50 ms, a
metadata walk), its build (~0.2 s of CPU: by a cProfile of the same incremental build in one
process, ~0.1 s its own walk of 5,048 entries, ~60 ms writing and hashing the 29.7 MB of
reused deflate as the new kept archive; the log itself is a few ms), the layout encode
(~80 ms), the server's apply (~50–130 ms) and the fsync of the new 29.7 MB archive
(``store-commit`` ~90–110 ms wall, ~3 ms CPU; the agent's cache write, ~100 ms of wall, runs
beside it, after the answer); end to end adds ctl's start-up and request (0.2–0.9 s under
load).  The full build it is divided by spreads over both cores; the chain does not.

Prints a table per repeat (and the daemons' timelines under it), with ``--repeat`` > 1 the
worst ratio of each repeat, and the load average, which must be quoted next to any figure.
Invariants: every wait has a deadline; the daemons, the writer and the temp dir are removed
on every exit path (``try``/``finally``, SIGTERM/SIGINT → exit; the pids of what runs are
in ``WORK/pids`` for the shell wrapper, should this driver be killed with -9).  A benchmark:
it asserts nothing about time; it fails when a backup did not store what it should have.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# benchmarks/ is no package: on sys.path above.
from _daemonlog import (
    AGENT_PHASES,
    END_LINE,
    END_STAMP,
    SERVER_PHASES,
    BenchError,
    daemon_phases,
    read,
    stamps,
    timeline,
    wait_count,
)

BACKUP_TIMEOUT_S = 1800.0
AFTER_TIMEOUT_S = 600.0  # the server's work after a commit; the agent's after its answer
SEED = 20261130
#: Past the archive's racy window (deltabkp.archive._walk.RACY_NS, 2 s), with a margin.
SETTLE_S = 2.5
WARMUP_S = 1.0  # the writer's appends before the first of the measured backups


# -- the writer -------------------------------------------------------------------------------


def _line(i: int, rng: random.Random) -> bytes:
    words = " ".join(rng.choice(("GET", "POST", "/api/v1/items", "200", "404", "ok", "slow",
                                 "user=42", "cache", "miss", "hit", "retry"))
                     for _ in range(rng.randrange(2, 30)))
    return b"%012d INFO request %d: %s\n" % (1_700_000_000_000 + 100 * i, i, words.encode())


def write(log: str, journal: str, period: float) -> int:
    """Append a line to ``log`` every ``period`` s on a fixed schedule until SIGTERM/SIGINT;
    after each append, journal the file's ``size mtime_ns`` (one line, flushed)."""
    stop = [False]

    def _stop(_signum: int, _frame: object) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    rng = random.Random(SEED + 1)
    with open(journal, "a") as j:
        i, due = 0, time.monotonic()
        while not stop[0]:
            with open(log, "ab", buffering=0) as f:  # one write(2): fstat sees it
                f.write(_line(i, rng))
                st = os.fstat(f.fileno())
            j.write(f"{st.st_size} {st.st_mtime_ns}\n")
            j.flush()
            i += 1
            due += period
            time.sleep(max(0.0, due - time.monotonic()))
    return 0


def _journal(path: Path) -> set[tuple[int, int]]:
    states = set()
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:  # a line cut by a kill is no state
            states.add((int(parts[0]), int(parts[1])))
    return states


# -- one repeat -------------------------------------------------------------------------------


@attrs.frozen
class Backup:
    label: str  # 1…5, or "r": the racy build after the writer stopped
    what: str
    seq: int
    execution_s: float
    e2e_s: float
    agent_cpu_s: float
    server_cpu_s: float
    wire: int
    archive_size: int
    after_s: float  # the server's work after the commit (the lease's), until its end line
    changed: int  # files changed while read
    detail: str  # the wall time's split and both daemons' timelines


@attrs.frozen
class Check:
    seq: int
    log_len: int
    in_journal: bool
    identical: bool


def _env(work: Path) -> dict[str, str]:
    # The working tree's code, whatever the installed copy points at.
    pp = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{pp}" if pp else str(ROOT),
        "DELTABKP_KEY_FILE": str(work / "cluster.key"),
        "HOME": str(work / "home"),
        "PYTHONUNBUFFERED": "1",
    }


def _ctl(ctl: list[str], args: Sequence[str], env: dict[str, str], what: str) -> Any:
    res = subprocess.run([*ctl, *args], check=False, env=env, capture_output=True, text=True,
                         timeout=BACKUP_TIMEOUT_S)
    if res.returncode != 0:
        raise BenchError(f"{what} exited {res.returncode}: {res.stderr.strip()[-2000:]}")
    return json.loads(res.stdout) if res.stdout.strip() else None


def _full_build(tree: Path) -> tuple[float, float]:
    """Wall and CPU s of a full build of ``tree``, as ``bench_system.sh`` times one."""
    from deltabkp.archive import TgzBuilder

    w, c = time.perf_counter(), time.process_time()
    for _ in TgzBuilder(tree):
        pass
    return time.perf_counter() - w, time.process_time() - c


def _cpu_total(phases: str) -> float:
    """The CPU s of a phases line's total (``… (ms wall/cpu; total W/C)``)."""
    tail = phases.rpartition("total ")[2]
    try:
        return int(tail.split("/")[1].split(")")[0]) / 1e3
    except (IndexError, ValueError):
        return float("nan")


def _captured(tgz: bytes, rel: str) -> tuple[bytes, int]:
    """The log's bytes and mtime (ns, from the PAX record: exact) as ``tgz`` holds them."""
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tf:
        m = tf.getmember(rel)
        f = tf.extractfile(m)
        if f is None:
            raise BenchError(f"{rel} is no file in the stored archive")
        data = f.read()
        pax = m.pax_headers.get("mtime")
    if pax is None:
        return data, int(m.mtime) * 1_000_000_000
    sec, _, frac = pax.partition(".")
    sign = -1 if sec.startswith("-") else 1
    return data, sign * (abs(int(sec)) * 1_000_000_000 + int((frac + "000000000")[:9]))


def _check(seq: int, tgz: bytes, live: Path, fresh: Path, rel: str,
           states: set[tuple[int, int]]) -> Check:
    """Stored version ``seq`` against a fresh build of what it captured (module docstring)."""
    from deltabkp.archive import TgzBuilder

    data, mtime = _captured(tgz, rel)
    now = live.read_bytes()
    in_journal = (len(data), mtime) in states and now[: len(data)] == data
    log = fresh / rel
    log.write_bytes(now[: len(data)])  # the live file's bytes, not the archive's
    os.utime(log, ns=(mtime, mtime))
    identical = b"".join(TgzBuilder(fresh)) == tgz
    return Check(seq, len(data), in_journal, identical)


def _backup(ctl: list[str], target: list[str], env: dict[str, str], agent_log: Path,
            server_log: Path, label: str, what: str) -> Backup:
    """One ``ctl backup-now --wait`` that must store an archive, and its figures, once the
    server's execution is over (its end line) and the agent logged its phases."""
    served = len(AGENT_PHASES.findall(read(agent_log)))
    ended = len(END_LINE.findall(read(server_log)))
    signed = len(SERVER_PHASES.findall(read(server_log)))
    t0, p0 = time.time(), time.perf_counter()
    ex = _ctl(ctl, ["backup-now", *target, "--wait"], env, "ctl backup-now --wait")
    e2e, t1 = time.perf_counter() - p0, time.time()
    if ex["outcome"] != "stored":
        raise BenchError(f"backup {label} ({what}) did not store an archive: {ex}")
    wait_count(server_log, END_LINE, ended + 1, AFTER_TIMEOUT_S, "the execution's end")
    wait_count(agent_log, AGENT_PHASES, served + 1, AFTER_TIMEOUT_S, "the agent's phases line")
    agent_line = AGENT_PHASES.findall(read(agent_log))[served]
    server_lines = SERVER_PHASES.findall(read(server_log))
    server_line = server_lines[signed] if len(server_lines) > signed else ""
    started, done = (_when(ex[k]) for k in ("started", "ended"))
    return Backup(
        label=label, what=what, seq=int(ex["seq"]), execution_s=done - started, e2e_s=e2e,
        agent_cpu_s=_cpu_total(agent_line), server_cpu_s=_cpu_total(server_line),
        wire=int(ex["transferred"]), archive_size=int(ex["archive_size"]),
        after_s=stamps(END_STAMP, server_log)[ended] - done, changed=_count(ex.get("changed")),
        detail=(timeline(t0, t1, ex, agent_log, server_log)
                + daemon_phases(agent_log, server_log, served, signed)))


def one_repeat(base: Path, work: Path, args: argparse.Namespace, pids: Path) -> tuple[
        list[Backup], list[Check], str, tuple[float, float], tuple[float, float]]:
    from deltabkp.testing import Daemon, console_script

    work.mkdir()
    env = _env(work.parent)
    app, fresh = work / "app", work / "fresh"
    subprocess.run(["cp", "-a", f"{base}/.", str(app)], check=True)
    log = app / args.log
    log.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    with open(log, "wb") as f:
        i = 0
        while f.tell() < args.log_size:
            f.write(_line(i - 10**6, rng))
            i += 1
    st = log.stat()
    states = {(st.st_size, st.st_mtime_ns)}  # the log before the writer's first append
    subprocess.run(["cp", "-a", f"{app}/.", str(fresh)], check=True)
    settled = time.monotonic() + SETTLE_S
    journal = work / "journal"
    writer: subprocess.Popen[bytes] | None = None
    server = Daemon([console_script("deltabkp-server"), "--listen", "127.0.0.1:0", "--data-dir",
                     str(work / "data")], log=work / "server.log", name="deltabkp-server", env=env)
    agent: Daemon | None = None
    try:
        agent = Daemon([console_script("deltabkp-agent"), "--listen", "127.0.0.1:0", "--allow",
                        str(app), "--cache-dir", str(work / "cache")],
                       log=work / "agent.log", name="deltabkp-agent", env=env)
        pids.write_text(f"{server.pid} {agent.pid}\n")
        ctl = [console_script("deltabkp"), "ctl", "--server", server.address, "--json"]
        target = [agent.address, str(app)]
        time.sleep(max(0.0, settled - time.monotonic()))

        # The first (full) backup, at registration.
        _ctl(ctl, ["register", *target, "--every", "1d"], env, "ctl register")
        wait_count(server.log, END_LINE, 1, BACKUP_TIMEOUT_S, "the first backup")
        wait_count(agent.log, AGENT_PHASES, 1, AFTER_TIMEOUT_S, "the agent's phases line")
        first = [e for e in _ctl(ctl, ["log", *target], env, "ctl log") if e["outcome"]]
        if len(first) != 1 or first[0]["outcome"] != "stored":
            raise BenchError(f"the first backup did not store an archive: {first}")
        full0 = _full_build(app)

        writer = subprocess.Popen([sys.executable, __file__, "write", str(log), str(journal),
                                   str(args.period)], env=env)
        pids.write_text(f"{server.pid} {agent.pid} {writer.pid}\n")
        time.sleep(WARMUP_S)
        backups = [_backup(ctl, target, env, agent.log, server.log, str(n + 1), "with the writer "
                           "running") for n in range(args.backups)]
        writer.send_signal(signal.SIGTERM)
        writer.wait(30)
        writer = None
        pids.write_text(f"{server.pid} {agent.pid}\n")
        # The racy build the done-when's quick check follows: the log's last append is within
        # the racy window (2 s), so no fingerprint is recorded for this archive.
        backups.append(_backup(ctl, target, env, agent.log, server.log, "r",
                               "right after the writer stopped (racy)"))

        # The unchanged tree, once past the racy window of the last append.
        time.sleep(SETTLE_S)
        served = len(AGENT_PHASES.findall(read(agent.log)))
        t0, p0 = time.time(), time.perf_counter()
        ex = _ctl(ctl, ["backup-now", *target, "--wait"], env, "ctl backup-now --wait (unchanged)")
        e2e, t1 = time.perf_counter() - p0, time.time()
        wait_count(agent.log, AGENT_PHASES, served + 1, AFTER_TIMEOUT_S, "the agent's phases line")
        quick_line = list(AGENT_PHASES.finditer(read(agent.log)))[served]
        # "INFO backup of PATH: unchanged (REASON), base H; phases …"
        said = quick_line.group(0).partition("; phases ")[0].partition(": ")[2]
        reason = said.rpartition(", base")[0] or "(a new archive)"
        phases = quick_line.group(1)
        quick = (ex["outcome"] == "unchanged" and "fingerprint" in reason
                 and " build" not in f" {phases}" and "layout" not in phases)
        unchanged = (f"outcome {ex['outcome']}, agent: {reason}; quick check (no build): "
                     f"{'yes' if quick else 'NO'}; execution "
                     f"{_when(ex['ended']) - _when(ex['started']):.3f} s, end to end {e2e:.2f} s, "
                     f"wire {ex['transferred']:,} B\n  "
                     + timeline(t0, t1, ex, agent.log, server.log)
                     + daemon_phases(agent.log, server.log, served, None))
        full1 = _full_build(app)

        # Each stored version against a fresh build of what it captured.
        listing = _ctl(ctl, ["list", *target], env, "ctl list")
        archives = listing["archives"] if isinstance(listing, dict) else listing
        seqs = sorted(int(a["seq"]) for a in archives)
        states |= _journal(journal)
        checks = []
        for seq in seqs:
            out = work / f"v{seq}.tgz"
            _ctl(ctl, ["fetch", *target, str(out), "--version", str(seq)], env,
                 f"ctl fetch --version {seq}")
            checks.append(_check(seq, out.read_bytes(), log, fresh, args.log, states))
            out.unlink()
        return backups, checks, unchanged, full0, full1
    finally:
        if writer is not None:
            writer.send_signal(signal.SIGTERM)
            try:
                writer.wait(10)
            except subprocess.TimeoutExpired:
                writer.kill()
                writer.wait()
        try:
            if agent is not None:
                agent.stop()
        finally:
            server.stop()
            pids.unlink(missing_ok=True)


def _count(v: object) -> int:
    """A record's "changed while read": a count, or the list of them."""
    return v if isinstance(v, int) else len(v) if isinstance(v, (list, tuple)) else 0


def _when(v: str | float) -> float:
    from datetime import datetime

    return datetime.fromisoformat(v).timestamp() if isinstance(v, str) else float(v)


# -- printing ---------------------------------------------------------------------------------


def table(backups: list[Backup], checks: list[Check], full: tuple[float, float]) -> str:
    by_seq = {c.seq: c for c in checks}
    fw, fc = full
    lines = [("| # | seq | execution s | ÷ full | end to end s | ÷ full | agent cpu s | ÷ full cpu "
              "| server cpu s | wire B (% of archive) | changed while read | server after s "
              "| log B captured | a state the log had | identical to a fresh build |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for b in backups:
        c = by_seq.get(b.seq)
        lines.append(
            f"| {b.label} | {b.seq} | {b.execution_s:.2f} | {b.execution_s / fw:.3f} | {b.e2e_s:.2f} | "
            f"{b.e2e_s / fw:.3f} | {b.agent_cpu_s:.2f} | {b.agent_cpu_s / fc:.3f} | "
            f"{b.server_cpu_s:.2f} | {b.wire:,} ({100 * b.wire / b.archive_size:.3f} %) | "
            f"{b.changed} | {b.after_s:.2f} | {f'{c.log_len:,}' if c else '-'} | "
            f"{('yes' if c.in_journal else 'NO') if c else '-'} | "
            f"{('yes' if c.identical else 'NO') if c else 'not retained'} |")
    return "\n".join(lines)


def _trees(tree: str | None) -> tuple[Path, str]:
    import archive_data

    if tree is None:
        return archive_data.trees()["base"], "the stdlib tree (benchmarks/archive_data.py base)"
    src = Path(tree).resolve()
    if not src.is_dir():
        raise BenchError(f"--tree {tree}: not a directory")
    return src, str(src)


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds the try-blocks: processes and temp dir removed


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] == "write":
        return write(argv[1], argv[2], float(argv[3]))
    p = argparse.ArgumentParser(prog="bench_system.sh --append",
                                description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=1, help="fresh runs of it all (default 1)")
    p.add_argument("--backups", type=int, default=5, help="backups with the writer running (5)")
    p.add_argument("--period", type=float, default=0.1, help="seconds between appends (0.1)")
    p.add_argument("--tree", help="a directory to copy instead of the stdlib tree")
    p.add_argument("--log", default="logging/app.log",
                   help="the appended file, relative to the tree (logging/app.log)")
    p.add_argument("--log-size", type=int, default=1 << 20,
                   help="its size before the first backup, bytes (1 MiB)")
    p.add_argument("--keep-dir", action="store_true", help="keep the temp dir (daemon logs)")
    p.add_argument("--work-dir", help="make the temp dir in here (default: the system's)")
    args = p.parse_args(argv)
    if args.repeat < 1 or args.backups < 1 or args.period <= 0:
        p.error("--repeat and --backups must be ≥ 1, --period > 0")
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    import secrets

    work = Path(tempfile.mkdtemp(prefix="bench-append-", dir=args.work_dir))
    pids = Path(args.work_dir or work) / "pids"
    try:
        key = work / "cluster.key"
        key.write_text(secrets.token_hex(32) + "\n")
        key.chmod(0o600)
        base, what = _trees(args.tree)
        print(f"# {args.log} appended every {args.period:g} s ({args.log_size:,} bytes to begin "
              f"with); tree: {what}; {os.cpu_count()} CPUs", flush=True)
        worst: list[tuple[float, float, float, bool, bool]] = []
        for r in range(args.repeat):
            load0 = os.getloadavg()
            backups, checks, unchanged, full0, full1 = one_repeat(base, work / f"run{r}", args,
                                                                  pids)
            load1 = os.getloadavg()
            full = (min(full0[0], full1[0]), min(full0[1], full1[1]))
            print(f"\n## repeat {r + 1} of {args.repeat}\n\nfull build (TgzBuilder, this "
                  f"process): before the writer {full0[0]:.2f} s wall / {full0[1]:.2f} s cpu, "
                  f"after it {full1[0]:.2f} / {full1[1]:.2f}; ratios ÷ the smaller of each\n\n"
                  f"{table(backups, checks, full)}\n")
            print("1…5: with the writer running; r: right after it stopped (the racy build "
                  "the unchanged check follows)")
            for c in checks:
                if c.seq not in {b.seq for b in backups}:
                    print(f"first backup (seq {c.seq}): log {c.log_len:,} B, a state the log "
                          f"had: {'yes' if c.in_journal else 'NO'}, identical to a fresh build "
                          f"of what it captured: {'yes' if c.identical else 'NO'}")
            for b in backups:
                print(f"\nbackup {b.label} ({b.what}): {b.detail}")
            print(f"\nunchanged check after the writer stopped (+{SETTLE_S:g} s): {unchanged}")
            print(f"\nload average (1/5/15 min) at start: {' '.join(f'{x:.1f}' for x in load0)}, "
                  f"end: {' '.join(f'{x:.1f}' for x in load1)}", flush=True)
            running = [b for b in backups if b.label != "r"]
            worst.append((max(b.execution_s for b in running) / full[0],
                          max(b.e2e_s for b in running) / full[0],
                          max(b.agent_cpu_s for b in running) / full[1],
                          all(c.identical and c.in_journal for c in checks),
                          "quick check (no build): yes" in unchanged))
        if args.repeat > 1:
            print("\n## summary: the worst of the backups with the writer running, ÷ a full "
                  "build\n\n| repeat | execution | end to end | agent cpu ÷ build cpu | "
                  "all identical | quick check |\n|---:|---:|---:|---:|---|---|")
            for r, (ex_r, e2e_r, cpu_r, ok, quick) in enumerate(worst, 1):
                print(f"| {r} | {ex_r:.3f} | {e2e_r:.3f} | {cpu_r:.3f} | {'yes' if ok else 'NO'} | "
                      f"{'yes' if quick else 'NO'} |")
        bad = [r for r, w in enumerate(worst, 1) if not w[3]]
        if bad:
            raise BenchError(f"repeat(s) {bad}: a stored archive was not a fresh build of what it "
                             "captured (the tables above say which)")
        return 0
    except BenchError as e:
        print(f"bench_system --append: {e}\n(logs in {work})", file=sys.stderr)
        args.keep_dir = True
        if args.work_dir:  # the shell wrapper removes its dir unless told to keep it
            (Path(args.work_dir) / "keep").touch()
        return 1
    finally:
        if args.keep_dir:
            print(f"# kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
