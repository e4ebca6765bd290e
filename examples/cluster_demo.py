"""The main job on one machine: a backup server and two agents on embedded defaults.

Builds a demo tree for two "applications", starts `deltabkp-server` and two `deltabkp-agent`
processes on 127.0.0.1, registers both targets with `deltabkp ctl`, runs backups while the
applications keep changing their files, and prints what crossed the network compared with the
archive sizes. Everything lives in one run directory (printed) and every process is stopped at
the end, even on Ctrl-C.

    python examples/cluster_demo.py [--rounds N] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from deltabkp.ctl import format_size
from deltabkp.testing import Daemon, DaemonStartError, console_script


def start(cmd: list[str], log: Path, env: dict[str, str]) -> Daemon:
    """Start a daemon and wait for its 'listening on HOST:PORT' line (port 0 is resolved)."""
    try:
        return Daemon(cmd, log=log, env=env, append=False)
    except DaemonStartError as exc:
        raise SystemExit(exc.message) from None


def ctl(server: str, env: dict[str, str], *args: str) -> object:
    cmd = [console_script("deltabkp"), "ctl", "--server", server, "--json", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed ({res.returncode}): {res.stderr.strip()}")
    return json.loads(res.stdout) if res.stdout.strip() else None


def make_app_tree(root: Path, seed: int) -> None:
    """A plausible application directory: code copied from the stdlib, data and a log."""
    rnd = random.Random(seed)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    (root / "src").mkdir(parents=True)
    for name in ("json", "email", "http", "logging"):
        src = stdlib / name
        if src.is_dir():
            shutil.copytree(src, root / "src" / name, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "data").mkdir()
    for i in range(20):
        (root / "data" / f"record-{i:03}.txt").write_text(
            "".join(f"{rnd.random():.12f},{i},{j}\n" for j in range(500))
        )
    (root / "app.log").write_text("started\n")


def mutate(root: Path, rnd: random.Random, round_no: int) -> None:
    """What a running application does between backups: appends, edits, a new file."""
    with open(root / "app.log", "a") as f:
        f.writelines(f"round {round_no} event {k} {rnd.random()}\n" for k in range(200))
    victim = root / "data" / f"record-{rnd.randrange(20):03}.txt"
    text = victim.read_text()
    pos = rnd.randrange(len(text))
    victim.write_text(text[:pos] + f"EDITED in round {round_no}\n" + text[pos:])
    (root / "data" / f"new-{round_no}.txt").write_text(f"created in round {round_no}\n" * 50)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="changed backups after the first (default 3)")
    ap.add_argument("--keep", action="store_true", help="keep the run directory afterwards")
    args = ap.parse_args()

    run = Path(tempfile.mkdtemp(prefix="deltabkp-demo-"))
    print(f"run directory: {run}")
    env = dict(os.environ)
    # One key for the whole demo cluster; a real deployment shares one file between hosts.
    env["DELTABKP_KEY_FILE"] = str(run / "cluster.key")
    (run / "cluster.key").write_text(os.urandom(32).hex() + "\n")
    os.chmod(run / "cluster.key", 0o600)

    apps = [run / "apps" / "app1", run / "apps" / "app2"]
    for i, app in enumerate(apps):
        make_app_tree(app, seed=i)

    procs: list[Daemon] = []
    try:
        server_proc = start(
            [console_script("deltabkp-server"), "--listen", "127.0.0.1:0", "--data-dir", str(run / "server-data")],
            run / "server.log",
            env,
        )
        procs.append(server_proc)
        server = server_proc.address
        print(f"server listening on {server}")
        nodes = []
        for i, app in enumerate(apps, 1):
            agent_proc = start(
                [
                    console_script("deltabkp-agent"), "--listen", "127.0.0.1:0", "--allow", str(app),
                    "--server", server, "--cache-dir", str(run / f"agent{i}-cache"),
                ],
                run / f"agent{i}.log",
                env,
            )
            procs.append(agent_proc)
            node = agent_proc.address
            nodes.append(node)
            print(f"agent {i} listening on {node}, allowed {app}")

        for node, app in zip(nodes, apps):
            ctl(server, env, "register", node, str(app), "--every", "1")
            print(f"registered {node} {app} every 1 minute")

        # Registering makes a target due at once: wait for those first (full) backups.
        for node, app in zip(nodes, apps):
            deadline = time.monotonic() + 60
            rows: object = []
            while not rows and time.monotonic() < deadline:
                time.sleep(0.2)
                rows = ctl(server, env, "list", node, str(app))
            if not isinstance(rows, list) or not rows:
                raise SystemExit(f"no first backup of {node} {app} within 60 s; see {run}/server.log")
            first = rows[-1]
            print(f"  first backup: {node} {app.name}: archive {format_size(first['size'])}, "
                  f"on the wire {format_size(first['transferred'])} (no base yet: a plain upload)")

        rnd = random.Random(42)
        for round_no in range(1, args.rounds + 1):
            for app in apps:
                mutate(app, rnd, round_no)
            for node, app in zip(nodes, apps):
                ex = ctl(server, env, "backup-now", node, str(app), "--wait")
                assert isinstance(ex, dict)
                print(
                    f"  round {round_no}: {node} {app.name}: {ex.get('outcome')}, "
                    f"archive {format_size(ex.get('archive_size') or 0)}, "
                    f"on the wire {format_size(ex.get('transferred') or 0)}"
                )
        # One more backup with no change at all: the agent answers "unchanged".
        ex = ctl(server, env, "backup-now", nodes[0], str(apps[0]), "--wait")
        assert isinstance(ex, dict)
        print(f"  no change: {nodes[0]} {apps[0].name}: {ex.get('outcome')}, "
              f"on the wire {format_size(ex.get('transferred') or 0)}")

        print("\nbackups of app1 (deltabkp ctl list):")
        subprocess.run(
            [console_script("deltabkp"), "ctl", "--server", server, "list", nodes[0], str(apps[0])],
            env=env, check=True,
        )
        total_size = total_wire = 0
        for node, app in zip(nodes, apps):
            rows = ctl(server, env, "list", node, str(app))
            assert isinstance(rows, list)
            for row in rows:
                total_size += int(row["size"])
                total_wire += int(row["transferred"])
        print(
            f"\nall stored backups: {format_size(total_size)} of archives, {format_size(total_wire)} on the wire "
            f"({100 * total_wire / max(total_size, 1):.1f}%); sending whole archives would have "
            f"cost {format_size(total_size)}."
        )
        restore_dir = run / "restored-app1"
        subprocess.run(
            [console_script("deltabkp"), "ctl", "--server", server, "restore", nodes[0], str(apps[0]),
             str(restore_dir)],
            env=env, check=True,
        )
        same = subprocess.run(["diff", "-r", str(apps[0]), str(restore_dir)], capture_output=True)
        print(f"restored newest app1 backup into {restore_dir}: "
              f"{'identical to the live tree' if same.returncode == 0 else 'differs (the app kept writing)'}")
    finally:
        for p in reversed(procs):
            p.stop(timeout=10)
        if not args.keep:
            shutil.rmtree(run, ignore_errors=True)
        else:
            print(f"kept {run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
