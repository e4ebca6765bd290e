"""The layout delta's versions 2 and 3 (``LayoutStreamer``): made while the incremental build
runs (version 3: all of it before the build compresses, ``stream_first``).

The same receiver (``LayoutPatcher``) rebuilds the new archive byte for byte, whatever the
trees, edits and chunking; the records come out as the build goes (the first RUN before the
build's end); a build that does not reuse the old archive makes no delta; damaged deltas fail
with deltabkp's errors only.  Golden file: ``tests/golden/layout/v2.dbkpld`` (the same pair as
``v1.dbkpld``: against ``v1-base.tgz`` it rebuilds the archive of ``v1-new.b3``), and
``v3.dbkpld`` (the same).
"""

from __future__ import annotations

import random
import struct
import tempfile
from pathlib import Path

import blake3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deltabkp.archive import (
    ArchiveIndex,
    IncrementalBuilder,
    LayoutPatcher,
    LayoutStreamer,
    SeekPoints,
    encode_layout,
    layout_capabilities,
    layout_capability,
)
from deltabkp.archive._layout import (
    LAYOUT_EARLY_VERSION,
    LAYOUT_STREAM_VERSION,
    T_COPY,
    T_END,
    T_RUN,
)
from deltabkp.errors import FormatError, IntegrityError, UnsupportedVersion
from tests.test_layout_delta import (
    EDITS,
    GOLDEN,
    _build,
    _edit,
    _golden_edited,
    _make_tree,
    _patch,
    _settle,
)
from tests.test_layout_delta import _golden as _golden_of

#: Archive bytes a version 3 build had yielded when its END was made (``_streamed``).
_EARLY_OUT: list[int] = []


def _streamed(
    root: Path, out: Path, prev: IncrementalBuilder, prev_path: Path, *, threads: int = 0,
    seek: SeekPoints | None = None, version: int = LAYOUT_STREAM_VERSION,
) -> tuple[IncrementalBuilder, bytes, LayoutStreamer, int]:
    """Build ``root`` from ``prev`` with a streamer, as the agent does: the delta, and how
    many chunks of the build had gone out when the first RUN record was made.  Version 3:
    END as soon as the streamer was told everything (the archive bytes out by then are
    appended to ``_EARLY_OUT``)."""
    old = prev_path.read_bytes()
    streamer = LayoutStreamer(prev.index, old, seek=seek, version=version)
    early = version == LAYOUT_EARLY_VERSION
    # racy_ns=0: files written a moment ago (their ctime is recent) are reused all the same,
    # as an agent's settled tree's are (nothing writes them during the test).
    b = IncrementalBuilder(root, previous=prev.index, previous_archive=prev_path,
                           threads=threads, stream=streamer, racy_ns=0, stream_first=early)
    records = [streamer.header()]
    first_run = -1
    ended = False
    with open(out, "wb") as f:
        for k, chunk in enumerate(b):
            f.write(chunk)
            got = streamer.take()
            if first_run < 0 and any(r[0] == T_RUN for r in got):
                first_run = k
            records += got
            if early and not ended and streamer.told_all:
                records += streamer.end()
                ended = True
                _EARLY_OUT.append(f.tell())
    if not early:
        records += streamer.end(b.index.archive_size, b.index.archive_hash)
    assert ended or not early
    return b, b"".join(records), streamer, first_run


def _built_then_edited(w: Path, seed: int, files: int, kind: str, n: int
                       ) -> tuple[Path, IncrementalBuilder]:
    """A tree of ``files`` built (``w/a.tgz``), then one ``_edit``: the tree, that build."""
    rng = random.Random(seed)
    root = w / "tree"
    _make_tree(root, rng, files)
    _settle(root)
    a = _build(root, w / "a.tgz", None, None)
    _edit(root, rng, kind, n)
    _settle(root)
    return root, a


def _records(delta: bytes) -> list[int]:
    """The record types of a version 2 delta, in order."""
    at = 6 + 1 + 1 + 32 + 1 + 1 + delta[41]
    kinds = []
    while at < len(delta):
        kind, n = struct.unpack_from("<BI", delta, at)
        kinds.append(kind)
        at += 5 + n
    return kinds


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), generations=st.lists(EDITS, min_size=1, max_size=2),
       step=st.sampled_from((None, 1, 977)), threads=st.sampled_from((0, 2)),
       version=st.sampled_from((LAYOUT_STREAM_VERSION, LAYOUT_EARLY_VERSION)))
def test_streamed_delta_rebuilds_the_agents_archive_byte_for_byte(
    seed: int, generations: list[list[tuple[str, int]]], step: int | None, threads: int,
    version: int,
) -> None:
    """Random trees and edit sequences over generations, built with and without the
    compression pool: the streamed delta of each generation (version 2, or 3: told before
    the build compresses), decoded against the previous archive (fed whole, byte by byte,
    or in odd pieces), is the new archive exactly, and the build's archive a fresh one's."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as d:
        w = Path(d)
        root = w / "tree"
        _make_tree(root, rng, 24)
        prev_path = w / "a0.tgz"
        prev = IncrementalBuilder(root, threads=0, racy_ns=0)
        prev_path.write_bytes(b"".join(prev))
        for g, edits in enumerate(generations, 1):
            for kind, n in edits:
                _edit(root, rng, kind, n)
            # (No ``_settle``: only the edited files' ctimes change, the rest is copied.)
            path = w / f"a{g}.tgz"
            b, delta, streamer, _ = _streamed(root, path, prev, prev_path, threads=threads,
                                              version=version)
            assert not streamer.failed
            assert delta[:7] == b"DBKPLD" + bytes([version])
            old, new = prev_path.read_bytes(), path.read_bytes()
            assert new == b"".join(IncrementalBuilder(root, threads=0))  # a fresh build's
            assert _patch(old, delta, prev.index.archive_hash, step if g == 1 else None) == new
            prev, prev_path = b, path


def _big_tree(root: Path, rng: random.Random) -> None:
    """~2.5 MB of text in 200 files: many compression jobs and segments."""
    _make_tree(root, rng, 200)
    for p in sorted(root.rglob("*.py"))[::10]:
        p.write_bytes(p.read_bytes() * 20)
    _settle(root)


def _big_built(w: Path, seed: int) -> tuple[Path, IncrementalBuilder]:
    """``_big_tree`` in ``w/tree``, built (``w/a.tgz``): the tree, that build."""
    root = w / "tree"
    _big_tree(root, random.Random(seed))
    a = IncrementalBuilder(root, threads=0, racy_ns=0)
    (w / "a.tgz").write_bytes(b"".join(a))
    return root, a


def test_records_go_out_while_the_build_runs_and_cost_about_what_v1_costs(tmp_path: Path) -> None:
    """An edit a third into a big tree: its RUN is made well before the build's last chunk
    (the receiver works while the agent builds), entering the old stream right after the
    copied segments before it (``fresh_windows``), the delta the same with the old archive's
    seek points or without, and about version 1's size (the jobs' segments that compressed to
    old bytes are rebuilt, not copied: their cuts and references cost a little)."""
    root, a = _big_built(tmp_path, 5)
    files = sorted(root.rglob("*.py"))
    edited = files[len(files) // 3]
    edited.write_bytes(edited.read_bytes()[:500] + b"# an edit\n" + edited.read_bytes()[500:])
    # (No ``_settle``: setting every file's times would change every file's ctime.)
    old = (tmp_path / "a.tgz").read_bytes()
    seek = SeekPoints.build(old, a.index.archive_hash, index=a.index, spacing=64 << 10)
    b, delta, streamer, first_run = _streamed(root, tmp_path / "b.tgz", a, tmp_path / "a.tgz",
                                              threads=2, seek=seek)
    _, plain, _, _ = _streamed(root, tmp_path / "c.tgz", a, tmp_path / "a.tgz")
    new = (tmp_path / "b.tgz").read_bytes()
    chunks = sum(1 for _ in IncrementalBuilder(root, previous=a.index, racy_ns=0,
                                               previous_archive=tmp_path / "a.tgz"))
    assert 0 <= first_run < 2 * chunks // 3, (first_run, chunks)
    assert streamer.runs >= 1 and streamer.fresh_windows >= 1
    assert delta == plain  # seek points and entry points change what is inflated only
    assert _patch(old, delta, a.index.archive_hash, 4096) == new
    v1 = b"".join(encode_layout(a.index, old, b.index, new))
    assert len(delta) < 2 * len(v1) + 1000, (len(delta), len(v1))
    kinds = _records(delta)
    assert kinds[0] == T_COPY and kinds[-1] == T_END and T_RUN in kinds


def test_an_unchanged_tree_is_copies_and_the_final_run(tmp_path: Path) -> None:
    """Nothing changed: no compression job before the final one (``runs`` 0, which is what
    the agent holds its records back on), and the delta rebuilds the same archive."""
    root, a = _big_built(tmp_path, 9)
    b, delta, streamer, _ = _streamed(root, tmp_path / "b.tgz", a, tmp_path / "a.tgz")
    old = (tmp_path / "a.tgz").read_bytes()
    assert b.index.archive_hash == a.index.archive_hash
    assert streamer.runs == 0
    assert _records(delta).count(T_RUN) == 1
    assert _patch(old, delta, a.index.archive_hash) == old


def test_a_build_that_does_not_reuse_the_old_archive_makes_no_delta(tmp_path: Path) -> None:
    """A streamer for another archive than the build reuses, or a build whose previous
    archive fails its check: no record, ``failed`` says why, ``end`` refuses."""
    root, a = _built_then_edited(tmp_path, 2, 30, "edit", 3)
    other = _build(root, tmp_path / "o.tgz", None, None)
    # Against another old archive than the one the build reuses.
    s = LayoutStreamer(other.index, (tmp_path / "o.tgz").read_bytes())
    b = IncrementalBuilder(root, previous=a.index, previous_archive=tmp_path / "a.tgz",
                           threads=0, stream=s)
    for _ in b:
        assert s.take() == []
    assert "another archive" in s.failed
    with pytest.raises(IntegrityError):
        s.end(b.index.archive_size, b.index.archive_hash)
    # The previous archive damaged: the build goes on afresh, without it.
    damaged = bytearray((tmp_path / "a.tgz").read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    (tmp_path / "d.tgz").write_bytes(bytes(damaged))
    s = LayoutStreamer(a.index, bytes(damaged))
    b = IncrementalBuilder(root, previous=a.index, previous_archive=tmp_path / "d.tgz",
                           threads=0, stream=s)
    for _ in b:
        assert s.take() == []
    assert s.failed and b.stats.previous
    # The old archive is not the size its index says: refused at once.
    with pytest.raises(IntegrityError):
        LayoutStreamer(a.index, bytes(damaged[:-1]))


def test_capabilities_name_every_version_the_newest_first() -> None:
    caps = layout_capabilities()
    assert caps == (layout_capability(3), layout_capability(2), layout_capability(1))
    assert [c.split("/", 1)[0] for c in caps] == ["layout-3", "layout-2", "layout-1"]
    assert len({c.split("/", 1)[1] for c in caps}) == 1  # the same deflater and format


# -- golden file ------------------------------------------------------------------------------


def _golden_streamed(w: Path, version: int = LAYOUT_STREAM_VERSION) -> tuple[Path, bytes]:
    """The pair of ``v1.dbkpld`` (``test_layout_delta._golden_pair``'s trees), the new
    build streamed: its base, its delta."""
    root, a = _golden_edited(w)
    _, delta, _, _ = _streamed(root, w / "new.tgz", a, w / "old.tgz", version=version)
    return w / "old.tgz", delta


def write_golden(version: int = LAYOUT_STREAM_VERSION) -> None:  # pragma: no cover - by hand
    """python -c "import tests.test_layout_stream as t; t.write_golden(2); t.write_golden(3)" """
    with tempfile.TemporaryDirectory() as d:
        old, delta = _golden_streamed(Path(d), version)
        assert old.read_bytes() == (GOLDEN / "v1-base.tgz").read_bytes()
        (GOLDEN / f"v{version}.dbkpld").write_bytes(delta)


def _golden() -> tuple[bytes, bytes, bytes]:
    return _golden_of("v2.dbkpld")


def test_golden_v3_decodes_to_the_recorded_archive(tmp_path: Path) -> None:
    """Version 3: version 2's records (the same bytes, but the version byte and END), END
    the blake3 of the tar its RUN records rebuild; the encoder still makes these bytes."""
    base, delta, h = _golden_of("v3.dbkpld")
    assert delta[:7] == b"DBKPLD\x03"
    got = _patch(base, delta, h)
    assert blake3.blake3(got).hexdigest() == (GOLDEN / "v1-new.b3").read_text().strip()
    v2 = (GOLDEN / "v2.dbkpld").read_bytes()
    assert delta[7:-69] == v2[7:-45] and delta[-69:-64] == struct.pack("<BI", T_END, 64)
    _, made = _golden_streamed(tmp_path, LAYOUT_EARLY_VERSION)
    assert made == delta


def test_refusals_of_version_3() -> None:
    """END vouches for the RUN records' rebuilt tar and for the delta's bytes (a damaged
    COPY record would copy other old bytes; the fuzz of ``test_layout_delta`` found it):
    another digest, or another size, is refused; the archive's size and blake3 are the
    receiver's own (what a full build makes)."""
    base, delta, h = _golden_of("v3.dbkpld")
    p = LayoutPatcher(base, base_hash=h)
    p.feed(delta)
    p.finish()
    assert blake3.blake3(_patch(base, delta, h)).digest() == p.new_hash
    for bad, why in ((delta[:-64] + bytes(32) + delta[-32:], "other tar"),
                     (delta[:-32] + bytes(32), "not the one"),
                     # the gzip trailer (the RAW record before END) changed
                     (delta[:-70] + bytes([delta[-70] ^ 1]) + delta[-69:], "not the one")):
        p = LayoutPatcher(base, base_hash=h)
        p.feed(bad)
        with pytest.raises(IntegrityError, match=why):
            p.finish()
    with pytest.raises(FormatError, match="END record has the wrong size"):
        LayoutPatcher(base).feed(delta[:-69] + struct.pack("<BI", T_END, 40) + bytes(40))


def test_version_3_is_all_told_before_the_build_compresses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 3's END is made before any compressed job went out (the build held its jobs,
    ``DEFER_LIMIT``), from the same records as version 2's; past the limit (0 here) the jobs
    are compressed as they come, and the delta and the archive are the same bytes."""
    import deltabkp.archive._incremental as inc

    root, a = _big_built(tmp_path, 5)
    files = sorted(root.rglob("*.py"))
    for f in (files[len(files) // 3], files[2 * len(files) // 3]):
        f.write_bytes(f.read_bytes()[:500] + b"# an edit\n" + f.read_bytes()[500:])
    old = (tmp_path / "a.tgz").read_bytes()
    _EARLY_OUT.clear()
    b2, d2, _, _ = _streamed(root, tmp_path / "b.tgz", a, tmp_path / "a.tgz", threads=2)
    b3, d3, s3, _ = _streamed(root, tmp_path / "c.tgz", a, tmp_path / "a.tgz", threads=2,
                              version=LAYOUT_EARLY_VERSION)
    new = (tmp_path / "b.tgz").read_bytes()
    assert (tmp_path / "c.tgz").read_bytes() == new and b3.index == b2.index
    assert s3.runs >= 2
    # Out before END: the gzip header and the copies before the first job, no more.
    first_job = next(i for i, (x, y) in enumerate(zip(old, new, strict=False)) if x != y)
    assert _EARLY_OUT[-1] <= first_job, (_EARLY_OUT, first_job)
    assert d3[7:-69] == d2[7:-45]
    assert _patch(old, d3, a.index.archive_hash, 977) == new
    monkeypatch.setattr(inc, "DEFER_LIMIT", 0)
    undeferred: list[bool] = []  # the stream had been told everything, at each _undefer
    undefer = inc._Splicer._undefer

    def spy(self: inc._Splicer) -> None:
        assert isinstance(self.stream, LayoutStreamer)
        undeferred.append(self.stream.told_all)
        undefer(self)

    monkeypatch.setattr(inc._Splicer, "_undefer", spy)
    _, d4, _, _ = _streamed(root, tmp_path / "d.tgz", a, tmp_path / "a.tgz", threads=2,
                             version=LAYOUT_EARLY_VERSION)
    assert (tmp_path / "d.tgz").read_bytes() == new and d4 == d3
    # Compressed as they came: the jobs were let go (once) long before the trailer.
    # (Not by the bytes out before END: which jobs finished by then is the pool's timing.)
    assert undeferred == [False], undeferred

def test_golden_v2_decodes_to_the_recorded_archive() -> None:
    """(Damaged copies of it: ``test_layout_delta.test_a_damaged_delta_fails_only_with_…``.)"""
    base, delta, h = _golden()
    assert delta[:7] == b"DBKPLD\x02"
    got = _patch(base, delta, h)
    assert blake3.blake3(got).hexdigest() == (GOLDEN / "v1-new.b3").read_text().strip()


def test_the_streamer_still_makes_the_golden_bytes(tmp_path: Path) -> None:
    """The encoder's bytes are pinned (a change to them is a format change, or not)."""
    old, delta = _golden_streamed(tmp_path)
    assert old.read_bytes() == (GOLDEN / "v1-base.tgz").read_bytes()
    assert delta == (GOLDEN / "v2.dbkpld").read_bytes()


def test_refusals_of_version_2() -> None:
    base, delta, h = _golden()
    with pytest.raises(UnsupportedVersion):
        LayoutPatcher(base).feed(delta[:6] + b"\x04" + delta[7:])
    with pytest.raises(IntegrityError, match="another base"):
        LayoutPatcher(base, base_hash=bytes(32)).feed(delta)
    # END carries size and blake3: a wrong one is refused at finish, a short one at once.
    end = delta[-(5 + 40):]
    assert end[:5] == struct.pack("<BI", T_END, 40)
    size, digest = struct.unpack("<Q32s", end[5:])
    for bad in (struct.pack("<Q32s", size + 1, digest), struct.pack("<Q32s", size, bytes(32))):
        p = LayoutPatcher(base, base_hash=h)
        p.feed(delta[:-40] + bad)
        with pytest.raises(IntegrityError):
            p.finish()
    with pytest.raises(FormatError, match="END record has the wrong size"):
        LayoutPatcher(base).feed(delta[:-45] + struct.pack("<BI", T_END, 8) + bytes(8))
    p = LayoutPatcher(base, base_hash=h)
    p.feed(delta[:-45])
    with pytest.raises(FormatError, match="truncated"):
        p.finish()


@pytest.mark.parametrize("version", [LAYOUT_STREAM_VERSION, LAYOUT_EARLY_VERSION])
def test_index_parse_is_untouched_by_streaming(tmp_path: Path, version: int) -> None:
    """The build's index is the same whether a streamer watched it or not."""
    root, a = _built_then_edited(tmp_path, 4, 40, "append", 7)
    b, _, _, _ = _streamed(root, tmp_path / "b.tgz", a, tmp_path / "a.tgz", version=version)
    plain = IncrementalBuilder(root, previous=a.index, previous_archive=tmp_path / "a.tgz",
                               threads=0, racy_ns=0)  # as ``_streamed`` builds
    assert b"".join(plain) == (tmp_path / "b.tgz").read_bytes()
    assert ArchiveIndex.parse(b.index.encode()) == ArchiveIndex.parse(plain.index.encode())
    assert b.handover is None  # the stream took its place
    assert plain.handover is not None


def test_jobs_no_entry_covers_yet_go_as_literal_past_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A big changed file's jobs are described as they come (the builder says which entry
    it is feeding, ``placing``).  Without that, and with no room to hold jobs until the
    entries cover them (``STREAM_WAITING`` 0), each goes as it comes, what no entry covers
    yet as literal: a bigger delta, the same archive."""
    import deltabkp.archive._layout as layout

    rng = random.Random(8)
    root = tmp_path / "tree"
    _big_tree(root, rng)
    big = root / "d1" / "big.log"  # ~2 MB: its jobs go out long before its entry is placed
    big.write_bytes(b"".join(p.read_bytes() for p in sorted(root.rglob("*.py"))[:60]))
    a = IncrementalBuilder(root, threads=0, racy_ns=0)
    (tmp_path / "a.tgz").write_bytes(b"".join(a))
    data = big.read_bytes()
    big.write_bytes(data[:1000] + b"# edited\n" + data[1000:])
    _, held, _, _ = _streamed(root, tmp_path / "b.tgz", a, tmp_path / "a.tgz")
    # Not told which entry is being fed: the jobs wait for it to be placed, the same bytes.
    monkeypatch.setattr(LayoutStreamer, "placing", lambda *_: None)
    _, waited, _, _ = _streamed(root, tmp_path / "d.tgz", a, tmp_path / "a.tgz")
    assert waited == held
    # Nor allowed to wait.
    monkeypatch.setattr(layout, "STREAM_WAITING", 0)
    _, eager, _, _ = _streamed(root, tmp_path / "c.tgz", a, tmp_path / "a.tgz")
    old, new = (tmp_path / "a.tgz").read_bytes(), (tmp_path / "b.tgz").read_bytes()
    assert (tmp_path / "c.tgz").read_bytes() == new
    assert _patch(old, eager, a.index.archive_hash) == new
    assert _patch(old, held, a.index.archive_hash) == new
    # Held: the big file's bytes after the edit are an old reference (aligned on its end);
    # eager: literal, compressed.
    assert len(held) < 20_000 < len(eager), (len(eager), len(held))


@pytest.mark.parametrize("change", [False, True])
def test_a_final_segment_may_be_empty(tmp_path: Path, change: bool) -> None:
    """A tar ending on a cut (here zeros: the cut finder's forced cut every 64 KiB lands on
    the end) leaves the final segment empty: the final job's last RUN then rebuilds no tar
    (found by review: refused as cuts that do not fit)."""
    root = tmp_path / "tree"
    root.mkdir()
    (root / "zeros").write_bytes(bytes(322048))  # tar: 512 + 322048 + 5 x 1024 = 5 x 64 KiB
    a = IncrementalBuilder(root, threads=0, racy_ns=0)
    (tmp_path / "a.tgz").write_bytes(b"".join(a))
    assert a.index.tar_size == 5 * 65536
    if change:
        (root / "zeros").write_bytes(bytes(1000) + b"x" + bytes(321047))
    b, delta, streamer, _ = _streamed(root, tmp_path / "b.tgz", a, tmp_path / "a.tgz")
    # (One job, the final one, rebuilds it all: no change seen before it, either way.)
    assert not streamer.failed and not streamer.changed
    old, new = (tmp_path / "a.tgz").read_bytes(), (tmp_path / "b.tgz").read_bytes()
    assert _patch(old, delta, a.index.archive_hash) == new


def test_a_file_read_again_unchanged_is_no_change(tmp_path: Path) -> None:
    """Only a file's ctime changed (a chmod to its own mode): the build reads and compresses
    it again, to the old bytes at the old place, and the streamer does not call that a change
    (the agent then still answers "unchanged (hash)"); an edit is one."""
    root, a = _big_built(tmp_path, 12)
    p = sorted(root.rglob("*.py"))[50]
    p.chmod(p.stat().st_mode)
    b, delta, streamer, _ = _streamed(root, tmp_path / "b.tgz", a, tmp_path / "a.tgz")
    assert b.stats.files_opened >= 1 and streamer.runs >= 1  # read and compressed again
    assert b.index.archive_hash == a.index.archive_hash and not streamer.changed
    p.write_bytes(p.read_bytes() + b"# more\n")
    _, _, streamer, _ = _streamed(root, tmp_path / "c.tgz", b, tmp_path / "b.tgz")
    assert streamer.changed
