"""What one ``deltabkp ctl`` command costs, before and after (issue 10): CPU and wall time of
``ctl status``, ``ctl list`` and ``ctl backup-now`` (no ``--wait``: until the request is
queued), the working tree against a baseline tree, alternating, beside ``python -c pass``.

    python benchmarks/bench_ctl.py [--rounds 9] [--baseline REV | --baseline-dir DIR]
                                   [--importtime N]

One real ``deltabkp-server`` (TLS, a throwaway key and data dir) answers both trees; every
command is a fresh process (``sys.executable -m deltabkp``, PYTHONPATH = the tree), its CPU
the child's ``user + sys`` (``os.wait4``), its wall time from spawn to exit.  The baseline is
``git archive REV`` (default HEAD: the code before the working tree's changes) unpacked in a
temp dir; nothing in the repository is changed.  Both trees get their bytecode compiled first
(as an installed package has it) and one warm-up run per command, so the new ctl's TLS cache
is warm, as it is for every command after the first; ``status (cold cache)`` removes that
cache before each run: the cost of the first command with a new key (or once a day).
Medians of ``--rounds``; the order within a round alternates.  Figures only, asserts
nothing; on a shared machine quote the load average printed with them.

Measured 2026-11-29 (2 cores shared by 4 engineers, load 5-6; 11 rounds), CPU s old → new:
``python -c pass`` 0.098; ``status`` 0.446 → 0.245 (0.55); ``list`` 0.435 → 0.225 (0.52);
``backup-now`` until queued 0.408 → 0.208 (0.51; wall 0.620 → 0.313); ``status`` with a
cold cache 0.280.  What is left above a bare interpreter (``time.process_time`` by phase,
~115 ms): importing attrs ~29 ms and building the protocol's attrs message classes ~33 ms,
``ssl`` + ``socket`` ~20 ms, the ctl modules and argparse ~18 ms, TLS context from the cache
~4 ms, TCP + TLS + key handshake ~4 ms, the request itself < 1 ms.

Then (2026-11-29, 2 cores shared by 4 engineers, load 3-5: figures noisy) a ``ctl …`` command
line imports and builds the ctl family's parser only (``cli._families``) and, of ctl's
subcommands, only the one it runs (``_commands._Subparsers``); the protocol's backup side
(``protocol/_backup.py``: 12 of the 23 message classes, two conversations) is built only by the
daemons: attrs classes built by ``ctl status`` 31 → 19; the parser: built in 9.2 ms → built
and parsed in 2.1 ms.
15 rounds, CPU s HEAD → working tree: ``status`` 0.220 → 0.209 (0.95), ``list`` 0.224 →
0.197 (0.88), ``backup-now`` 0.226 → 0.192 (0.85).  Start-up alone (import ``deltabkp.cli``,
build the parser, parse ``ctl status``, import the protocol and the blocking edge), counted by
``valgrind --tool=callgrind`` (instructions: deterministic where CPU time is not): 437.3 M →
389.4 M against 145.3 M for ``python -c pass``, i.e. the ctl's own share 292 M → 244 M (0.84).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from deltabkp.testing import Daemon, console_script

ROOT = Path(__file__).resolve().parent.parent
NODE, PATH = "127.0.0.1:1", "/srv/bench"  # no agent there: backup-now only queues


def run(argv: Sequence[str], env: dict[str, str]) -> tuple[float, float]:
    """(CPU s, wall s) of one process, which must succeed (run from ``/``: the current
    directory must not shadow the tree on PYTHONPATH)."""
    t = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd="/", stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read() if proc.stderr else b""
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {err.decode()[-500:]}")
    return ru.ru_utime + ru.ru_stime, wall


def baseline_tree(rev: str, into: Path) -> Path:
    """``git archive rev`` of the package, unpacked under ``into`` (read-only git use)."""
    data = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "deltabkp"],
                          check=True, capture_output=True).stdout
    into.mkdir()
    tar = into / "tree.tar"
    tar.write_bytes(data)
    with tarfile.open(tar) as t:
        t.extractall(into, filter="data")
    tar.unlink()
    return into


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--baseline", default="HEAD", help="git revision of the 'old' tree")
    ap.add_argument("--baseline-dir", type=Path, help="or a directory holding the old deltabkp/")
    ap.add_argument("--importtime", type=int, default=12, metavar="N",
                    help="show the N slowest imports of each tree's 'ctl status' (0: none)")
    opts = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-ctl-"))
    server = None
    try:
        old = opts.baseline_dir or baseline_tree(opts.baseline, work / "old")
        trees = {"old": old.resolve(), "new": ROOT}
        for tree in trees.values():
            subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "deltabkp")],
                           check=True, stdout=subprocess.DEVNULL)
        key = work / "key"
        key.write_text(os.urandom(32).hex() + "\n")
        key.chmod(0o600)
        server = Daemon([console_script("deltabkp-server"), "--listen", "127.0.0.1:0",
                         "--key-file", str(key), "--data-dir", str(work / "data")],
                        log=work / "server.log")
        base_env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        base_env.update(DELTABKP_KEY_FILE=str(key), DELTABKP_SERVER=server.address,
                        XDG_CACHE_HOME=str(work / "cache"))
        envs = {name: {**base_env, "PYTHONPATH": str(tree)} for name, tree in trees.items()}
        ctl = [sys.executable, "-m", "deltabkp", "ctl"]
        run([*ctl, "register", NODE, PATH, "--every", "1d"], envs["new"])
        commands = {
            "status": ["status"],
            "list": ["list", NODE, PATH],
            "backup-now (until queued)": ["backup-now", NODE, PATH],
        }
        for name in trees:  # warm-up: bytecode checked, the new tree's TLS cache written
            for args in commands.values():
                run([*ctl, *args], envs[name])
        cases: list[tuple[str, str, list[str]]] = [("bare", "python -c pass", [sys.executable, "-c", "pass"])]
        for label, args in commands.items():
            cases += [(name, label, [*ctl, *args]) for name in trees]
        cases.append(("new", "status (cold cache)", [*ctl, "status"]))
        got: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for r in range(opts.rounds):
            order = cases if r % 2 == 0 else cases[::-1]
            for name, label, argv in order:
                if label.endswith("(cold cache)"):
                    shutil.rmtree(work / "cache" / "deltabkp" / "tls", ignore_errors=True)
                env = envs.get(name, base_env)
                got.setdefault((name, label), []).append(run(argv, env))
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"# deltabkp ctl, {opts.rounds} rounds, medians (load average {load}, "
              f"{os.cpu_count()} CPUs, shared machine)\n")
        print("| command | old CPU s | new CPU s | new/old CPU | old wall s | new wall s | new/old wall |")
        print("|---|---|---|---|---|---|---|")
        med = {k: (statistics.median(c for c, _ in v), statistics.median(w for _, w in v))
               for k, v in got.items()}
        bare = med[("bare", "python -c pass")]
        print(f"| python -c pass | {bare[0]:.3f} | {bare[0]:.3f} | - | {bare[1]:.3f} | "
              f"{bare[1]:.3f} | - |")
        for label in commands:
            o, n = med[("old", label)], med[("new", label)]
            print(f"| ctl {label} | {o[0]:.3f} | {n[0]:.3f} | {n[0] / o[0]:.2f} | {o[1]:.3f} | "
                  f"{n[1]:.3f} | {n[1] / o[1]:.2f} |")
        o, n = med[("old", "status")], med[("new", "status (cold cache)")]
        print(f"| ctl status, new with a cold TLS cache | {o[0]:.3f} | {n[0]:.3f} | "
              f"{n[0] / o[0]:.2f} | {o[1]:.3f} | {n[1]:.3f} | {n[1] / o[1]:.2f} |")
        for name in trees if opts.importtime else ():
            proc = subprocess.run([sys.executable, "-X", "importtime", *ctl[1:], "status"],
                                  env=envs[name], cwd="/", capture_output=True, text=True,
                                  check=True)
            rows = [ln.split("|") for ln in proc.stderr.splitlines() if ln.startswith("import time:")
                    and "self" not in ln]
            top = sorted(rows, key=lambda row: -int(row[1]))[: opts.importtime]
            print(f"\n{name}: -X importtime of 'ctl status', the {opts.importtime} largest "
                  "cumulative (us, inflated by the tracing)")
            for row in top:
                print(f"  {int(row[1]):>8} {row[2].rstrip()}")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
