"""Hostile-network campaigns with figures (tried / survived / lost), on real network namespaces.

    python benchmarks/bench_hostile.py [--only partitions,slow,loss,kills,flood] [--slow-mb 30]
        [--loss-backups 8] [--server-kills 50] [--agent-kills 20] [--flood-seconds 30]
        [--seed N] [--keep-dir]

Server, agent, ``ctl`` and a flooder each live in their own namespace of a
``deltabkp.testing.NetLab`` (veth pairs to a bridge, a private /24); the daemons are started
by the tests' launcher (``tests/test_hostile_network.py:NetCluster``), wrapped in
``ip netns exec``, and every client runs inside its namespace.  Needs root, iproute2 and
nftables.  The campaigns:

0. **partitions**: the test's one-way partitions in the delta and signature phases
   (``tests/test_hostile_network.py:partition_campaign``) plus the case too slow for the
   default run — the agent's acknowledgements of the signature lost, which only the server's
   60 s send deadline ends: how long each took to fail, and the reason logged.
1. **slow**: the agent's link at 1 Mbit/s (``tc tbf``, both ways), a first backup of
   ``--slow-mb`` MB of incompressible files, server idle timeout 10 s: stored or not, any
   failed attempt (an idle timeout that misfired), duration and goodput.
2. **loss**: 20 % of the agent's TCP packets dropped both ways (nftables ``numgen``); a
   first backup, then ``--loss-backups`` backups of a 1 MB change each: stored at the first
   attempt, stored after retries, lost (not stored within 5 min), failed attempts and why.
3. **kills**: ``--server-kills`` kill -9 of the server and ``--agent-kills`` of the agent, in
   a random order, each at a random instant of a backup (a 12 MB tree changing each round,
   registered every second): every other kill uniform over the length of a backup (mostly
   the agent's build), the others once the transfer has begun (a ``.part`` with data), up to
   0.3 s later; the table says how many found a ``.part`` on disk.  After each
   kill, with the agent away (so no transfer starts while we look): the store matches the
   catalog (``tests/test_e2e_faults.py:check_store_matches_catalog``: every retained row's
   files with its size and blake3, no other file, no execution left open, SQLite integrity).
   At the end every retained archive is restored with ``ctl restore --version`` (which checks
   its hash) and the newest one is compared with the tree.
4. **flood**: ``ctl status`` latencies (p50 / max; in one client process, so the
   interpreter's start-up is left out) with no flood, then while 1,000 idle and
   100 slow (one byte every 3 s) sockets are held at each daemon (a backup runs through the
   agent's flood meanwhile), then the issue's case: the server under ``ulimit -n 1024`` and
   1,100 idle sockets — with the lines and bytes the server logged and its tracebacks.

A benchmark, not a test: it prints markdown tables and asserts nothing about time.  Every
loop is bounded; the lab, the daemons and the temp dir are removed at the end (``--keep-dir``
keeps the dir, with the daemons' logs), also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers_proc import exe, tree_equal
from test_e2e_faults import (
    check_store_matches_catalog,
    open_executions,
    part_with_data,
    parts,
)
from test_hostile_network import (
    PARTITIONS,
    SIG_ACKS_LOST,
    NetCluster,
    partition_campaign,
)

from deltabkp.testing import NetLab

NODES = ["server", "agent", "ctl", "mob"]
#: What a failed check raises: an assert, or ``pytest.fail`` inside the tests' helpers.
CHECK_FAILED = (Exception, pytest.fail.Exception)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(xs: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (nan for no data)."""
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def poll(pred: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
    """``pred()`` once truthy, else None after ``timeout`` s (bounded, never raises)."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(interval)


def random_tree(root: Path, name: str, files: int, size: int) -> Path:
    app = root / name
    app.mkdir(parents=True)
    for i in range(files):
        (app / f"f{i:02d}.bin").write_bytes(os.urandom(size))
    return app


class Lab:
    """One NetLab + NetCluster under a fresh directory; closed whatever happens."""

    def __init__(self, root: Path, name: str, idle_timeout: float = 10.0) -> None:
        self.dir = root / name
        self.dir.mkdir()
        self.lab = NetLab(NODES)
        self.c: NetCluster | None = None
        self.idle = idle_timeout

    def __enter__(self) -> NetCluster:
        self.lab.__enter__()
        self.c = NetCluster(self.dir, self.lab, idle_timeout=self.idle)
        return self.c

    def __exit__(self, *exc: object) -> None:
        try:
            if self.c is not None:
                self.c.close()
        finally:
            self.lab.close()


def log_of(c: NetCluster, node: str, app: Path) -> list[dict[str, Any]]:
    return list(c.ctl("log", node, str(app), "--limit", "0", timeout=120))  # the whole log


def first_backup(c: NetCluster, node: str, app: Path, timeout: float) -> dict[str, Any]:
    """Register (the first backup starts at once) and wait for a stored execution; the
    last execution seen if none was stored in time."""
    c.ctl("register", node, str(app), "--every", "1d")
    poll(lambda: [e for e in log_of(c, node, app) if e["outcome"] == "stored"], timeout, 1)
    done = [e for e in log_of(c, node, app) if e["outcome"] is not None]
    stored = [e for e in done if e["outcome"] == "stored"]
    return stored[0] if stored else (done[-1] if done else {"outcome": None})


# -- 1. slow link ------------------------------------------------------------------------------


def run_slow(root: Path, args: argparse.Namespace) -> list[list[object]]:
    with Lab(root, "slow") as c:
        app = random_tree(c.root, "app", max(1, args.slow_mb), 1 << 20)
        c.lab.shape("agent", "1mbit")
        c.start_server()
        agent = c.start_agent(c.root)
        node = agent.address
        say(f"slow: first backup of {args.slow_mb} MB at 1 Mbit/s")
        t0 = time.monotonic()
        rec = first_backup(c, node, app, 3 * 60 * 60)
        took = time.monotonic() - t0
        log = log_of(c, node, app)
        failed = [e for e in log if e["outcome"] == "failed"]
        stored = rec["outcome"] == "stored"
        mbit = 8 * (rec.get("bytes_received") or 0) / took / 1e6
        return [["1 Mbit/s link, first backup", f"{args.slow_mb} MB", 1, int(stored),
                 int(not stored), (f"{len(failed)} failed attempts; {took:.0f} s, "
                 f"{mbit:.2f} Mbit/s goodput, idle timeout 10 s")]]


# -- 2. loss -----------------------------------------------------------------------------------


def run_loss(root: Path, args: argparse.Namespace) -> list[list[object]]:
    with Lab(root, "loss") as c:
        app = random_tree(c.root, "app", 4, 1 << 20)
        c.start_server()
        agent = c.start_agent(c.root)
        node = agent.address
        c.lab.drop("agent", "out", percent=20)
        c.lab.drop("agent", "in", percent=20)
        t0 = time.monotonic()
        rec = first_backup(c, node, app, 600)  # a full backup, retried as needed
        durations = [time.monotonic() - t0]
        first = int(rec["outcome"] == "stored" and rec["trigger"] == "schedule")
        retried = int(rec["outcome"] == "stored" and not first)
        lost = int(rec["outcome"] != "stored")
        reasons: Counter[str] = Counter()
        say(f"loss: first backup: {rec['outcome']} in {durations[-1]:.1f} s")
        for i in range(1, args.loss_backups + 1):
            (app / f"f{i % 4:02d}.bin").write_bytes(os.urandom(1 << 20))
            t0 = time.monotonic()
            res = c.ctl_run("--json", "--timeout", "600", "backup-now", node, str(app), "--wait",
                            timeout=900)
            rec = json.loads(res.stdout) if res.stdout.strip() else {}
            if rec.get("outcome") in ("stored", "unchanged"):
                first += 1
            else:
                eid = rec.get("id", 0)

                def stored_after(eid: int = eid) -> list[dict[str, Any]]:
                    return [e for e in log_of(c, node, app) if e["id"] > eid and e["outcome"] == "stored"]

                got = poll(stored_after, 300, 2)
                retried += bool(got)
                lost += not got
            durations.append(time.monotonic() - t0)
            say(f"loss: backup {i}: {rec.get('outcome')} in {durations[-1]:.1f} s")
        for e in log_of(c, node, app):
            if e["outcome"] == "failed":
                reasons[_reason(e["error"])] += 1
        check_store_matches_catalog(c)
        why = "; ".join(f"{n}× {r}" for r, n in reasons.most_common(4)) or "none"
        return [["20 % loss both ways", "4 MB, then 1 MB changes", args.loss_backups + 1,
                 first + retried, lost,
                 (f"{first} at once, {retried} after retries; failed attempts: {why}; "
                 f"{c.lab.dropped('agent')} packets dropped; per backup p50 "
                 f"{pct(durations, 50):.1f} s, max {max(durations):.1f} s")]]


def _reason(error: str) -> str:
    """An error without its node and path (``NODE PATH: reason``), numbers folded."""
    tail = error.split(": ", 1)[-1]
    return "".join("N" if ch.isdigit() else ch for ch in tail)[:90]


# -- partitions ------------------------------------------------------------------------------


def _secs(e: dict[str, Any]) -> str:
    try:
        d = datetime.fromisoformat(e["ended"]) - datetime.fromisoformat(e["started"])
    except (KeyError, TypeError, ValueError):
        return "–"
    return f"{d.total_seconds():.1f} s"


def run_partitions(root: Path, args: argparse.Namespace) -> list[list[object]]:
    """The test's one-way partitions plus the one too slow for it (signature ACKs lost)."""
    cases = [*PARTITIONS, SIG_ACKS_LOST]
    with Lab(root, "partitions", idle_timeout=4) as c:
        try:
            failed = partition_campaign(c, c.lab, c.root, cases)
        except CHECK_FAILED as exc:
            return [["one-way partitions (4 cases)", "4 MB tree", len(cases), 0, len(cases),
                     f"CHECK FAILED: {str(exc)[:300]}"]]
    return [[f"partition: {label}", "4 MB tree, idle timeout 4 s", 1, 1, 0,
             f"failed after {_secs(e)}: {e['error'].split(': ', 1)[-1]}; stored once healed"]
            for (label, _, _), e in zip(cases, failed, strict=True)]


# -- 3. kill -9 --------------------------------------------------------------------------------


def run_kills(root: Path, args: argparse.Namespace, rng: random.Random) -> list[list[object]]:
    with Lab(root, "kills") as c:
        app = random_tree(c.root, "churn", 6, 2 << 20)
        server = c.start_server()
        agent = c.start_agent(c.root)
        node = agent.address
        c.ctl("register", node, str(app), "--every", "1s")
        t0 = time.monotonic()
        c.ctl("backup-now", node, str(app), "--wait", timeout=600)
        window = 1.2 * (time.monotonic() - t0)  # a full backup's length: kills land anywhere in it
        victims = ["server"] * args.server_kills + ["agent"] * args.agent_kills
        rng.shuffle(victims)
        tried: Counter[str] = Counter()
        survived: Counter[str] = Counter()
        lost: list[str] = []
        missed = unsettled = 0
        mid_transfer: Counter[str] = Counter()  # kills that found a .part file on disk
        for rnd, victim in enumerate(victims):
            (app / f"f{rnd % 6:02d}.bin").write_bytes(os.urandom(2 << 20))
            if not poll(lambda: open_executions(c), 60, 0.005):
                missed += 1  # no execution started: no kill this round
                continue
            if rnd % 2:
                time.sleep(rng.uniform(0.0, window))  # anywhere: connect, build, send, commit…
            else:
                # Most of a backup is the agent's build: every other kill waits for the
                # transfer (a .part with data), then lands somewhere in it or just after.
                poll(lambda: part_with_data(c), 30, 0.005)
                time.sleep(rng.uniform(0.0, 0.3))
            tried[victim] += 1
            n_parts = len(parts(c))
            mid_transfer[victim] += n_parts > 0
            try:
                if victim == "server":
                    server.kill()
                    agent.stop()  # so that the restarted server starts no transfer while we look
                    since = time.time()
                    server = c.start_server()
                else:
                    agent.kill()
                    # The server sees the connection go and logs the execution failed.
                    poll(lambda: open_executions(c) == 0, 60)
                    since = time.time()
                    # A stored execution's row closes before retention and the reverse-delta
                    # conversion run (execution.py): the server is still at work; a mismatch
                    # that outlives this bounded wait is an orphan.
                    if not poll(lambda since=since: _consistent(c, since), 20, 0.5):
                        unsettled += 1
                check_store_matches_catalog(c, since)
                survived[victim] += 1
            except CHECK_FAILED as exc:
                lost.append(f"round {rnd} ({victim}): {type(exc).__name__}: {str(exc)[:300]}")
                say(f"kills: round {rnd}: CHECK FAILED: {type(exc).__name__}: {exc}")
            agent = c.start_agent(c.root)
            if rnd % 10 == 0:
                say(f"kills: round {rnd}/{len(victims)}: killed the {victim} "
                    f"({n_parts} .part on disk)")
        # Every retained archive restores, and the newest is the tree.
        rec = c.ctl("backup-now", node, str(app), "--wait", timeout=600)
        listed = [a for a in c.ctl("list", node, str(app)) if a["retained"]]
        restored, bad = 0, []
        for a in listed:
            dest = c.root / f"restored-{a['seq']}"
            res = c.ctl_run("restore", node, str(app), str(dest), "--version", str(a["seq"]),
                            timeout=600)
            if res.returncode == 0:
                restored += 1
            else:
                bad.append(f"seq {a['seq']}: exit {res.returncode} {res.stderr.strip()[:200]}")
            shutil.rmtree(dest, ignore_errors=True)
        dest = c.root / "restored-newest"
        c.ctl_run("restore", node, str(app), str(dest), timeout=600)
        same = tree_equal(app, dest) == [] if rec["outcome"] in ("stored", "unchanged") else False
        try:
            n_rows = check_store_matches_catalog(c)
            orphans = "0 orphans, catalog consistent"
        except CHECK_FAILED as exc:
            n_rows, orphans = -1, f"END CHECK FAILED: {exc}"
        log = log_of(c, node, app)
        outcomes = Counter(e["outcome"] for e in log)
        note = (f"{restored}/{len(listed)} retained archives restore (hash checked), newest "
                f"{'equals' if same else 'DIFFERS FROM'} the tree; {n_rows} rows; {orphans}; "
                f"executions {dict(outcomes)}; {missed} rounds without an execution to kill; "
                f"{unsettled} agent kills after which the store had not settled in 20 s")
        rows: list[list[object]] = []
        for v in ("server", "agent"):
            mine = [x for x in lost if f"({v})" in x]
            rows.append([f"kill -9 of the {v} mid-backup", "12 MB, 2 MB change a round",
                         tried[v], survived[v], len(mine),
                         f"{mid_transfer[v]} kills with a .part on disk; "
                         + (note if v == "server" else "; ".join(mine + bad)[:400] or "–")])
        for x in lost + bad:
            say(f"kills: LOST {x}")
        return rows


def _consistent(c: NetCluster, since: float) -> bool:
    try:
        check_store_matches_catalog(c, since)
    except CHECK_FAILED:
        return False
    return True


# -- 4. flood ----------------------------------------------------------------------------------


#: ``ctl status`` in a loop inside one process (the CLI's own ``main``, so TLS and whatever
#: the client does are included, the interpreter's start-up is not): [[exit code, seconds]].
_STATUS_LOOP = """
import contextlib, io, json, sys, time
from deltabkp.cli import main
argv, seconds, gap = json.loads(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
out = []
end = time.monotonic() + seconds
for i in range(100000):  # bounded by the clock below
    t0 = time.monotonic()
    if i and t0 > end:
        break
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rc = main(argv)
    if i:  # the first call is a warm-up (imports, key file)
        out.append([rc, time.monotonic() - t0])
    time.sleep(gap)
print(json.dumps(out))
"""


def status_latencies(c: NetCluster, seconds: float, gap: float) -> tuple[list[float], int]:
    """For ``seconds``: latencies of the ``ctl status`` calls that answered, and how many
    did not."""
    assert c.server is not None
    argv = ["ctl", "--server", c.server.address, "--key-file", str(c.key_file), "--json",
            "--timeout", "30", "status"]
    res = c.lab.run("ctl", [sys.executable, "-c", _STATUS_LOOP, json.dumps(argv), f"{seconds:g}",
                            f"{gap:g}"], env=c.env, timeout=seconds + 120)
    got = json.loads(res.stdout.strip().splitlines()[-1]) if res.stdout.strip() else []
    lat = [t for rc, t in got if rc == 0]
    return lat, len(got) - len(lat)


def _flood_counts(procs: list[Any], seconds: float) -> list[dict[str, int]]:
    out = []
    for p in procs:
        text, _ = p.communicate(timeout=seconds + 60)
        lines = text.decode().strip().splitlines()
        out.append(json.loads(lines[-1]) if lines else {})
    return out


def run_flood(root: Path, args: argparse.Namespace) -> list[list[object]]:
    import subprocess

    rows: list[list[object]] = []
    secs = args.flood_seconds
    with Lab(root, "flood", idle_timeout=300) as c:
        app = random_tree(c.root, "app", 1, 256 << 10)
        server = c.start_server()
        agent = c.start_agent(c.root)
        node = agent.address
        c.ctl("register", node, str(app), "--every", "1d")
        c.ctl("backup-now", node, str(app), "--wait")
        lat, failed = status_latencies(c, 6, 0.2)
        rows.append(["no flood", len(lat) + failed, len(lat), failed,
                     f"{pct(lat, 50):.3f}", f"{max(lat, default=math.nan):.3f}", "–"])
        floods = [c.lab.flood("mob", a, idle=1000, slow=100, seconds=secs, slow_every=3,
                              stdout=subprocess.PIPE) for a in (server.address, agent.address)]
        time.sleep(3)
        (app / "f00.bin").write_bytes(os.urandom(256 << 10))
        backup = c.lab.popen("ctl", [exe("deltabkp"), "ctl", "--server", server.address,
                                     "--key-file", str(c.key_file), "--json", "--timeout", "120",
                                     "backup-now", node, str(app), "--wait"],
                             env=c.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        lat, failed = status_latencies(c, secs - 6, 0.5)
        out, _ = backup.communicate(timeout=300)
        rec = json.loads(out) if out.strip() else {}
        counts = _flood_counts(floods, secs)
        rows.append([f"1,000 idle + 100 slow sockets at each daemon, {secs:g} s",
                     len(lat) + failed, len(lat), failed, f"{pct(lat, 50):.3f}",
                     f"{max(lat, default=math.nan):.3f}",
                     f"backup during the flood: {rec.get('outcome')}; flood (server, agent): "
                     + ", ".join(f"{k.get('opened')} opened / {k.get('closed_by_peer')} closed "
                                 f"by the daemon" for k in counts)])
        # The case: 1,100 silent sockets at a server limited to 1,024 descriptors.
        server.stop()
        limited = c.start_server(wrap=["prlimit", "--nofile=1024:1024"])
        mark = len(limited.log_text())
        flood = [c.lab.flood("mob", limited.address, idle=1100, slow=0, seconds=secs,
                             stdout=subprocess.PIPE)]
        time.sleep(3)
        lat, failed = status_latencies(c, secs - 6, 0.5)
        counts = _flood_counts(flood, secs)
        text = limited.log_text()[mark:]
        rows.append([f"1,100 idle sockets, server under ulimit -n 1024, {secs:g} s",
                     len(lat) + failed, len(lat), failed, f"{pct(lat, 50):.3f}",
                     f"{max(lat, default=math.nan):.3f}",
                     (f"server log meanwhile: {len(text.splitlines())} lines, {len(text)} B, "
                     f"{text.count('Traceback')} tracebacks, "
                     f"{text.count('EMFILE') + text.count('Too many open files')} EMFILE mentions; "
                     f"flood: {counts[0].get('opened')} opened")])
    return rows


# -- main --------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="partitions,slow,loss,kills,flood")
    ap.add_argument("--slow-mb", type=int, default=30)
    ap.add_argument("--loss-backups", type=int, default=8)
    ap.add_argument("--server-kills", type=int, default=50)
    ap.add_argument("--agent-kills", type=int, default=20)
    ap.add_argument("--flood-seconds", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--keep-dir", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_hostile: network namespaces need root", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    root = Path(tempfile.mkdtemp(prefix="bench-hostile-"))
    campaigns: list[list[object]] = []
    flood: list[list[object]] = []
    errors: list[str] = []
    t_start = time.time()
    only = set(args.only.split(","))
    try:
        for name, run in (("partitions", lambda: run_partitions(root, args)),
                          ("slow", lambda: run_slow(root, args)),
                          ("loss", lambda: run_loss(root, args)),
                          ("kills", lambda: run_kills(root, args, rng)),
                          ("flood", lambda: run_flood(root, args))):
            if name not in only:
                continue
            say(f"campaign {name}")
            try:
                got = run()
            except CHECK_FAILED as exc:
                errors.append(f"{name}: {type(exc).__name__}: {str(exc)[:2000]}")
                say(f"campaign {name} failed: {exc}")
                continue
            (flood if name == "flood" else campaigns).extend(got)
    finally:
        print(f"\n## bench_hostile (seed {seed}, {time.time() - t_start:.0f} s, "
              f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})\n")
        if campaigns:
            print(table(["campaign", "data", "tried", "survived", "lost", "notes"], campaigns))
        if flood:
            print("\n`ctl status` from a third namespace (seconds):\n")
            print(table(["flood", "asked", "answered", "failed", "p50", "max", "notes"], flood))
        for e in errors:
            print(f"\n**campaign error** {e}")
        if args.keep_dir:
            say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
