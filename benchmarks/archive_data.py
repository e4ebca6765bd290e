"""Benchmark inputs for the archive: a real ~107 MB tree, a ~1% changed copy, a 24,000-file tree.

Cached under ``benchmarks/_work/archive/``; a fixed seed drives every choice, and file times
are set explicitly, so reruns give the same trees (and so the same archives).

- ``base``: the installed Python standard library without ``site-packages``, ``config-*``
  (a static library) and the test suite's ``__pycache__`` (sources, bytecode, extension
  modules: ~107 MB, ~4,800 files);
- ``new``: a copy of ``base`` with as many changes as 1% of its files: edits inside files,
  appends, deletions, additions, and a 64-byte overwrite inside the largest binary;
- ``many``: 24,000 small files in 240 directories (for the quick check).
"""

from __future__ import annotations

import os
import random
import shutil
import sysconfig
from pathlib import Path

WORK = Path(__file__).resolve().parent / "_work" / "archive"
SEED = 20261126
#: Every file of the trees gets this mtime, so the archives do not depend on copy time.
EPOCH = 1_700_000_000


def _ignore(dirpath: str, names: list[str]) -> list[str]:
    out = [n for n in names if n == "site-packages" or n.startswith("config-")]
    if "__pycache__" in names and "/test" in dirpath.replace(os.sep, "/"):
        out.append("__pycache__")
    return out


def _settle(tree: Path) -> None:
    for dirpath, _dirs, files in os.walk(tree):
        for n in files:
            p = os.path.join(dirpath, n)
            if not os.path.islink(p):
                os.utime(p, (EPOCH, EPOCH))
        os.utime(dirpath, (EPOCH, EPOCH))


def change_set(tree: Path, rng: random.Random) -> dict[str, int]:
    """Apply a ~1% change set (of the files) in place; return the counts per kind."""
    files = sorted(p for p in tree.rglob("*") if p.is_file() and not p.is_symlink())
    texts = [p for p in files if p.suffix in (".py", ".txt", ".rst", ".cfg", ".html")]
    n = max(5, len(files) // 100)  # changes in all: 1% of the files
    counts = {"edited": 0, "appended": 0, "deleted": 0, "added": 0, "binary": 0}
    picked = rng.sample(texts, n - n // 5 - 1)
    for i, path in enumerate(picked):
        data = path.read_bytes()
        kind = ("edited", "edited", "appended", "deleted")[i % 4]
        if kind == "edited":
            at = rng.randrange(len(data) + 1)
            data = data[:at] + b"# changed by the benchmark %d\n" % i + data[at + rng.randrange(200):]
            path.write_bytes(data)
        elif kind == "appended":
            path.write_bytes(data + b"\n# appended line %d\n" % i * rng.randrange(1, 20))
        else:
            path.unlink()
        counts[kind] += 1
    for i in range(n // 5):
        d = rng.choice(picked).parent
        words = [rng.choice(("alpha", "beta", "gamma", "delta", "x", "y", "=", "+", "\n"))
                 for _ in range(rng.randrange(100, 5000))]
        (d / f"bench_added_{i}.py").write_text(" ".join(words))
        counts["added"] += 1
    binaries = [p for p in files if p.suffix == ".so" and p.exists()]
    victim = max(binaries, key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    at = len(data) // 2
    data[at : at + 64] = rng.randbytes(64)
    victim.write_bytes(bytes(data))
    counts["binary"] = 1
    return counts


def _many(dst: Path, base: Path, rng: random.Random) -> None:
    sources = sorted(p for p in base.rglob("*.py") if p.is_file())
    for d in range(240):
        sub = dst / f"d{d:03}" / f"s{d % 7}"
        sub.mkdir(parents=True)
        for f in range(100):
            src = sources[(d * 100 + f) % len(sources)]
            data = src.read_bytes()[: rng.randrange(200, 8000)]
            (sub / f"f{f:03}.py").write_bytes(b"# copy %d/%d\n" % (d, f) + data)


def trees(work: Path = WORK) -> dict[str, Path]:
    """Paths of the ``base``, ``new`` and ``many`` trees (built once)."""
    paths = {k: work / k for k in ("base", "new", "many")}
    if all(p.is_dir() for p in paths.values()) and (work / "done").exists():
        return paths
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    rng = random.Random(SEED)
    src = Path(sysconfig.get_paths()["stdlib"])
    shutil.copytree(src, paths["base"], symlinks=True, ignore=_ignore)
    _settle(paths["base"])
    shutil.copytree(paths["base"], paths["new"], symlinks=True)
    counts = change_set(paths["new"], rng)
    _settle(paths["new"])
    _many(paths["many"], paths["base"], rng)
    _settle(paths["many"])
    (work / "done").write_text(repr(counts) + "\n")
    return paths


if __name__ == "__main__":
    for name, p in trees().items():
        print(name, p)
    print((WORK / "done").read_text().strip())
