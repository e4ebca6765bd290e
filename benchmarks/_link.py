"""The driver of ``bench_link.sh``: a backup over a 10 Mbit/s link, side by side with the
original design and rsync, real daemons in two network namespaces.

    python benchmarks/_link.py [--repeat N] [--tree DIR] [--rate 10mbit] [--json OUT]
        [--keep-dir] [--work-dir DIR]
    python benchmarks/_link.py send HOST PORT      (stdin → one TCP connection)
    python benchmarks/_link.py recv HOST OUT       (one TCP connection → OUT; prints its port)

A ``deltabkp.testing.NetLab`` with two nodes, ``server`` and ``agent`` (veth pairs to a
bridge in a hub namespace); ``tc tbf`` shapes both directions of the agent's link to
``--rate`` (netem is not in this kernel), so every byte between agent and server crosses it.
Every client runs inside a namespace: ``deltabkp ctl`` and the receivers in ``server``
(``ctl`` talks to the server over the namespace's ``lo``: none of its bytes are on the
link), the senders in ``agent``.  Each repeat starts from nothing (fresh data dir, agent
cache and application copy of the base tree) and measures, in this order:

0. **link check**: 4 MiB of zeros over raw TCP (the original design's sender and receiver),
   so the shaping is seen to give what it claims;
1. **full**: the first backup — ``ctl register`` until the server logs the execution's end
   (the first backup runs at registration; the log line is watched in the file, not polled
   with ``ctl``, which would steal CPU from the agent);
2. **ours**: the ~1 % change set applied to the application directory
   (``rsync -a --delete --checksum`` from the changed tree: only the changed files are
   written, as an application would), then the wall time of ``ctl backup-now --wait``;
2b. **control**: "ours" again on the same daemons and lab with the link unshaped (a second
   copy of the base tree, registered — its first backup —, the same change set, then
   ``backup-now --wait``; after ours in odd repeats, before it in even ones), so what the
   10 Mbit/s link itself costs a backup is the difference of two rows of one run, not a
   comparison with ``bench_system.sh`` (which differs in more than the link);
3. **original design**: ``tar --sort=name -c | gzip -6 -n`` of the changed tree streamed
   into one TCP connection to a receiver in ``server`` that writes the file (streamed, not
   built then sent: the fastest form of the original design, so the ratio is not flattered);
4. **build**: ``deltabkp archive`` of the changed tree in ``agent`` (the archive rsync needs;
   its blake3 must equal the one the server stored: the independent check that the delta
   backup stored the archive of the tree);
5. **rsync**: ``rsync --stats`` of that archive from ``agent`` to an rsync daemon in
   ``server`` holding the base archive under the same name (delta transfer; no ``-z``: the
   data is gzip).  Reported alone and as build + rsync.

Bytes on the wire are the agent's ``eth0`` counters (link layer: Ethernet, IP, TCP and TLS
headers included) read before and after each method: agent → server is its tx, server →
agent its rx.  The payload column is what each tool says it moved (deltabkp's execution
record, the receiver's byte count, rsync's "Total bytes sent/received").  Ratios are wall
times over ours in the same repeat; the summary gives the median over repeats.  Under each
table: where deltabkp's wall time went (until the server started the execution — ctl's
start-up and request until the server logs "backup-now … queued", then the claim —, the
execution, from its end to the measurement's end),
each daemon's own per-phase timeline of that backup (``deltabkp._phases``: the agent's
"backup of …; phases" and the server's "execution N … phases" log lines, ms wall/cpu), and
the machine's load average, which must be quoted next to any figure.

Invariants: every wait has a deadline; the lab (and with it every process still inside it)
and the temp dir are removed on every exit path (``with``, SIGTERM/SIGINT → exit; the shell
wrapper sweeps the lab's namespace prefix too, for a kill -9 of this driver).  A benchmark:
it prints figures and asserts only that each method did its job (stored, same bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import attrs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

if TYPE_CHECKING:
    from deltabkp.testing import NetLab

# The daemons' log lines (stdlib only: cheap for the sender's start-up too).
from _daemonlog import (
    AGENT_PHASES,
    END_LINE,
    BenchError,
    daemon_phases,
    end_line_of,
    timeline,
    wait_count,
    wait_line,
)

# deltabkp.testing (Trio, cryptography) and archive_data are imported where used: the
# sender of the original design is this file too, and its start-up is inside the timing.

#: The lab's namespace prefix: the shell wrapper sweeps exactly these on exit.
PREFIX = "dbklink-"
RSYNC_PORT = 8730  # inside the server namespace: no other process can hold it
BACKUP_TIMEOUT_S = 1800.0
LINK_CHECK_BYTES = 4 << 20
SETTLE_S = 3.0  # > the archive's racy window (deltabkp.archive RACY_NS, 2 s)


@attrs.frozen
class Row:
    method: str
    wall_s: float
    up: int  # link bytes agent → server
    down: int  # link bytes server → agent
    payload: str  # what the tool says it moved
    note: str = ""


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


def link_bytes(lab: NetLab, node: str) -> tuple[int, int]:
    """(tx, rx) bytes of ``node``'s ``eth0`` so far (link layer)."""
    out = subprocess.run(["ip", "-n", lab[node].netns, "-s", "-j", "link", "show", "dev", "eth0"],
                         capture_output=True, text=True, check=True, timeout=15).stdout
    stats = json.loads(out)[0]["stats64"]
    return int(stats["tx"]["bytes"]), int(stats["rx"]["bytes"])


class Meter:
    """Wall time and the agent link's byte counters over one ``with`` block."""

    def __init__(self, lab: NetLab) -> None:
        self.lab = lab
        self.wall = self.start = self.end = 0.0
        self.up = self.down = 0

    def __enter__(self) -> Self:
        self._tx, self._rx = link_bytes(self.lab, "agent")
        self.start = time.time()  # the server's clock too: compared with execution records
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._t
        self.end = time.time()
        tx, rx = link_bytes(self.lab, "agent")
        self.up, self.down = tx - self._tx, rx - self._rx


def _run(lab: NetLab, node: str, argv: Sequence[str], env: dict[str, str], *,
         timeout: float = BACKUP_TIMEOUT_S, what: str) -> str:
    res = lab.run(node, argv, env=env, timeout=timeout)
    if res.returncode != 0:
        raise BenchError(f"{what} exited {res.returncode} in {node}: {res.stderr.strip()[-2000:]}")
    return res.stdout


def _wait_listening(lab: NetLab, node: str, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = lab.run(node, ["ss", "-Htln", f"sport = :{port}"]).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise BenchError(f"nothing listens on port {port} in {node} after {timeout:g} s")


def _blake3(path: Path) -> str:
    import blake3

    h = blake3.blake3()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def one_repeat(lab: NetLab, base: Path, new: Path, work: Path, rate: str,
               control_first: bool = False) -> list[Row]:
    from deltabkp.testing import Daemon, console_script

    work.mkdir()
    env = _env(work.parent)
    app, control = work / "app", work / "app-unshaped"
    for tree in (app, control):
        subprocess.run(["cp", "-a", f"{base}/.", str(tree)], check=True)
    # An application's tree predates its first backup: files written within the archive's
    # racy window (2 s) of the first build would be re-read by the next one, an artefact
    # of this set-up rather than of the ~1 % change.
    settled = time.monotonic() + SETTLE_S
    srv, agt = lab["server"], lab["agent"]
    rows: list[Row] = []
    # 0. the link itself: raw TCP, so the shaping is seen to be what it claims.
    m, got, seconds = _stream(lab, env, f"head -c {LINK_CHECK_BYTES} /dev/zero", work / "zeros",
                              "link check")
    rows.append(Row(f"link check: {LINK_CHECK_BYTES >> 20} MiB over raw TCP", m.wall, m.up,
                    m.down, f"{got}", f"{8 * got / seconds / 1e6:.2f} Mbit/s of payload from "
                    f"the first byte to the last ({8 * m.up / seconds / 1e6:.2f} at the link "
                    "layer)"))
    (work / "zeros").unlink()
    server = Daemon(srv.exec_argv([console_script("deltabkp-server"), "--listen",
                                   f"{srv.address}:0", "--data-dir", str(work / "data")]),
                    log=work / "server.log", name="deltabkp-server", env=env)
    try:
        agent = Daemon(agt.exec_argv([console_script("deltabkp-agent"), "--listen",
                                      f"{agt.address}:0", "--allow", str(app),
                                      "--allow", str(control),
                                      "--cache-dir", str(work / "cache")]),
                       log=work / "agent.log", name="deltabkp-agent", env=env)
        try:
            ctl = [console_script("deltabkp"), "ctl", "--server", server.address, "--json"]
            target = [agent.address, str(app)]

            # 1. the first backup: at registration; its end is the server's log line.
            time.sleep(max(0.0, settled - time.monotonic()))
            with Meter(lab) as m:
                _run(lab, "server", [*ctl, "register", *target, "--every", "1d"], env,
                     what="ctl register")
                wait_line(server.log, END_LINE, BACKUP_TIMEOUT_S, "the first backup")
            first = json.loads(_run(lab, "server", [*ctl, "log", *target], env, what="ctl log"))
            first = [e for e in first if e["outcome"] is not None]
            if len(first) != 1 or first[0]["outcome"] != "stored":
                raise BenchError(f"the first backup did not store an archive: {first}")
            f = first[0]
            rows.append(Row("deltabkp first (full) backup", m.wall, m.up, m.down,
                            f"{f['transferred']} (archive {f['archive_size']})",
                            timeline(m.start, m.end, f, agent.log, server.log)))
            base_hash = json.loads(_run(lab, "server", [*ctl, "list", *target], env,
                                        what="ctl list"))
            # Its agent line (after the agent's after-phase): no work of it is left running.
            wait_count(agent.log, AGENT_PHASES, 1, 60.0, "the agent's phases line")

            # 2b. the control: the same change backed up by the same daemons, the link
            # unshaped (its own copy of the base tree, first backup and all), so that what
            # the 10 Mbit/s link itself costs "ours" is the difference of two rows of one
            # run; before or after ours, every other repeat (whichever runs second finds the
            # daemons' caches warmer, or the previous backup's after-work still running).
            def run_control() -> Row:
                lab.unshape("agent")
                try:
                    return _control(lab, ctl, [agent.address, str(control)], new, env,
                                    agent.log, server.log)
                finally:
                    lab.shape("agent", rate)

            controlled = run_control() if control_first else None

            # 2. ours: the ~1 % change, then backup-now --wait.
            subprocess.run(["rsync", "-a", "--delete", "--checksum", f"{new}/", f"{app}/"],
                           check=True)
            served = len(AGENT_PHASES.findall(agent.log.read_text(errors="replace")))
            with Meter(lab) as m:
                ex = json.loads(_run(lab, "server", [*ctl, "backup-now", *target, "--wait"], env,
                                     what="ctl backup-now --wait"))
            if ex["outcome"] != "stored":
                raise BenchError(f"the backup after the change did not store an archive: {ex}")
            size = ex["archive_size"]
            # The daemons' own per-phase timelines of this backup (deltabkp._phases), to set
            # beside bench_system.sh's on loopback: what the link adds shows phase by phase.
            # The agent logs its line after its "after" phase, past --wait's answer.
            wait_count(agent.log, AGENT_PHASES, served + 1, 60.0, "the agent's phases line")
            rows.append(Row("deltabkp after ~1 % change (ours)", m.wall, m.up, m.down,
                            f"{ex['transferred']} = {100 * ex['transferred'] / size:.2f} %",
                            timeline(m.start, m.end, ex, agent.log, server.log)
                            + daemon_phases(agent.log, server.log)))
            stored = json.loads(_run(lab, "server", [*ctl, "list", *target], env, what="ctl list"))
            rows.append(controlled if controlled is not None else run_control())
        finally:
            agent.stop()
    finally:
        server.stop()

    # 3. the original design: tar | gzip streamed into one connection.
    pipe = f"tar --sort=name -cf - -C {shlex.quote(str(app))} . | gzip -6 -n"
    m, got, _ = _stream(lab, env, pipe, work / "orig.tgz", "tar | gzip | send")
    rows.append(Row("original design: tar, gzip -6, whole archive", m.wall, m.up, m.down, f"{got}"))

    # 4. the archive rsync needs, built where the application lives.
    new_tgz, old_dir = work / "new.tgz", work / "rsyncd"
    old_dir.mkdir()
    t = time.perf_counter()
    _run(lab, "agent", [console_script("deltabkp"), "archive", str(app), str(new_tgz)], env,
         what="deltabkp archive")
    build = time.perf_counter() - t
    want = _newest_hash(stored)
    if _blake3(new_tgz) != want:
        raise BenchError(f"deltabkp archive of the changed tree ({_blake3(new_tgz)}) is not the "
                         f"archive the server stored ({want})")
    # The base archive, as the server holds it (checked against its hash too); built once.
    base_tgz = work.parent / "base.tgz"
    if not base_tgz.exists():
        subprocess.run([console_script("deltabkp"), "archive", str(base), str(base_tgz)],
                       env=env, check=True, capture_output=True)
    shutil.copyfile(base_tgz, old_dir / "a.tgz")
    if _blake3(old_dir / "a.tgz") != _newest_hash(base_hash):
        raise BenchError("deltabkp archive of the base tree is not the first archive stored")
    rows.append(Row("build: deltabkp archive (no network)", build, 0, 0, "-"))

    # 5. rsync of the archive pair, daemon in server, client in agent.
    conf = work / "rsyncd.conf"
    conf.write_text(f"use chroot = no\nuid = root\ngid = root\n[m]\npath = {old_dir}\n"
                    "read only = no\n")
    rsyncd = lab.popen("server", ["rsync", "--daemon", "--no-detach", f"--config={conf}",
                                  f"--address={srv.address}", f"--port={RSYNC_PORT}"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listening(lab, "server", RSYNC_PORT)
        with Meter(lab) as m:
            out = _run(lab, "agent", ["rsync", "--stats", str(new_tgz),
                                      f"rsync://{srv.address}:{RSYNC_PORT}/m/a.tgz"], env,
                       what="rsync")
    finally:
        rsyncd.terminate()
        rsyncd.wait(30)
    if _blake3(old_dir / "a.tgz") != want:
        raise BenchError("rsync did not reproduce the new archive")
    sent = _stat(out, "Total bytes sent")
    received = _stat(out, "Total bytes received")
    rows.append(Row("rsync of the archive pair", m.wall, m.up, m.down,
                    f"{sent + received} = {100 * (sent + received) / size:.2f} %"))
    rows.append(Row("build + rsync", build + m.wall, m.up, m.down, "as above"))
    return rows


def _control(lab: NetLab, ctl: list[str], target: list[str], new: Path, env: dict[str, str],
             agent_log: Path, server_log: Path) -> Row:
    """"Ours" again on the unshaped link: register (its first backup), the change, then
    ``backup-now --wait``; its row's note has both daemons' timelines, as ours has."""
    ended = end_line_of(target[1])  # its first backup's end (not another target's)
    served = len(AGENT_PHASES.findall(agent_log.read_text(errors="replace")))
    _run(lab, "server", [*ctl, "register", *target, "--every", "1d"], env, what="ctl register")
    wait_line(server_log, ended, BACKUP_TIMEOUT_S, "the control's first backup")
    wait_count(agent_log, AGENT_PHASES, served + 1, 60.0, "the agent's phases line")
    subprocess.run(["rsync", "-a", "--delete", "--checksum", f"{new}/", f"{target[1]}/"],
                   check=True)
    with Meter(lab) as m:
        ex = json.loads(_run(lab, "server", [*ctl, "backup-now", *target, "--wait"], env,
                             what="ctl backup-now --wait (control)"))
    if ex["outcome"] != "stored":
        raise BenchError(f"the control backup did not store an archive: {ex}")
    wait_count(agent_log, AGENT_PHASES, served + 2, 60.0, "the agent's phases line")
    return Row("ours on the same lab, link unshaped (control)", m.wall, m.up, m.down,
               f"{ex['transferred']} = {100 * ex['transferred'] / ex['archive_size']:.2f} %",
               timeline(m.start, m.end, ex, agent_log, server_log) + daemon_phases(agent_log, server_log))


def _stream(lab: NetLab, env: dict[str, str], producer: str, out: Path,
            what: str) -> tuple[Meter, int, float]:
    """``producer | send`` in ``agent`` into a receiver in ``server`` that writes ``out``;
    the meter covers the sender's start to the receiver's last byte written; also returns
    the bytes received and the seconds from the first to the last."""
    me = [sys.executable, str(Path(__file__).resolve())]
    srv = lab["server"]
    recv = lab.popen("server", [*me, "recv", srv.address, str(out)], env=env,
                     stdout=subprocess.PIPE, text=True)
    try:
        assert recv.stdout is not None
        line = recv.stdout.readline().strip()
        if not line.isdigit():
            raise BenchError(f"{what}: the receiver in server did not start ({line!r})")
        port = int(line)
        with Meter(lab) as m:
            _run(lab, "agent", ["bash", "-o", "pipefail", "-c",
                                f"{producer} | {shlex.join(me)} send {srv.address} {port}"],
                 env, what=what)
            said = recv.communicate(timeout=60)[0].split()
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    got, seconds = (int(said[0]), float(said[1])) if len(said) == 2 else (-1, 0.0)
    if got <= 0 or got != out.stat().st_size:
        raise BenchError(f"{what}: the receiver counted {got} bytes, {out} has "
                         f"{out.stat().st_size}")
    return m, got, seconds


def _newest_hash(listing: Any) -> str:
    archives = listing["archives"] if isinstance(listing, dict) else listing
    newest = max(archives, key=lambda a: a["seq"])
    return str(newest["hash"])


def _stat(out: str, label: str) -> int:
    m = re.search(rf"{label}: ([\d,]+)", out)
    if m is None:
        raise BenchError(f"rsync --stats printed no {label!r}:\n{out}")
    return int(m.group(1).replace(",", ""))


# -- printing -------------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    ours = next(r.wall_s for r in rows if "(ours)" in r.method)
    lines = ["| method | wall s | agent→server B | server→agent B | payload B | wall / ours |",
             "|---|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r.method} | {r.wall_s:.2f} | {r.up:,} | {r.down:,} | {r.payload} | "
                     f"{_ratio(r.wall_s / ours)} |")
    lines += [f"\n{r.method}: {r.note}" for r in rows if r.note]
    return "\n".join(lines)


def _ratio(x: float) -> str:
    return f"{x:.1f}×" if x >= 1 else f"{x:.2f}×"


def summary(runs: list[list[Row]]) -> str:
    lines = [("| method | median wall s (min–max) | median agent→server B | "
              "median server→agent B | median wall / ours |"),
             "|---|---:|---:|---:|---:|"]
    for i, r0 in enumerate(runs[0]):
        walls = [run[i].wall_s for run in runs]
        ratios = [run[i].wall_s / next(r.wall_s for r in run if "(ours)" in r.method)
                  for run in runs]
        lines.append(
            f"| {r0.method} | {statistics.median(walls):.2f} ({min(walls):.2f}–{max(walls):.2f}) | "
            f"{int(statistics.median(run[i].up for run in runs)):,} | "
            f"{int(statistics.median(run[i].down for run in runs)):,} | "
            f"{_ratio(statistics.median(ratios))} |")
    return "\n".join(lines)


# -- the sender and receiver of the original design -------------------------------------------


def send(host: str, port: int) -> int:
    with socket.create_connection((host, port), timeout=60) as s:
        while chunk := sys.stdin.buffer.read(1 << 20):
            s.sendall(chunk)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)  # the receiver closes once it has written everything
    return 0


def recv(host: str, out: str) -> int:
    with socket.create_server((host, 0)) as ls:
        print(ls.getsockname()[1], flush=True)
        ls.settimeout(120)
        conn, _ = ls.accept()
        conn.settimeout(120)
        n, first = 0, 0.0
        with conn, open(out, "wb") as f:
            while chunk := conn.recv(1 << 20):
                if not n:
                    first = time.perf_counter()
                f.write(chunk)
                n += len(chunk)
            f.flush()
    # Bytes, and seconds from the first byte to the end: the link's rate without start-ups.
    print(n, f"{time.perf_counter() - first:.6f}", flush=True)
    return 0


# -- main -------------------------------------------------------------------------------------


def _trees(tree: str | None, work: Path) -> tuple[Path, Path, str]:
    import archive_data

    if tree is None:
        t = archive_data.trees()
        return t["base"], t["new"], f"the stdlib tree ({(archive_data.WORK / 'done').read_text().strip()})"
    src = Path(tree).resolve()
    if not src.is_dir():
        raise BenchError(f"--tree {tree}: not a directory")
    base, new = work / "base", work / "new"
    shutil.copytree(src, base, symlinks=True)
    shutil.copytree(base, new, symlinks=True)
    try:
        counts = archive_data.change_set(new, random.Random(archive_data.SEED))
    except (ValueError, IndexError) as e:
        raise BenchError(f"--tree {tree}: the ~1 % change set needs text files (.py, .txt, …) "
                         f"and one .so file ({e})") from None
    return base, new, f"{src} ({counts})"


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds the with-blocks: lab and temp dir removed


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] == "send":
        return send(argv[1], int(argv[2]))
    if argv and argv[0] == "recv":
        return recv(argv[1], argv[2])
    p = argparse.ArgumentParser(prog="bench_link.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=1, help="fresh runs of every method (default 1)")
    p.add_argument("--tree", help="a directory to use instead of the stdlib tree (a seeded ~1 %% "
                                  "change set is applied to a copy)")
    p.add_argument("--rate", default="10mbit", help="tc tbf rate of the agent's link (10mbit)")
    p.add_argument("--json", dest="json_out", help="also write every row as JSON here")
    p.add_argument("--keep-dir", action="store_true", help="keep the temp dir (daemon logs)")
    p.add_argument("--work-dir", help="make the temp dir in here (default: the system's)")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be ≥ 1")
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    from deltabkp.testing import NetLab

    work = Path(tempfile.mkdtemp(prefix="bench-link-", dir=args.work_dir))
    try:
        key = work / "cluster.key"
        key.write_text(secrets.token_hex(32) + "\n")
        key.chmod(0o600)
        base, new, what = _trees(args.tree, work)
        runs: list[list[Row]] = []
        loads: list[tuple[float, float]] = []  # a busy machine must show next to the figures
        with NetLab(["server", "agent"], prefix=PREFIX) as lab:
            lab.shape("agent", args.rate)
            print(f"# link: agent ↔ server, tc tbf {args.rate} both ways; tree: {what}", flush=True)
            for i in range(args.repeat):
                load0 = os.getloadavg()[0]
                rows = one_repeat(lab, base, new, work / f"run{i}", args.rate,
                                  control_first=i % 2 == 1)
                runs.append(rows)
                loads.append((load0, os.getloadavg()[0]))
                print(f"\n## repeat {i + 1} of {args.repeat}\n\n{table(rows)}\n"
                      f"load average (1 min) at start / end: {load0:.1f} / {loads[-1][1]:.1f} "
                      f"on {os.cpu_count()} CPUs", flush=True)
        if args.repeat > 1:
            print(f"\n## summary over {args.repeat} repeats\n\n{summary(runs)}")
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(
                {"rate": args.rate, "tree": what, "cpus": os.cpu_count(), "load_start_end": loads,
                 "runs": [[attrs.asdict(r) for r in rows] for rows in runs]}, indent=1) + "\n")
        return 0
    except BenchError as e:
        print(f"bench_link: {e}\n(logs in {work})", file=sys.stderr)
        args.keep_dir = True
        return 1
    finally:
        if args.keep_dir:
            print(f"# kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
