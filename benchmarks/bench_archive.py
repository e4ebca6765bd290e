"""The archive side by side with tar | gzip --rsyncable and pigz --rsyncable, in the same run.

    python benchmarks/bench_archive.py [--repeat N] [--skip-build]

Trees (``benchmarks/archive_data.py``, built once under ``benchmarks/_work/archive/``): a real
~107 MB source tree, a copy with a ~1% change set, and a 24,000-file tree.  Prints

1. build throughput (MB/s of uncompressed tar) and size: deltabkp (2 worker threads and 0),
   ``tar --sort=name -c | gzip -6 -n --rsyncable``, ``tar --sort=name -c | pigz -6 -n
   --rsyncable`` (all cores); and deltabkp's size against ``gzip -6 -n`` of the same tar;
2. delta size between the archives of the tree before and after the change set, with the
   project's engine and with ``rdiff``, as a fraction of the new archive (and the same for
   gzip --rsyncable and plain gzip -6 archives, for reference);
3. the quick check (``tree_fingerprint``) against a full build of the 24,000-file tree.

Wall times, best of ``--repeat``; files in the page cache; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import archive_data  # noqa: E402

import deltabkp  # noqa: E402

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
            for chunk in b:
                f.write(chunk)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
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
