"""Benchmark inputs for the delta engine: a realistic tgz pair with a ~1% change set.

Builds (once, cached under ``benchmarks/_work/``) a copy of a real source tree (the installed
Python standard library, without ``__pycache__`` and ``site-packages``), a changed copy (edits
inside files, appends, deletions, additions, a small overwrite inside a binary), and tars each
deterministically (``tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner``) into
``gzip --rsyncable -6 -n``.  Also writes an unrelated pair of random files of the same size.
Deterministic: a fixed seed drives every choice, so reruns give byte-identical archives.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from archive_data import change_set

WORK = Path(__file__).resolve().parent / "_work"
SEED = 20261126


def _source_tree() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(
        src,
        dst,
        symlinks=True,
        ignore=shutil.ignore_patterns("__pycache__", "site-packages", "*.pyc"),
    )


def _tgz(tree: Path, out: Path) -> None:
    tmp = out.with_suffix(".part")
    with tmp.open("wb") as f:
        tar = subprocess.Popen(
            ["tar", "--sort=name", "--mtime=@0", "--owner=0", "--group=0", "--numeric-owner",
             "-c", "-C", str(tree), "."],
            stdout=subprocess.PIPE,
        )
        gz = subprocess.run(["gzip", "--rsyncable", "-6", "-n"], stdin=tar.stdout, stdout=f)
        assert tar.stdout is not None
        tar.stdout.close()
        if tar.wait() != 0 or gz.returncode != 0:
            raise SystemExit("tar | gzip failed")
    tmp.rename(out)


def build(work: Path = WORK) -> dict[str, Path]:
    """Return paths of base.tgz, new.tgz, unrelated-base.bin, unrelated-new.bin (cached)."""
    work.mkdir(parents=True, exist_ok=True)
    paths = {
        "base": work / "base.tgz",
        "new": work / "new.tgz",
        "ubase": work / "unrelated-base.bin",
        "unew": work / "unrelated-new.bin",
    }
    if all(p.exists() for p in paths.values()):
        return paths
    rng = random.Random(SEED)
    trees = work / "trees"
    if trees.exists():
        shutil.rmtree(trees)
    _copy_tree(_source_tree(), trees / "base")
    _tgz(trees / "base", paths["base"])
    shutil.copytree(trees / "base", trees / "new", symlinks=True)
    # The same ~1% change set as the archive benchmark (one definition for both).
    counts = change_set(trees / "new", rng)
    print(f"change set: {counts}", file=sys.stderr)
    _tgz(trees / "new", paths["new"])
    shutil.rmtree(trees)
    size = paths["new"].stat().st_size
    paths["ubase"].write_bytes(rng.randbytes(size))
    paths["unew"].write_bytes(rng.randbytes(size))
    return paths


if __name__ == "__main__":
    for name, p in build().items():
        print(f"{name}: {p} ({os.path.getsize(p):,} bytes)")
