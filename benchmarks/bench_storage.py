"""Storage figures for reverse-delta version storage: 10 versions of a ~1 %-change series.

    python benchmarks/bench_storage.py [--tree small|stdlib] [--versions 10] [--repeat 3]

Real processes on 127.0.0.1: one ``deltabkp-server`` (local store, SQLite, no scrub) and one
``deltabkp-agent``; one target backed up ``--versions`` times (``ctl backup-now --wait``),
a ~1 % change set (``archive_data.change_set``: edits, appends, deletions, additions, a
binary overwrite — 1 % of the files) applied before each backup after the first.  Then:

1. **bytes on disk** under the store's ``archives/`` (every object: the newest ``.tgz`` and
   ``.sig``, the older versions' ``.rdelta``) against the newest archive, next to what the
   versions would take whole (today's layout before reverse deltas: every ``.tgz`` + ``.sig``)
   and what deltas all made against the newest would take (the alternative layout, computed
   here with the engine on the fetched archives: each older version's delta against the
   newest's signature);
2. **time to fetch and to restore** the oldest retained version (rebuilt through the whole
   chain of reverse deltas) vs the newest (whole), best of ``--repeat``
   (``ctl fetch`` / ``ctl restore``, wall time of the command);
3. every fetched version's blake3 against ``list --json``'s ``hash`` (a mismatch is printed
   as a failure — the benchmark itself asserts nothing about time).

``--tree small``: a few stdlib packages (~8 MB of sources); ``stdlib``: the ~107 MB tree of
``archive_data.py`` (minutes).  Every process and temp dir is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import blake3

sys.path.insert(0, str(Path(__file__).resolve().parent))
import archive_data  # noqa: E402

import deltabkp  # noqa: E402
from deltabkp import testing  # noqa: E402

SMALL_DIRS = ("json", "email", "http", "logging", "xml", "unittest", "urllib", "concurrent",
              "asyncio", "importlib")


def make_tree(kind: str, root: Path) -> Path:
    app = root / "app"
    if kind == "stdlib":
        shutil.copytree(archive_data.trees()["base"], app, symlinks=True)
    else:
        stdlib = Path(os.__file__).parent
        for d in SMALL_DIRS:
            shutil.copytree(stdlib / d, app / d,
                            ignore=shutil.ignore_patterns("__pycache__", "test*"))
        # An extension module, as in the real tree (the change set overwrites 64 bytes of it).
        so = max(Path(sys.executable).resolve().parent.parent.glob("lib/python3*/lib-dynload/*.so"),
                 key=lambda p: p.stat().st_size, default=None)
        if so is not None:
            shutil.copyfile(so, app / so.name)
        else:
            (app / "blob.so").write_bytes(random.Random(1).randbytes(400_000))
    archive_data._settle(app)
    return app


class Run:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.key = root / "cluster.key"
        self.key.write_text(secrets.token_hex(32) + "\n")
        self.key.chmod(0o600)
        self.env = {**os.environ, "DELTABKP_KEY_FILE": str(self.key), "HOME": str(root / "home")}
        self.data = root / "server-data"
        self.daemons: list[testing.Daemon] = []
        self.server = self._start("deltabkp-server", [
            "--listen", "127.0.0.1:0", "--data-dir", str(self.data), "--scrub-every", "off"])

    def _start(self, name: str, args: list[str]) -> testing.Daemon:
        d = testing.Daemon([testing.console_script(name), "--key-file", str(self.key), *args],
                           log=self.root / f"{name}-{len(self.daemons)}.log", name=name,
                           env=self.env, start_new_session=True)
        self.daemons.append(d)
        return d

    def agent(self, allow: Path) -> testing.Daemon:
        return self._start("deltabkp-agent", ["--listen", "127.0.0.1:0", "--allow", str(allow)])

    def ctl(self, *args: str, json_out: bool = True) -> Any:
        cmd = [testing.console_script("deltabkp"), "ctl", "--server", self.server.address,
               *(["--json"] if json_out else []), *args]
        res = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=600)
        if res.returncode != 0:
            raise SystemExit(f"ctl {' '.join(args)} exited {res.returncode}: {res.stderr}")
        return json.loads(res.stdout) if json_out and res.stdout.strip() else res.stdout

    def timed(self, *args: str) -> float:
        t0 = time.perf_counter()
        self.ctl(*args, json_out=False)
        return time.perf_counter() - t0

    def close(self) -> None:
        for d in reversed(self.daemons):
            d.stop()


def disk(data: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in (data / "archives").rglob("*"):
        if p.is_file():
            out[p.suffix] = out.get(p.suffix, 0) + p.stat().st_size
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", choices=("small", "stdlib"), default="small")
    ap.add_argument("--versions", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    run: Run | None = None
    try:
        app = make_tree(args.tree, root)
        run = Run(root)
        agent = run.agent(root)
        node = agent.address
        run.ctl("register", node, str(app), "--every", "1d")
        rng = random.Random(archive_data.SEED)
        hashes: dict[int, str] = {}
        for i in range(args.versions):
            if i:
                archive_data.change_set(app, rng)
                archive_data._settle(app)
            rec = run.ctl("backup-now", node, str(app), "--wait")
            # The first backup may have run already: registering makes the target due.
            if rec["outcome"] != "stored" and not (i == 0 and rec["outcome"] == "unchanged"):
                raise SystemExit(f"backup {i + 1}: {rec}")
            newest = run.ctl("list", node, str(app))[0]
            hashes[newest["seq"]] = newest["hash"]
        listed = [r for r in run.ctl("list", node, str(app)) if r["retained"]]
        seqs = sorted(r["seq"] for r in listed)
        newest_size = next(r["size"] for r in listed if r["seq"] == seqs[-1])
        on_disk = disk(run.data)
        total = sum(on_disk.values())

        fetched: dict[int, bytes] = {}
        bad = []
        for s in seqs:
            out = root / f"v{s}.tgz"
            run.ctl("fetch", node, str(app), str(out), "--version", str(s), json_out=False)
            fetched[s] = out.read_bytes()
            if blake3.blake3(fetched[s]).hexdigest() != hashes[s]:
                bad.append(s)
        whole = sum(len(b) + len(deltabkp.signature(b)) for b in fetched.values())
        newest_sig = deltabkp.Signature.parse(deltabkp.signature(fetched[seqs[-1]]))
        against_newest = len(fetched[seqs[-1]]) + len(newest_sig.to_bytes()) + sum(
            len(deltabkp.delta(newest_sig, fetched[s])) for s in seqs[:-1])

        def best(*cmd: str) -> float:
            assert run is not None
            return min(run.timed(*cmd) for _ in range(args.repeat))

        def restore(s: int) -> float:
            times = []
            for k in range(args.repeat):
                dest = root / f"r{s}-{k}"
                assert run is not None
                times.append(run.timed("restore", node, str(app), str(dest), "--version", str(s)))
                shutil.rmtree(dest)
            return min(times)

        oldest, newest_seq = seqs[0], seqs[-1]
        t_fetch_old = best("fetch", node, str(app), str(root / "o.tgz"), "--version", str(oldest))
        t_fetch_new = best("fetch", node, str(app), str(root / "n.tgz"),
                           "--version", str(newest_seq))
        t_rest_old, t_rest_new = restore(oldest), restore(newest_seq)

        mb = 1 << 20
        print(f"## Reverse-delta storage: {len(seqs)} versions of a ~1 % change series "
              f"(tree '{args.tree}', newest archive {newest_size / mb:.2f} MiB)\n")
        print("| layout | bytes on disk | × newest archive |\n|---|---:|---:|")
        print(f"| reverse deltas, successor chaining (this server) | {total:,} | "
              f"{total / newest_size:.2f} |")
        print(f"| deltas against the newest (alternative, computed) | {against_newest:,} | "
              f"{against_newest / newest_size:.2f} |")
        print(f"| every version whole (before) | {whole:,} | {whole / newest_size:.2f} |")
        kinds = ", ".join(f"{k or 'other'} {v:,} B" for k, v in sorted(on_disk.items()))
        print(f"\nobjects: {kinds}")
        print("\n| operation | oldest (rebuilt through the chain) | newest (whole) |")
        print("|---|---:|---:|")
        print(f"| ctl fetch, best of {args.repeat} | {t_fetch_old:.2f} s | {t_fetch_new:.2f} s |")
        print(f"| ctl restore, best of {args.repeat} | {t_rest_old:.2f} s | {t_rest_new:.2f} s |")
        print(f"\nfetched versions whose blake3 differs from list's hash: {bad or 'none'}")
        return 1 if bad else 0
    finally:
        if run is not None:
            run.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
