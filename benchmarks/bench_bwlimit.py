"""Does ``--bwlimit`` hold on a real daemon pair?  The achieved rate of a first backup
(incompressible data, so the archive crosses the wire whole) against the cap, with the cap
set on the agent (``deltabkp-agent --bwlimit``), on the target (``ctl register --bwlimit``)
and, side by side in the same run, with no cap at all.

    python benchmarks/bench_bwlimit.py [--mib 30] [--rate 1M]

Real ``deltabkp-server`` and ``deltabkp-agent`` processes on 127.0.0.1 (TLS, the normal
path).  The rate is the agent's bytes on the wire (what the server received, counted below
TLS) over the execution's duration from the log, and also the slope of the bytes the server
reports while the backup runs (``progress``, written about once a second), between 10 % and
90 % of the transfer, so connection set-up and the build's start do not count.  The issue's
target: within 10 % of the cap.  Exit 1 if a capped run is outside it (a figure, not a
test: the machine's load can only make a capped run slower).
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from deltabkp import net, testing
from deltabkp.ctl._client import Client
from deltabkp_server.model import from_iso


def _slope(samples: list[tuple[float, int]], total: int) -> float:
    """Least-squares bytes/s over the samples between 10 % and 90 % of ``total``."""
    mid = [(t, b) for t, b in samples if 0.1 * total <= b <= 0.9 * total]
    if len(mid) < 3:
        return float("nan")
    n = len(mid)
    mt = sum(t for t, _ in mid) / n
    mb = sum(b for _, b in mid) / n
    var = sum((t - mt) ** 2 for t, _ in mid)
    return sum((t - mt) * (b - mb) for t, b in mid) / var if var else float("nan")


def _backup(client: Client, node: str, path: str, bwlimit: int | None) -> dict[str, Any]:
    """Register ``path`` (its first backup starts at once), follow it, return its figures."""

    async def run() -> dict[str, Any]:
        args: dict[str, Any] = {"node": node, "path": path, "every": "1d"}
        if bwlimit is not None:
            args["bwlimit"] = bwlimit
        await client.request("register", args)
        about = {"node": node, "path": path}
        samples: list[tuple[float, int]] = []
        seen = False
        while True:
            prog = await client.request("progress", about)
            if prog["running"]:
                seen = True
                samples.append((time.monotonic(), int(prog["transferred"])))
            elif seen or samples:
                break
            else:
                rows: list[Any] = []
                await client.stream("log", {**about, "limit": 1}, rows.extend)
                if rows and rows[0]["outcome"] is not None:
                    break
            await trio.sleep(0.25)
        rows = []
        await client.stream("log", {**about, "limit": 1}, rows.extend)
        row = rows[0]
        secs = from_iso(row["ended"]) - from_iso(row["started"])
        return {"row": row, "seconds": secs, "samples": samples}

    got = trio.run(run)
    row = got["row"]
    if row["outcome"] != "stored":
        sys.exit(f"backup of {path} ended {row['outcome']}: {row.get('error')}")
    received = int(row["bytes_received"])
    return {
        "bytes": received,
        "seconds": got["seconds"],
        "overall": received / got["seconds"],
        "steady": _slope(got["samples"], received),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=30, help="size of the tree, MiB (default 30)")
    ap.add_argument("--rate", default="1M", help="the cap (default 1M = 1 MiB/s)")
    opts = ap.parse_args()
    rate = net.parse_rate(opts.rate)
    with tempfile.TemporaryDirectory(prefix="bench-bwlimit-") as tmp:
        root = Path(tmp)
        key = root / "cluster.key"
        key.write_text(secrets.token_hex(32) + "\n")
        key.chmod(0o600)
        env = {**os.environ, "HOME": str(root / "home"), "PYTHONUNBUFFERED": "1"}
        trees = {}
        for name in ("agent-cap", "target-cap", "no-cap"):
            d = root / name
            d.mkdir()
            for i in range(opts.mib):  # incompressible: the tgz is as big as the data
                (d / f"{i:03d}.bin").write_bytes(os.urandom(1 << 20))
            trees[name] = str(d)

        def daemon(name: str, *argv: str) -> testing.Daemon:
            return testing.Daemon(
                [testing.console_script(name), "--listen", "127.0.0.1:0", "--key-file",
                 str(key), *argv], log=root / f"{name}-{len(argv)}.log", env=env,
                start_new_session=True,
            )

        with daemon("deltabkp-server", "--data-dir", str(root / "data")) as server, \
                daemon("deltabkp-agent", "--allow", str(root), "--cache-dir",
                       str(root / "c1"), "--bwlimit", opts.rate) as capped, \
                daemon("deltabkp-agent", "--allow", str(root), "--cache-dir",
                       str(root / "c2")) as free:
            client = Client(server.endpoint, net.load_key(str(key)), 120.0)
            runs = [
                ("agent --bwlimit", _backup(client, capped.address, trees["agent-cap"], None)),
                ("register --bwlimit", _backup(client, free.address, trees["target-cap"], rate)),
                ("no cap", _backup(client, free.address, trees["no-cap"], None)),
            ]
    print(f"first backup of {opts.mib} MiB of incompressible files, cap {opts.rate} = "
          f"{rate} B/s (loopback, TLS; a shared, loaded machine: side by side in one run)")
    print(f"{'run':<20} {'wire bytes':>12} {'seconds':>8} {'overall B/s':>12} "
          f"{'/cap':>6} {'steady B/s':>12} {'/cap':>6}")
    ok = True
    for name, r in runs:
        print(f"{name:<20} {r['bytes']:>12} {r['seconds']:>8.2f} {r['overall']:>12.0f} "
              f"{r['overall'] / rate:>6.3f} {r['steady']:>12.0f} {r['steady'] / rate:>6.3f}")
        if name != "no cap":
            ok = ok and abs(r["overall"] / rate - 1) <= 0.10
    print(f"capped runs within 10 % of the cap (overall rate): {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
