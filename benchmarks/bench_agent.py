"""The agent's side of a backup after the ~1% change, up to the layout encoder's input.

    python benchmarks/bench_agent.py [--rounds N] [--compare DIR] [--racy-first] [--cold] [--layout]
                                     [--unchanged]

A copy of the ~107 MB stdlib tree (``archive_data.py``) gets a first backup through the
agent's own ``serve_backup`` (full build, kept in a temp cache; with ``--racy-first`` at
once after the copy, as ``bench_system.sh`` does, so that many files are racy when that
build reads them), then the ~1% change set
(``rsync -a --checksum --delete new/ copy/``, as ``bench_system.sh`` does); each round then restores
that cache and serves one backup request with the layout delta accepted — fingerprint,
quick checks, incremental build, new archive and index kept, cache records — with
``_stream_layout`` stubbed out (the layout encode is timed by ``bench_system.sh``).  Each
round runs in a fresh process (CPU and wall of the request only; the CRC tables a daemon
builds at its first build are built before timing), timed up to the answer
(``backup-done``: what the server waits for) and to the request's end (the cache records
and the kept build's seek points follow the answer); the last round's per-phase timeline
(``deltabkp._phases``) is printed when the version logs one.  ``--compare DIR`` runs every round
also with ``PYTHONPATH=DIR`` (e.g. ``git archive HEAD | tar -x -C DIR``), interleaved, for
ratios side by side in one run.  Each round's agent knows the kept archive as the daemon
that wrote it does (``AgentCache`` remembers its ``stat``: not hashed again before use);
``--cold``: as an agent restarted since (hashed first).  Also printed: the CPU of the
build's own thread (``_build``: the walk, the reads, the splicing; its worker threads not
counted), the serial part of the build that a second core cannot take, and less noisy
than wall while the machine is shared.  ``--layout``: the layout encoder runs too (not
stubbed; then that thread's CPU includes the encode), and the first delta byte is timed:
what ends the server's "agent" phase; the ``layout`` phase's medians are printed too.  ``--unchanged``: no change set; each round is the
check of the unchanged tree (an agent's usual request, every period): after a settled
first build, its fingerprint; with ``--racy-first``, the first check after a racy build
(the kept index, then a fingerprint recorded).  Medians; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _serve(
    work: Path, base: bytes | None, layout: bool, cold: bool = False, encode: bool = False
) -> tuple[float, float, str, float, float, float, float, float]:
    import trio

    from deltabkp import protocol
    from deltabkp.archive import layout_capability
    from deltabkp.archive._crc import crc32_concat
    from deltabkp_agent import backup
    from deltabkp_agent.cache import AgentCache

    if not encode:
        backup._stream_layout = lambda *a, **k: 0  # not timed here
    # The CPU of the thread that walks, reads and splices (``_build``'s own): the serial
    # part of the build, which no other core can take; less noisy than wall on a busy box.
    build_cpu: list[float] = []
    build = backup._build

    def timed_build(*a: object, **k: object) -> object:
        t = time.thread_time()
        try:
            return build(*a, **k)  # type: ignore[arg-type]
        finally:
            build_cpu.append(time.thread_time() - t)

    backup._build = timed_build  # type: ignore[assignment]
    crc32_concat([1, 2], [3, 4])  # tables: built once per daemon
    root = os.path.realpath(work / "app")

    answered: list[float] = []
    first: list[float] = []  # the first delta byte: what ends the server's "agent" phase

    class Chan:  # the server's side: takes what is sent, says nothing meanwhile
        async def send(self, msg: object) -> None:
            if isinstance(msg, protocol.DeltaChunk) and msg.data and not first:
                first.extend((time.perf_counter(), time.process_time()))
            # The answer (what the server waits for); what follows it is off its path.
            if isinstance(msg, (protocol.BackupDone, protocol.Unchanged)) and not answered:
                answered.extend((time.perf_counter(), time.process_time()))

        async def receive(self, timeout: float | None = None, raise_errors: bool = True) -> None:
            await trio.sleep_forever()

    cache = AgentCache(work / "cache")
    kept, tgz = cache.kept_index(root), cache.kept_archive(root)
    if not cold and hasattr(cache, "_hashed") and kept is not None and tgz is not None:
        # What the daemon that kept this archive knows (it wrote and hashed that file): a
        # running agent's backups after its first do not hash the kept archive again.
        cache._hashed[root] = (kept.archive_hash, os.stat(tgz))

    async def serve() -> backup.BackupOutcome:
        ctx = backup.BackupContext("bench", cache, trio.CapacityLimiter(1), 1 << 30)
        req = protocol.BackupRequest(root, base, accepts=(layout_capability(),) if layout else ())
        return await backup.serve_backup(ctx, Chan(), req, root, ())  # type: ignore[arg-type]

    w, c = time.perf_counter(), time.process_time()
    out = trio.run(serve)
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    print(getattr(out, "phases", ""), file=sys.stderr)  # the per-phase timeline, if logged
    if not first:  # none sent (encoder stubbed): the answer is the first byte
        first.extend(answered)
    return (wall, cpu, f"{out.outcome}/{out.signature_from}", answered[0] - w, answered[1] - c,
            first[0] - w, first[1] - c, sum(build_cpu))


Row = tuple[float, float, str, float, float, str, float, float, float]


def _round(work: Path, pythonpath: str | None, cold: bool, encode: bool) -> Row:
    shutil.rmtree(work / "cache", ignore_errors=True)
    subprocess.run(["cp", "-a", str(work / "cache.first"), str(work / "cache")], check=True)
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    flags = [*(["--cold"] if cold else []), *(["--layout"] if encode else [])]
    run = subprocess.run([sys.executable, __file__, "--round", str(work), *flags],
                         env=env, check=True,
                         capture_output=True, text=True)
    out = run.stdout.split()
    return (float(out[0]), float(out[1]), out[2], float(out[3]), float(out[4]),
            run.stderr.strip(), float(out[5]), float(out[6]), float(out[7]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--compare", metavar="DIR", help="another version's source tree, run side by side")
    ap.add_argument("--racy-first", action="store_true",
                    help="first backup right after the copy (files racy when it reads them)")
    ap.add_argument("--cold", action="store_true",
                    help="as a restarted agent: the kept archive is hashed before use")
    ap.add_argument("--layout", action="store_true",
                    help="the layout encoder too (not stubbed): times the first delta byte")
    ap.add_argument("--unchanged", action="store_true",
                    help="no change set: the quick check of the unchanged tree")
    ap.add_argument("--round", metavar="WORK", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.round:
        work = Path(args.round)
        w, c, how, aw, ac, fw, fc, bt = _serve(
            work, (work / "base-hash").read_bytes(), True, args.cold, args.layout
        )
        print(f"{w:.4f} {c:.4f} {how} {aw:.4f} {ac:.4f} {fw:.4f} {fc:.4f} {bt:.4f}")
        return
    sys.path.insert(0, str(HERE))
    import archive_data

    from deltabkp.archive._walk import RACY_NS

    trees = archive_data.trees()
    work = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    try:
        subprocess.run(["cp", "-a", str(trees["base"]), str(work / "app")], check=True)
        if not args.racy_first:
            time.sleep(RACY_NS / 1e9 + 0.1)  # the copy's ctimes: reusable by the next build
        _serve(work, None, False)
        from deltabkp_agent.cache import AgentCache

        kept = AgentCache(work / "cache").kept_index(os.path.realpath(work / "app"))
        assert kept is not None
        (work / "base-hash").write_bytes(kept.archive_hash)
        if not args.unchanged:
            subprocess.run(["rsync", "-a", "--checksum", "--delete", f"{trees['new']}/",
                            f"{work / 'app'}/"],
                           check=True)  # --checksum: a same-size same-mtime edit is in the set
        else:
            time.sleep(RACY_NS / 1e9 + 0.1)  # the check of a tree that has been left alone
        subprocess.run(["cp", "-a", str(work / "cache"), str(work / "cache.first")], check=True)
        versions = {"this tree": None} | ({f"--compare {args.compare}": args.compare} if args.compare else {})
        got: dict[str, list[Row]] = {v: [] for v in versions}
        for _ in range(args.rounds):
            for name, path in versions.items():
                got[name].append(_round(work, path, args.cold, args.layout))
        print(f"serve_backup {'of the unchanged tree' if args.unchanged else 'after the ~1% change'}"
              f" (layout accepted, "
              f"{'encoder run' if args.layout else 'encoder stubbed'}"
              f"{'; first build racy' if args.racy_first else ''}"
              f"{'; cold agent' if args.cold else ''}), "
              f"{args.rounds} rounds, cores {os.cpu_count()}, load {os.getloadavg()[0]:.1f}")
        ref = statistics.median(r[4] for r in got["this tree"])
        for name, rows in got.items():
            wall = statistics.median(r[0] for r in rows)
            cpu = statistics.median(r[1] for r in rows)
            awall = statistics.median(r[3] for r in rows)
            acpu = statistics.median(r[4] for r in rows)
            # "answer": up to backup-done (what the server waits for); "all": the request,
            # with the work after the answer (cache records, seek points).
            print(f"   {name:32} answer wall {awall:6.3f} s cpu {acpu:6.3f} s (cpu / this tree's "
                  f"{acpu / ref:.2f})   all wall {wall:6.3f} s cpu {cpu:6.3f} s   {rows[-1][2]}")
            if args.layout:
                # What the server waits for before its apply starts (its "agent" phase).
                fwall = statistics.median(r[6] for r in rows)
                fcpu = statistics.median(r[7] for r in rows)
                print(f"   {'':32} first delta byte: wall {fwall:6.3f} s cpu {fcpu:6.3f} s")
            # The build phase alone (the per-phase timeline's "build", medians over rounds).
            builds = [m.groups() for r in rows if (m := re.search(r"\bbuild (\d+)/(\d+)", r[5]))]
            if builds:
                bw = statistics.median(int(b[0]) for b in builds)
                bc = statistics.median(int(b[1]) for b in builds)
                bt = statistics.median(r[8] for r in rows)
                print(f"   {'':32} build phase: wall {bw:.0f} ms cpu {bc:.0f} ms, its own thread's "
                      f"cpu {bt * 1e3:.0f} ms (the serial part; medians of {len(builds)})")
            # The layout encode streaming its records (the delta's hand-over to the loop).
            lays = [m.groups() for r in rows if (m := re.search(r"\blayout (\d+)/(\d+)", r[5]))]
            if lays:
                print(f"   {'':32} layout phase: wall {statistics.median(int(x[0]) for x in lays):.0f}"
                      f" ms cpu {statistics.median(int(x[1]) for x in lays):.0f} ms (medians)")
            if rows[-1][5]:
                print(f"   {'':32} phases (last round): {rows[-1][5]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
