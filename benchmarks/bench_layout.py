"""The layout delta's cost on the bench pair: encode (agent) and apply (server), side by side
with a full build of the same tree and with the rolling delta it replaces.

    python benchmarks/bench_layout.py [--repeat N] [--baseline PATH] [--seek [KIB ...]]
                                      [--threads N ...] [--handover] [--stream]

Trees (``benchmarks/archive_data.py``): the ~107 MB stdlib tree and its copy with the ~1%
change set.  Both archives are built (``IncrementalBuilder``, indexes kept) under
``benchmarks/_work/layout/``; then, best of ``--repeat``, CPU and wall seconds of

- ``encode``: ``encode_layout`` from the old archive to the new one (both mmapped);
- ``apply``: ``LayoutPatcher`` fed the delta in 64 KiB pieces, writing the new archive
  (checked byte for byte against the built one);
- ``rolling``: signature of the old archive then ``DeltaEncoder`` over the new one (the
  fallback), for reference;
- ``full build``: a fresh ``TgzBuilder`` of the new tree, the unit of the ratios.

``--seek`` runs encode and apply again given the old archive's seek points
(``SeekPoints``, docs/formats.md "Seek points"), in the same run, and times making them as
the agent does (from the index; then the new archive's derived from it, ``derive``) and
as the server does (from the sync markers, and the new archive's carried through the patch,
``SeekPoints.carry``, against its markers); the delta must be the same bytes.  ``--seek 256 512 1024`` does it for each spacing (KiB).

``--threads 1 2`` times apply again for each ``LayoutPatcher(threads=N)`` (1: the serial
path), in turns, ``--repeat`` times each, in the same run (and with seek points too when
``--seek`` is given): CPU and wall, best and median, and the CPU of the calling thread
alone (``time.thread_time``: the patcher's longest path when the workers have a core).

``--handover`` makes the pair as the agent does (a copy of the base tree built, the change
set rsynced into it, built again from the first build) and times encode there, with the
old archive's seek points, without and with what that incremental build hands over
(``IncrementalBuilder.handover``: the tar it compressed, each job's window, the segments
it copied), in turns, ``--repeat`` times each, the archives mapped afresh each time (as the
agent maps them): CPU best and median, old tar inflated, and whether the delta is the
same bytes as without and as the bench pair's.

``--stream`` makes the same agent's pair and times, in turns, ``--repeat`` times each, the
incremental build alone (kept archive written beside, as the agent does), the same build
with a ``LayoutStreamer`` making version 2 of the delta as it goes (the old archive's seek
points given, as the agent's), the same making version 3 (``stream_first``: its END, the
agent's answer, before the build compresses: how far into the build that was), then
version 1 made after that build (with its hand-over): wall and CPU best and median, how far
into the build the first RUN record was made, each delta's size; and the apply of each
(``LayoutPatcher``, one thread, the server's seek points at 256 KiB): the work the server
does beside the build (versions 2 and 3) or after it (version 1).

``--baseline PATH`` runs encode and apply again with the ``deltabkp`` package found under
PATH (e.g. a ``git worktree`` of an older commit), in the same run, on the same archives:
a child process for the baseline and this tree in turn, ``--repeat`` times (alternating,
so both see the same load), given the old archive's seek points too when ``--seek`` is
given (the first spacing; each side makes them with its own package); the best and the
median of each, and whether the deltas are the same bytes (sha256).
CPU is ``time.process_time`` (all threads of the process); wall times are noisy on a shared
machine, so the load average is printed.  Asserts nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

OUT = Path(__file__).resolve().parent / "_work" / "layout"


def _mapped(path: Path) -> mmap.mmap:
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _timed(fn: Callable[[], Any], repeat: int) -> tuple[tuple[float, float], Any]:
    best = (float("inf"), float("inf"))
    result = None
    for _ in range(repeat):
        c, w = time.process_time(), time.perf_counter()
        result = fn()
        best = min(best, (time.process_time() - c, time.perf_counter() - w))
    return best, result


def measure(repeat: int, seek: Any = None, threads: list[int] | None = None) -> dict[str, object]:
    """Encode and apply with whichever ``deltabkp`` is first on sys.path (``seek``: the old
    archive's seek points, passed only when given: a baseline may not know them; ``threads``:
    apply again with each of these ``LayoutPatcher`` thread counts, in turns)."""
    from deltabkp.archive import ArchiveIndex, LayoutPatcher, encode_layout

    old_i = ArchiveIndex.parse((OUT / "old.idx").read_bytes())
    new_i = ArchiveIndex.parse((OUT / "new.idx").read_bytes())
    old, new = _mapped(OUT / "old.tgz"), _mapped(OUT / "new.tgz")
    kw = {} if seek is None else {"seek": seek}
    enc, delta = _timed(lambda: b"".join(encode_layout(old_i, old, new_i, new, **kw)), repeat)
    inflated = _inflated(old_i, old, new_i, new, kw)

    def apply(extra: dict[str, Any] | None = None) -> None:
        p = LayoutPatcher(old, base_hash=old_i.archive_hash, max_size=1 << 40, **kw, **(extra or {}))
        with open(OUT / "applied.tgz", "wb") as f:
            for at in range(0, len(delta), 1 << 16):
                f.writelines(p.feed(delta[at : at + (1 << 16)]))
        p.finish()

    app, _ = _timed(apply, repeat)
    same = (OUT / "applied.tgz").read_bytes() == (OUT / "new.tgz").read_bytes()
    by_threads: dict[int, list[tuple[float, float, float]]] = {t: [] for t in threads or []}
    for _ in range(repeat if threads else 0):
        for t, runs in by_threads.items():  # in turns: every count sees the same load
            c, w, m = time.process_time(), time.perf_counter(), time.thread_time()
            apply({"threads": t})
            runs.append((time.process_time() - c, time.perf_counter() - w, time.thread_time() - m))
            same = same and (OUT / "applied.tgz").read_bytes() == (OUT / "new.tgz").read_bytes()
    return {"encode": enc, "apply": app, "delta": len(delta), "same": same,
            "archive": new_i.archive_size, "sha256": hashlib.sha256(delta).hexdigest(),
            "inflated": inflated, "threads": by_threads}


def _inflated(old_i: Any, old: Any, new_i: Any, new: Any, kw: dict[str, Any]) -> int | None:
    """Old tar bytes the encoder inflated (None: this ``deltabkp`` does not say)."""
    try:
        from deltabkp.archive._layout import _Encoder
        enc = _Encoder(old_i, old, new_i, new, kw.get("seek"))
        b"".join(enc.records())
        return int(enc.old_tar.inflated)
    except (ImportError, AttributeError, TypeError):
        return None


def _agents_pair(work: Path, trees: dict[str, Path]) -> Any:
    """As an agent's: a copy of the base tree in ``work/app`` built (``work/a.tgz``; its
    builder returned), then the change set rsynced into the copy."""
    import shutil

    from deltabkp.archive import IncrementalBuilder
    from deltabkp.archive._walk import RACY_NS

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    subprocess.run(["cp", "-a", str(trees["base"]), str(work / "app")], check=True)
    time.sleep(RACY_NS / 1e9 + 0.1)  # the copy's ctimes: reusable by the next build
    a = IncrementalBuilder(work / "app")
    with open(work / "a.tgz", "wb") as f:
        f.writelines(a)
    subprocess.run(["rsync", "-a", "--checksum", "--delete", f"{trees['new']}/",
                    f"{work / 'app'}/"], check=True)
    return a


def _handover(repeat: int, trees: dict[str, Path], want_sha: str) -> str:
    """``--handover``: encode on an agent's pair, without and with the build's hand-over."""
    import shutil

    from deltabkp.archive import IncrementalBuilder, SeekPoints, encode_layout
    from deltabkp.archive._layout import _Encoder

    work = OUT.parent / "layout-handover"
    a = _agents_pair(work, trees)
    b = IncrementalBuilder(work / "app", previous=a.index, previous_archive=work / "a.tgz")
    with open(work / "b.tgz", "wb") as f:
        f.writelines(b)
    seek = SeekPoints.build(_mapped(work / "a.tgz"), a.index.archive_hash, index=a.index)
    hand = b.handover
    times: dict[bool, list[float]] = {False: [], True: []}
    shas: dict[bool, set[str]] = {False: set(), True: set()}
    for _ in range(repeat):
        for with_it in (False, True):  # in turns: both see the same load
            old, new = _mapped(work / "a.tgz"), _mapped(work / "b.tgz")
            c = time.process_time()
            delta = b"".join(encode_layout(a.index, old, b.index, new, seek=seek,
                                           fresh=hand if with_it else None))
            times[with_it].append(time.process_time() - c)
            shas[with_it].add(hashlib.sha256(delta).hexdigest())
    inflated = {}
    for with_it in (False, True):
        enc = _Encoder(a.index, _mapped(work / "a.tgz"), b.index, _mapped(work / "b.tgz"), seek,
                       hand if with_it else None)
        b"".join(enc.records())
        inflated[with_it] = enc.old_tar.inflated
    shutil.rmtree(work, ignore_errors=True)
    w, h = sorted(times[False]), sorted(times[True])
    same = shas[False] == shas[True] == {want_sha}
    size = sum(map(len, hand.chunks)) if hand is not None else 0
    return (f"hand-over (an agent's pair, seek points; {size:,} bytes of tar, "
            f"{len(hand.copies) if hand is not None else 0} copied stretches): encode CPU s "
            f"without best {w[0]:.3f} median {w[len(w) // 2]:.3f}, with best {h[0]:.3f} median "
            f"{h[len(h) // 2]:.3f}: {w[0] / h[0]:.2f}x (best), "
            f"{w[len(w) // 2] / h[len(h) // 2]:.2f}x (median); old tar inflated "
            f"{inflated[False]:,} -> {inflated[True]:,}; deltas "
            f"{'the same bytes as the bench pair' if same else 'DIFFERENT'} "
            f"(sha256 {', '.join(sorted(x[:16] for x in shas[False] | shas[True]))})")


def _stream(repeat: int, trees: dict[str, Path]) -> str:
    """``--stream``: on an agent's pair, the build with and without the streamed encoder."""
    import shutil
    import statistics

    from deltabkp.archive import IncrementalBuilder, LayoutPatcher, LayoutStreamer, SeekPoints
    from deltabkp.archive import encode_layout
    from deltabkp.archive._layout import T_RUN
    from deltabkp.archive._walk import RACY_NS

    work = OUT.parent / "layout-stream"
    a = _agents_pair(work, trees)
    time.sleep(RACY_NS / 1e9 + 0.1)
    old = _mapped(work / "a.tgz")
    agent_seek = SeekPoints.build(old, a.index.archive_hash, index=a.index)
    server_seek = SeekPoints.build(old, a.index.archive_hash, index=a.index, spacing=256 << 10)
    runs: dict[str, list[tuple[float, float]]] = {
        "build": [], "build + v2": [], "build + v3": [], "v1 after": []}
    first_run: list[float] = []
    answered: list[float] = []  # version 3: END made, this far into the build
    deltas: dict[str, bytes] = {}
    for _ in range(repeat):
        for mode in ("build", "build + v2", "build + v3"):  # in turns: all see the same load
            v3 = mode == "build + v3"
            streamer = (LayoutStreamer(a.index, old, seek=agent_seek, version=3 if v3 else 2)
                        if mode != "build" else None)
            records = [streamer.header()] if streamer is not None else []
            w, c = time.perf_counter(), time.process_time()
            ended = False
            with open(work / "b.tgz", "wb") as f:
                b = IncrementalBuilder(work / "app", previous=a.index,
                                       previous_archive=work / "a.tgz", sink=f.write,
                                       stream=streamer, stream_first=v3)
                for _chunk in b:
                    if streamer is not None:
                        got = streamer.take()
                        if mode == "build + v2" and len(first_run) < len(runs[mode]) + 1 and \
                                any(r[0] == T_RUN for r in got):
                            first_run.append(time.perf_counter() - w)
                        records += got
                        if v3 and not ended and streamer.told_all:
                            records += streamer.end()
                            ended = True
                            answered.append(time.perf_counter() - w)
                if streamer is not None and not v3:
                    records += streamer.end(b.index.archive_size, b.index.archive_hash)
            runs[mode].append((time.perf_counter() - w, time.process_time() - c))
            if streamer is not None:
                deltas["v3" if v3 else "v2"] = b"".join(records)
            else:
                new = _mapped(work / "b.tgz")
                w, c = time.perf_counter(), time.process_time()
                deltas["v1"] = b"".join(encode_layout(a.index, old, b.index, new,
                                                      seek=agent_seek, fresh=b.handover))
                runs["v1 after"].append((time.perf_counter() - w, time.process_time() - c))
    new_bytes = (work / "b.tgz").read_bytes()
    applies: dict[str, list[float]] = {"v1": [], "v2": [], "v3": []}
    for _ in range(repeat):
        for v in ("v1", "v2", "v3"):
            p = LayoutPatcher(old, base_hash=a.index.archive_hash, max_size=1 << 40,
                              seek=server_seek)
            c = time.process_time()
            out = b"".join(p.feed(deltas[v]))
            p.finish()
            applies[v].append(time.process_time() - c)
            if out != new_bytes:
                return f"stream: the {v} delta does NOT rebuild the archive"
    shutil.rmtree(work, ignore_errors=True)

    def cell(xs: list[tuple[float, float]]) -> str:
        wall, cpu = sorted(x[0] for x in xs), sorted(x[1] for x in xs)
        return (f"wall best {wall[0]:.3f} median {statistics.median(wall):.3f}, "
                f"CPU best {cpu[0]:.3f} median {statistics.median(cpu):.3f} s")

    return (f"stream (an agent's pair, {repeat} runs each in turns): the build {cell(runs['build'])};"
            f" with version 2 made as it goes {cell(runs['build + v2'])}, its first RUN "
            f"{statistics.median(first_run):.3f} s in, {len(deltas['v2']):,} bytes; with version 3 "
            f"{cell(runs['build + v3'])}, its END (the answer) {statistics.median(answered):.3f} "
            f"s in, {len(deltas['v3']):,} bytes; version 1 made "
            f"after the build {cell(runs['v1 after'])}, {len(deltas['v1']):,} bytes; apply (one "
            f"thread, server seek points) CPU median v1 {statistics.median(applies['v1']):.3f} s, "
            f"v2 {statistics.median(applies['v2']):.3f} s, v3 "
            f"{statistics.median(applies['v3']):.3f} s; each rebuilds the archive")


def _seek_points(kib: int) -> Any:
    """The old archive's seek points at ``kib`` spacing, made as the agent makes them."""
    from deltabkp.archive import ArchiveIndex, SeekPoints

    old_i = ArchiveIndex.parse((OUT / "old.idx").read_bytes())
    return SeekPoints.build(_mapped(OUT / "old.tgz"), old_i.archive_hash, index=old_i,
                            spacing=kib << 10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--baseline", help="a directory holding another deltabkp package")
    ap.add_argument("--seek", nargs="*", type=int, metavar="KIB",
                    help="also with the old archive's seek points (at these spacings, KiB)")
    ap.add_argument("--threads", nargs="+", type=int, metavar="N",
                    help="also apply with LayoutPatcher(threads=N) for each N, in turns")
    ap.add_argument("--handover", action="store_true",
                    help="also encode on an agent's pair, with and without the build's hand-over")
    ap.add_argument("--stream", action="store_true",
                    help="also build an agent's pair with and without the streamed encoder "
                         "(version 2), and apply both versions")
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--measure-seek", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:  # one side of the baseline comparison, in a child process
        seek = _seek_points(args.measure_seek) if args.measure_seek else None
        print(json.dumps(measure(args.repeat, seek)))
        return

    import archive_data

    import deltabkp
    from deltabkp.archive import IncrementalBuilder

    trees = archive_data.trees()
    OUT.mkdir(parents=True, exist_ok=True)
    for name, tree in (("old", trees["base"]), ("new", trees["new"])):
        b = IncrementalBuilder(tree)
        with open(OUT / f"{name}.tgz", "wb") as f:
            f.writelines(b)
        (OUT / f"{name}.idx").write_bytes(b.index.encode())

    def full_build() -> None:
        with open(OUT / "fresh.tgz", "wb") as f:
            f.writelines(deltabkp.TgzBuilder(trees["new"]))

    full, _ = _timed(full_build, args.repeat)
    old_b, new_b = (OUT / "old.tgz").read_bytes(), (OUT / "new.tgz").read_bytes()

    def rolling() -> int:
        sb = deltabkp.SignatureBuilder(base_size=len(old_b))
        sb.feed(old_b)
        enc = deltabkp.DeltaEncoder(deltabkp.Signature.parse(sb.finish()))
        return len(enc.feed(new_b)) + len(enc.finish())

    roll, roll_bytes = _timed(rolling, args.repeat)
    rows = {"this tree": measure(args.repeat, threads=args.threads)}
    seek_notes: list[str] = []
    if args.seek is not None:
        from deltabkp.archive import ArchiveIndex, SeekPoints
        from deltabkp.archive._seek import SPACING

        old_i = ArchiveIndex.parse((OUT / "old.idx").read_bytes())
        old_m = _mapped(OUT / "old.tgz")
        new_i = ArchiveIndex.parse((OUT / "new.idx").read_bytes())
        new_m = _mapped(OUT / "new.tgz")
        for kib in args.seek or [SPACING >> 10]:
            sp = kib << 10
            agent, seek = _timed(
                lambda sp=sp: SeekPoints.build(old_m, old_i.archive_hash, index=old_i, spacing=sp),
                args.repeat)
            server, by_markers = _timed(
                lambda sp=sp: SeekPoints.build(old_m, old_i.archive_hash, spacing=sp), args.repeat)
            assert by_markers == seek, "seek points from the markers differ from the index's"
            derive, _ = _timed(
                lambda sp=sp, seek=seek: SeekPoints.derive(seek, old_i, new_m, new_i, spacing=sp),
                args.repeat)
            label = f"seek points, {kib} KiB"
            rows[label] = measure(args.repeat, seek, args.threads)
            # The server's way to the new archive's table: carried through the patch.
            from deltabkp.archive import LayoutPatcher, encode_layout
            lp = LayoutPatcher(old_m, base_hash=old_i.archive_hash, max_size=1 << 40, seek=seek)
            lp.feed(b"".join(encode_layout(old_i, old_m, new_i, new_m, seek=seek)))
            lp.finish()
            carry, carried = _timed(
                lambda sp=sp, seek=seek, lp=lp: SeekPoints.carry(
                    seek, lp.copies, new_m, new_i.archive_hash, spacing=sp), args.repeat)
            fresh, _ = _timed(
                lambda sp=sp: SeekPoints.build(new_m, new_i.archive_hash, spacing=sp), args.repeat)
            if rows[label]["delta"] != rows["this tree"]["delta"]:
                print(f"({label}: the delta has another size!)")
            t, s = rows["this tree"], rows[label]
            seek_notes.append(
                f"{label}: {len(seek)} points, file {len(seek.encode()):,} bytes; made from the "
                f"index (agent) {agent[0]:.3f} s CPU, from the markers (server) {server[0]:.3f} s "
                f"CPU, the new archive's derived from it (agent) {derive[0]:.3f} s CPU (after "
                f"the backup); encode {t['encode'][0] / s['encode'][0]:.2f}x, apply "
                f"{t['apply'][0] / s['apply'][0]:.2f}x less CPU; the new archive's carried "
                f"through the patch (server) {carry[0]:.3f} s CPU, {len(carried)} points, "
                f"against {fresh[0]:.3f} s from its markers")
    versus: list[str] = []
    if args.handover:
        versus.append(_handover(args.repeat, trees, str(rows["this tree"]["sha256"])))
    if args.stream:
        versus.append(_stream(args.repeat, trees))
    if args.baseline:
        here = str(Path(__file__).resolve().parent.parent)
        cmd = [sys.executable, __file__, "--measure", "--repeat", "1"]
        if args.seek is not None:
            cmd += ["--measure-seek", str((args.seek or [SPACING >> 10])[0])]
        runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "this tree": []}
        for _ in range(args.repeat):  # alternating: both sides under the same load
            for side, path in (("baseline", os.path.abspath(args.baseline)), ("this tree", here)):
                env = dict(os.environ, PYTHONPATH=path)
                out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True,
                                     cwd="/").stdout
                runs[side].append(json.loads(out))
        rows["baseline"] = runs["baseline"][0] | {
            step: min(r[step] for r in runs["baseline"]) for step in ("encode", "apply")}
        for step in ("encode", "apply"):
            b = sorted(r[step][0] for r in runs["baseline"])
            t = sorted(r[step][0] for r in runs["this tree"])
            versus.append(
                f"{step} CPU s, alternating runs ({args.repeat} each"
                f"{', seek points' if args.seek is not None else ''}): baseline best "
                f"{b[0]:.3f} median {b[len(b) // 2]:.3f}, this tree best {t[0]:.3f} median "
                f"{t[len(t) // 2]:.3f}: {b[0] / t[0]:.2f}x (best), "
                f"{b[len(b) // 2] / t[len(t) // 2]:.2f}x (median)")
        shas = {r["sha256"] for side in runs.values() for r in side}
        versus.append(f"deltas: {'the same bytes' if len(shas) == 1 else 'DIFFERENT'} "
                      f"(sha256 {', '.join(sorted(s[:16] for s in shas))}); old tar inflated "
                      f"by the encoder: baseline {runs['baseline'][0]['inflated']}, this tree "
                      f"{runs['this tree'][0]['inflated']}")

    print(f"load average {os.getloadavg()[0]:.1f} (2 cores shared: wall is noisy, CPU less)")
    print(f"archive {len(new_b):,} bytes; full build {full[0]:.2f} s CPU, {full[1]:.2f} s wall\n")
    print("| step | CPU s | wall s | CPU × full build | wire bytes | % of archive |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, r in rows.items():
        for step in ("encode", "apply"):
            c, w = r[step]
            wire = f"{r['delta']:,}" if step == "encode" else ""
            pct = f"{100 * r['delta'] / len(new_b):.3f}" if step == "encode" else ""
            print(f"| {step} ({label}) | {c:.3f} | {w:.3f} | {c / full[0]:.3f} | {wire} | {pct} |")
        for t, runs in r.get("threads", {}).items():  # type: ignore[attr-defined]
            cpu, wall, own = (sorted(x[i] for x in runs) for i in range(3))
            mid = len(runs) // 2
            print(f"| apply ({label}, threads={t}; best / median) | {cpu[0]:.3f} / {cpu[mid]:.3f} "
                  f"| {wall[0]:.3f} / {wall[mid]:.3f} | {cpu[0] / full[0]:.3f} | calling "
                  f"thread {own[0]:.3f} / {own[mid]:.3f} s CPU | |")
        if not r["same"]:
            print(f"| ({label}: the applied archive differs from the built one!) |")
    print(f"| rolling delta (signature + delta) | {roll[0]:.3f} | {roll[1]:.3f} | "
          f"{roll[0] / full[0]:.3f} | {roll_bytes:,} | {100 * roll_bytes / len(new_b):.3f} |")
    for note in seek_notes:
        print(note)
    for line in versus:
        print(line)


if __name__ == "__main__":
    main()
