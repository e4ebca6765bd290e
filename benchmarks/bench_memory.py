"""Peak memory of the real daemons backing up and restoring a ~1 GB tree (issue 10, item 5).

    python benchmarks/bench_memory.py [--size-gb 1.0] [--work DIR] [--keep]

Builds a ~``--size-gb`` tree once (cached in ``--work``, default ``/tmp/deltabkp-bench-memory``):
five copies of the stdlib tree of ``archive_data.py`` (sources, bytecode, extension modules:
~24,000 files) and, for the rest, 16 MiB files of mixed content (stdlib text and random
64 KiB runs, fixed seed).  Then, with a real ``deltabkp-server`` and ``deltabkp-agent``
(``deltabkp.testing.Daemon``, 127.0.0.1, port 0): a first backup, a ~1 % change (the
change set of ``archive_data.py`` on two of the copies, 1 MiB appended to three big files),
a second backup, and a ``deltabkp ctl restore`` of the newest archive (also the previous one
with ``--restore-old``: rebuilt from its reverse delta).  Each process's ``/proc/PID/status``
is polled every 20 ms; per phase it prints the peak of ``VmRSS`` and of ``RssAnon`` (the
anonymous part: heap, thread stacks, anonymous maps; not the page-cache pages of mapped
files) and ``VmHWM`` at the end (the kernel's high-water mark of RSS since the start).

A benchmark, not a test: it asserts nothing; the daemons and their data dirs are removed at
the end (the generated tree stays in ``--work`` unless it is a temp dir of this run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Self

sys.path.insert(0, str(Path(__file__).resolve().parent))

import archive_data

from deltabkp.testing import Daemon, console_script

_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile")
_BIG = 16 * 1024 * 1024
_RUN = 64 * 1024


def status(pid: int) -> dict[str, int] | None:
    """The memory fields of /proc/PID/status in bytes (None once the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in _FIELDS:
            out[key] = int(value.split()[0]) * 1024
    return out


class Poller:
    """Samples the memory of named pids in a thread; ``phase`` starts a new row of peaks."""

    def __init__(self) -> None:
        self.pids: dict[str, int] = {}
        self.rows: list[tuple[str, dict[str, dict[str, int]]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def phase(self, name: str) -> None:
        with self._lock:
            self.rows.append((name, {}))

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            with self._lock:
                if not self.rows:
                    continue
                peaks = self.rows[-1][1]
                for name, pid in list(self.pids.items()):
                    st = status(pid)
                    if st is None:
                        continue
                    p = peaks.setdefault(name, {})
                    for k, v in st.items():
                        p[k] = max(p.get(k, 0), v)


def make_tree(root: Path, size: int) -> Path:
    """The ~``size``-byte tree under ``root/tree`` (built once: ``root/tree.done``)."""
    tree, done = root / "tree", root / "tree.done"
    if done.exists():
        return tree
    if tree.exists():
        shutil.rmtree(tree)
    base = archive_data.trees()["base"]
    tree.mkdir(parents=True)
    total = 0
    for k in range(5):
        shutil.copytree(base, tree / f"src{k}", symlinks=True)
    for dirpath, _dirs, files in os.walk(tree):
        total += sum(os.lstat(os.path.join(dirpath, f)).st_size for f in files)
    rng = random.Random(archive_data.SEED)
    text = b"".join(p.read_bytes() for p in sorted(base.rglob("*.py"))[:400])
    (tree / "data").mkdir()
    i = 0
    while total < size:
        runs = []
        for _ in range(_BIG // _RUN):
            if rng.random() < 0.3:
                runs.append(rng.randbytes(_RUN))
            else:
                at = rng.randrange(len(text) - _RUN)
                runs.append(text[at : at + _RUN])
        (tree / "data" / f"blob{i:03}.bin").write_bytes(b"".join(runs))
        total += _BIG
        i += 1
    archive_data._settle(tree)
    done.write_text(f"{total}\n")
    return tree


def change(tree: Path) -> None:
    """~1 %: the archive_data change set on two copies, 1 MiB appended to three big files."""
    rng = random.Random(7)
    for k in (0, 1):
        archive_data.change_set(tree / f"src{k}", rng)
    for p in sorted((tree / "data").iterdir())[:3]:
        with open(p, "ab") as f:
            f.write(rng.randbytes(1024 * 1024))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "deltabkp-bench-memory")
    ap.add_argument("--restore-old", action="store_true", help="also restore the previous version")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    src = make_tree(args.work, int(args.size_gb * 1e9))
    print(f"tree {src} ready in {time.perf_counter() - t:.0f} s; cores {os.cpu_count()}, "
          f"load {os.getloadavg()[0]:.1f} (a shared machine: other work runs beside this)", flush=True)
    with contextlib.ExitStack() as stack:
        run = Path(tempfile.mkdtemp(prefix="deltabkp-bench-memory-", dir=args.work))
        stack.callback(shutil.rmtree, run, True)
        app = run / "app"
        # A real copy (not hard links: the change rewrites files in place).
        subprocess.run(["cp", "-a", str(src), str(app)], check=True)
        key = run / "cluster.key"
        key.write_text(secrets.token_hex(32) + "\n")
        key.chmod(0o600)
        env = {**os.environ, "DELTABKP_KEY_FILE": str(key), "PYTHONUNBUFFERED": "1"}

        def daemon(argv: list[str], name: str) -> Daemon:
            d = Daemon(argv, log=run / f"{name}.log", name=name, env=env, start_new_session=True)
            stack.callback(d.stop, 10)
            return d

        server = daemon([console_script("deltabkp-server"), "--listen", "127.0.0.1:0",
                         "--data-dir", str(run / "data")], "server")
        agent = daemon([console_script("deltabkp-agent"), "--listen", "127.0.0.1:0",
                        "--allow", str(app), "--cache-dir", str(run / "cache")], "agent")
        poller = stack.enter_context(Poller())
        poller.pids.update(server=server.pid, agent=agent.pid)

        def ctl(*a: str) -> Any:
            p = subprocess.Popen([console_script("deltabkp"), "ctl", "--server", server.address,
                                  "--json", "--timeout", "1800", *a],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            poller.pids["ctl"] = p.pid
            out, err = p.communicate(timeout=1900)
            poller.pids.pop("ctl", None)
            if p.returncode:
                tails = "".join(f"\n--- {n} log:\n" + "\n".join(
                    (run / f"{n}.log").read_text(errors="replace").splitlines()[-15:])
                    for n in ("server", "agent"))
                raise RuntimeError(f"ctl {' '.join(a)} exited {p.returncode}: {err.strip()} "
                                   f"{out.strip()[:2000]}{tails}")
            return json.loads(out) if out.strip() else None

        def step(name: str, *a: str) -> Any:
            poller.phase(name)
            t = time.perf_counter()
            res = ctl(*a)
            print(f"{name}: {time.perf_counter() - t:.1f} s", flush=True)
            return res

        target = (agent.address, str(app))
        ctl("register", *target, "--every", "1d")
        # Registering queues a first backup: wait for it as the first phase.
        poller.phase("first backup")
        t = time.perf_counter()
        while not any(e["outcome"] for e in ctl("log", *target)):
            time.sleep(0.5)
        first = ctl("log", *target)[0]
        print(f"first backup: {time.perf_counter() - t:.1f} s, {first.get('outcome')}, "
              f"archive {first.get('archive_size')}", flush=True)
        change(app)
        ex = step("backup after ~1% change", "backup-now", *target, "--wait")
        print(f"   {ex.get('outcome')}, archive {ex.get('archive_size')}, transferred {ex.get('transferred')}")
        step("restore newest", "restore", *target, str(run / "restored"))
        if args.restore_old:
            shutil.rmtree(run / "restored")
            step("restore previous (reverse delta)", "restore", "--version", "1", *target,
                 str(run / "restored"))
        poller.phase("end")
        time.sleep(0.1)
        # Which delta each backup used (layout, rolling, full): the agent's own words.
        for line in (run / "agent.log").read_text(errors="replace").splitlines():
            if " INFO " in line and ("archive of" in line or "layout" in line or "backup of" in line):
                print("agent:", line.split(" INFO ", 1)[1][:200])
        mb = 1e6
        print(f"\n{'phase':34} {'process':7} {'VmRSS peak':>11} {'RssAnon peak':>13} {'VmHWM':>9}   (MB)")
        for name, peaks in poller.rows[:-1]:
            for proc, p in peaks.items():
                print(f"{name:34} {proc:7} {p.get('VmRSS', 0) / mb:11.1f} {p.get('RssAnon', 0) / mb:13.1f}"
                      f" {p.get('VmHWM', 0) / mb:9.1f}")


if __name__ == "__main__":
    main()
