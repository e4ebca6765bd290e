"""The incremental build: byte-identical to a fresh build over random trees and edit
sequences, reused files not opened, hot safety, fallbacks; the index format; CRC combining."""

from __future__ import annotations

import errno
import io
import os
import random
import shutil
import struct
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

import attrs
import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltabkp.archive import ArchiveIndex, IncrementalBuilder, TgzBuilder, _build, _crc
from deltabkp.archive._crc import crc32_combine, crc32_concat
from deltabkp.archive._gzip import GZIP_HEADER
from deltabkp.archive._incremental import (
    DATA,
    HEADER_ONLY,
    EntryTable,
    IndexEntry,
    SegmentTable,
    _Item,
    _Old,
    _Reused,
)
from deltabkp.errors import ArchiveError, FormatError, LimitExceeded, UnsupportedVersion

GOLDEN = Path(__file__).parent / "golden" / "archive"
#: Files are racy (never reused) for this long after a write; the tests wait it out.
RACY_NS = 30_000_000


# -- CRC combining ------------------------------------------------------------------------------


@given(st.binary(max_size=3000), st.binary(max_size=3000))
def test_crc32_combine_equals_zlib(a: bytes, b: bytes) -> None:
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


@given(st.lists(st.binary(max_size=2000), max_size=40))
def test_crc32_concat_equals_zlib(parts: list[bytes]) -> None:
    whole = b"".join(parts)
    assert crc32_concat([zlib.crc32(p) for p in parts], [len(p) for p in parts]) == zlib.crc32(whole)


def test_crc32_concat_long_parts() -> None:
    parts = [bytes(70_000), b"x" * (3 << 20), b"", b"tail"]
    assert crc32_concat([zlib.crc32(p) for p in parts], [len(p) for p in parts]) == zlib.crc32(b"".join(parts))


def test_crc32_concat_many_parts_across_blocks() -> None:
    # More parts than one vectorised block (_crc._BLOCK), so block edges are crossed.
    rng = random.Random(7)
    parts = [rng.randbytes(rng.randrange(0, 40)) for _ in range(3 * _crc._BLOCK + 5)]
    assert crc32_concat([zlib.crc32(p) for p in parts], [len(p) for p in parts]) == zlib.crc32(b"".join(parts))


def test_crc32_concat_beyond_64_gib() -> None:
    # Byte counts past 2^36 (and past 2^32 - 1, the order of x mod P): against the scalar
    # combine, itself checked against zlib above.
    rng = random.Random(8)
    parts = [(rng.getrandbits(32), rng.randrange(1 << 42)) for _ in range(12)] + [(5, 0xFFFFFFFF)]
    want = parts[0][0]
    for crc, n in parts[1:]:
        want = crc32_combine(want, crc, n)
    assert crc32_concat([c for c, _ in parts], [n for _, n in parts]) == want


# -- helpers -------------------------------------------------------------------------------------


def settle() -> None:
    """Wait until everything written so far is no longer racy for a build started now."""
    time.sleep(RACY_NS / 1e9 + 0.01)


def fresh(root: Path) -> bytes:
    return b"".join(TgzBuilder(root, threads=0))


class Generations:
    """Builds a tree again and again, each time from the previous build's index and archive."""

    def __init__(self, root: Path, keep: Path, threads: int = 2) -> None:
        self.root, self.keep, self.threads = root, keep, threads
        self.index: ArchiveIndex | None = None
        self.builder: IncrementalBuilder | None = None

    def build(self, builder_cls: type[IncrementalBuilder] = IncrementalBuilder) -> bytes:
        b = builder_cls(
            self.root, previous=self.index,
            previous_archive=self.keep if self.index is not None else None,
            racy_ns=RACY_NS, threads=self.threads,
        )
        data = b"".join(b)
        # The index survives its own format, and names this very archive.
        encoded = b.index.encode()
        self.index = ArchiveIndex.parse(encoded)
        assert self.index == b.index
        assert self.index.archive_hash == blake3.blake3(data).digest()
        assert self.index.archive_size == len(data)
        self.keep.write_bytes(data)
        self.builder = b
        return data


def sixty_files_built(tmp_path: Path, seed: int) -> tuple[Path, Generations]:
    """A tree of 60 text files of 20 KB, settled, and its first build."""
    rng = random.Random(seed)
    root = tmp_path / "tree"
    root.mkdir()
    for i in range(60):
        (root / f"f{i:02d}").write_bytes(text(rng, 20_000))
    settle()
    gen = Generations(root, tmp_path / "prev.tgz")
    gen.build()
    return root, gen


def text(rng: random.Random, n: int) -> bytes:
    words = [b"alpha", b"beta", b"gamma", b"delta", b"backup", b"tree", b"%d" % rng.randrange(999)]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + rng.choice([b" ", b"\n", b", "])
    return bytes(out[:n])


def content(rng: random.Random) -> bytes:
    kind = rng.randrange(4)
    n = rng.choice([0, 100, 3000, 20_000, 60_000, 150_000])
    if kind == 0:
        return rng.randbytes(n)
    if kind == 1:
        return bytes(n)
    return text(rng, n)


def make_tree(root: Path, rng: random.Random, files: int) -> None:
    root.mkdir(parents=True)
    for d in ("a", "a/b", "c", "d" * 120):
        (root / d).mkdir(parents=True, exist_ok=True)
    dirs = [root, root / "a", root / "a" / "b", root / "c", root / ("d" * 120)]
    for i in range(files):
        (rng.choice(dirs) / f"f{i:03d}.txt").write_bytes(content(rng))
    os.symlink("a/b", root / "link")


def regular_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def edit(root: Path, rng: random.Random, what: str) -> None:
    files = regular_files(root)
    if not files and what not in ("add", "mkdir"):
        what = "add"
    p = rng.choice(files) if files else root / "x"
    if what == "middle":
        d = p.read_bytes()
        i = rng.randrange(len(d) + 1)
        p.write_bytes(d[:i] + text(rng, rng.randrange(1, 200)) + d[i + rng.randrange(0, 50):])
    elif what == "overwrite":  # same size, same second: only the content (and ctime) moves
        buf = bytearray(p.read_bytes())
        if buf:
            buf[rng.randrange(len(buf))] ^= 0xFF
        st_ = p.stat()
        p.write_bytes(bytes(buf))
        os.utime(p, ns=(st_.st_atime_ns, st_.st_mtime_ns))
    elif what == "append":
        with open(p, "ab") as f:
            f.write(text(rng, rng.randrange(1, 5000)))
    elif what == "truncate":
        os.truncate(p, rng.randrange(p.stat().st_size + 1))
    elif what == "rename":
        p.rename(p.with_name("r" + p.name))
    elif what == "delete":
        p.unlink()
    elif what == "add":
        (root / "a" / f"new{rng.randrange(10**6)}.txt").write_bytes(content(rng))
    elif what == "mkdir":
        sub = root / "c" / f"dir{rng.randrange(10**6)}"
        sub.mkdir(exist_ok=True)
        (sub / "inner").write_bytes(text(rng, 4000))
    elif what == "chmod":
        p.chmod(rng.choice([0o600, 0o640, 0o755]))
    elif what == "touch":
        os.utime(p, ns=(0, rng.randrange(10**18)))
    elif what == "hardlink":
        target = p.with_name("h" + p.name)
        if not target.exists():
            os.link(p, target)
    elif what == "symlink":
        (root / "link").unlink(missing_ok=True)
        os.symlink(f"target-{rng.randrange(100)}", root / "link")


EDITS = ["middle", "overwrite", "append", "truncate", "rename", "delete", "add", "mkdir",
         "chmod", "touch", "hardlink", "symlink"]


# -- the property ----------------------------------------------------------------------------------


# Each example builds several generations: an eighth of the profile's examples (12 by
# default, 125 with HYPOTHESIS_PROFILE=thorough).
@settings(max_examples=max(12, settings().max_examples // 8))
@given(
    seed=st.integers(0, 2**32),
    files=st.integers(1, 30),
    generations=st.lists(
        st.tuples(st.lists(st.sampled_from(EDITS), max_size=4), st.booleans()),
        min_size=1, max_size=4,
    ),
    threads=st.sampled_from([0, 2]),
)
def test_incremental_equals_fresh_over_generations(
    tmp_path_factory: pytest.TempPathFactory, seed: int, files: int,
    generations: list[tuple[list[str], bool]], threads: int,
) -> None:
    base = tmp_path_factory.mktemp("inc")
    rng = random.Random(seed)
    root = base / "tree"
    make_tree(root, rng, files)
    settle()
    gen = Generations(root, base / "prev.tgz", threads)
    assert gen.build() == fresh(root)
    for edits, wait in generations:
        for what in edits:
            edit(root, rng, what)
        if wait:
            settle()  # else the edited files are racy and must be read again
        data = gen.build()
        assert data == fresh(root)
        assert gen.builder is not None and gen.builder.stats.previous == ""
    shutil.rmtree(base)


def test_unchanged_tree_reuses_everything_without_opening(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(7)
    root = tmp_path / "tree"
    make_tree(root, rng, 40)
    settle()
    gen = Generations(root, tmp_path / "prev.tgz")
    first = gen.build()
    spy = count_opens(monkeypatch)
    assert gen.build() == first
    opened = list(spy)
    assert gen.builder is not None
    s = gen.builder.stats
    # Only the first stretch of the one run (the whole archive) is read, and its tail
    # (~96 KiB before the end) read again to resume compressing the last segment.
    assert len(set(opened)) <= s.files_opened + s.files_peeked <= 12
    assert s.bytes_inflated == 0
    assert s.bytes_copied > 0.8 * len(first)
    assert s.bytes_compressed < 200_000


def count_opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every file the builder opens for reading (the one place it does)."""
    opened: list[str] = []
    real = os.open

    def spy(path: object, flags: int, *a: object, **kw: object) -> int:
        if flags == _build._O_READ:
            opened.append(str(path))
        return real(path, flags, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", spy)
    return opened


def test_tree_smaller_than_a_segment(tmp_path: Path) -> None:
    """The first run is in step from the stream's start: with no cut in it at all (a tree
    of a few hundred bytes), the build resumes at offset 0 with an empty window."""
    root = tmp_path / "tree"
    root.mkdir()
    for name in ("a", "b", "c"):
        (root / name).write_bytes(name.encode() * 100)
    # Fixed times: the tar (~4 KiB) then has the same bytes every run, with no cut in it
    # (with the clock's times, one run in a few had a candidate after 2 KiB).
    for p in (root / "a", root / "b", root / "c", root):
        os.utime(p, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    settle()
    gen = Generations(root, tmp_path / "prev.tgz")
    gen.build()
    assert gen.index is not None and len(gen.index.segments) == 0
    assert gen.build() == fresh(root)
    assert gen.builder is not None and gen.builder.stats.files_opened == 0
    with open(root / "c", "ab") as f:
        f.write(b"appended")
    settle()
    assert gen.build() == fresh(root)
    assert gen.builder.stats.files_opened == 1


def test_reused_files_are_not_opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One file changed among 60 of ~20 KiB: only it and the files of the ~32-96 KiB after it
    (where the compressor gets back in step) are opened; the rest is copied."""
    root, gen = sixty_files_built(tmp_path, seed=3)
    with open(root / "f30", "ab") as f:
        f.write(b"appended")
    settle()
    spy = count_opens(monkeypatch)
    data = gen.build()
    opened = list(spy)
    assert data == fresh(root)
    assert gen.builder is not None
    stats = gen.builder.stats
    # Read: f30, the first stretch of the run after it up to its sync point (32-96 KiB;
    # the run from f00 is in step from the stream's start); read again: the last ~96 KiB
    # of each run (before f30, and at the end).  Nothing else.
    assert "f30" in opened
    assert len(set(opened)) <= stats.files_opened + stats.files_peeked
    assert len({n for n in opened if "f30" < n < "f40"}) <= 5, opened
    assert len({n for n in opened if "f20" < n < "f30"}) <= 5, opened
    assert len({n for n in opened if "f50" < n}) <= 5, opened
    assert not {f"f{i:02d}" for i in [*range(20), *range(36, 50)]} & set(opened), opened
    assert stats.entries_reused >= 45
    assert stats.bytes_inflated == 0


# -- hot safety ------------------------------------------------------------------------------------


class ChangeOnWalk(IncrementalBuilder):
    """Rewrites one file right after the walk listed it, before the build reads it (if it
    reads it at all)."""

    target = ""

    def _items(self, *a: object, **kw: object) -> Iterator[_Item | _Reused]:
        for item in super()._items(*a, **kw):  # type: ignore[arg-type]
            # Reused by identity (one by one, or in a batch continuing a run in sync).
            if (self.target in item.rels if isinstance(item, _Reused)
                    else item.old >= 0 and item.rel == self.target):
                p = Path(self.root) / self.target
                p.write_bytes(p.read_bytes() + b" changed after the walk")
            yield item


@pytest.mark.parametrize("target", ["f02", "f02 after f00", "f30", "f58"])
def test_file_changed_after_the_walk(tmp_path: Path, target: str) -> None:
    """f02 is in a copied stretch, as f30 (not read: the archive holds it as the walk saw
    it; the first run is in step from the stream's start); after a change to f00, f02 is
    in the first stretch of the next run (read: its new content is stored); f58 in the tail of the run, whose bytes must be read
    again: found changed, they are inflated from the previous archive instead, so the
    archive again holds it as the walk saw it.  Either way the archive is a fresh build of
    one state of the tree, and the next build sees the change."""
    root, gen = sixty_files_built(tmp_path, seed=5)
    if target == "f02 after f00":
        with open(root / "f00", "ab") as f:
            f.write(b"changed before the walk")
    before = fresh(root)
    ChangeOnWalk.target = target.split()[0]
    data = gen.build(ChangeOnWalk)
    after = fresh(root)
    assert data == (after if target == "f02 after f00" else before)
    assert gen.builder is not None
    assert (gen.builder.stats.bytes_inflated > 0) == (target == "f58")
    settle()
    assert gen.build() == fresh(root) == after


def test_racing_file_is_read_each_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A racy file (here: its mtime ahead of the clock, racy whatever the timing) is never
    reused: each build reads it again; the others are reused."""
    rng = random.Random(9)
    root = tmp_path / "tree"
    root.mkdir()
    for i in range(30):
        (root / f"f{i:02d}").write_bytes(text(rng, 20_000))
    log = root / "f15"
    settle()
    gen = Generations(root, tmp_path / "prev.tgz")
    gen.build()
    spy = count_opens(monkeypatch)
    for n in range(3):
        with open(log, "ab") as f:
            f.write(b"line %d\n" % n)
        os.utime(log, ns=(0, time.time_ns() + 3600 * 10**9))
        spy.clear()
        data = gen.build()
        assert "f15" in spy
        assert data == fresh(root)
        assert gen.index is not None
        entry = next(e for e in gen.index.entries if e.path == "f15")
        assert not entry.reusable
        assert gen.builder is not None and gen.builder.stats.entries_reused > 15


# -- fallbacks -------------------------------------------------------------------------------------


def test_previous_build_unusable_falls_back_to_a_full_build(tmp_path: Path) -> None:
    rng = random.Random(11)
    root = tmp_path / "tree"
    make_tree(root, rng, 10)
    settle()
    gen = Generations(root, tmp_path / "prev.tgz")
    gen.build()
    index = gen.index
    assert index is not None
    expect = fresh(root)
    # A corrupt kept archive is never copied from.
    bad = tmp_path / "bad.tgz"
    data = bytearray((tmp_path / "prev.tgz").read_bytes())
    data[len(data) // 2] ^= 1
    bad.write_bytes(bytes(data))
    cases = [
        (index, bad, "not the one its index describes"),
        (index, tmp_path / "missing.tgz", "cannot open"),
        (attrs.evolve(index, level=9), tmp_path / "prev.tgz", "level"),
        (attrs.evolve(index, deflater="zlib 0.0"), tmp_path / "prev.tgz", "made by zlib 0.0"),
        # An index of format 2 (zlib -6 untuned): never reused for a format-3 build.
        (attrs.evolve(index, archive_version=2, deflater="1.2.13"), tmp_path / "prev.tgz", "format 2"),
        (attrs.evolve(index, deflater=index.deflater.split(" tune")[0]), tmp_path / "prev.tgz", "tune"),
        (attrs.evolve(index, archive_version=1), tmp_path / "prev.tgz", "format"),
    ]
    for idx, archive, why in cases:
        b = IncrementalBuilder(root, previous=idx, previous_archive=archive, racy_ns=RACY_NS)
        assert b"".join(b) == expect
        assert why in b.stats.previous
        assert b.stats.entries_reused == 0


class FailingReads:
    """The previous archive's file as ``_Old`` reads it: reads touching ``[bad_lo, bad_hi)``
    fail with EIO (a bad sector), reads past ``end`` come back short (truncated there)."""

    def __init__(self, f: Any, bad_lo: int, bad_hi: int, end: int | None) -> None:
        self.f, self.bad_lo, self.bad_hi, self.end = f, bad_lo, bad_hi, end
        self.at = 0

    def seek(self, at: int) -> int:
        self.at = at
        return int(self.f.seek(at))

    def read(self, n: int) -> bytes:
        if self.at < self.bad_hi and self.at + n > self.bad_lo:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        if self.end is not None:
            n = max(0, min(n, self.end - self.at))
        return bytes(self.f.read(n))

    def close(self) -> None:
        self.f.close()


def failing_reads(
    monkeypatch: pytest.MonkeyPatch, bad_lo: int, bad_hi: int, end: int | None = None
) -> None:
    """Every previous archive opened from now on reads as ``FailingReads`` (after its check:
    the check reads the file itself)."""
    real = _Old.__init__

    def init(self: _Old, index: ArchiveIndex, f: Any) -> None:
        fr = cast("BinaryIO", FailingReads(f, bad_lo, bad_hi, end)) if f is not None else None
        real(self, index, fr)

    monkeypatch.setattr(_Old, "__init__", init)


def inside_of_big(index: ArchiveIndex) -> tuple[int, int]:
    """The file offsets of the deflate bytes of the inside of ``index``'s entry "big" (all
    but ~70 KB at either end): a changed big file's compare needs them."""
    [e] = [e for e in index.entries if e.path == "big"]
    segs = index.segments
    first = next(i for i, (t, _d, _c) in enumerate(segs) if t > e.tar_start + 70_000)
    last = next(i for i, (t, _d, _c) in enumerate(segs) if t > e.tar_end - 70_000)
    return len(GZIP_HEADER) + segs[first - 1][1], len(GZIP_HEADER) + segs[last][1]


@pytest.mark.parametrize("threads", [0, 2])
def test_previous_archive_failing_midway_builds_afresh(tmp_path: Path, threads: int) -> None:
    """The previous archive passed its check at the start, then fails while the build
    copies from it (truncated to half here, right after the first chunk): the build goes on
    as a fresh one from the bytes already made, identical to a fresh build, its sink given
    the same bytes, and says why."""
    root, gen = sixty_files_built(tmp_path, 21)
    assert gen.index is not None
    with open(root / "f01", "ab") as f:  # a run f02..f59: most of the archive copied
        f.write(b"one more line\n")
    settle()
    prev = tmp_path / "prev.tgz"
    size = prev.stat().st_size
    sunk: list[bytes] = []
    # As the agent builds (``no_links``: the fresh build it goes on with is built alike).
    b = IncrementalBuilder(root, previous=gen.index, previous_archive=prev, racy_ns=RACY_NS,
                           threads=threads, sink=sunk.append, no_links=True)
    chunks = iter(b)
    # The first chunk (the gzip header) comes after the previous archive's check and before
    # any copy from it.  Truncated here, on the iterating thread, not by the sink: in its
    # worker thread (``threads=2``) the truncation would race the copy's reads, held in
    # order only by ``_BESIDE`` and where the copy falls among the chunks.
    first = next(chunks)
    assert first == GZIP_HEADER
    os.truncate(prev, size // 2)
    data = first + b"".join(chunks)
    assert data == fresh(root)
    assert b"".join(sunk) == data
    assert "the previous archive shrank" in b.stats.previous
    assert "built afresh" in b.stats.previous
    # Its index is the fresh build's (it was one), naming this very archive.
    again = IncrementalBuilder(root, racy_ns=RACY_NS)
    assert b"".join(again) == data and b.index == again.index
    assert b.handover is None  # a fresh build's: nothing copied to hand over


def test_previous_archive_unreadable_under_a_changed_file_compresses_it_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A changed big file's old bytes are unreadable (EIO: a bad sector under them): its
    unchanged stretches cannot be proven, so it is compressed anew, the rest still reused
    (the build says so), and the archive is a fresh build's."""
    rng = random.Random(11)
    root, big = tree_with_big(tmp_path, rng, lambda r: r.randbytes(300_000) + text(r, 700_000))
    settle()
    gen = Generations(root, tmp_path / "prev.tgz")
    gen.build()
    assert gen.index is not None
    failing_reads(monkeypatch, *inside_of_big(gen.index))  # EIO under big's inside
    d = bytearray(big.read_bytes())
    d[500_000 : 500_064] = rng.randbytes(64)
    big.write_bytes(bytes(d))
    settle()
    assert gen.build() == fresh(root)
    assert gen.builder is not None
    s = gen.builder.stats
    assert s.previous == "" and "Input/output error" in s.old_failed
    assert s.bytes_matched == 0 and s.bytes_compressed > 1_000_000  # big: compressed anew
    assert s.entries_reused >= 4  # the small files before it: still copied


def test_previous_archive_failing_for_a_compare_then_a_copy_keeps_both_whys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The previous archive fails under a changed big file's compare (EIO: the file
    compressed anew), then again for the copy of the files after it (truncated there): the
    build goes on afresh and its stats keep both, why it went on afresh (``previous``) and
    what the compare met (``old_failed``); a fresh build has nothing to hand over."""
    rng = random.Random(12)
    root, big = tree_with_big(tmp_path, rng, lambda r: r.randbytes(300_000) + text(r, 700_000))
    for i in range(8):  # after "big": a run to copy from the previous archive
        (root / f"z{i}").write_bytes(text(rng, 30_000))
    settle()
    gen = Generations(root, tmp_path / "prev.tgz")
    gen.build()
    index = gen.index
    assert index is not None
    # Short reads past the segment holding big's last byte: beyond the compare's reads.
    [e] = [e for e in index.entries if e.path == "big"]
    segs = index.segments
    end = len(GZIP_HEADER) + next(d for t, d, _c in segs if t >= e.tar_end)
    failing_reads(monkeypatch, *inside_of_big(index), end)
    d = bytearray(big.read_bytes())
    d[500_000 : 500_064] = rng.randbytes(64)
    big.write_bytes(bytes(d))
    settle()
    assert gen.build() == fresh(root)
    b = gen.builder
    assert b is not None
    assert "the previous archive shrank" in b.stats.previous
    assert "built afresh" in b.stats.previous
    assert "Input/output error" in b.stats.old_failed
    assert b.handover is None


@pytest.mark.parametrize("level", [4, 9])
def test_other_levels(tmp_path: Path, level: int) -> None:
    rng = random.Random(level)
    root = tmp_path / "tree"
    make_tree(root, rng, 8)
    settle()
    b = IncrementalBuilder(root, level=level, racy_ns=RACY_NS)
    data = b"".join(b)
    assert data == b"".join(TgzBuilder(root, level=level))
    (tmp_path / "prev.tgz").write_bytes(data)
    edit(root, rng, "middle")
    settle()
    b = IncrementalBuilder(root, level=level, previous=b.index,
                           previous_archive=tmp_path / "prev.tgz", racy_ns=RACY_NS)
    assert b"".join(b) == b"".join(TgzBuilder(root, level=level))
    assert b.stats.previous == ""


def test_fast_levels_are_refused(tmp_path: Path) -> None:
    # zlib's levels 1-3 compress differently after a zdict than in one stream: a spliced
    # archive could not equal a fresh one.
    with pytest.raises(ArchiveError, match="level of 4..9"):
        IncrementalBuilder(tmp_path, level=3)


# -- the index format --------------------------------------------------------------------------------


def golden_index() -> ArchiveIndex:
    return ArchiveIndex(
        archive_hash=bytes(range(32)), archive_size=70_000, tar_size=204_800, level=6,
        deflater="1.2.13", archive_version=2,  # recorded under format 2 (index format unchanged)
        entries=(
            IndexEntry("dir", HEADER_ONLY, True, tar_start=0, tar_end=512, digest=b"D" * 16),
            IndexEntry("dir/file.txt", DATA, True, 0o100644, 1000, 1000, 1, 2049, 123456,
                       70_000, 1_700_000_000_123_456_789, 1_700_000_001_000_000_000, 512, 71_680),
            IndexEntry("dir/racy.log", DATA, False, 0o100600, 0, 0, 2, 2049, 654321, 5,
                       -1_500_000_000, 1_700_000_002_000_000_000, 71_680, 72_704),
            IndexEntry("ünï-\udcff", HEADER_ONLY, True, tar_start=72_704, tar_end=73_216,
                       digest=b"L" * 16),
        ),
        segments=((8192, 3000, 0xDEADBEEF), (73_216, 60_000, 0x12345678)),
    )


def test_golden_index() -> None:
    data = golden_index().encode()
    golden = GOLDEN / "index-v1.bin"
    if os.environ.get("DELTABKP_REGEN_GOLDEN"):
        golden.write_bytes(data)
    assert data == golden.read_bytes()
    assert ArchiveIndex.parse(golden.read_bytes()) == golden_index()


@given(st.lists(st.tuples(st.integers(1, 2**63), st.integers(1, 2**63), st.integers(0, 2**32 - 1)),
                max_size=40), st.integers(-45, 45), st.integers(-45, 45))
def test_segment_table_reads_as_a_tuple_of_tuples(
    rows: list[tuple[int, int, int]], a: int, b: int
) -> None:
    table = SegmentTable.of(rows)
    assert len(table) == len(rows) and list(table) == rows and table == tuple(rows)
    assert [table[i] for i in range(-len(rows), len(rows))] == rows[-len(rows):] + rows
    assert list(table[a:b]) == rows[a:b] and table[a:b] == SegmentTable.of(rows[a:b])
    assert SegmentTable.from_bytes(table.to_bytes()) == table
    assert table.to_bytes() == b"".join(struct.pack("<QQI", *r) for r in rows)
    assert table.tar_ends.tolist() == [r[0] for r in rows]


def test_entry_table_reads_as_a_tuple_of_entries() -> None:
    rows = golden_index().entries
    table = EntryTable.of(list(rows))
    assert table == rows and list(table) == list(rows) and len(table) == len(rows)
    assert table[1:3] == tuple(rows)[1:3] and table[-1] == list(rows)[-1]
    assert [table.path(i) for i in range(len(table))] == [e.path for e in rows]
    parsed = ArchiveIndex.parse(golden_index().encode()).entries
    assert parsed == table and list(parsed) == list(table) and hash(parsed) == hash(table)
    # A reused entry's record is copied packed, its tar range patched: the bytes that
    # packing the moved entry would give, from a parsed (read-only) table or a built one.
    for src in (parsed, table):
        moved, packed = EntryTable(bytearray()), EntryTable(bytearray())
        for i in reversed(range(len(src))):
            moved.append_moved(src, i, 7 * i, 7 * i + 1000)
            packed.append(src[i].placed(7 * i, 7 * i + 1000))
        assert moved.to_bytes() == packed.to_bytes() and moved == packed
        for k, e in enumerate(packed):
            r = moved.raw(k)
            assert (r[0], bool(r[1] & 1), *r[3:]) == (
                e.kind, e.reusable, e.mode, e.uid, e.gid, e.nlink, e.dev, e.ino, e.size,
                e.mtime_ns, e.ctime_ns, e.tar_start, e.tar_end, e.digest,
            )


def test_index_parser_rejects_bad_input() -> None:
    good = golden_index().encode()
    with pytest.raises(FormatError, match="magic"):
        ArchiveIndex.parse(b"XXXXXX" + good[6:])
    with pytest.raises(UnsupportedVersion):
        ArchiveIndex.parse(good[:6] + b"\x02" + good[7:])
    with pytest.raises(LimitExceeded):
        ArchiveIndex.parse(good, limit=100)
    with pytest.raises(FormatError, match="corrupt"):
        ArchiveIndex.parse(good[:50] + bytes([good[50] ^ 1]) + good[51:])
    for n in (0, 6, 7, 40, len(good) - 1):
        with pytest.raises(FormatError):
            ArchiveIndex.parse(good[:n])


@given(st.binary(max_size=400), st.integers(0, 2000))
def test_index_parser_fuzz(junk: bytes, at: int) -> None:
    """Any input either parses or raises FormatError (re-signed, so the checks past the
    digest are the ones exercised)."""
    good = golden_index().encode()[:-32]
    at = min(at, len(good))
    body = good[:at] + junk + good[at + len(junk):]
    try:
        ArchiveIndex.parse(body + blake3.blake3(body).digest())
    except FormatError:
        pass


def test_spooled_streamed_and_excluded_files(tmp_path: Path) -> None:
    """Files read through the spool (past ``mem_limit``) and streamed (past ``spool_limit``,
    never reused: their read cannot be proven consistent), with exclude patterns."""
    rng = random.Random(13)
    root = tmp_path / "tree"
    root.mkdir()
    (root / "a-small").write_bytes(text(rng, 50_000))
    (root / "b-spooled").write_bytes(text(rng, 1_500_000))
    (root / "c-streamed").write_bytes(text(rng, 2_500_000))
    (root / "d-small").write_bytes(text(rng, 50_000))
    (root / "skip.log").write_bytes(b"excluded\n")
    kw: dict[str, object] = {"mem_limit": 1 << 20, "spool_limit": 2 << 20, "exclude": ["*.log"]}
    settle()
    index: ArchiveIndex | None = None
    prev = tmp_path / "prev.tgz"
    for step in range(4):
        if step == 1:
            with open(root / "a-small", "ab") as f:
                f.write(b"appended\n")
        elif step == 2:
            d = bytearray((root / "b-spooled").read_bytes())
            d[700_000:700_010] = b"0123456789"
            (root / "b-spooled").write_bytes(bytes(d))
        elif step == 3:
            (root / "skip.log").write_bytes(b"still excluded\n")
        settle()
        b = IncrementalBuilder(root, previous=index, previous_archive=prev if index else None,
                               racy_ns=RACY_NS, **kw)  # type: ignore[arg-type]
        data = b"".join(b)
        assert data == b"".join(TgzBuilder(root, **kw))  # type: ignore[arg-type]
        prev.write_bytes(data)
        index = b.index
        by_path = {e.path: e for e in index.entries}
        assert "skip.log" not in by_path
        assert not by_path["c-streamed"].reusable and by_path["b-spooled"].reusable
        if step:
            assert b.stats.entries_reused >= 2


# -- the quick check with racy files re-read ---------------------------------------------------


def test_unchanged_rereads_only_the_racy_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(21)
    root = tmp_path / "tree"
    make_tree(root, rng, 20)
    os.link(regular_files(root)[0], root / "hard")
    settle()
    log = root / "a" / "app.log"
    log.write_bytes(b"first line\n")
    os.utime(log, ns=(0, time.time_ns() + 3600 * 10**9))  # racy whatever the timing
    # Built while app.log is racy: its identity cannot vouch for it later.
    b = IncrementalBuilder(root, racy_ns=RACY_NS)
    b"".join(b)
    index = b.index
    entry = next(e for e in index.entries if e.path == "a/app.log")
    assert not entry.reusable and entry.digest != bytes(16)
    settle()
    spy = count_opens(monkeypatch)
    assert IncrementalBuilder(root, racy_ns=RACY_NS).unchanged(index)
    assert set(spy) == {"app.log"}  # the one racy file, read again; nothing else opened
    # Same metadata, other bytes (a write in the same clock tick as the build's read, which
    # user space cannot stage: the index is made to say so): only the re-read can tell.
    other = attrs.evolve(index, entries=tuple(
        attrs.evolve(e, digest=bytes(15) + b"x") if e.path == entry.path else e for e in index.entries
    ))
    assert not IncrementalBuilder(root, racy_ns=RACY_NS).unchanged(other)
    # Appended to (as a log is, all the time): its lstat already says so, so it is not read
    # (the build that follows reads it once; the quick check must not read it first).
    saved = log.read_bytes()
    with open(log, "ab") as f:
        f.write(b"second line\n")
    spy.clear()
    assert not IncrementalBuilder(root, racy_ns=RACY_NS).unchanged(index)
    assert spy == []
    log.write_bytes(saved)
    mtime = log.stat().st_mtime_ns
    log.write_bytes(b"first line\n")  # same bytes and mtime, but the ctime moved
    os.utime(log, ns=(0, mtime))
    assert not IncrementalBuilder(root, racy_ns=RACY_NS).unchanged(index)
    # Every other kind of change is seen from metadata alone.
    b = IncrementalBuilder(root, racy_ns=RACY_NS)
    b"".join(b)
    index = b.index
    settle()
    assert IncrementalBuilder(root, racy_ns=RACY_NS).unchanged(index)
    for what in ["middle", "add", "delete", "chmod", "rename", "symlink", "hardlink", "mkdir"]:
        edit(root, rng, what)
        assert not IncrementalBuilder(root, racy_ns=RACY_NS).unchanged(index), what
        b = IncrementalBuilder(root, racy_ns=RACY_NS)
        b"".join(b)
        index = b.index
        settle()
        assert IncrementalBuilder(root, racy_ns=RACY_NS).unchanged(index), what
    # Excluding an entry changes the archive too.
    assert not IncrementalBuilder(root, racy_ns=RACY_NS, exclude=["*.txt"]).unchanged(index)


def test_files_racy_when_built_are_read_again_not_recompressed(tmp_path: Path) -> None:
    """Files racy when the previous build read them (every file here: a huge ``racy_ns``)
    are read again and hashed, one by one, and their old compressed bytes are reused when
    the digest matches: no recompression, a fresh build's bytes, and the next build reuses
    them unread.  A digest that does not match (bytes changed within a timestamp tick,
    simulated by an index with a wrong one) means that file is compressed anew."""
    rng = random.Random(11)
    root = tmp_path / "tree"
    root.mkdir()
    for i in range(30):
        (root / f"f{i:02d}").write_bytes(text(rng, 20_000))
    first = IncrementalBuilder(root, racy_ns=10**18)
    a1 = b"".join(first)
    files = [e for e in first.index.entries if e.kind == DATA]
    assert files and not any(e.reusable for e in files) and all(e.digest != bytes(16) for e in files)
    (tmp_path / "a1.tgz").write_bytes(a1)

    second = IncrementalBuilder(root, previous=first.index, previous_archive=tmp_path / "a1.tgz",
                                racy_ns=0)
    a2 = b"".join(second)
    assert a2 == a1 == fresh(root)
    s = second.stats
    assert s.files_opened == 30 and s.entries_reused == len(first.index.entries) == 30
    assert s.bytes_compressed < 100_000 < 30 * 20_000  # the last segment, not the files
    assert s.bytes_inflated == 0 and s.files_peeked == 0  # the tail: kept bytes, no re-read
    (tmp_path / "a2.tgz").write_bytes(a2)
    third = IncrementalBuilder(root, previous=second.index, previous_archive=tmp_path / "a2.tgz")
    assert b"".join(third) == a1 and third.stats.files_opened < 10

    wrong = ArchiveIndex(
        archive_hash=first.index.archive_hash, archive_size=first.index.archive_size,
        tar_size=first.index.tar_size, level=first.index.level,
        deflater=first.index.deflater, segments=first.index.segments,
        entries=[attrs.evolve(e, digest=b"\x01" * 16) if e.path == "f15" else e
                 for e in first.index.entries],
    )
    fourth = IncrementalBuilder(root, previous=wrong, previous_archive=tmp_path / "a1.tgz",
                                racy_ns=0)
    assert b"".join(fourth) == a1
    assert fourth.stats.bytes_compressed >= 20_000 and fourth.stats.entries_reused == 29


def test_files_the_quick_check_verified_are_not_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files racy when the previous build read them, read again by the quick check just
    before the build (the agent's check of a racy build, then its build from the same
    index), consistently, with their old identity and bytes and not racy then, are reusable
    for that build: it does not read them a second time, and stores the records its own
    re-read would (reusable, no digest).  Not trusted: a file changed since the check (its
    lstat), a check whose read was racy itself, a check with a narrower racy window."""
    rng = random.Random(12)
    root = tmp_path / "tree"
    root.mkdir()
    for i in range(30):
        (root / f"f{i:02d}").write_bytes(text(rng, 20_000))
    (root / "z_last").write_bytes(text(rng, 5_000))  # after them in the archive
    first = IncrementalBuilder(root, racy_ns=10**18)  # every file racy when read
    a1 = b"".join(first)
    keep = tmp_path / "a1.tgz"
    keep.write_bytes(a1)
    (root / "z_last").write_bytes(text(rng, 5_000))
    settle()  # (z_last too: both builds below then store the same record of it)
    files = {f"f{i:02d}" for i in range(30)}

    def build(check_ns: int | None, build_ns: int = RACY_NS) -> tuple[IncrementalBuilder, list[str]]:
        _Old._checked = None
        spy = count_opens(monkeypatch)
        if check_ns is not None:
            assert not IncrementalBuilder(root, racy_ns=check_ns).unchanged(first.index)
            assert files <= set(spy)  # the check read the racy files (z_last: its lstat)
            spy.clear()
        b = IncrementalBuilder(root, previous=first.index, previous_archive=keep,
                               racy_ns=build_ns)
        data = b"".join(b)
        monkeypatch.undo()
        assert data == fresh(root)
        return b, spy

    alone, spy = build(None)
    assert files <= set(spy) and alone.stats.files_opened == 31
    checked, spy = build(RACY_NS)
    # Opened: z_last, and the run's tail before it (read by path, identity checked).
    assert checked.stats.files_opened == 1 and set(spy) == {"z_last", "f28", "f29"}
    assert checked.index == alone.index  # the records of the build's own re-read
    assert all(e.reusable and e.digest == bytes(16) for e in checked.index.entries)
    # A narrower window for the check than for the build: not trusted, read again.
    b, _spy = build(RACY_NS, build_ns=10**18)
    assert b.stats.files_opened == 31
    # Changed after the check (same size and mtime, another ctime): its lstat says so.
    _Old._checked = None
    assert not IncrementalBuilder(root, racy_ns=RACY_NS).unchanged(first.index)
    f05 = root / "f05"
    mtime = f05.stat().st_mtime_ns
    f05.write_bytes(bytes(20_000))
    os.utime(f05, ns=(0, mtime))
    spy = count_opens(monkeypatch)
    b = IncrementalBuilder(root, previous=first.index, previous_archive=keep, racy_ns=RACY_NS)
    data = b"".join(b)
    monkeypatch.undo()
    # f05, the run's first stretch after it (read until back in step), z_last.
    assert data == fresh(root) and "f05" in spy and b.stats.files_opened < 6
    # A file racy when the check read it (its mtime ahead of the clock): read by the build.
    os.utime(root / "f07", ns=(0, time.time_ns() + 3600 * 10**9))
    first = IncrementalBuilder(root, racy_ns=10**18)
    keep.write_bytes(b"".join(first))
    (root / "z_last").write_bytes(text(rng, 5_000))
    settle()
    b, spy = build(RACY_NS)
    assert b.stats.files_opened == 2 and "f07" in spy


def test_settled_index_records_the_racy_files_read_again_as_reusable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``settled`` reads again the files racy when the archive was built and records those
    equal, same identity and not racy now, as reusable: the same archive, and the next
    build (and quick check) reads none of them.  A file changed since, one racy now, one
    with other links stay as they were, unread; nothing racy: nothing read, None."""
    rng = random.Random(14)
    root = tmp_path / "tree"
    root.mkdir()
    for i in range(20):
        (root / f"f{i:02d}").write_bytes(text(rng, 20_000))
    os.link(root / "f03", root / "f03.link")
    os.utime(root / "f07", ns=(0, time.time_ns() + 3600 * 10**9))  # racy whatever the timing
    for d in ("d/e", "gone"):
        (root / d).mkdir(parents=True)
        (root / d / "g").write_bytes(text(rng, 5_000))
    first = IncrementalBuilder(root, racy_ns=10**18)  # every file racy when read
    a1 = b"".join(first)
    keep = tmp_path / "a1.tgz"
    keep.write_bytes(a1)
    settle()
    (root / "f11").write_bytes(text(rng, 20_000))  # changed since
    shutil.rmtree(root / "gone")
    settle()
    spy = count_opens(monkeypatch)
    new = IncrementalBuilder(root, racy_ns=RACY_NS).settled(first.index)
    monkeypatch.undo()
    assert new is not None and new.archive_hash == first.index.archive_hash
    assert new.segments == first.index.segments
    # Not read: f03 (other links), f11 (changed since), f07 (racy still: a read could not
    # settle it).
    assert set(spy) == {f"f{i:02d}" for i in range(20)} - {"f03", "f07", "f11"} | {"g"}
    racy = {e.path for e in new.entries if e.kind == DATA and not e.reusable}
    assert racy == {"f03", "f07", "f11", "gone/g"}  # (f03.link: a hard link, header only)
    for e, f in zip(new.entries, first.index.entries, strict=True):
        settled = f.kind == DATA and e.path not in racy
        assert e == (attrs.evolve(f, reusable=True, digest=bytes(16)) if settled else f)
    # The next build from it: the archive a fresh build makes, the settled files unread.
    _Old._checked = None
    spy = count_opens(monkeypatch)
    b = IncrementalBuilder(root, previous=new, previous_archive=keep, racy_ns=RACY_NS)
    data = b"".join(b)
    monkeypatch.undo()
    assert data == fresh(root)
    # Read: f03 and f07 (racy still), f11 (changed), the 32-96 KiB after it; not the rest
    # (from the first index: all 20).
    assert {"f03", "f07", "f11"} <= set(spy) and b.stats.files_opened <= 9
    # Nothing racy when built: nothing read, nothing to record.
    os.utime(root / "f07", ns=(0, time.time_ns() - 10 * 10**9))
    settle()
    plain = IncrementalBuilder(root, racy_ns=RACY_NS)
    b"".join(plain)
    spy = count_opens(monkeypatch)
    assert IncrementalBuilder(root, racy_ns=RACY_NS).settled(plain.index) is None and spy == []


def test_sink_gets_the_archive_in_order(tmp_path: Path) -> None:
    # The agent's kept archive is written by the builder's worker thread (``sink``): the
    # same bytes as yielded, all of them once the iteration ended, a full or a spliced
    # build, with a worker thread or none (``threads=0``: the sink is called inline).
    root, gen = sixty_files_built(tmp_path, 5)
    assert gen.index is not None
    assert IncrementalBuilder(root, racy_ns=RACY_NS).unchanged(gen.index)
    assert _Old._checked is None  # unchanged: no build follows, nothing kept
    (root / "f07").write_bytes(b"changed" * 3000)
    # Changed: the next build from that very index takes the check's lookups over.
    assert not IncrementalBuilder(root, racy_ns=RACY_NS).unchanged(gen.index)
    assert _Old._checked is not None and _Old._checked.index is gen.index
    for threads in (0, 2):
        for previous in (None, gen.index):
            got: list[bytes] = []
            b = IncrementalBuilder(root, previous=previous, previous_archive=gen.keep,
                                   racy_ns=RACY_NS, threads=threads, sink=got.append)
            data = b"".join(b)
            assert _Old._checked is None  # taken over, or let go
            assert b"".join(got) == data == fresh(root)
            assert b.index.archive_hash == blake3.blake3(data).digest()
        assert b.stats.bytes_copied > 0


def test_sink_thread_ends_when_the_consumer_stops(tmp_path: Path) -> None:
    import threading

    root = tmp_path / "tree"
    make_tree(root, random.Random(6), 30)
    full = fresh(root)
    got: list[bytes] = []
    chunks = iter(IncrementalBuilder(root, racy_ns=RACY_NS, sink=got.append))
    assert next(chunks)
    chunks.close()  # a stopped backup: no thread is left behind, nothing more is sunk
    assert not [t for t in threading.enumerate() if t.name.startswith("deltabkp-archive-out")]
    sunk = b"".join(got)
    assert full.startswith(sunk) and len(sunk) < len(full)


# -- changed files: their unchanged stretches --------------------------------------------------


BIG_EDITS = ["inplace", "inplace", "append", "truncate", "middle", "head", "rewrite", "touch",
             "retime"]


def tree_with_big(
    tmp_path: Path, rng: random.Random, big: Callable[[random.Random], bytes]
) -> tuple[Path, Path]:
    """A tree of four 30 KB text files and ``big`` (a changed file's stretches to reuse)."""
    root = tmp_path / "tree"
    root.mkdir()
    for i in range(4):
        (root / f"a{i}").write_bytes(text(rng, 30_000))
    (root / "big").write_bytes(big(rng))
    return root, root / "big"


def big_edit(p: Path, rng: random.Random, what: str) -> None:
    """An edit of a big file: in place (same size, same mtime: only ctime moves), appended,
    truncated, a size-changing edit in its middle, an edit of its first bytes, a rewrite;
    ``retime``: in place with an mtime that gains (or loses) a fraction of a second, so the
    tar header before the data grows (or shrinks) by a PAX record."""
    d = bytearray(p.read_bytes())
    st_ = p.stat()
    if what == "retime":
        at = rng.randrange(len(d))
        d[at : at + 64] = rng.randbytes(len(d[at : at + 64]))
        p.write_bytes(bytes(d))
        sec, frac = divmod(st_.st_mtime_ns, 10**9)
        os.utime(p, ns=(st_.st_atime_ns, sec * 10**9 + (0 if frac else 123_456_789)))
    elif what in ("inplace", "head"):
        at = rng.randrange(min(len(d), 600)) if what == "head" else rng.randrange(len(d))
        n = rng.randrange(1, 300)
        d[at : at + n] = rng.randbytes(len(d[at : at + n]))
        p.write_bytes(bytes(d))
        os.utime(p, ns=(st_.st_atime_ns, st_.st_mtime_ns))
    elif what == "append":
        with open(p, "ab") as f:
            f.write(text(rng, rng.randrange(1, 70_000)))
    elif what == "truncate":
        os.truncate(p, rng.randrange(len(d) // 2, len(d) + 1))
    elif what == "middle":
        at = rng.randrange(len(d))
        p.write_bytes(bytes(d[:at]) + text(rng, rng.randrange(1, 100)) + bytes(d[at:]))
    elif what == "rewrite":
        p.write_bytes(text(rng, len(d)))
    elif what == "touch":
        os.utime(p, ns=(0, rng.randrange(10**18)))


def big_tree(root: Path, rng: random.Random, bigs: int) -> list[Path]:
    """Small files around ``bigs`` files of 150-400 KB (text and random bytes mixed)."""
    root.mkdir()
    big = []
    for i in range(bigs):
        for k in range(3):
            (root / f"f{i}{k}").write_bytes(text(rng, 30_000))
        p = root / f"g{i}"
        n = rng.randrange(150_000, 400_000)
        p.write_bytes(rng.randbytes(n // 3) + text(rng, n - n // 3))
        big.append(p)
    (root / "z").write_bytes(text(rng, 50_000))
    return big


@settings(max_examples=max(6, settings().max_examples // 16))
@given(
    seed=st.integers(0, 2**32),
    generations=st.lists(st.lists(st.sampled_from(BIG_EDITS), min_size=1, max_size=3),
                         min_size=1, max_size=3),
    threads=st.sampled_from([0, 2]),
)
def test_changed_big_files_equal_fresh(
    tmp_path_factory: pytest.TempPathFactory, seed: int, generations: list[list[str]],
    threads: int,
) -> None:
    """Edits inside big files (their unchanged stretches reused: ``_splice_changed``):
    each generation is byte-identical to a fresh build."""
    base = tmp_path_factory.mktemp("big")
    rng = random.Random(seed)
    root = base / "tree"
    bigs = big_tree(root, rng, 2)
    settle()
    gen = Generations(root, base / "prev.tgz", threads)
    gen.build()
    for edits in generations:
        for what in edits:
            big_edit(rng.choice(bigs), rng, what)
        settle()
        assert gen.build() == fresh(root)
    shutil.rmtree(base)


@pytest.mark.parametrize("what", ["inplace", "append", "truncate", "pax", "unpax"])
def test_changed_file_reuses_its_unchanged_stretches(tmp_path: Path, what: str) -> None:
    """A 64-byte overwrite in the middle of a 1 MB file (the benchmark's change), an append,
    a truncation: the file is read, but only what is around the change is compressed.
    ``pax``/``unpax``: the overwrite gives a whole-second mtime a fraction (or takes it
    away): the header before the data grows (shrinks) by a PAX record, the data stays at
    its in-file offsets (the benchmark's tree has whole-second times: its 1.7 MB file)."""
    rng = random.Random(11)
    root, big = tree_with_big(tmp_path, rng, lambda r: r.randbytes(300_000) + text(r, 700_000))
    (root / "z").write_bytes(text(rng, 30_000))
    if what in ("pax", "unpax"):
        os.utime(big, ns=(0, 1_700_000_000 * 10**9 + (0 if what == "pax" else 5)))
    settle()
    gen = Generations(root, tmp_path / "prev.tgz")
    gen.build()
    d = bytearray(big.read_bytes())
    st_ = big.stat()
    if what == "inplace":
        d[500_000 : 500_064] = rng.randbytes(64)
        big.write_bytes(bytes(d))
        os.utime(big, ns=(st_.st_atime_ns, st_.st_mtime_ns))
    elif what in ("pax", "unpax"):
        d[500_000 : 500_064] = rng.randbytes(64)
        big.write_bytes(bytes(d))
        os.utime(big, ns=(0, st_.st_mtime_ns + (7 if what == "pax" else -5)))
    elif what == "append":
        with open(big, "ab") as f:
            f.write(text(rng, 3000))
    else:
        os.truncate(big, 800_000)
    settle()
    assert gen.build() == fresh(root)
    assert gen.builder is not None
    s = gen.builder.stats
    assert s.bytes_matched > 700_000
    assert s.bytes_compressed < 400_000


class RaceRead:
    """Wraps ``_build._read_small``: after each read of ``target`` (up to ``times``), writes
    64 bytes into its middle (same size, same mtime) — an edit racing the read; remembers
    what the last read of it returned."""

    def __init__(self, target: Path, times: int) -> None:
        self.target, self.times, self.last = target, times, b""
        self.ino = target.stat().st_ino
        self.real = _build._read_small

    def __call__(self, fd: int, size: int) -> tuple[bytes, bool]:
        got = self.real(fd, size)
        if os.fstat(fd).st_ino == self.ino:
            self.last = got[0]
            if self.times > 0:
                self.times -= 1
                st_ = self.target.stat()
                with open(self.target, "r+b") as f:
                    f.seek(st_.st_size // 2 + 17 * self.times)
                    f.write(os.urandom(64))
                os.utime(self.target, ns=(st_.st_atime_ns, st_.st_mtime_ns))
        return got


@pytest.mark.parametrize("times", [1, 100])
def test_changed_file_edited_while_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, times: int
) -> None:
    """An edit racing the read of a changed file: once (the re-read is stored: a fresh
    build of the state after it), or at every read (stored as last read, reported as
    changed while read): either way the archive holds exactly the bytes that were read,
    whatever of them is copied from the previous archive."""
    rng = random.Random(13)
    root, big = tree_with_big(tmp_path, rng, lambda r: text(r, 900_000))
    settle()
    gen = Generations(root, tmp_path / "prev.tgz")
    gen.build()
    big_edit(big, rng, "inplace")
    settle()
    race = RaceRead(big, times)
    monkeypatch.setattr(_build, "_read_small", race)
    data = gen.build()
    monkeypatch.undo()
    assert gen.builder is not None and gen.builder.stats.bytes_matched > 0
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tf:
        f = tf.extractfile("big")
        assert f is not None and f.read() == race.last
    if times == 1:
        assert data == fresh(root)
    settle()
    assert gen.build() == fresh(root)


def test_changed_file_grown_past_the_memory_limit_since_the_walk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A changed file the walk saw under ``mem_limit`` that grew past it before its read is
    not compared in memory (``_splice_changed`` reads it whole): it goes the ordinary way
    (spooled), nothing matched, and the archive is still right."""
    rng = random.Random(21)
    root, big = tree_with_big(tmp_path, rng, lambda r: text(r, 150_000))
    settle()

    class Small(IncrementalBuilder):  # mem_limit as small as it goes (1 MiB: ``_READ``)
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, mem_limit=200_000, **k)

    gen = Generations(root, tmp_path / "prev.tgz")
    gen.build(Small)
    big_edit(big, rng, "inplace")
    settle()
    real_open = os.open
    grown: list[bool] = []

    def grow(path: Any, flags: int, *a: Any, **k: Any) -> int:
        if path == "big" and not grown:
            grown.append(True)
            with open(big, "ab") as f:
                f.write(text(rng, 3_000_000))  # past mem_limit (≥ 1 MiB) + _ENTRY_SLACK
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", grow)
    gen.build(Small)
    monkeypatch.undo()
    assert grown and gen.builder is not None and gen.builder.stats.bytes_matched == 0
    settle()
    assert gen.build(Small) == fresh(root)


def test_settled_stops_at_its_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``settled`` reads no more than its byte budget (the file that crosses it is the last)
    nor past its time: the files not reached stay racy, the rest as without a budget."""
    rng = random.Random(15)
    root = tmp_path / "tree"
    root.mkdir()
    for i in range(6):
        (root / f"f{i}").write_bytes(text(rng, 10_000))
    first = IncrementalBuilder(root, racy_ns=10**18)  # every file racy when read
    b"".join(first)
    settle()
    builder = IncrementalBuilder(root, racy_ns=RACY_NS)
    spy = count_opens(monkeypatch)
    part = builder.settled(first.index, budget=25_000)
    monkeypatch.undo()
    assert sorted(set(spy)) == ["f0", "f1", "f2"] and part is not None
    assert [e.path for e in part.entries if e.reusable] == ["f0", "f1", "f2"]
    assert builder.settled(first.index, seconds=0) is None  # out of time before the first
    whole = builder.settled(first.index)
    assert whole is not None and [e.path for e in whole.entries if e.reusable] == [
        f"f{i}" for i in range(6)
    ]
