"""Seek points (DBKPSK v1): the table is exact (windows are the true tar bytes, boundaries
the real ones even among chance markers), reading old tar bytes through it answers exactly
as inflating from the start, the layout delta is byte-identical with and without it and
costs what changed, and a missing, stale, torn or corrupt seek file on either side is only
a miss."""

from __future__ import annotations

import errno
import functools
import gzip
import logging
import random
import shutil
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any

import attrs
import blake3
import numpy as np
import pytest
from helpers_proc import Cluster, cluster, wait_for  # noqa: F401
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_agent_cache import build_kept, make_tree
from test_layout_delta import (
    EDITS,
    _build,
    _edit,
    _edited_pair,
    _make_tree,
    _settle,
    _text,
)

import deltabkp.archive._incremental as incremental
import deltabkp.archive._layout as layout
import deltabkp.archive._seek as seekmod
from deltabkp.archive import (
    ArchiveIndex,
    BuildHandover,
    IncrementalBuilder,
    LayoutPatcher,
    SeekPoints,
    encode_layout,
)
from deltabkp.errors import FormatError, LimitExceeded, UnsupportedVersion
from deltabkp_agent.cache import AgentCache
from deltabkp_server import seeks as server_seeks
from deltabkp_server.model import ArchiveRecord
from deltabkp_server.seeks import SeekCache
from deltabkp_server.store import LocalStore

GOLDEN = Path(__file__).parent / "golden"
BASE = GOLDEN / "layout" / "v1-base.tgz"
SEEK_GOLDEN = GOLDEN / "seek" / "v1.dbkpsk"
GOLDEN_SPACING = 16 << 10


def write_golden() -> None:  # pragma: no cover - run by hand
    base = BASE.read_bytes()
    SEEK_GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    seek = SeekPoints.build(base, blake3.blake3(base).digest(), spacing=GOLDEN_SPACING)
    SEEK_GOLDEN.write_bytes(seek.encode())


def _windows_are_the_tar(archive: bytes, seek: SeekPoints, exact: bool = True) -> None:
    """Entered at each point with its window, the archive inflates to the tar from there
    (``exact``: and the window is the tar before it, as ``build`` makes it)."""
    tar = gzip.decompress(archive)
    assert seek.tar_size == len(tar)
    for k, (c, t) in enumerate(zip(seek.archive_offsets, seek.tar_offsets, strict=True)):
        window = seek.window(k)
        assert len(window) == min(32768, t)
        if exact:
            assert window == tar[max(0, t - 32768) : t]
        # Entered there with its window, the stream gives the tar from t on.
        d = zlib.decompressobj(-15, zdict=window)
        assert d.decompress(archive[c : len(archive) - 8]) == tar[t:]


def test_golden_v1() -> None:
    base = BASE.read_bytes()
    data = SEEK_GOLDEN.read_bytes()
    assert data[:7] == b"DBKPSK\x01"
    golden = SeekPoints.parse(data)
    assert golden.encode() == data
    made = SeekPoints.build(base, blake3.blake3(base).digest(), spacing=GOLDEN_SPACING)
    # Windows are compared inflated: their deflate bytes are zlib's (version-dependent).
    assert attrs_of(made) == attrs_of(golden)
    assert [made.window(k) for k in range(len(made))] == \
        [golden.window(k) for k in range(len(golden))]
    assert len(golden) >= 3
    assert all(b - a >= GOLDEN_SPACING
               for a, b in zip((0, *golden.tar_offsets), golden.tar_offsets, strict=False))
    _windows_are_the_tar(base, golden)


def attrs_of(s: SeekPoints) -> tuple[object, ...]:
    return s.archive_hash, s.archive_size, s.tar_size, s.archive_offsets, s.tar_offsets


@functools.cache
def _archive_with_chance_markers() -> tuple[bytes, ArchiveIndex]:
    """A tree whose incompressible file holds many ``00 00 ff ff`` (kept verbatim in stored
    blocks): chance markers among the real ones."""
    rng = random.Random(7)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "tree"
        _make_tree(root, rng, 40)
        noise = bytearray(rng.randbytes(200_000))
        for at in range(100, len(noise) - 4, 700):
            noise[at : at + 4] = b"\x00\x00\xff\xff"
        (root / "noise.bin").write_bytes(bytes(noise))
        _settle(root)
        b = _build(root, Path(d) / "a.tgz", None, None)
        return (Path(d) / "a.tgz").read_bytes(), b.index


def test_points_from_markers_are_the_indexed_boundaries() -> None:
    archive, index = _archive_with_chance_markers()
    h = blake3.blake3(archive).digest()
    markers = archive.count(b"\x00\x00\xff\xff")
    assert markers > len(index.segments) + 100  # the case meant: many chance markers
    by_index = SeekPoints.build(archive, h, index=index, spacing=4096)
    by_markers = SeekPoints.build(archive, h, spacing=4096)
    assert attrs_of(by_index) == attrs_of(by_markers)
    assert by_index.windows == by_markers.windows
    assert len(by_index) > 20
    boundaries = {10 + int(d) for d in index.segments.deflate_ends}
    assert set(by_index.archive_offsets) <= boundaries
    _windows_are_the_tar(archive, by_markers)
    with pytest.raises(FormatError):
        SeekPoints.build(archive, b"\0" * 32, index=index)  # the index is another's


@functools.cache
def _with_seek_points() -> tuple[bytes, bytes, SeekPoints]:
    archive, _index = _archive_with_chance_markers()
    seek = SeekPoints.build(archive, blake3.blake3(archive).digest(), spacing=8192)
    return archive, gzip.decompress(archive), seek


@settings(max_examples=30, deadline=None)
@given(reads=st.lists(st.tuples(st.integers(0, 420_000), st.integers(0, 40_000)), min_size=1,
                      max_size=14))
def test_reads_answer_the_same_with_seek_points(reads: list[tuple[int, int]]) -> None:
    """Whatever the reads, a stream with seek points answers each exactly as one without
    (the same bytes, the same refusals: what a read answers depends on the reads alone),
    and holds no more."""
    archive, tar, seek = _with_seek_points()
    keep = 64 << 10
    plain, sought = layout.TarStream(archive, keep), layout.TarStream(archive, keep, seek)
    for lo, n in reads:
        a, b = plain.read(lo, lo + n), sought.read(lo, lo + n)
        assert a == b
        assert a is None or a == tar[lo : lo + n]
        assert sum(map(len, sought._pieces)) <= keep + n + 2 * layout._PIECE


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), edits=EDITS)
def test_layout_delta_is_the_same_with_seek_points(
    seed: int, edits: list[tuple[str, int]]
) -> None:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as d:
        a, b, old, new = _edited_pair(Path(d), rng, 30, edits)
    seek = SeekPoints.build(old, a.index.archive_hash, index=a.index, spacing=4096)
    plain = b"".join(encode_layout(a.index, old, b.index, new))
    assert b"".join(encode_layout(a.index, old, b.index, new, seek=seek)) == plain
    p = LayoutPatcher(old, base_hash=a.index.archive_hash, max_size=1 << 30, seek=seek)
    got = b"".join(bytes(x) for x in p.feed(plain))
    p.finish()
    assert got == new


def _sixty_files(root: Path, rng: random.Random) -> None:
    """A tree of 60 directories of one ~8 KB text file each (~500 KB of tar), settled."""
    for i in range(60):
        (root / f"d{i:02}").mkdir(parents=True)
        (root / f"d{i:02}" / "f.py").write_bytes(_text(rng, 8000))
    _settle(root)


def test_a_change_near_the_end_inflates_little_of_the_old_archive(tmp_path: Path) -> None:
    rng = random.Random(11)
    root = tmp_path / "tree"
    _sixty_files(root, rng)
    a = _build(root, tmp_path / "a.tgz", None, None)
    with open(root / "d58" / "f.py", "ab") as f:
        f.write(b"# appended near the end\n")
    _settle(root)
    b = _build(root, tmp_path / "b.tgz", a, tmp_path / "a.tgz")
    old, new = (tmp_path / "a.tgz").read_bytes(), (tmp_path / "b.tgz").read_bytes()
    seek = SeekPoints.build(old, a.index.archive_hash, index=a.index, spacing=64 << 10)
    streams: list[layout.TarStream] = []
    real = layout.TarStream.__init__

    def spy(self: layout.TarStream, *args: object, **kw: object) -> None:
        real(self, *args, **kw)  # type: ignore[arg-type]
        streams.append(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(layout.TarStream, "__init__", spy)
        delta = b"".join(encode_layout(a.index, old, b.index, new, seek=seek))
        assert _patch_with(old, delta, a.index.archive_hash, seek) == new
        without = b"".join(encode_layout(a.index, old, b.index, new))
    assert delta == without
    sender, receiver, plain = streams[0], streams[-2], streams[-1]
    assert sender.seeks >= 1 and receiver.seeks >= 1
    # From the start, the old tar is inflated up to the change: ~all of it.
    assert plain.inflated > 0.9 * a.index.tar_size
    for s in (sender, receiver):
        assert s.inflated < 0.25 * a.index.tar_size, (s.inflated, a.index.tar_size)


@settings(max_examples=30, deadline=None)
@given(reads=st.lists(st.tuples(st.integers(0, 420_000), st.integers(0, 40_000)), min_size=1,
                      max_size=14),
       extra=st.lists(st.integers(0, 10_000), max_size=8), table=st.booleans())
def test_reads_answer_the_same_with_extra_entry_points(
    reads: list[tuple[int, int]], extra: list[int], table: bool
) -> None:
    """Extra entry points (``TarStream.enter``: a segment boundary and its window, as the
    layout encoder makes them from a build's hand-over) change what is inflated, never
    what a read answers; reads inside a point's window are answered from it."""
    archive, tar, seek = _with_seek_points()
    index = _archive_with_chance_markers()[1]
    keep = 64 << 10
    plain = layout.TarStream(archive, keep)
    entered = layout.TarStream(archive, keep, seek if table else None)
    for x in extra:
        k = x % (len(index.segments) - 1)
        t, d = int(index.segments.tar_ends[k]), int(index.segments.deflate_ends[k])
        if x % 2:  # with the tar up to the next boundary as inflated already
            t2, d2 = int(index.segments.tar_ends[k + 1]), int(index.segments.deflate_ends[k + 1])
            entered.enter(10 + d, t, tar[max(0, t - (32 << 10)) : t], tar[t:t2], 10 + d2)
        else:
            entered.enter(10 + d, t, tar[max(0, t - (32 << 10)) : t])
    for lo, n in reads:
        a, b = plain.read(lo, lo + n), entered.read(lo, lo + n)
        assert a == b
        assert a is None or a == tar[lo : lo + n]
    with pytest.raises(ValueError):
        entered.enter(10, 40_000, b"short")


def _build_unracy(root: Path, out: Path, prev: IncrementalBuilder | None, prev_path: Path | None
                  ) -> IncrementalBuilder:
    """``_build`` with nothing racy: ``_settle`` changes every ctime, so files settled just
    before a build are read again by the next one; here, unchanged files are copied."""
    b = IncrementalBuilder(root, previous=prev.index if prev else None,
                           previous_archive=prev_path if prev else None, racy_ns=0, threads=0)
    with open(out, "wb") as f:
        f.writelines(b)
    return b


def _fresh_corrupted(fresh: BuildHandover) -> BuildHandover:
    """The hand-over with a byte of every chunk flipped (as a bug or a bad memory would)."""
    chunks = tuple(c[: len(c) // 2] + bytes([c[len(c) // 2] ^ 1]) + c[len(c) // 2 + 1 :]
                   for c in fresh.chunks)
    return attrs.evolve(fresh, chunks=chunks)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), edits=EDITS)
def test_layout_delta_is_the_same_with_the_builds_hand_over(
    seed: int, edits: list[tuple[str, int]]
) -> None:
    """The tar a build compressed (``BuildHandover``) spares the encoder inflating, and changes
    nothing in the delta: with or without seek points, whole, cut short by its limit, or
    corrupted (each chunk then fails its CRC-32s and is inflated as before)."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "tree"
        _make_tree(root, rng, 30)
        _settle(root)
        a = _build_unracy(root, Path(d) / "a.tgz", None, None)
        for kind, n in edits:
            _edit(root, rng, kind, n)
        b = _build_unracy(root, Path(d) / "b.tgz", a, Path(d) / "a.tgz")
        old, new = (Path(d) / "a.tgz").read_bytes(), (Path(d) / "b.tgz").read_bytes()
    fresh = b.handover
    assert fresh is not None and fresh.archive_hash == b.index.archive_hash
    seek = SeekPoints.build(old, a.index.archive_hash, index=a.index, spacing=4096)
    plain = b"".join(encode_layout(a.index, old, b.index, new))
    short = BuildHandover(fresh.archive_hash, fresh.previous_hash, fresh.offsets[:1],
                          fresh.chunks[:1])
    for f in (fresh, short, _fresh_corrupted(fresh)):
        for sp in (None, seek):
            assert b"".join(encode_layout(a.index, old, b.index, new, seek=sp, fresh=f)) == plain
    # Another archive's hand-over is not used.
    other = attrs.evolve(_fresh_corrupted(fresh), archive_hash=b"\0" * 32)
    assert b"".join(encode_layout(a.index, old, b.index, new, fresh=other)) == plain
    assert _patch_with(old, plain, a.index.archive_hash, seek) == new


def test_the_hand_over_spares_inflating_old_and_new(tmp_path: Path) -> None:
    """Two edits in the middle of a tree: with the build's hand-over the encoder enters the
    old archive at each fresh run (its window checked) and inflates only about what it
    reads there, takes the runs' tar as handed over, and does not compare the segments the
    build copied.  Kept to ``FRESH_LIMIT`` bytes,
    the build hands over only the jobs compressed first (the rest inflated as before)."""
    rng = random.Random(12)
    root = tmp_path / "tree"
    _sixty_files(root, rng)

    def build(out: str, prev: IncrementalBuilder | None) -> IncrementalBuilder:
        return _build_unracy(root, tmp_path / out, prev, tmp_path / "a.tgz")

    a = build("a.tgz", None)
    for i in (20, 40):
        with open(root / f"d{i}" / "f.py", "r+b") as f:
            f.seek(3000)
            f.write(b"# edited in place #")
    b = build("b.tgz", a)
    old, new = (tmp_path / "a.tgz").read_bytes(), (tmp_path / "b.tgz").read_bytes()
    assert b.handover is not None
    # The agent's spacing, 1 MiB (a table jumps at its own: with points every 128 KiB
    # the plain encoder too would enter near each edit).
    seek = SeekPoints.build(old, a.index.archive_hash, index=a.index, spacing=seekmod.SPACING)
    compared: list[int] = []  # compressed bytes compared by each encoder
    real_equal = np.array_equal

    def counting(x: Any, y: Any) -> bool:
        compared[-1] += len(x)
        return bool(real_equal(x, y))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(np, "array_equal", counting)
        compared.append(0)
        plain = layout._Encoder(a.index, old, b.index, new, seek)
        want = b"".join(plain.records())
        compared.append(0)
        handed = layout._Encoder(a.index, old, b.index, new, seek, b.handover)
        assert b"".join(handed.records()) == want
    # The segments the build copied are not compared again (all but ~the edits' 96 KiB).
    assert b.handover.copies
    assert compared[0] > 0.9 * len(new) and compared[1] < 0.2 * len(new), compared
    assert handed.fresh_windows == 2 and handed.fresh_runs == 3  # two edits, the final segment
    assert plain.fresh_windows == plain.fresh_runs == 0
    # Seeking: forward up to a spacing (1 MiB) is inflated rather than jumped, so the
    # plain stream inflates ~all of this small tree; entered at each edit, ~what it reads
    # (the final segment's window still from the table).
    assert plain.old_tar.inflated > 0.9 * a.index.tar_size
    assert handed.old_tar.inflated < 0.5 * plain.old_tar.inflated
    with pytest.MonkeyPatch.context() as mp:
        # All but the last job's bytes (the final segment's): the rest is kept.
        mp.setattr(incremental, "FRESH_LIMIT", sum(map(len, b.handover.chunks)) - 1)
        c = build("c.tgz", a)
    assert c.handover is not None
    assert sum(map(len, c.handover.chunks)) < sum(map(len, b.handover.chunks))
    cut = layout._Encoder(a.index, old, c.index, new, fresh=c.handover)
    assert b"".join(cut.records()) == want
    assert cut.fresh_runs == 2 and cut.fresh_windows == 2


def test_a_hand_over_is_ignored_against_another_base(tmp_path: Path) -> None:
    """B built from A hands over which of A's segments it copied; encoding A' -> B with that
    hand-over (A' another archive of a like tree: many segments of A' have the tar, lengths
    and places of A's, not their compressed bytes) must not take those as equal.  It did
    (``previous_hash`` unchecked): COPYs of A' bytes that are not B's, the receiver's
    blake3 refusing the result.  Now the hand-over names A and is ignored: the delta is the
    plain one, and rebuilds B."""
    rng = random.Random(12)
    root, other = tmp_path / "tree", tmp_path / "other"
    _sixty_files(root, rng)
    a = _build_unracy(root, tmp_path / "a.tgz", None, None)
    shutil.copytree(root, other)
    for i in range(1, 60, 2):  # A': every other file edited in place (same length)
        with open(other / f"d{i:02}" / "f.py", "r+b") as f:
            f.seek(3000)
            f.write(b"#" + bytes([65 + i % 26]) * 3)
    a2 = _build_unracy(other, tmp_path / "a2.tgz", None, None)
    for i in (20, 40):
        with open(root / f"d{i}" / "f.py", "r+b") as f:
            f.seek(3000)
            f.write(b"# edited in place #")
    b = _build_unracy(root, tmp_path / "b.tgz", a, tmp_path / "a.tgz")
    assert b.handover is not None and b.handover.copies
    assert b.handover.previous_hash == a.index.archive_hash
    old2, new = (tmp_path / "a2.tgz").read_bytes(), (tmp_path / "b.tgz").read_bytes()
    plain = b"".join(encode_layout(a2.index, old2, b.index, new))
    handed = b"".join(encode_layout(a2.index, old2, b.index, new, fresh=b.handover))
    assert handed == plain
    seek = SeekPoints.build(old2, a2.index.archive_hash, index=a2.index)
    assert _patch_with(old2, handed, a2.index.archive_hash, seek) == new


def _patch_with(old: bytes, delta: bytes, h: bytes, seek: SeekPoints) -> bytes:
    p = LayoutPatcher(old, base_hash=h, max_size=1 << 30, seek=seek)
    out = b"".join(bytes(x) for x in p.feed(delta))
    p.finish()
    return out


def test_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    data = SEEK_GOLDEN.read_bytes()
    with pytest.raises(FormatError, match="magic"):
        SeekPoints.parse(b"DBKPSX" + data[6:])
    with pytest.raises(UnsupportedVersion):
        SeekPoints.parse(data[:6] + b"\x02" + data[7:])
    for cut in (10, len(data) - 1):
        with pytest.raises(FormatError):
            SeekPoints.parse(data[:cut])
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1
    with pytest.raises(FormatError, match="checksum"):
        SeekPoints.parse(bytes(flipped))
    # Well-formed but with points out of order (checksum recomputed): refused.
    s = SeekPoints.parse(data)
    body = bytearray(data[:-32])
    head = seekmod._HEAD.size
    first = struct.unpack_from("<QQI", body, head)
    struct.pack_into("<QQI", body, head + seekmod._POINT.size, *first)
    with pytest.raises(FormatError, match="order"):
        SeekPoints.parse(bytes(body) + blake3.blake3(bytes(body)).digest())
    monkeypatch.setattr(seekmod, "MAX_SEEK_FILE", len(data) - 1)
    with pytest.raises(LimitExceeded):
        SeekPoints.parse(data)
    # A table of another archive is not used (the same output, inflated from the start).
    base = BASE.read_bytes()
    assert s.matches(blake3.blake3(base).digest(), len(base))
    assert not s.matches(b"\0" * 32, len(base)) and not s.matches(None, len(base))


# -- the agent's seek file -----------------------------------------------------------------


def test_agent_seek_file_stale_corrupt_torn_or_unwritable_is_a_miss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "deltabkp_agent")
    c = AgentCache(tmp_path / "c")
    root = make_tree(tmp_path / "t")
    build_kept(c, root)
    index = c.kept_index(str(root))
    assert index is not None and c.kept_seek(str(root), index) is None  # not made yet
    assert c.make_seek(str(root))
    seek = c.kept_seek(str(root), index)
    assert seek is not None and seek.matches(index.archive_hash, index.archive_size)
    f = c._seek_file(str(root))
    # A newer kept build: the file names the old archive, so it is not used, then replaced.
    (root / "f03").write_bytes(b"changed\n" * 1000)
    build_kept(c, root)
    index2 = c.kept_index(str(root))
    assert index2 is not None and index2.archive_hash != index.archive_hash
    assert c.kept_seek(str(root), index2) is None
    derived: list[SeekPoints] = []
    real_derive = SeekPoints.derive.__func__  # type: ignore[attr-defined]

    def spy(cls: type[SeekPoints], *a: object, **k: object) -> SeekPoints:
        derived.append(real_derive(cls, *a, **k))
        return derived[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SeekPoints, "derive", classmethod(spy))
        assert c.make_seek(str(root))
    # From the replaced build's seek file (the cost of the change, not of an inflate).
    assert derived and c.kept_seek(str(root), index2) == derived[0]
    # Corrupt: a miss, and the file goes.
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    assert c.kept_seek(str(root), index2) is None and not f.exists()
    assert "dropping unreadable seek file" in caplog.text
    # A crash mid-write leaves a temp file: start-up removes it, the kept build stays.
    torn = f.parent / f".{f.name}.x1y2.part"
    torn.write_bytes(b"DBKPSK\x01 half")
    c = AgentCache(tmp_path / "c")
    assert not torn.exists() and c.kept_index(str(root)) == index2
    # A full disk: no seek file, the kept build untouched, no error.
    archive_before = c.kept_archive(str(root)).read_bytes()  # type: ignore[union-attr]

    def full(*_a: object, **_k: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("deltabkp_agent.cache.write_bytes_atomic", full)
    assert not c.make_seek(str(root)) and not f.exists()
    assert c.kept_index(str(root)) == index2
    assert c.kept_archive(str(root)).read_bytes() == archive_before  # type: ignore[union-attr]
    c.drop_kept(str(root))
    assert c.kept_seek(str(root), index2) is None


# -- the server's seek files ---------------------------------------------------------------


def _commit(store: LocalStore, tid: int, seq: int, archive: bytes) -> ArchiveRecord:
    part = store.begin(tid, seq)
    part.write(archive)
    part.commit()
    return ArchiveRecord(target_id=tid, seq=seq, created=0.0, size=len(archive),
                         hash=blake3.blake3(archive).digest(), transferred=0,
                         execution_id=None, retained=True, deleted_at=None, missing=False)


def test_server_seek_files_bounded_and_a_miss_when_damaged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "deltabkp_server")
    store = LocalStore(tmp_path / "store")
    seeks = SeekCache(tmp_path / "seek")
    base = BASE.read_bytes()
    other, _ = _archive_with_chance_markers()
    r1 = _commit(store, 1, 1, base)
    r2 = _commit(store, 1, 2, other)
    r9 = _commit(store, 9, 1, base)
    assert seeks.load(1, r1) is None
    for r in (r1, r9):
        seeks.make(store, r.target_id, r.seq, r.size, r.hash)
    got = seeks.load(1, r1)
    assert got is not None and got.matches(r1.hash, r1.size)
    # The target's newest only: making archive 2's drops archive 1's, not target 9's.
    seeks.make(store, 1, 2, r2.size, r2.hash)
    assert seeks.load(1, r1) is None and seeks.load(1, r2) is not None
    assert seeks.load(9, r9) is not None
    assert len(list(seeks.dir.glob("*.dbkpsk"))) == 2
    # Corrupt: a miss, deleted, logged at DEBUG; a crash's temp file goes at start-up.
    f = next(seeks.dir.glob("1-*.dbkpsk"))
    f.write_bytes(f.read_bytes()[:-5])
    assert seeks.load(1, r2) is None and not f.exists()
    assert "dropping" in caplog.text
    torn = seeks.dir / f".{f.name}.abc.part"
    torn.write_bytes(b"half")
    seeks = SeekCache(tmp_path / "seek")
    assert not torn.exists()
    # An archive the store cannot read: no file, no error.
    absent = bytes([1]) * 32
    seeks.make(store, 1, 7, 123, absent)
    assert not (seeks.dir / f"1-{absent.hex()}.dbkpsk").exists()
    assert "none made for archive 7" in caplog.text


# -- between real daemons ------------------------------------------------------------------


def test_daemons_keep_seek_files_and_survive_corrupt_ones(
    cluster: Cluster, tmp_path: Path  # noqa: F811 (the fixture)
) -> None:
    """Both daemons make the seek file of the newest archive after a backup; corrupt ones
    on both sides cost nothing but the speed: the next backup is still a layout delta that
    stores a fresh build's bytes, and new seek files follow it."""
    from test_layout_delta_e2e import STDLIB, _nth_served, _same_as_fresh_build, _served
    from test_layout_delta_e2e import _edit as edit_tree

    c = cluster
    app = tmp_path / "src"
    for d in ("json", "http", "email", "asyncio", "xml", "unittest"):  # ~3 MB of tar
        shutil.copytree(STDLIB / d, app / d, ignore=shutil.ignore_patterns("__pycache__", "test*"))
    c.start_server()
    agent = c.start_agent(tmp_path)
    c.ctl("register", agent.address, str(app), "--every", "1h")
    home = tmp_path / "home" / ".cache" / "deltabkp"

    def files() -> tuple[list[Path], list[Path]]:
        return sorted((c.data_dir / "seek").glob("*.dbkpsk")), sorted(home.rglob("builds/*.sk"))

    wait_for(lambda: all(len(f) == 1 for f in files()), timeout=120, what="seek files")
    (server_sk,), (agent_sk,) = files()
    newest = max((c.data_dir / "archives").rglob("*.tgz"), key=lambda p: int(p.stem))
    first = SeekPoints.parse(server_sk.read_bytes())
    assert first.matches(blake3.blake3(newest.read_bytes()).digest(), newest.stat().st_size)
    assert len(first) >= 1  # the case meant: an archive with a point to seek to
    # Index or markers, one table at one spacing: the agent's at ``SPACING``, the server's
    # denser (``seeks.SPACING``).
    data = newest.read_bytes()
    h = blake3.blake3(data).digest()
    assert SeekPoints.parse(agent_sk.read_bytes()) == SeekPoints.build(data, h)
    assert first == SeekPoints.build(data, h, spacing=server_seeks.SPACING)
    for f in (server_sk, agent_sk):
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    edit_tree(app, 1)
    rec = c.ctl("backup-now", agent.address, str(app), "--wait")
    assert rec["outcome"] == "stored", rec
    assert "signature from layout" in _nth_served(c, 2), _served(c)
    _same_as_fresh_build(c, app)
    newest = max((c.data_dir / "archives").rglob("*.tgz"), key=lambda p: int(p.stem))
    h = blake3.blake3(newest.read_bytes()).digest()
    wait_for(lambda: [p.name for p in files()[0]] == [f"{server_sk.name.split('-')[0]}-{h.hex()}.dbkpsk"]
             and len(files()[1]) == 1 and SeekPoints.parse(files()[1][0].read_bytes()).matches(
                 h, newest.stat().st_size), timeout=60, what="the new archive's seek files")
    # With the base's seek file sound, the server carries its points through the patch:
    # the new archive's table is exact.
    edit_tree(app, 2)
    rec = c.ctl("backup-now", agent.address, str(app), "--wait")
    assert rec["outcome"] == "stored", rec
    newest = max((c.data_dir / "archives").rglob("*.tgz"), key=lambda p: int(p.stem))
    data = newest.read_bytes()
    h = blake3.blake3(data).digest()
    wait_for(lambda: [p.name for p in files()[0]] == [f"{server_sk.name.split('-')[0]}-{h.hex()}.dbkpsk"],
             timeout=60, what="the carried seek file")
    carried = SeekPoints.parse(files()[0][0].read_bytes())
    assert carried.matches(h, len(data)) and len(carried) >= 1
    _windows_are_the_tar(data, carried)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), generations=st.lists(EDITS, min_size=1, max_size=3))
# Found: a point under 32 KiB moved (its window's length), the tail's last point.
@example(seed=170, generations=[[("delete", 0)]])
@example(seed=0, generations=[[("delete", 0)]])
def test_derived_tables_are_exact_and_keep_their_spacing(
    seed: int, generations: list[list[tuple[str, int]]]
) -> None:
    """Generation after generation, a table derived from the previous one (as the agent
    makes it) decodes exactly from each point, at real boundaries, with no gap over twice
    the spacing (+ a segment), and is the table a fresh ``build`` gives when nothing
    changed."""
    rng = random.Random(seed)
    spacing = 8192
    with tempfile.TemporaryDirectory() as d:
        w = Path(d)
        root = w / "tree"
        _make_tree(root, rng, 30)
        _settle(root)
        prev = _build(root, w / "a0.tgz", None, None)
        seek = SeekPoints.build((w / "a0.tgz").read_bytes(), prev.index.archive_hash,
                                index=prev.index, spacing=spacing)
        for g, edits in enumerate([[], *generations], 1):
            for kind, n in edits:
                _edit(root, rng, kind, n)
            _settle(root)
            b = _build(root, w / f"a{g}.tgz", prev, w / f"a{g - 1}.tgz")
            new = (w / f"a{g}.tgz").read_bytes()
            derived = SeekPoints.derive(seek, prev.index, new, b.index, spacing=spacing)
            assert derived.matches(b.index.archive_hash, len(new))
            _windows_are_the_tar(new, derived, exact=False)
            assert set(derived.archive_offsets) <= {10 + int(x) for x in b.index.segments.deflate_ends}
            starts = (0, *derived.tar_offsets)
            assert all(y - x > 0 for x, y in zip(starts, (*derived.tar_offsets, b.index.tar_size),
                                                 strict=True))
            assert all(y - x <= 2 * spacing + 65536 for x, y in
                       zip(starts, (*derived.tar_offsets, b.index.tar_size), strict=True))
            if not edits and g == 1:
                # Unchanged: the fresh table's points (those less than 32 KiB of tar from
                # the end cannot be checked, so are not taken), with its windows.
                built = SeekPoints.build(new, b.index.archive_hash, index=b.index,
                                         spacing=spacing)
                n = len(derived)
                assert n >= len(built) - 1 and derived.windows == built.windows[:n]
                assert derived.tar_offsets == built.tar_offsets[:n]
            seek, prev = derived, b


# -- the server's tables carried through a layout patch -------------------------------------


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), generations=st.lists(EDITS, min_size=1, max_size=3))
@example(seed=0, generations=[[("delete", 0)]])
def test_carried_tables_are_exact_and_keep_their_spacing(
    seed: int, generations: list[list[tuple[str, int]]]
) -> None:
    """Generation after generation, the table the server carries from the base's through
    the layout patch (its COPY records) is exact (each window the tar before its point, the
    stream from each point the tar from there), at real boundaries, with no gap over three
    times the spacing; it patches the next generation right; unchanged, it is the base's
    table moved along."""
    rng = random.Random(seed)
    spacing = 8192
    with tempfile.TemporaryDirectory() as d:
        w = Path(d)
        root = w / "tree"
        _make_tree(root, rng, 30)
        _settle(root)
        prev = _build(root, w / "a0.tgz", None, None)
        old = (w / "a0.tgz").read_bytes()
        seek = SeekPoints.build(old, prev.index.archive_hash, spacing=spacing)  # the server's
        for g, edits in enumerate([[], *generations], 1):
            for kind, n in edits:
                _edit(root, rng, kind, n)
            _settle(root)
            b = _build(root, w / f"a{g}.tgz", prev, w / f"a{g - 1}.tgz")
            new = (w / f"a{g}.tgz").read_bytes()
            delta = b"".join(encode_layout(prev.index, old, b.index, new, seek=seek))
            p = LayoutPatcher(old, base_hash=prev.index.archive_hash, max_size=1 << 30,
                              seek=seek)
            assert b"".join(bytes(x) for x in p.feed(delta)) == new
            p.finish()
            assert p.seek is seek and p.copies
            carried = SeekPoints.carry(seek, p.copies, new, b.index.archive_hash,
                                       spacing=spacing)
            assert carried.matches(b.index.archive_hash, len(new))
            _windows_are_the_tar(new, carried)
            assert set(carried.archive_offsets) <= {10 + int(x) for x in b.index.segments.deflate_ends}
            ends = (*carried.tar_offsets, b.index.tar_size)
            assert all(0 < y - x <= 3 * spacing + 65536 for x, y in zip((0, *carried.tar_offsets), ends,
                                                                       strict=True))
            if not edits:
                assert carried.tar_offsets == seek.tar_offsets and carried.windows == seek.windows
            seek, prev, old = carried, b, new


def test_server_carries_seek_points_and_falls_back_to_the_markers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a layout patch with the base's table, ``make`` carries it (no marker scan of
    the whole archive); a hint of another archive or one that does not fit is the full
    scan's table, never an error."""
    caplog.set_level(logging.DEBUG, "deltabkp_server")
    rng = random.Random(7)
    w = tmp_path
    root = w / "tree"
    _make_tree(root, rng, 120)  # ~3 MB of tar: points at the server's spacing
    _settle(root)
    a = _build(root, w / "a.tgz", None, None)
    _edit(root, rng, "edit", 50)
    _settle(root)
    b = _build(root, w / "b.tgz", a, w / "a.tgz")
    old, new = (w / "a.tgz").read_bytes(), (w / "b.tgz").read_bytes()
    store = LocalStore(w / "store")
    seeks = SeekCache(w / "seek")
    r1 = _commit(store, 1, 1, old)
    seeks.make(store, 1, 1, r1.size, r1.hash)
    base_seek = seeks.load(1, r1)
    assert base_seek is not None
    p = LayoutPatcher(old, base_hash=r1.hash, max_size=1 << 30, seek=base_seek)
    p.feed(b"".join(encode_layout(a.index, old, b.index, new, seek=base_seek)))
    p.finish()
    r2 = _commit(store, 1, 2, new)
    full = SeekPoints.build(new, r2.hash, spacing=server_seeks.SPACING)
    built = []
    monkeypatch.setattr(SeekPoints, "build", classmethod(
        lambda cls, *args, **kw: built.append(1) or full))
    seeks.carry_from(1, r2.hash, base_seek, p.copies)
    seeks.make(store, 1, 2, r2.size, r2.hash)
    got = seeks.load(1, r2)
    assert got == SeekPoints.carry(base_seek, p.copies, new, r2.hash,
                                   spacing=server_seeks.SPACING) and not built
    assert len(got) >= 1 and set(got.tar_offsets) & set(full.tar_offsets)
    _windows_are_the_tar(new, got)
    # A hint of another archive: the markers.
    (seeks.dir / f"1-{r2.hash.hex()}.dbkpsk").unlink()
    seeks.carry_from(1, r1.hash, base_seek, p.copies)
    seeks.make(store, 1, 2, r2.size, r2.hash)
    assert seeks.load(1, r2) == full and len(built) == 1
    # Copies that do not fit the archive (its prior points land elsewhere): not carried,
    # the archive is scanned through; carrying that fails: the markers.
    bogus = SeekPoints.carry(base_seek, [(0, 10, len(new) - 18)], new, r2.hash)
    _windows_are_the_tar(new, bogus)

    def fail(*args: object, **kw: object) -> SeekPoints:
        raise FormatError("seek points: the archive does not inflate")

    monkeypatch.setattr(SeekPoints, "carry", fail)
    (seeks.dir / f"1-{r2.hash.hex()}.dbkpsk").unlink()
    seeks.carry_from(1, r2.hash, base_seek, p.copies)
    seeks.make(store, 1, 2, r2.size, r2.hash)
    assert seeks.load(1, r2) == full and len(built) == 2
    assert "cannot carry points to archive 2" in caplog.text
