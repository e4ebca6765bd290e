"""The archive side by side with tar | gzip --rsyncable and pigz --rsyncable, in the same run.

    python benchmarks/bench_archive.py [--repeat N] [--skip-build]
    python benchmarks/bench_archive.py --incremental [--repeat N]
    python benchmarks/bench_archive.py --racy
    python benchmarks/bench_archive.py --deflaters [--repeat N]

Trees (``benchmarks/archive_data.py``, built once under ``benchmarks/_work/archive/``): a real
~107 MB source tree, a copy with a ~1% change set, and a 24,000-file tree.  Prints

1. build throughput (MB/s of uncompressed tar) and size: deltabkp (2 worker threads and 0),
   ``tar --sort=name -c | gzip -6 -n --rsyncable``, ``tar --sort=name -c | pigz -6 -n
   --rsyncable`` (all cores); and deltabkp's size against ``gzip -6 -n`` of the same tar;
2. delta size between the archives of the tree before and after the change set, with the
   project's engine and with ``rdiff``, as a fraction of the new archive (and the same for
   gzip --rsyncable and plain gzip -6 archives, for reference);
3. the quick check (``tree_fingerprint``) against a full build of the 24,000-file tree.

``--incremental`` instead: a copy of the ~107 MB tree is built once (``IncrementalBuilder``,
index kept), then changed in place by the same ~1% change set; the next build from the
previous one's index and archive is timed against a fresh ``TgzBuilder`` of the same state
(byte-identity checked), as is a rebuild of the unchanged tree.  ``--racy``: five
incremental builds in a row of a copy of that tree with a file appended every 100 ms,
against a full build, each checked against a fresh build of what it captured.
``--deflaters``: CPU seconds of each step of a full build over the tar of the ~107 MB tree
(cut finding: numpy's and, when built, C's, the one the build uses marked; the format's
deflate — version 3: zlib -6 tuned, through ctypes — and version 2's, Python's zlib -6, both
with the format's sync flushes, plain deflate) next to ``tar | pigz --rsyncable``, and version
2's deflate with zlib-ng and ISA-L where installed (``pip install zlib-ng isal``; not
dependencies): their size against pigz's and whether a compressor primed with ``zdict`` emits
what a continuing one does (the format needs it: docs/formats.md); fewer flushes and other
levels (format options); then the full build against ``tar | pigz -6 --rsyncable``,
alternating, ``max(--repeat, 5)`` rounds: wall, CPU, ratios, and where the
build's threads spent their time (Linux ``/proc/.../schedstat``).

Wall times, best of ``--repeat``; files in the page cache; asserts nothing.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import archive_data

import deltabkp

OUT = archive_data.WORK.parent / "archive-out"


def best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def ours(tree: Path, out: Path, threads: int = 2) -> Callable[[], object]:
    def run() -> object:
        with open(out, "wb") as f:
            b = deltabkp.TgzBuilder(tree, threads=threads)
            f.writelines(b)
        return b.report
    return run


def shell(cmd: str) -> Callable[[], object]:
    return lambda: subprocess.run(cmd, shell=True, check=True)


def size(p: Path) -> int:
    return p.stat().st_size


def rdiff_delta(base: Path, new: Path) -> int:
    sig, dl = OUT / "rdiff.sig", OUT / "rdiff.delta"
    for p in (sig, dl):
        p.unlink(missing_ok=True)
    subprocess.run(["rdiff", "signature", str(base), str(sig)], check=True)
    subprocess.run(["rdiff", "delta", str(sig), str(new), str(dl)], check=True)
    return size(dl)


def engine_delta(base: Path, new: Path) -> int:
    a, b = base.read_bytes(), new.read_bytes()
    d = deltabkp.delta(deltabkp.signature(a), b)
    assert bytes(deltabkp.patch(a, d)) == b
    return len(d)


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Best wall time and best CPU time (all threads) of ``repeat`` runs: on a shared
    machine the CPU time is the steadier of the two."""
    walls, cpus = [], []
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return min(walls), min(cpus)


def incremental(repeat: int) -> None:
    import random
    import shutil

    from deltabkp.archive import ArchiveIndex, IncrementalBuilder
    from deltabkp.archive._walk import RACY_NS

    base = archive_data.trees()["base"]
    OUT.mkdir(parents=True, exist_ok=True)
    tree, prev = OUT / "inc-tree", OUT / "inc-prev.tgz"
    if tree.exists():
        shutil.rmtree(tree)
    shutil.copytree(base, tree, symlinks=True)
    time.sleep(RACY_NS / 1e9 + 0.1)  # the copy's ctimes are racy until then
    print(f"tree: copy of {base} | cores: {os.cpu_count()}  load: {os.getloadavg()[0]:.2f}")

    def build(index: ArchiveIndex | None, out: Path) -> IncrementalBuilder:
        b = IncrementalBuilder(tree, previous=index, previous_archive=prev if index else None)
        with open(out, "wb") as f:
            f.writelines(b)
        return b

    def show(name: str, t: tuple[float, float], ref: tuple[float, float]) -> None:
        print(f"   {name:34} wall {t[0]:6.2f} s ({ref[0] / t[0]:5.1f}x, ratio {t[0] / ref[0]:.3f})"
              f"   cpu {t[1]:6.2f} s ({ref[1] / t[1]:5.1f}x, ratio {t[1] / ref[1]:.3f})")

    first: list[IncrementalBuilder] = []
    t_first = timed(lambda: first.append(build(None, prev)), 1)
    index = first[-1].index
    t_fresh0 = timed(ours(tree, OUT / "inc-fresh0.tgz"), repeat)
    same0 = prev.read_bytes() == (OUT / "inc-fresh0.tgz").read_bytes()
    tar = first[-1].report.bytes_in
    print(f"\nfull builds ({tar / 1e6:.1f} MB of tar, {first[-1].report.files} files, "
          f"archive {prev.stat().st_size:,} bytes, index {len(index.encode()):,} bytes)")
    show("TgzBuilder", t_fresh0, t_fresh0)
    show("IncrementalBuilder, no previous", t_first, t_fresh0)
    print(f"   identical: {same0}")

    nothing: list[IncrementalBuilder] = []
    t_same = timed(lambda: nothing.append(build(index, OUT / "inc-same.tgz")), repeat)
    same1 = prev.read_bytes() == (OUT / "inc-same.tgz").read_bytes()
    print("\nunchanged tree (e.g. after a racy quick check):")
    show("IncrementalBuilder from previous", t_same, t_fresh0)
    print(f"   identical: {same1}   {nothing[-1].stats}")

    # Not settled afterwards: resetting every mtime would change every ctime (a full build).
    counts = archive_data.change_set(tree, random.Random(archive_data.SEED))
    time.sleep(RACY_NS / 1e9 + 0.1)
    changed: list[IncrementalBuilder] = []
    t_inc = timed(lambda: changed.append(build(index, OUT / "inc-new.tgz")), repeat)
    t_fresh = timed(ours(tree, OUT / "inc-fresh.tgz"), repeat)
    same2 = (OUT / "inc-new.tgz").read_bytes() == (OUT / "inc-fresh.tgz").read_bytes()
    s = changed[-1].stats
    print(f"\nafter the ~1% change set {counts}:")
    show("TgzBuilder", t_fresh, t_fresh)
    show("IncrementalBuilder from previous", t_inc, t_fresh)
    print(f"   identical: {same2}")
    print(f"   files opened {s.files_opened} (+{s.files_peeked} run tails read again) of "
          f"{changed[-1].report.files}, entries reused {s.entries_reused}, tar compressed "
          f"{s.bytes_compressed / 1e6:.2f} MB, deflate copied {s.bytes_copied / 1e6:.2f} MB, "
          f"tar inflated {s.bytes_inflated / 1e6:.2f} MB")
    print(f"   tar of changed files matched {s.bytes_matched / 1e6:.2f} MB")
    print("   " + format_minimum(index, changed[-1].index, prev, OUT / "inc-new.tgz"))
    shutil.rmtree(tree)


def format_minimum(old: Any, new: Any, old_tgz: Path, new_tgz: Path) -> str:
    """What the format forces an incremental build to compress, from the two archives and
    their indexes (docs/formats.md "Archive index"): for each changed spot, from the last
    cut before it to the first cut both streams share ≥ 32 KiB after its last changed byte
    (spots closer than that merge).  Changed spots: the differing bytes of each entry
    against its old version at the same path (common prefix and suffix; a big file of the
    same size compared 4 KiB block by block at the same in-file offsets), added entries,
    and where old entries were removed or moved."""
    import bisect
    import zlib

    import numpy as np

    ot, nt = (zlib.decompress(p.read_bytes(), 31) for p in (old_tgz, new_tgz))
    ocuts = set(old.segments.tar_ends.tolist())
    ncuts = new.segments.tar_ends.tolist()
    olds = {e.path: e for e in old.entries}
    news = list(new.entries)

    def pad(n: int) -> int:
        return n + (-n % 512)

    def same(e: Any) -> bool:
        o = olds.get(e.path)
        return o is not None and ot[o.tar_start : o.tar_end] == nt[e.tar_start : e.tar_end]

    spots: list[tuple[int, int, int | None]] = []  # new [a, b), old - new offset after b
    prev_end = 0
    for e in news:
        o = olds.get(e.path)
        if o is None:
            spots.append((e.tar_start, e.tar_end, None))
            prev_end = -1
            continue
        if o.tar_start != prev_end:
            spots.append((e.tar_start, e.tar_start, o.tar_start - e.tar_start))
        prev_end = o.tar_end
        ob, nb = ot[o.tar_start : o.tar_end], nt[e.tar_start : e.tar_end]
        if ob == nb:
            continue
        if o.kind == 1 and e.size == o.size >= 1 << 17:
            hn, ho = len(nb) - pad(e.size), len(ob) - pad(o.size)
            shift = o.tar_start + ho - e.tar_start - hn
            spots.append((e.tar_start, e.tar_start + hn, shift))
            n = e.size // 4096 * 4096
            a = np.frombuffer(nb, np.uint8, n, hn).reshape(-1, 4096)
            b = np.frombuffer(ob, np.uint8, n, ho).reshape(-1, 4096)
            for k in np.flatnonzero((a != b).any(axis=1)).tolist():
                at = e.tar_start + hn + k * 4096
                spots.append((at, at + 4096, shift))
            if nb[hn + n :] != ob[ho + n :]:
                spots.append((e.tar_start + hn + n, e.tar_end, o.tar_end - e.tar_end))
            continue
        m = min(len(ob), len(nb))
        p = len(os.path.commonprefix([ob, nb]))
        q = len(os.path.commonprefix([ob[::-1][: m - p], nb[::-1][: m - p]]))
        spots.append((e.tar_start + p, e.tar_end - q, o.tar_end - e.tar_end))
    spots.sort()
    stretches: list[list[int]] = []  # [lo, hi, changed bytes]
    for i, (a, b, shift) in enumerate(spots):
        if shift is None:  # after an added entry: the offset of the next unchanged one
            nxt = next((e for e in news if e.tar_start >= b and same(e)), None)
            shift = olds[nxt.path].tar_start - nxt.tar_start if nxt is not None else 0
        bound = spots[i + 1][0] if i + 1 < len(spots) else len(nt)
        lo = ncuts[bisect.bisect_right(ncuts, a) - 1] if ncuts and ncuts[0] <= a else 0
        j = bisect.bisect_left(ncuts, b + 32768)
        while j < len(ncuts) and ncuts[j] <= bound and ncuts[j] + shift not in ocuts:
            j += 1
        hi = ncuts[j] if j < len(ncuts) and ncuts[j] <= bound else bound
        if stretches and lo <= stretches[-1][1]:
            stretches[-1][1] = max(stretches[-1][1], hi)
            stretches[-1][2] += b - a
        else:
            stretches.append([lo, hi, b - a])
    total = sum(hi - lo for lo, hi, _ in stretches)
    changed = sum(d for _, _, d in stretches)
    return (f"the format's minimum: {total / 1e6:.3f} MB of tar in {len(stretches)} stretches "
            f"around {len(spots)} changed spots ({changed / 1e6:.3f} MB of changed bytes; "
            f"the rest is the 32 KiB windows after them and segment edges)")


def racy(rounds: int = 5) -> None:
    """A file appended every 100 ms while the tree is backed up ``rounds`` times in a row:
    each incremental build against one full build; each archive checked against a fresh
    build of what it captured (the appender paused, the log put back to its captured
    length and mtime)."""
    import io
    import random
    import shutil
    import tarfile
    import threading

    from deltabkp.archive import ArchiveIndex, IncrementalBuilder
    from deltabkp.archive._walk import RACY_NS

    base = archive_data.trees()["base"]
    OUT.mkdir(parents=True, exist_ok=True)
    tree, prev = OUT / "racy-tree", OUT / "racy-prev.tgz"
    if tree.exists():
        shutil.rmtree(tree)
    shutil.copytree(base, tree, symlinks=True)
    log_file = tree / "app.log"
    log_file.write_bytes(b"")
    time.sleep(RACY_NS / 1e9 + 0.1)
    print(f"tree: copy of {base}, {log_file.name} appended every 100 ms | cores: "
          f"{os.cpu_count()}  load: {os.getloadavg()[0]:.2f}")
    first = IncrementalBuilder(tree)
    prev.write_bytes(b"".join(first))
    index = first.index
    t_full = timed(ours(tree, OUT / "racy-fresh.tgz"), 1)
    print(f"   full build (TgzBuilder): wall {t_full[0]:.2f} s  cpu {t_full[1]:.2f} s")

    running = threading.Event()
    stop = threading.Event()
    lines = [0]
    rng = random.Random(1)

    def append() -> None:
        while not stop.is_set():
            if running.is_set():
                with open(log_file, "ab") as f:
                    f.write(b"%d %s\n" % (lines[0], b"x" * rng.randrange(200)))
                lines[0] += 1
            time.sleep(0.1)

    appender = threading.Thread(target=append, daemon=True)
    appender.start()
    try:
        for n in range(rounds):
            running.set()
            time.sleep(1.0)
            box: list[IncrementalBuilder] = []

            def inc(index: ArchiveIndex = index, box: list[IncrementalBuilder] = box) -> None:
                b = IncrementalBuilder(tree, previous=index, previous_archive=prev)
                box.append(b)
                (OUT / "racy-new.tgz").write_bytes(b"".join(b))

            t = timed(inc, 1)
            running.clear()
            time.sleep(0.3)  # the appender is idle now
            b = box[-1]
            data = (OUT / "racy-new.tgz").read_bytes()
            # Put the log back as this build captured it, and compare with a fresh build.
            with tarfile.open(fileobj=io.BytesIO(data)) as tf:
                m = tf.getmember("app.log")
                captured = tf.extractfile(m).read()  # type: ignore[union-attr]
            full = log_file.read_bytes()
            log_file.write_bytes(captured)
            entry = next(e for e in b.index.entries if e.path == "app.log")
            os.utime(log_file, ns=(entry.mtime_ns, entry.mtime_ns))
            same = b"".join(deltabkp.TgzBuilder(tree)) == data
            log_file.write_bytes(full)
            os.replace(OUT / "racy-new.tgz", prev)
            index = b.index
            s = b.stats
            print(f"   backup {n + 1}: wall {t[0]:.2f} s (ratio {t[0] / t_full[0]:.3f})  cpu {t[1]:.2f} s"
                  f" (ratio {t[1] / t_full[1]:.3f})  files read {s.files_opened}, entries reused "
                  f"{s.entries_reused}/{len(b.index.entries)}, log {len(captured):,} bytes; "
                  f"identical to a fresh build of what it captured: {same}")
    finally:
        stop.set()
        appender.join()
        shutil.rmtree(tree)


def deflaters(rounds: int = 5) -> None:
    import importlib
    import random
    import resource
    import zlib

    from deltabkp.archive import _gzip

    base = archive_data.trees()["base"]
    tar = subprocess.run(["tar", "--sort=name", "-cf", "-", "-C", str(base), "."],
                         capture_output=True, check=True).stdout

    def cpu(fn: Callable[[], object]) -> tuple[float, object]:
        c = time.process_time()
        r = fn()
        return time.process_time() - c, r

    def children_cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    step = _gzip.JOB_SIZE
    uses = _gzip.cut_finder()  # the first call runs the C scan's load check
    t_cuts: dict[str, float] = {}
    found: dict[str, object] = {}
    for impl in ("numpy", "C") if uses == "C" else ("numpy",):
        t_cuts[impl], found[impl] = cpu(functools.partial(_all_cuts, _gzip.CutFinder(impl), tar, step))
    cuts = found["numpy"]
    assert isinstance(cuts, list) and all(v == cuts for v in found.values())
    c0 = children_cpu()
    pigz = subprocess.run(f"tar --sort=name -cf - -C {base} . | pigz -6 -n --rsyncable | wc -c",
                          shell=True, capture_output=True, text=True, check=True)
    t_pigz, pigz_size = children_cpu() - c0, int(pigz.stdout)
    print(f"tar {len(tar) / 1e6:.1f} MB, {len(cuts)} cuts | cores {os.cpu_count()}, load "
          f"{os.getloadavg()[0]:.1f} (CPU seconds: steadier than wall time on a shared machine)")
    for impl, t in t_cuts.items():
        print(f"   {f'cut finding ({impl})':33} cpu {t:6.2f} s   {t / len(tar) * 1e9:.2f} ns a byte"
              + ("   (the build's)" if impl == uses else ""))
    if uses != "C":
        print("   cut finding (C): not built, turned off (DELTABKP_CUT_FINDER=numpy) or failed its check")
    print(f"   tar | pigz -6 --rsyncable (all)   cpu {t_pigz:6.2f} s   size {pigz_size:,}")
    t_plain, plain = cpu(lambda: zlib.compress(tar, 6))
    assert isinstance(plain, bytes)
    print(f"   zlib -6, no flushes               cpu {t_plain:6.2f} s   size {len(plain) / pigz_size:.4f} x pigz")
    # The format's deflate (version 3: zlib -6 tuned, through ctypes) next to format 2's
    # (Python's zlib -6 untuned) and other deflaters with the format's flushes.
    t, out = cpu(lambda: _gzip.compress_segments(tar, cuts, 6, True))
    assert isinstance(out, bytes)
    same = primed_equals_continuing(_gzip.compress_segments, tar, cuts, 6, random.Random(1))
    how = "C loop" if _gzip._deflate_library().loop is not None else "ctypes"
    print(f"   {'v3: zlib -6 tuned ' + ' '.join(map(str, _gzip.TUNE[6])) + ', ' + how:33} cpu {t:6.2f} s   "
          f"size {(len(out) + 18) / pigz_size:.4f} x pigz   primed == continuing: {same}")
    mods: list[tuple[str, object, tuple[int, ...]]] = [("zlib", zlib, (6,))]
    for name, mod, levels in (("zlib_ng.zlib_ng", "zlib-ng", (6, 7)), ("isal.isal_zlib", "isal", (3,))):
        try:
            mods.append((mod, importlib.import_module(name), levels))
        except ImportError:
            print(f"   {mod}: not installed")
    for label, mod, levels in mods:
        for level in levels:
            seg = functools.partial(module_segments, mod)
            t, out = cpu(lambda level=level, seg=seg: seg(tar, cuts, level, True))
            assert isinstance(out, bytes)
            same = primed_equals_continuing(seg, tar, cuts, level, random.Random(1))
            print(f"   {label + f' -{level}, sync flushes':33} cpu {t:6.2f} s   size "
                  f"{(len(out) + 18) / pigz_size:.4f} x pigz   primed == continuing: {same}")
    # Format options for a later version: fewer flushes (a flush at every k-th cut only:
    # segments k times longer), or another zlib level, with the format's flushes (v3's).
    for k in (2, 4, 16):
        t, out = cpu(functools.partial(_gzip.compress_segments, tar, cuts[k - 1 :: k], 6, True))
        assert isinstance(out, bytes)
        print(f"   {f'v3 -6, flush every {k}th cut':33} cpu {t:6.2f} s   size "
              f"{(len(out) + 18) / pigz_size:.4f} x pigz")
    # The format's split for a deflater whose primed compressor differs from a continuing
    # one: a fresh compressor per segment, primed with the 32 KiB before it.
    bounds = [0, *cuts, len(tar)]
    for label, mod, _levels in [m for m in mods if m[0] == "zlib-ng"]:
        t, parts = cpu(lambda mod=mod: [
            module_segments(mod, tar[a:b], [] if b == len(tar) else [b - a], 7, b == len(tar),
                            tar[max(0, a - _gzip.DICT_SIZE) : a])
            for a, b in itertools.pairwise(bounds)
        ])
        assert isinstance(parts, list)
        print(f"   {label + ' -7, fresh per segment':33} cpu {t:6.2f} s   size "
              f"{(sum(map(len, parts)) + 18) / pigz_size:.4f} x pigz")
    for level in (4, 5):
        t, out = cpu(functools.partial(_gzip.compress_segments, tar, cuts, level, True))
        assert isinstance(out, bytes)
        print(f"   {f'zlib -{level}, sync flushes':33} cpu {t:6.2f} s   size "
              f"{(len(out) + 18) / pigz_size:.4f} x pigz")
    full_build(base, rounds, tar)


def module_segments(mod: Any, data: bytes, cuts: list[int], level: int, final: bool,
                    zdict: bytes = b"") -> bytes:
    """Format 2's deflate with any zlib-like module: Python's zlib (format 2 itself),
    zlib-ng, ISA-L."""
    from deltabkp.archive import _libz

    return _libz.compressobj_segments(data, cuts, level, final, zdict, mod)


def primed_equals_continuing(seg: Callable[..., bytes], tar: bytes, cuts: list[int], level: int,
                             rng: Any) -> bool:
    """Grouping independence: two jobs split at a random cut, the second primed with the
    32 KiB before it, against one job (5 tries)."""
    from deltabkp.archive import _gzip

    same = True
    for _ in range(5):
        k = rng.randrange(1, min(400, len(cuts) - 1))
        n = min(400, len(cuts) - 1)
        whole = seg(tar[: cuts[n]], cuts[: n + 1], level, False)
        a = seg(tar[: cuts[k]], cuts[: k + 1], level, False)
        b = seg(tar[cuts[k] : cuts[n]], [c - cuts[k] for c in cuts[k + 1 : n + 1]], level, False,
                tar[max(0, cuts[k] - _gzip.DICT_SIZE) : cuts[k]])
        same = same and a + b == whole
    return same


def _all_cuts(finder: Any, data: bytes, step: int) -> list[int]:
    """``finder``'s cuts of ``data`` fed ``step`` bytes at a time (as the build's jobs)."""
    return [c for i in range(0, len(data), step) for c in finder.feed(data[i : i + step])]


def _schedstat() -> tuple[float, float]:
    """This thread's seconds on a CPU and waiting for one (Linux ``schedstat``)."""
    import threading

    with open(f"/proc/self/task/{threading.get_native_id()}/schedstat") as f:
        run, wait, _ = f.read().split()
    return int(run) / 1e9, int(wait) / 1e9


def full_build(base: Path, rounds: int, tar: bytes) -> None:
    """The whole build (``TgzBuilder``, 2 deflate threads) against ``tar | pigz -6
    --rsyncable``, alternating, ``rounds`` times: wall and CPU of each, the ratio of each
    round, and where the build's threads spent their time (from ``/proc``: on a CPU,
    waiting for one, asleep inside a deflate job — the GIL, between zlib calls —, and
    workers idle for want of a job: the iterating thread starving them).  Also, in each
    round, the gzip layer alone (``RsyncableGzip``, 2 threads) over the same tar held in
    memory: the build without the walk's Python on the iterating thread."""
    import resource
    import statistics
    import threading

    from deltabkp.archive import _gzip

    acc = {"busy": 0.0, "run": 0.0, "queue": 0.0}
    lock = threading.Lock()
    real = _gzip.compress_segments

    def probe(*args: Any, **kwargs: Any) -> bytes:
        w = time.perf_counter()
        r0, q0 = _schedstat()
        out = real(*args, **kwargs)
        r1, q1 = _schedstat()
        with lock:
            acc["busy"] += time.perf_counter() - w
            acc["run"] += r1 - r0
            acc["queue"] += q1 - q0
        return out

    rows: dict[str, list[tuple[float, float, int]]] = {"deltabkp": [], "pigz": [], "gzip layer": []}
    pieces = [tar[i : i + 100_000] for i in range(0, len(tar), 100_000)]
    threads: list[tuple[float, ...]] = []
    print(f"\nfull build of {base} against tar | pigz -6 --rsyncable, alternating, {rounds} rounds"
          f" | load {os.getloadavg()[0]:.1f}")
    for n in range(rounds):
        for acc_key in acc:
            acc[acc_key] = 0.0
        _gzip.compress_segments = probe
        try:
            w, c = time.perf_counter(), time.process_time()
            r0, q0 = _schedstat()
            size = sum(len(chunk) for chunk in deltabkp.TgzBuilder(base, threads=2))
            r1, q1 = _schedstat()
            w, c = time.perf_counter() - w, time.process_time() - c
        finally:
            _gzip.compress_segments = real
        rows["deltabkp"].append((w, c, size))
        threads.append((r1 - r0, q1 - q0, acc["run"], acc["queue"],
                        acc["busy"] - acc["run"] - acc["queue"], 2 * w - acc["busy"]))
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        w = time.perf_counter()
        out = subprocess.run(f"tar --sort=name -cf - -C {base} . | pigz -6 -n --rsyncable | wc -c",
                             shell=True, capture_output=True, text=True, check=True)
        w = time.perf_counter() - w
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        c = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        rows["pigz"].append((w, c, int(out.stdout)))
        w, c = time.perf_counter(), time.process_time()
        size = sum(len(chunk) for chunk in _gzip.RsyncableGzip(6, 2).compress(pieces))
        rows["gzip layer"].append((time.perf_counter() - w, time.process_time() - c, size))
        o, p, g = rows["deltabkp"][-1], rows["pigz"][-1], rows["gzip layer"][-1]
        print(f"   round {n + 1}: deltabkp wall {o[0]:5.2f} cpu {o[1]:5.2f} | pigz wall {p[0]:5.2f} "
              f"cpu {p[1]:5.2f} | pigz/deltabkp wall {p[0] / o[0]:.2f} cpu {p[1] / o[1]:.2f} | "
              f"gzip layer alone: wall {g[0]:5.2f} cpu {g[1]:5.2f} | load {os.getloadavg()[0]:.1f}")
    med = statistics.median
    for name, r in rows.items():
        print(f"   {name:9} wall median {med(x[0] for x in r):5.2f} s (min {min(x[0] for x in r):5.2f})"
              f"   cpu median {med(x[1] for x in r):5.2f} s (min {min(x[1] for x in r):5.2f})   size {r[0][2]:,}")
    pairs = list(zip(rows["deltabkp"], rows["pigz"]))
    walls = [b[0] / a[0] for a, b in pairs]
    print(f"   speed vs pigz (pigz time / ours, per round): wall median {med(walls):.2f}"
          f" (range {min(walls):.2f}-{max(walls):.2f}), cpu median {med(b[1] / a[1] for a, b in pairs):.2f};"
          f" size {pairs[0][0][2] / pairs[0][1][2]:.4f} x pigz")
    layer = [b[0] / a[0] for a, b in zip(rows["gzip layer"], rows["pigz"])]
    print(f"   the gzip layer alone over the tar in memory: pigz/it wall median {med(layer):.2f}"
          f" (range {min(layer):.2f}-{max(layer):.2f})")
    print("   build threads, median s: iterating thread on CPU / waiting for a CPU; deflate workers"
          " on CPU / waiting for a CPU / asleep in a job (GIL) / idle without a job:")
    print("   " + " / ".join(f"{med(t[i] for t in threads):.2f}" for i in range(6)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--incremental", action="store_true",
                    help="time an incremental build after the ~1%% change set instead")
    ap.add_argument("--racy", action="store_true",
                    help="time 5 incremental builds of a tree with a file appended every 100 ms")
    ap.add_argument("--deflaters", action="store_true",
                    help="CPU cost of each build step and of other deflaters, against pigz")
    args = ap.parse_args()
    if args.deflaters:
        deflaters(max(args.repeat, 5))
        return
    if args.incremental:
        incremental(args.repeat)
        return
    if args.racy:
        racy()
        return
    trees = archive_data.trees()
    OUT.mkdir(parents=True, exist_ok=True)
    base, new, many = trees["base"], trees["new"], trees["many"]
    print(f"tree: {base} | change set: {(archive_data.WORK / 'done').read_text().strip()}")
    print(f"cores: {os.cpu_count()}  load: {os.getloadavg()[0]:.2f}")

    # 1. throughput and size
    tar = f"tar --sort=name -cf - -C {base} ."
    rows = [
        ("deltabkp (2 threads)", ours(base, OUT / "ours.tgz", 2), OUT / "ours.tgz"),
        ("deltabkp (0 threads)", ours(base, OUT / "ours0.tgz", 0), OUT / "ours0.tgz"),
        ("tar | gzip -6 --rsyncable", shell(f"{tar} | gzip -6 -n --rsyncable > {OUT}/gzip.tgz"), OUT / "gzip.tgz"),
        ("tar | pigz -6 --rsyncable", shell(f"{tar} | pigz -6 -n --rsyncable > {OUT}/pigz.tgz"), OUT / "pigz.tgz"),
    ]
    report = ours(base, OUT / "ours.tgz")()
    assert isinstance(report, deltabkp.ArchiveReport)
    tar_bytes = report.bytes_in
    times = {name: best(fn, args.repeat) for name, fn, _ in rows}
    ref = times["tar | gzip -6 --rsyncable"]
    print(f"\n1. build ({tar_bytes / 1e6:.1f} MB of tar, {report.files} files)")
    print(f"   {'':28} {'s':>7} {'MB/s':>7} {'speed vs gzip':>14} {'size':>12}")
    for name, _, out in rows:
        t = times[name]
        print(f"   {name:28} {t:7.2f} {tar_bytes / t / 1e6:7.1f} {ref / t:13.2f}x {size(out):12,}")
    subprocess.run(f"zcat {OUT}/ours.tgz | gzip -6 -n > {OUT}/same-tar.gz", shell=True, check=True)
    print(f"   deltabkp size / gzip -6 of the same tar: {size(OUT / 'ours.tgz') / size(OUT / 'same-tar.gz'):.4f}")
    same = (OUT / "ours.tgz").read_bytes() == (OUT / "ours0.tgz").read_bytes()
    print(f"   2-thread and 0-thread archives byte-identical: {same}")

    # 2. deltas after a ~1% change set
    print("\n2. delta after the ~1% change set (delta / new archive)")
    ours(new, OUT / "ours-new.tgz")()
    subprocess.run(f"tar --sort=name -cf - -C {new} . | gzip -6 -n --rsyncable > {OUT}/gzip-new.tgz", shell=True, check=True)
    subprocess.run(f"tar --sort=name -cf - -C {base} . | gzip -6 -n > {OUT}/plain.tgz", shell=True, check=True)
    subprocess.run(f"tar --sort=name -cf - -C {new} . | gzip -6 -n > {OUT}/plain-new.tgz", shell=True, check=True)
    pairs = [
        ("deltabkp archive", OUT / "ours.tgz", OUT / "ours-new.tgz"),
        ("tar | gzip --rsyncable", OUT / "gzip.tgz", OUT / "gzip-new.tgz"),
        ("tar | gzip (plain)", OUT / "plain.tgz", OUT / "plain-new.tgz"),
    ]
    print(f"   {'':24} {'new size':>12} {'engine':>16} {'rdiff':>16}")
    for name, a, b in pairs:
        e, r = engine_delta(a, b), rdiff_delta(a, b)
        n = size(b)
        print(f"   {name:24} {n:12,} {e:9,} {e / n:6.2%} {r:9,} {r / n:6.2%}")

    # 3. quick check vs full build, 24,000 files
    nfiles = sum(len(f) for _, _, f in os.walk(many))
    fp = deltabkp.tree_fingerprint(many)
    t_fp = best(lambda: deltabkp.tree_fingerprint(many), max(3, args.repeat))
    t_build = best(ours(many, OUT / "many.tgz"), args.repeat)
    print(f"\n3. quick check on an unchanged tree of {nfiles:,} files (racy: {fp.racy})")
    print(f"   tree_fingerprint {t_fp * 1000:8.1f} ms   full build {t_build * 1000:8.1f} ms   "
          f"ratio {t_build / t_fp:.1f}x")


if __name__ == "__main__":
    main()
