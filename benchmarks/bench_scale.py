"""Scale figures: 1 and 3 servers over one PostgreSQL + one SeaweedFS, T light targets every minute.

    python benchmarks/bench_scale.py [--targets 2000] [--minutes 3] [--servers 1,3]
        [--lease-ttl 30] [--max-concurrent 8] [--max-per-node 2] [--agents 8] [--repeat 2]
        [--skip-scale] [--skip-onepct]

Real processes only, all on 127.0.0.1: one throwaway PostgreSQL (``deltabkp.testing.
PostgresServer``) and one SeaweedFS (``SeaweedFS``) for the whole run; per N a fresh database
and S3 prefix, N ``deltabkp-server`` over them, ``--agents`` agents serving T tiny directories
(1-3 small files each) between them.  The T targets are bulk-registered (one Python process,
a few ctl connections, ``register`` requests in a loop) with ``--every 1`` (one minute).

1. **Throughput and lag.**  Once every target has been backed up once (the first round) and
   the catch-up that follows has drained (no target overdue by more than 10 s; at most two
   periods), the servers run for ``--minutes``; then the execution log gives, over that
   window: executions finished per minute (any outcome) against the demand (T per minute) and
   the peak 10-second rate, scheduler lag (``started - due``) p50/p90/p99/max, outcome counts,
   how many targets ran, the period each target actually got, and no-overlap of one target's
   executions.  CPU per component over the window comes from /proc (the machine's cores are
   the budget; other load on the machine is shown as the load average).  The log is read
   with ``ctl --json log``; when that answer is over the protocol's 1 MiB frame limit (a few
   thousand executions) it fails, which is printed, and the log is read per target
   (``ctl --json log NODE PATH``, a few ctl connections) instead.
2. **Takeover** (N > 1): kill -9 of the server holding the most leases; for the targets it
   held (read from the catalog right after the kill), the delay from the kill to their next
   execution start on a survivor (``ctl --json log``), max/p50, next to the lease TTL and to
   what was left of each lease at the kill.
3. **1 % change over S3 vs local**: a copy of the stdlib tree of ``archive_data.py``, a first
   backup, then its ~1 % change set; bytes on the wire and duration of that backup
   (``ctl backup-now --wait --json``) with the default local store, with ``--store s3://``
   (SQLite catalog) and with PostgreSQL + S3 (the cluster set-up) — one server each, best
   of ``--repeat`` (the tree goes back to the base between runs).

A benchmark, not a test: it prints markdown tables and asserts nothing about time.  Every
process and temp dir it made is removed at the end, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

import archive_data
from _daemonlog import END_STAMP, stamps_in

from deltabkp import net, protocol
from deltabkp.errors import RequestRefused
from deltabkp.testing import Daemon, PostgresServer, SeaweedFS, console_script

BUCKET = "deltabkp-bench"
EVERY_MIN = 1
CLK_TCK = os.sysconf("SC_CLK_TCK")
_LEASE_LOST = "the server running this execution stopped or lost its lease"


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def pct(xs: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (nan for no data)."""
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]


def f1(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def f2(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# -- CPU time from /proc ---------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()  # fields from 3 (state) on


def proc_cpu(pid: int, children: bool = False) -> float:
    """utime+stime (and, with ``children``, of its reaped children) in seconds; 0 if gone."""
    f = _stat(pid)
    if f is None:
        return 0.0
    ticks = int(f[11]) + int(f[12]) + ((int(f[13]) + int(f[14])) if children else 0)
    return ticks / CLK_TCK


def tree_cpu(root: int) -> float:
    """A process, its reaped children and its live children (PostgreSQL's backends)."""
    total = proc_cpu(root, children=True)
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            f = _stat(int(d.name))
            if f is not None and int(f[1]) == root:
                total += proc_cpu(int(d.name), children=True)
    return total


# -- the run's environment -------------------------------------------------------------------


class Bench:
    """Temp root, key, env, the shared PostgreSQL and SeaweedFS; every daemon it starts is
    stopped by ``close`` (registered on the ExitStack)."""

    def __init__(self, stack: contextlib.ExitStack, args: argparse.Namespace) -> None:
        self.stack, self.args = stack, args
        self.root = Path(tempfile.mkdtemp(prefix="deltabkp-bench-scale-"))
        stack.callback(shutil.rmtree, self.root, True)
        self.key_file = self.root / "cluster.key"
        self.key_file.write_text(secrets.token_hex(32) + "\n")
        self.key_file.chmod(0o600)
        self.key = net.load_key(str(self.key_file))
        say("starting PostgreSQL and SeaweedFS")
        self.pg = stack.enter_context(PostgresServer(base_dir=None))
        self.s3 = stack.enter_context(SeaweedFS(base_dir=self.root))
        env = {k: v for k, v in os.environ.items()
               if k not in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3",
                            "AWS_DEFAULT_REGION", "DELTABKP_SERVER")}
        self.env = {
            **env, **self.s3.env(),
            "AWS_CONFIG_FILE": "/nonexistent/deltabkp-bench-aws-config",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/deltabkp-bench-aws-creds",
            "AWS_EC2_METADATA_DISABLED": "true",
            "DELTABKP_KEY_FILE": str(self.key_file),
            "HOME": str(self.root / "home"),
            "PYTHONUNBUFFERED": "1",
        }
        self._n = 0

    def daemon(self, stack: contextlib.ExitStack, argv: list[str], name: str) -> Daemon:
        """Started in its own session; ``stack`` stops it (the group, SIGKILL after 5 s)."""
        self._n += 1
        d = Daemon(argv, log=self.root / f"{self._n:03d}-{name}.log", name=name, env=self.env,
                   start_new_session=True)
        stack.callback(d.stop, 5)
        return d

    def server(self, stack: contextlib.ExitStack, data_dir: Path, *extra: str) -> Daemon:
        a = self.args
        return self.daemon(stack, [
            console_script("deltabkp-server"), "--listen", "127.0.0.1:0", "--data-dir",
            str(data_dir), "--key-file", str(self.key_file), "--max-concurrent",
            str(a.max_concurrent), "--max-per-node", str(a.max_per_node), *extra,
        ], "server")

    def agent(self, stack: contextlib.ExitStack, allow: Path, cache: Path) -> Daemon:
        return self.daemon(stack, [
            console_script("deltabkp-agent"), "--listen", "127.0.0.1:0", "--allow", str(allow),
            "--cache-dir", str(cache), "--key-file", str(self.key_file),
        ], "agent")

    def ctl(self, server: str, *args: str, timeout: float = 120) -> Any:
        cmd = [console_script("deltabkp"), "ctl", "--server", server, "--json", "--timeout",
               str(timeout), *args]
        res = subprocess.run(cmd, capture_output=True, text=True, env=self.env,
                             timeout=timeout + 60, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"deltabkp ctl {' '.join(args)} exited {res.returncode}: "
                               f"{res.stderr.strip()}")
        return json.loads(res.stdout) if res.stdout.strip() else None

    def sql(self, url: str, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
            return conn.execute(statement.encode(), params).fetchall()


# -- bulk registration -----------------------------------------------------------------------


async def _register_all(servers: list[str], targets: list[tuple[str, str]], key: bytes,
                        workers: int) -> Counter[str]:
    """Register every target over a few long-lived ctl connections (spread over the servers)."""
    stats: Counter[str] = Counter()
    todo = iter(targets)

    async def worker(k: int) -> None:
        addr = net.Address.parse(servers[k % len(servers)])
        async with await net.connect(addr, key=key, role="ctl", timeout=30) as chan:
            for node, path in todo:
                await chan.send(protocol.Request("register", {"node": node, "path": path,
                                                              "every": str(EVERY_MIN)}))
                try:
                    ans = await chan.receive_a(protocol.Response, 120)
                except RequestRefused as exc:
                    stats[f"refused: {exc.reason}"] += 1
                    continue
                stats["warning" if "warning" in ans.data else "ok"] += 1

    async with trio.open_nursery() as nursery:
        for k in range(workers):
            nursery.start_soon(worker, k)
    return stats


async def _logs_per_target(server: str, targets: list[tuple[str, str]], key: bytes,
                           workers: int) -> list[dict[str, Any]]:
    """``ctl log NODE PATH`` for every target, over a few ctl connections: the same rows as
    ``ctl log``, in answers small enough for the frame limit."""
    rows: list[dict[str, Any]] = []
    todo = iter(targets)

    async def worker() -> None:
        async with await net.connect(net.Address.parse(server), key=key, role="ctl",
                                     timeout=30) as chan:
            for node, path in todo:
                await chan.send(protocol.Request("log", {"node": node, "path": path}))
                rows.extend((await chan.receive_a(protocol.Response, 120)).data)

    async with trio.open_nursery() as nursery:
        for _ in range(workers):
            nursery.start_soon(worker)
    return rows


def read_log(b: Bench, server: Daemon, targets: list[tuple[str, str]]) -> tuple[list[dict[str, Any]], str]:
    """The whole execution log: ``ctl --json log``, else (see the note) per target."""
    try:
        return b.ctl(server.address, "log", "--limit", "0", timeout=600), ""  # every row, streamed
    except RuntimeError as exc:
        said = [line.split(" WARNING ", 1)[-1] for line in server.log_text().splitlines()
                if "frame limit" in line]
        note = (f"`ctl --json log` failed: {exc}" + (f"; the server logged: {said[-1]}" if said else "")
                + "; read with `ctl --json log NODE PATH` per target instead")
        say(note)
        return trio.run(_logs_per_target, server.address, targets, b.key, 8), note


def make_trees(root: Path, agents: int, targets: int) -> list[list[Path]]:
    """``targets`` light directories (1-3 files of 100-3,000 bytes), dealt to ``agents``."""
    rng = random.Random(20261127)
    per: list[list[Path]] = [[] for _ in range(agents)]
    for j in range(targets):
        i = j % agents
        d = root / f"a{i}" / f"t{j:05d}"
        d.mkdir(parents=True)
        for f in range(rng.randint(1, 3)):
            (d / f"f{f}.txt").write_bytes(rng.randbytes(rng.randint(50, 1500)).hex().encode())
        per[i].append(d)
    return per


# -- section 1 and 2 -------------------------------------------------------------------------

def finished_per_server(log: str, t0: float, t1: float) -> int:
    """Executions a server's log says ended (at INFO) in ``[t0, t1)``."""
    return sum(t0 <= t < t1 for t in stamps_in(END_STAMP, log))


def overlaps(log: list[dict[str, Any]]) -> int:
    per: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for e in log:
        per[(e["node"], e["path"])].append(
            (ts(e["started"]), ts(e["ended"]) if e["ended"] else math.inf))
    n = 0
    for runs in per.values():
        runs.sort()
        n += sum(1 for a, b in itertools.pairwise(runs) if a[1] > b[0])
    return n


def window_figures(log: list[dict[str, Any]], t0: float, t1: float, targets: int) -> dict[str, Any]:
    minutes = (t1 - t0) / 60
    done = [e for e in log if e["ended"] and t0 <= ts(e["ended"]) < t1]
    started = [e for e in log if t0 <= ts(e["started"]) < t1]
    lags = [ts(e["started"]) - ts(e["due"]) for e in started if e["due"]]
    per: dict[tuple[str, str], list[float]] = defaultdict(list)
    for e in log:
        if t0 <= ts(e["started"]) < t1:
            per[(e["node"], e["path"])].append(ts(e["started"]))
    periods = [b - a for runs in per.values() for a, b in itertools.pairwise(sorted(runs))]
    buckets = Counter(int((ts(e["ended"]) - t0) // 10) for e in done)
    return {
        "peak_per_min": 6 * max(buckets.values(), default=0),
        "minutes": minutes, "done": len(done), "per_min": len(done) / minutes,
        "demand": targets * 1 / EVERY_MIN,
        "outcomes": Counter(e["outcome"] for e in done),
        "lag_p50": pct(lags, 50), "lag_p90": pct(lags, 90), "lag_p99": pct(lags, 99), "lag_max": max(lags, default=math.nan),
        "ran": len(per), "period_p50": pct(periods, 50), "period_max": max(periods, default=math.nan),
    }


def run_scale(b: Bench, n: int, trees: list[list[Path]]) -> dict[str, Any]:
    a = b.args
    out: dict[str, Any] = {"n": n}
    say(f"N={n}: fresh database and prefix, {n} server(s), {len(trees)} agents")
    db = f"bench_n{n}_{uuid.uuid4().hex[:8]}"
    url = b.pg.create_database(db)
    store = f"s3://{BUCKET}/scale-n{n}-{uuid.uuid4().hex[:8]}"
    work = b.root / f"n{n}"
    with contextlib.ExitStack() as local:  # this N's daemons stop before the next N starts
        servers = [b.server(local, work / f"srv{i}", "--catalog", url, "--store", store,
                            "--lease-ttl", str(a.lease_ttl)) for i in range(n)]
        agents = [b.agent(local, t[0].parent, work / f"agent-cache{i}") for i, t in enumerate(trees)]
        ids = {b.ctl(s.address, "status")["server_id"]: s for s in servers}
        targets = [(ag.address, str(p)) for ag, t in zip(agents, trees) for p in t]
        random.Random(1).shuffle(targets)
        say(f"N={n}: registering {len(targets)} targets (every {EVERY_MIN} min)")
        t_reg = time.time()
        stats = trio.run(_register_all, [s.address for s in servers], targets, b.key, 8)
        out["register_s"] = time.time() - t_reg
        out["register"] = dict(stats)
        say(f"N={n}: registered in {out['register_s']:.1f} s: {dict(stats)}")

        # The first round: every target backed up once.
        deadline = time.time() + a.settle_timeout
        while True:
            left = b.sql(url, "SELECT count(*) FROM targets WHERE active=1 AND last_outcome IS NULL")[0][0]
            if left == 0 or time.time() > deadline:
                break
            say(f"N={n}: first round: {left} target(s) not backed up yet")
            time.sleep(5)
        t_first = time.time()
        out["first_round_s"] = t_first - t_reg
        out["settled"] = left == 0
        say(f"N={n}: first round {'done' if left == 0 else f'NOT done ({left} left)'} after "
            f"{out['first_round_s']:.0f} s")
        # Targets backed up early in the first round were due again long ago, but queued behind
        # the never-run ones (older due times): let that catch-up drain before measuring, so
        # the window shows the steady state (at most two periods; what is left is reported).
        limit = time.time() + 2 * 60 * EVERY_MIN
        while True:
            now = time.time()
            overdue = b.sql(url, "SELECT count(*) FROM targets WHERE active=1 AND next_due < %s"
                            " AND (lease_until IS NULL OR lease_until < %s)", (now - 10, now))[0][0]
            if overdue == 0 or now > limit:
                break
            say(f"N={n}: catching up: {overdue} target(s) overdue by more than 10 s")
            time.sleep(2)
        t0 = time.time()
        out["warmup_s"], out["overdue_at_t0"] = t0 - t_first, overdue
        say(f"N={n}: measuring for {a.minutes} min")

        procs = {"servers": [s.pid for s in servers], "agents": [g.pid for g in agents]}
        pg_pid = int((b.pg.data / "postmaster.pid").read_text().split()[0])
        weed_pid = b.s3._daemon.pid if b.s3._daemon else 0

        def cpu() -> dict[str, float]:
            return {
                "servers": sum(proc_cpu(p) for p in procs["servers"]),
                "agents": sum(proc_cpu(p) for p in procs["agents"]),
                "postgresql": tree_cpu(pg_pid), "seaweedfs": proc_cpu(weed_pid),
            }

        c0 = cpu()
        time.sleep(a.minutes * 60)
        t1 = time.time()
        c1 = cpu()
        out["cpu"] = {k: (c1[k] - c0[k]) / (t1 - t0) for k in c0}
        out["load"] = os.getloadavg()[0]
        out["per_server"] = [finished_per_server(s.log_text(), t0, t1) for s in servers]

        if n > 1:
            out["takeover"] = takeover(b, url, servers, ids)
        say(f"N={n}: reading ctl --json log")
        alive = [s for s in servers if s.alive()]
        log, out["log_note"] = read_log(b, alive[0], targets)
        out.update(window_figures(log, t0, t1, len(targets)))
        first_end: dict[tuple[str, str], float] = {}
        for e in log:
            if e["ended"]:
                k = (e["node"], e["path"])
                first_end[k] = min(first_end.get(k, math.inf), ts(e["ended"]))
        if len(first_end) == len(targets):  # the log's own account, sharper than our polling
            out["first_round_s"] = max(first_end.values()) - t_reg
        out["overlaps"] = overlaps(log)
        out["log_rows"] = len(log)
        if n > 1:
            finish_takeover(out["takeover"], log)
        say(f"N={n}: done; stopping")
    b.pg.drop_database(db)
    return out


def takeover(b: Bench, url: str, servers: list[Daemon], ids: dict[str, Daemon]) -> dict[str, Any]:
    """Kill -9 the server holding the most leases; wait until its targets ran elsewhere."""
    a = b.args
    deadline = time.time() + 120
    while True:
        now = time.time()
        rows = b.sql(url, "SELECT lease_owner, count(*) FROM targets WHERE lease_until > %s"
                     " GROUP BY lease_owner ORDER BY 2 DESC", (now,))
        rows = [r for r in rows if r[0] in ids]
        if rows or time.time() > deadline:
            break
        time.sleep(0.02)
    if not rows:
        return {"error": "no server held a lease for 120 s"}
    victim_id = rows[0][0]
    victim = ids[victim_id]
    kill_at = time.time()
    victim.kill()  # SIGKILL to its process group, reaped
    say(f"takeover: killed {victim_id} ({victim.address}), which held {rows[0][1]} lease(s)")
    time.sleep(1.0)  # PostgreSQL rolls back what the dead server had in flight
    held = b.sql(url, "SELECT id, node, path, lease_until FROM targets WHERE lease_owner=%s",
                 (victim_id,))
    ids_held = [r[0] for r in held]
    wait_until = kill_at + a.lease_ttl + 2 * 60 * EVERY_MIN + 120
    while ids_held and time.time() < wait_until:
        got = b.sql(url, "SELECT count(DISTINCT target_id) FROM executions WHERE started > %s"
                    " AND target_id = ANY(%s)", (kill_at, ids_held))[0][0]
        if got == len(ids_held):
            break
        time.sleep(0.5)
    took_s = time.time() - kill_at
    # Watch the survivors a little longer, to see their pace without the victim.
    if took_s < 60:
        time.sleep(60 - took_s)
    return {"victim": victim_id, "kill_at": kill_at, "held": [(r[1], r[2], r[3]) for r in held],
            "watched_until": time.time(),
            "ttl": a.lease_ttl}


def finish_takeover(t: dict[str, Any], log: list[dict[str, Any]]) -> None:
    if "error" in t:
        return
    kill_at = t["kill_at"]
    first: dict[tuple[str, str], float] = {}
    for e in log:
        s = ts(e["started"])
        k = (e["node"], e["path"])
        if s > kill_at and (k not in first or s < first[k]):
            first[k] = s
    delays, after_expiry, left = [], [], []
    for node, path, until in t["held"]:
        left.append(until - kill_at)
        if (node, path) in first:
            delays.append(first[(node, path)] - kill_at)
            after_expiry.append(first[(node, path)] - until)
    t["n_held"] = len(t["held"])
    t["n_taken"] = len(delays)
    t["running"] = sum(1 for e in log if (e.get("error") or "").startswith(_LEASE_LOST)
                       and ts(e["started"]) <= kill_at)
    t["delay_p50"], t["delay_max"] = pct(delays, 50), max(delays, default=math.nan)
    t["left_min"], t["left_max"] = min(left, default=math.nan), max(left, default=math.nan)
    t["expiry_p50"], t["expiry_max"] = pct(after_expiry, 50), max(after_expiry, default=math.nan)
    w0, w1 = kill_at, t["watched_until"]
    done = sum(1 for e in log if e["ended"] and w0 <= ts(e["ended"]) < w1)
    t["survivors_per_min"] = done / ((w1 - w0) / 60)


# -- section 3 -------------------------------------------------------------------------------


def run_onepct(b: Bench) -> list[dict[str, Any]]:
    say("1% change: building the archive trees (cached under benchmarks/_work/archive/)")
    trees = archive_data.trees()
    variants = [("local store, SQLite catalog (default)", []),
                ("S3 store (SeaweedFS), SQLite catalog", ["--store"]),
                ("S3 store + PostgreSQL catalog (cluster)", ["--store", "--catalog"])]
    rows = []
    for k, (name, kinds) in enumerate(variants):
        with contextlib.ExitStack() as local:
            work = b.root / f"onepct{k}"
            app = work / "app"
            shutil.copytree(trees["base"], app, symlinks=True)
            extra: list[str] = []
            db = ""
            if "--store" in kinds:
                extra += ["--store", f"s3://{BUCKET}/onepct-{uuid.uuid4().hex[:8]}"]
            if "--catalog" in kinds:
                db = f"bench_onepct_{uuid.uuid4().hex[:8]}"
                extra += ["--catalog", b.pg.create_database(db)]
            say(f"1% change: {name}")
            srv = b.server(local, work / "data", *extra)
            ag = b.agent(local, app, work / "agent-cache")
            b.ctl(srv.address, "register", ag.address, str(app), "--every", "1d")
            deadline = time.time() + 900
            first: dict[str, Any] | None = None
            while first is None and time.time() < deadline:
                first = next((e for e in b.ctl(srv.address, "log", ag.address, str(app))
                              if e["outcome"] is not None), None)
                if first is None:
                    time.sleep(0.5)
            if first is None:
                raise RuntimeError("the first backup did not finish within 900 s")
            runs = []
            for r in range(b.args.repeat):
                if r:  # back to the base tree (an unmeasured backup), so the same change repeats
                    subprocess.run(["rsync", "-a", "--delete", f"{trees['base']}/", f"{app}/"],
                                   check=True)
                    b.ctl(srv.address, "backup-now", ag.address, str(app), "--wait", timeout=900)
                subprocess.run(["rsync", "-a", "--delete", f"{trees['new']}/", f"{app}/"],
                               check=True)
                t = time.perf_counter()
                ex = b.ctl(srv.address, "backup-now", ag.address, str(app), "--wait", timeout=900)
                runs.append((ex, time.perf_counter() - t))
            rows.append({"name": name, "first": first, "runs": runs})
        if db:
            b.pg.drop_database(db)
    return rows


def dur(e: dict[str, Any]) -> float:
    return ts(e["ended"]) - ts(e["started"])


# -- output ----------------------------------------------------------------------------------


def report(args: argparse.Namespace, b: Bench, scale: list[dict[str, Any]],
           onepct: list[dict[str, Any]], t_start: float) -> None:
    cores = os.cpu_count()
    pg_ver = b.sql(b.pg.url, "SHOW server_version")[0][0]
    print(f"\n## bench_scale.py — {platform.node()}, {cores} cores, Python "
          f"{platform.python_version()}, PostgreSQL {pg_ver}, SeaweedFS `weed mini`; "
          f"load before start {args.load0:.2f}")
    if scale:
        print(f"\nParameters: T = {args.targets} targets, each due every {EVERY_MIN} min "
              f"(demand {args.targets / EVERY_MIN:.0f} executions/min); measured for "
              f"{args.minutes} min after the first round; lease TTL {args.lease_ttl:g} s; "
              f"--max-concurrent {args.max_concurrent} and --max-per-node {args.max_per_node} "
              f"per server; {args.agents} agents (light trees: 1-3 files of 0.1-3 kB); "
              f"all processes on this {cores}-core machine.\n")
        print("### 1. Throughput and scheduler lag (execution log, `ctl --json log`)\n")
        rows = []
        for r in scale:
            oc = ", ".join(f"{k} {v}" for k, v in sorted(r["outcomes"].items(), key=str))
            rows.append([
                r["n"], f"{r['per_min']:.0f}", f"{r['demand']:.0f}",
                f"{100 * r['per_min'] / r['demand']:.0f} %", r["peak_per_min"],
                f1(r["lag_p50"]), f1(r["lag_p90"]), f1(r["lag_p99"]), f1(r["lag_max"]),
                f"{r['ran']}/{args.targets}", f"{f1(r['period_p50'])} / {f1(r['period_max'])}",
                oc or "–", " / ".join(str(x) for x in r["per_server"]), r["overlaps"],
            ])
        print(table(["servers", "executions/min", "demand/min", "achieved",
                     "peak 10 s rate, /min", "lag p50 s", "lag p90 s", "lag p99 s", "lag max s",
                     "targets run", "period p50 / max s", "outcomes", "finished per server",
                     "overlapping runs (whole log)"], rows))
        print("\nBefore the window (register → first round → catch-up):\n")
        print(table(["servers", "bulk register s", "register answers", "first round s",
                     "first round, backups/min", "catch-up s", "overdue > 10 s at window start"],
                    [[r["n"], f"{r['register_s']:.0f}",
                      ", ".join(f"{k} {v}" for k, v in r["register"].items()),
                      f"{r['first_round_s']:.0f}" + ("" if r["settled"] else " (not done)"),
                      f"{60 * args.targets / r['first_round_s']:.0f}", f"{r['warmup_s']:.0f}",
                      r["overdue_at_t0"]] for r in scale]))
        print("\nCPU over the measuring window, in cores (of "
              f"{cores}; /proc utime+stime):\n")
        print(table(["servers", "deltabkp-server(s)", "agents", "postgresql", "seaweedfs",
                     "sum", "load avg (1 min) at end"],
                    [[r["n"], f2(r["cpu"]["servers"]), f2(r["cpu"]["agents"]),
                      f2(r["cpu"]["postgresql"]), f2(r["cpu"]["seaweedfs"]),
                      f2(sum(r["cpu"].values())), f2(r["load"])] for r in scale]))
        for r in scale:
            print(f"\nN={r['n']}: {r['log_rows']} execution rows read. {r['log_note']}")
        tk = [r for r in scale if "takeover" in r]
        if tk:
            print("\n### 2. Takeover after kill -9 of one server (survivors' `ctl --json log`)\n")
            rows = []
            for r in tk:
                t = r["takeover"]
                if "error" in t:
                    rows.append([r["n"], t["error"]] + ["–"] * 8)
                    continue
                rows.append([
                    r["n"], f"{t['ttl']:g}", t["n_held"], t["running"],
                    f"{t['n_taken']}/{t['n_held']}", f1(t["delay_p50"]), f1(t["delay_max"]),
                    f"{f1(t['left_min'])}–{f1(t['left_max'])}",
                    f"{f1(t['expiry_p50'])} / {f1(t['expiry_max'])}",
                    f"{t['survivors_per_min']:.0f}",
                ])
            print(table(["servers", "lease TTL s", "leases held at kill",
                         "its executions cut (failed: lease lost)", "taken over",
                         "kill → next start p50 s", "max s", "lease left at kill s",
                         "lease expiry → start p50 / max s", "survivors' executions/min"],
                        rows))
    if onepct:
        print("\n### 3. One ~1 % change backup of a stdlib copy: S3 vs local store "
              "(`ctl backup-now --wait --json`), one server each\n")
        print(f"Tree: {archive_data.WORK / 'base'} → changes "
              f"{(archive_data.WORK / 'done').read_text().strip()}\n")
        rows = []
        for r in onepct:
            f, runs = r["first"], r["runs"]
            e = runs[0][0]
            size = e["archive_size"] or 0
            wires = sorted({x["transferred"] for x, _ in runs})
            wire = f"{wires[0]:,}" if len(wires) == 1 else f"{wires[0]:,}–{wires[-1]:,}"
            execs = sorted(dur(x) for x, _ in runs)
            walls = sorted(w for _, w in runs)
            rows.append([
                r["name"], f"{f['archive_size']:,}", f"{f['transferred']:,}", f1(dur(f)),
                "/".join(sorted({x["outcome"] for x, _ in runs})), wire,
                f"{100 * wires[0] / size:.2f} %" if size else "–",
                f"{f1(execs[0])} ({', '.join(f1(x) for x in execs)})",
                f"{f1(walls[0])} ({', '.join(f1(x) for x in walls)})",
            ])
        print(f"Best of {args.repeat} (all runs in brackets); the store receives the whole new "
              "archive (its size) each time, the wire only the delta.\n")
        print(table(["store", "first: archive B", "first: wire B", "first: s", "1 %: outcome",
                     "1 %: wire B", "1 %: wire / archive", "1 %: execution s",
                     "1 %: ctl wall s"], rows))
    print(f"\nTotal run time {(time.time() - t_start) / 60:.1f} min.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", type=int, default=2000)
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--servers", default="1,3", help="server counts to run (default 1,3)")
    ap.add_argument("--lease-ttl", type=float, default=30.0)
    ap.add_argument("--max-concurrent", type=int, default=8)
    ap.add_argument("--max-per-node", type=int, default=2)
    ap.add_argument("--agents", type=int, default=8)
    ap.add_argument("--settle-timeout", type=float, default=900.0,
                    help="longest wait for the first round, s (then measure anyway)")
    ap.add_argument("--repeat", type=int, default=2,
                    help="1 %% change backups per store (best time shown)")
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--skip-onepct", action="store_true")
    args = ap.parse_args()
    args.load0 = os.getloadavg()[0]
    t_start = time.time()

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    with contextlib.ExitStack() as stack:
        b = Bench(stack, args)
        scale: list[dict[str, Any]] = []
        onepct: list[dict[str, Any]] = []
        try:
            if not args.skip_scale:
                trees = make_trees(b.root / "trees", args.agents, args.targets)
                for n in (int(x) for x in args.servers.split(",")):
                    scale.append(run_scale(b, n, trees))
            if not args.skip_onepct:
                onepct = run_onepct(b)
        finally:
            if scale or onepct:
                report(args, b, scale, onepct, t_start)
            say("cleaning up")


if __name__ == "__main__":
    main()
