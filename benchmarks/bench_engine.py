"""deltabkp's delta engine side by side with librsync's ``rdiff``, in the same run.

    python benchmarks/bench_engine.py [--repeat N] [--sweep]

Builds (once) a realistic archive pair (``benchmarks/engine_data.py``: the Python standard
library, a ~1% change set, deterministic tar, ``gzip --rsyncable``) and an unrelated pair of
random files, then times each step: ``rdiff`` as wall time of the real command (files in the
page cache), ``deltabkp`` in-process with inputs in memory.  Prints throughput (MB/s of the
base for signature, of the new file for delta and patch), the ratio to rdiff, and the sizes
of signatures and deltas.  ``--sweep`` also tabulates sizes per block size (the measurement
behind ``default_block_size``).  Best of ``--repeat`` runs; asserts nothing about time.

The rdiff-format rows run ``deltabkp.rdiff`` (librsync's formats, rdiff's defaults:
RabinKarp + BLAKE2b, whole 32-byte strong sums, the same block length as rdiff) on the same
files: our signature (checked byte-identical to rdiff's), our delta from rdiff's signature
(checked with ``rdiff patch``), and our patch of rdiff's delta, each against the rdiff command
doing the same step.  The "one thread" rows pass ``threads=0``: the default hashes on the
calling thread and helpers (one per further core), so the two show what the second core adds
and what the code alone saves.  The load average is printed before and after: with other
work on the machine the helpers find no idle core and the wall-time ratios drop toward the
CPU-time ones.  The header names the BLAKE2b in use (``deltabkp/engine/_blake2.py``:
libsodium, libb2 or hashlib; ``DELTABKP_BLAKE2=hashlib|sodium|b2`` picks one).

Measured (2-vCPU VM, rdiff 2.3.2, libsodium, 30 MB archive pair, --repeat 3, quiet machine,
load 1.0-1.2, 2026-11-30): rdiff-format signature 2.19-2.69x rdiff, delta 2.29-2.55x; on one
thread 1.55-1.63x and 1.80-1.86x (BLAKE2b alone is ~38 ms of a ~47 ms signature, so the 2x
needs the second core).  What made the threaded rows scale: the BLAKE2b of a task's blocks is
one call of the C loop (``deltabkp/engine/_blockloop.c``, the GIL released); the same minute
with ``DELTABKP_BLAKE2_LOOP=ctypes`` (a ctypes call per block, the GIL handed back and forth
between the threads around each, ~25 ms per 30 MB) gave 1.80x and 1.56x.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine_data  # noqa: E402

import deltabkp  # noqa: E402

MB = 1e6


def best(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    result: Any = None
    times = []
    for _ in range(repeat):
        result = None
        gc.collect()
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def stream_delta(sig: bytes, new: bytes, chunk: int = 1 << 20) -> bytes:
    enc = deltabkp.DeltaEncoder(sig)
    mv = memoryview(new)
    parts = [enc.feed(mv[i : i + chunk]) for i in range(0, len(mv), chunk)]
    parts.append(enc.finish())
    return b"".join(parts)


def stream_patch(base: bytes, dlt: bytes, out_path: Path, chunk: int = 256 * 1024) -> None:
    patcher = deltabkp.Patcher(base)
    out_path.unlink(missing_ok=True)  # as for rdiff: a new file, not a truncated one
    with open(out_path, "wb") as f:
        for i in range(0, len(dlt), chunk):
            for piece in patcher.feed(dlt[i : i + chunk]):
                f.write(piece)
        patcher.finish()


def stream_rdiff_delta(sig: bytes, new: bytes, chunk: int = 1 << 20) -> bytes:
    enc = deltabkp.rdiff.DeltaEncoder(sig)
    mv = memoryview(new)
    parts = [enc.feed(mv[i : i + chunk]) for i in range(0, len(mv), chunk)]
    parts.append(enc.finish())
    return b"".join(parts)


def stream_signature(base: bytes, chunk: int = 1 << 20) -> bytes:
    b = deltabkp.SignatureBuilder(base_size=len(base))
    mv = memoryview(base)
    for i in range(0, len(mv), chunk):
        b.feed(mv[i : i + chunk])
    return b.finish()


COLD_PATCH = """
import sys, time, deltabkp
base = open(sys.argv[1], "rb").read()
dlt = open(sys.argv[2], "rb").read()
t0 = time.perf_counter()
out = deltabkp.patch(base, dlt)
print(time.perf_counter() - t0)
"""


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) plus that of its finished children."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def row(step: str, n: int, t_rdiff: float | None, t_ours: float) -> str:
    ours = n / t_ours / MB
    if t_rdiff is None:
        return f"| {step:<34} | {'':>12} | {ours:>8.0f} MB/s ({t_ours * 1e3:6.1f} ms) | {'':>6} |"
    theirs = n / t_rdiff / MB
    return (
        f"| {step:<34} | {theirs:>5.0f} MB/s ({t_rdiff * 1e3:5.1f} ms) "
        f"| {ours:>8.0f} MB/s ({t_ours * 1e3:6.1f} ms) | {ours / theirs:5.2f}x |"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sweep", action="store_true", help="also tabulate sizes per block size")
    args = ap.parse_args()
    if shutil.which("rdiff") is None:
        print("rdiff not found (apt-get install rdiff)", file=sys.stderr)
        return 1
    paths = engine_data.build()
    base, new = paths["base"].read_bytes(), paths["new"].read_bytes()
    ubase, unew = paths["ubase"].read_bytes(), paths["unew"].read_bytes()
    rep = args.repeat
    from deltabkp.engine import _blake2  # the BLAKE2b in use, named in the header

    tmp = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    try:
        version = subprocess.run(["rdiff", "--version"], capture_output=True, text=True)
        print(f"# {version.stdout.splitlines()[0]} vs deltabkp {deltabkp.__version__}, "
              f"python {sys.version.split()[0]}, {os.cpu_count()} cpus")
        print(f"# load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
              f"deltabkp.rdiff helper threads: {deltabkp.rdiff.default_threads()}, "
              f"BLAKE2b from {_blake2.implementation()} ({_blake2.loop() or '-'} loop)")
        print(f"# archive pair: base {len(base):,} B, new {len(new):,} B "
              f"(stdlib tree, ~1% change set, gzip --rsyncable); unrelated pair: "
              f"{len(unew):,} B random each; best of {rep} interleaved rounds")
        rs_sig, rs_delta, rs_out = tmp / "r.sig", tmp / "r.delta", tmp / "r.out"
        ru_sig, ru_delta = tmp / "u.sig", tmp / "u.delta"
        b, n, ub, un = (str(paths[k]) for k in ("base", "new", "ubase", "unew"))
        subprocess.run(["rdiff", "signature", ub, str(ru_sig)], check=True)
        sig = deltabkp.signature(base)
        dlt = deltabkp.delta(sig, new)
        usig = deltabkp.signature(ubase)
        (tmp / "cold.delta").write_bytes(dlt)
        # rdiff's own signatures and delta, as the rdiff-format rows' inputs.
        subprocess.run(["rdiff", "signature", b, str(rs_sig)], check=True)
        subprocess.run(["rdiff", "delta", str(rs_sig), n, str(rs_delta)], check=True)
        rsig, ursig, rdlt = rs_sig.read_bytes(), ru_sig.read_bytes(), rs_delta.read_bytes()
        reuse = bytearray(len(new))

        def run_rdiff(*cmd: str) -> Callable[[], None]:
            def once() -> None:
                Path(cmd[-1]).unlink(missing_ok=True)  # rdiff refuses to overwrite
                subprocess.run(["rdiff", *cmd], check=True)
            return once

        def cold() -> float:
            r = subprocess.run([sys.executable, "-c", COLD_PATCH, b, str(tmp / "cold.delta")],
                               check=True, capture_output=True, text=True)
            return float(r.stdout)

        jobs: dict[str, Callable[[], Any]] = {
            "r.sig": run_rdiff("signature", b, str(rs_sig)),
            "sig": lambda: deltabkp.signature(base),
            "ssig": lambda: stream_signature(base),
            "r.delta": run_rdiff("delta", str(rs_sig), n, str(rs_delta)),
            "delta": lambda: deltabkp.delta(sig, new),
            "sdelta": lambda: stream_delta(sig, new),
            "r.patch": run_rdiff("patch", b, str(rs_delta), str(rs_out)),
            "patch": lambda: deltabkp.patch(base, dlt),
            "cold": cold,  # times itself inside the fresh process
            "patch.out": lambda: deltabkp.patch(base, dlt, out=reuse),
            "spatch": lambda: stream_patch(base, dlt, tmp / "o"),
            "r.udelta": run_rdiff("delta", str(ru_sig), un, str(ru_delta)),
            "udelta": lambda: deltabkp.delta(usig, unew),
            # librsync's formats: the same rdiff commands above are the reference.
            "rd.sig": lambda: deltabkp.rdiff.signature(base),
            "rd.sig1": lambda: deltabkp.rdiff.signature(base, threads=0),
            "rd.delta": lambda: deltabkp.rdiff.delta(rsig, new),
            "rd.delta1": lambda: deltabkp.rdiff.delta(rsig, new, threads=0),
            "rd.sdelta": lambda: stream_rdiff_delta(rsig, new),
            "rd.patch": lambda: deltabkp.rdiff.patch(base, rdlt),
            "rd.udelta": lambda: deltabkp.rdiff.delta(ursig, unew),
        }
        # Rounds interleave every step, so a burst of load elsewhere hits both tools alike.
        times: dict[str, list[float]] = {k: [] for k in jobs}
        # CPU seconds of all threads (ours) or of the child process (rdiff): on a loaded
        # machine they say more about the work done than wall time does.
        cpu: dict[str, list[float]] = {k: [] for k in jobs}
        for _ in range(rep):
            for key, fn in jobs.items():
                gc.collect()
                c0 = cpu_seconds()
                t0 = time.perf_counter()
                got = fn()
                elapsed = time.perf_counter() - t0
                cpu[key].append(cpu_seconds() - c0)
                times[key].append(got if key == "cold" else elapsed)
                del got
        t = {k: min(v) for k, v in times.items()}
        t_rsig, t_sig, t_ssig = t["r.sig"], t["sig"], t["ssig"]
        t_rdelta, t_delta, t_sdelta = t["r.delta"], t["delta"], t["sdelta"]
        t_rpatch, t_patch, t_cold = t["r.patch"], t["patch"], t["cold"]
        t_rpatch_buf, t_spatch = t["patch.out"], t["spatch"]
        t_rudelta, t_udelta = t["r.udelta"], t["udelta"]
        # rdiff format: same bytes as rdiff, and rdiff itself applies our delta.
        assert deltabkp.rdiff.signature(base) == rs_sig.read_bytes()
        assert deltabkp.rdiff.signature(base, threads=0) == rs_sig.read_bytes()
        assert deltabkp.rdiff.signature(ubase) == ursig
        rd_delta = deltabkp.rdiff.delta(rsig, new)
        assert stream_rdiff_delta(rsig, new) == rd_delta
        assert deltabkp.rdiff.delta(rsig, new, threads=0) == rd_delta
        (tmp / "rd.delta").write_bytes(rd_delta)
        subprocess.run(["rdiff", "-f", "patch", b, str(tmp / "rd.delta"), str(tmp / "rd.out")],
                       check=True)
        assert (tmp / "rd.out").read_bytes() == new
        assert deltabkp.rdiff.patch(base, rs_delta.read_bytes()) == new
        rd_udelta = deltabkp.rdiff.delta(ursig, unew)
        assert deltabkp.rdiff.patch(ubase, rd_udelta) == unew
        # The outputs are right (the timed runs above discard them).
        assert stream_signature(base) == sig and stream_delta(sig, new) == dlt
        assert bytes(deltabkp.patch(base, dlt)) == new
        assert (tmp / "o").read_bytes() == new and rs_out.read_bytes() == new
        udlt = deltabkp.delta(usig, unew)
        assert bytes(deltabkp.patch(ubase, udlt)) == unew
        r_magic, r_block, r_strong = struct.unpack(">III", rs_sig.read_bytes()[:12])
        r_kind = {0x72730136: "rollsum + MD4", 0x72730137: "rollsum + BLAKE2",
                  0x72730146: "rabinkarp + MD4", 0x72730147: "rabinkarp + BLAKE2"}.get(
                      r_magic, hex(r_magic))
        r_sig_size, r_delta_size = rs_sig.stat().st_size, rs_delta.stat().st_size
        parsed = deltabkp.Signature.parse(sig)

        print()
        print(f"| {'step':<34} | {'rdiff':>24} | {'deltabkp':>26} | ratio  |")
        print(f"|{'-' * 36}|{'-' * 26}|{'-' * 28}|{'-' * 8}|")
        print(row("signature (archive)", len(base), t_rsig, t_sig))
        print(row("  signature, 1 MiB feeds", len(base), t_rsig, t_ssig))
        print(row("delta (archive, ~1% change)", len(new), t_rdelta, t_delta))
        print(row("  delta, 1 MiB feeds", len(new), t_rdelta, t_sdelta))
        print(row("patch (archive), in memory", len(new), t_rpatch, t_patch))
        print(row("  patch, first call in a new process", len(new), t_rpatch, t_cold))
        print(row("  patch into a reused buffer (out=)", len(new), t_rpatch, t_rpatch_buf))
        print(row("  patch, 256 KiB feeds -> file", len(new), t_rpatch, t_spatch))
        print(row("delta (unrelated data)", len(unew), t_rudelta, t_udelta))
        print(f"| {'rdiff format (deltabkp.rdiff)':<34} | {'':>24} | {'':>26} |        |")
        print(row("  signature (archive)", len(base), t_rsig, t["rd.sig"]))
        print(row("    signature, one thread", len(base), t_rsig, t["rd.sig1"]))
        print(row("  delta (archive, rdiff's sig)", len(new), t_rdelta, t["rd.delta"]))
        print(row("    delta, one thread", len(new), t_rdelta, t["rd.delta1"]))
        print(row("    delta, 1 MiB feeds", len(new), t_rdelta, t["rd.sdelta"]))
        print(row("  patch of rdiff's delta, in memory", len(new), t_rpatch, t["rd.patch"]))
        print(row("  delta (unrelated data)", len(unew), t_rudelta, t["rd.udelta"]))
        print()
        c = {k: min(v) * 1e3 for k, v in cpu.items()}
        print("| CPU time, all threads (ms)         | rdiff | deltabkp | ratio |")
        print("|------------------------------------|------:|---------:|------:|")
        for label, theirs_key, ours_key in (
            ("signature (archive)", "r.sig", "sig"),
            ("delta (archive)", "r.delta", "delta"),
            ("rdiff format: signature (archive)", "r.sig", "rd.sig"),
            ("rdiff format: signature, 1 thread", "r.sig", "rd.sig1"),
            ("rdiff format: delta (archive)", "r.delta", "rd.delta"),
            ("rdiff format: delta, 1 thread", "r.delta", "rd.delta1"),
            ("rdiff format: delta, 1 MiB feeds", "r.delta", "rd.sdelta"),
            ("rdiff format: delta (unrelated)", "r.udelta", "rd.udelta"),
        ):
            print(f"| {label:<34} | {c[theirs_key]:5.0f} | {c[ours_key]:8.0f} | "
                  f"{c[theirs_key] / c[ours_key]:4.2f}x |")
        print()
        print("| sizes (archive pair)          |      rdiff |   deltabkp | ratio |")
        print("|-------------------------------|-----------:|-----------:|------:|")
        for what, theirs, ours in (
            ("signature", r_sig_size, len(sig)),
            ("delta", r_delta_size, len(dlt)),
            ("signature + delta", r_sig_size + r_delta_size, len(sig) + len(dlt)),
            ("delta (unrelated)", ru_delta.stat().st_size, len(udlt)),
            ("rdiff-format delta", r_delta_size, len(rd_delta)),
            ("rdiff-fmt delta (unrelated)", ru_delta.stat().st_size, len(rd_udelta)),
        ):
            print(f"| {what:<29} | {theirs:>10,} | {ours:>10,} | {ours / theirs:5.2f} |")
        print()
        print(f"# rdiff defaults: block {r_block} B, sums {r_kind}: 4 B weak + {r_strong} B "
              f"strong per block")
        print(f"# deltabkp: block {parsed.block_size} B (default_block_size), weak poly32 4 B, "
              f"strong XXH3-128 truncated to {parsed.strong_len} B, END blake3-256")
        rd_parsed = deltabkp.rdiff.Signature.parse(deltabkp.rdiff.signature(base))
        print(f"# deltabkp.rdiff: block {rd_parsed.block_size} B, {rd_parsed.kind.label}, "
              f"strong {rd_parsed.strong_len} B: the same parameters as rdiff's")
        print(f"# load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

        if args.sweep:
            print()
            print("| block size | signature | delta   | sig + delta | delta MB/s |")
            print("|-----------:|----------:|--------:|------------:|-----------:|")
            for bs in (1024, 2048, 4096, 8192, 16384, r_block):
                s = deltabkp.signature(base, bs)
                ts, d = best(lambda s=s: deltabkp.delta(s, new), 1)  # type: ignore[misc]
                print(f"| {bs:>10} | {len(s):>9,} | {len(d):>7,} | {len(s) + len(d):>11,} "
                      f"| {len(new) / ts / MB:>10.0f} |")
            rd = tmp / "sweep.delta"
            for bs in (1024, 2048, 4096, 8192):
                rs = tmp / f"sweep{bs}.sig"
                subprocess.run(["rdiff", "-b", str(bs), "signature", str(paths["base"]), str(rs)],
                               check=True)
                rd.unlink(missing_ok=True)
                subprocess.run(["rdiff", "delta", str(rs), str(paths["new"]), str(rd)], check=True)
                print(f"# rdiff -b {bs}: signature {rs.stat().st_size:,}, "
                      f"delta {rd.stat().st_size:,}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
