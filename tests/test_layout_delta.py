"""The layout delta (DBKPLD v1, ``deltabkp.archive._layout``): round trips over random edit
sequences, the golden file, refusals and fuzzing of the decoder, and the negotiation.

The real-daemon path (agent → server, rolling fallback when the agent lost its cache) is in
``test_layout_delta_e2e.py``.
"""

from __future__ import annotations

import functools
import os
import random
import struct
import tempfile
import zlib
from pathlib import Path

import blake3
import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import deltabkp
from deltabkp import protocol
from deltabkp.archive import (
    ArchiveIndex,
    IncrementalBuilder,
    LayoutPatcher,
    encode_layout,
    layout_capability,
)
from deltabkp.archive._gzip import deflater
from deltabkp.archive._layout import MAX_RECORD
from deltabkp.archive._walk import ARCHIVE_VERSION
from deltabkp.errors import (
    DeltabkpError,
    FormatError,
    IntegrityError,
    LimitExceeded,
    UnsupportedVersion,
)

GOLDEN = Path(__file__).parent / "golden" / "layout"
WORDS = ("alpha", "beta", "gamma", "delta", "def", "return", "x", "=", "(", ")", "\n", "    ")
EPOCH = 1_700_000_000


def _text(rng: random.Random, n: int) -> bytes:
    return " ".join(rng.choice(WORDS) for _ in range(n)).encode()


def _make_tree(root: Path, rng: random.Random, files: int) -> None:
    for i in range(files):
        p = root / f"d{i % 4}" / f"f{i:03}.py"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(_text(rng, rng.randrange(0, 4000)))
    (root / "blob.bin").write_bytes(rng.randbytes(30_000))


def _settle(root: Path) -> None:
    # Old times: nothing is racy, so the incremental build reuses what did not change.
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            os.utime(os.path.join(dirpath, n), (EPOCH, EPOCH))
        os.utime(dirpath, (EPOCH, EPOCH))


def _edit(root: Path, rng: random.Random, kind: str, n: int) -> None:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    p = files[n % len(files)]
    data = p.read_bytes()
    if kind == "edit":
        at = rng.randrange(len(data) + 1)
        p.write_bytes(data[:at] + b"# edited\n" + data[at + rng.randrange(50):])
    elif kind == "append":
        p.write_bytes(data + _text(rng, 40))
    elif kind == "delete":
        p.unlink()
    elif kind == "add":
        (p.parent / f"new{n}.py").write_bytes(_text(rng, rng.randrange(1, 3000)))
    elif kind == "rename":
        p.rename(p.parent / f"renamed{n}{p.suffix}")
    elif kind == "chmod":
        p.chmod(0o600)
    elif kind == "overwrite":  # same size, bytes changed in the middle
        at = len(data) // 2
        p.write_bytes(data[:at] + rng.randbytes(min(64, len(data) - at)) + data[at + 64:])


def _build(root: Path, out: Path, prev: IncrementalBuilder | None, prev_path: Path | None) -> IncrementalBuilder:
    b = IncrementalBuilder(
        root, previous=prev.index if prev else None, previous_archive=prev_path, threads=0
    )
    with open(out, "wb") as f:
        f.writelines(b)
    return b


def _edited_pair(
    w: Path, rng: random.Random, files: int, edits: list[tuple[str, int]]
) -> tuple[IncrementalBuilder, IncrementalBuilder, bytes, bytes]:
    """A tree of ``files`` built (``w/a.tgz``), edited, built again from it (``w/b.tgz``):
    both builders and both archives' bytes."""
    root = w / "tree"
    _make_tree(root, rng, files)
    _settle(root)
    a = _build(root, w / "a.tgz", None, None)
    for kind, n in edits:
        _edit(root, rng, kind, n)
    _settle(root)
    b = _build(root, w / "b.tgz", a, w / "a.tgz")
    return a, b, (w / "a.tgz").read_bytes(), (w / "b.tgz").read_bytes()


def _patch(old: bytes, delta: bytes, old_hash: bytes, step: int | None = None) -> bytes:
    p = LayoutPatcher(old, base_hash=old_hash, max_size=1 << 30)
    out = []
    if step is None:
        out += p.feed(delta)
    else:
        for i in range(0, len(delta), step):
            out += p.feed(delta[i : i + step])
    p.finish()
    return b"".join(out)


EDITS = st.lists(
    st.tuples(st.sampled_from(("edit", "append", "delete", "add", "rename", "chmod", "overwrite")),
              st.integers(0, 1000)),
    min_size=1, max_size=6,
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), generations=st.lists(EDITS, min_size=1, max_size=2),
       step=st.sampled_from((None, 1, 977)))
def test_rebuilt_archive_is_the_agents_byte_for_byte(seed: int, generations: list[list[tuple[str, int]]], step: int | None) -> None:
    """Random trees and edit sequences over generations: decoding the layout delta of each
    generation against the previous archive gives the new archive exactly (fed whole, byte
    by byte, or in odd pieces)."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as d:
        w = Path(d)
        root = w / "tree"
        _make_tree(root, rng, 24)
        _settle(root)
        prev_path = w / "a0.tgz"
        prev = _build(root, prev_path, None, None)
        for g, edits in enumerate(generations, 1):
            for kind, n in edits:
                _edit(root, rng, kind, n)
            _settle(root)
            path = w / f"a{g}.tgz"
            b = _build(root, path, prev, prev_path)
            old, new = prev_path.read_bytes(), path.read_bytes()
            delta = b"".join(encode_layout(prev.index, old, b.index, new))
            got = _patch(old, delta, prev.index.archive_hash, step if g == 1 else None)
            assert got == new
            prev, prev_path = b, path


def test_a_small_change_costs_about_what_changed(tmp_path: Path) -> None:
    """An edit in the middle of a file costs its own bytes plus headers, not the deflate
    window's ~32 KiB that follows it (what the rolling delta pays)."""
    rng = random.Random(7)
    root = tmp_path / "tree"
    _make_tree(root, rng, 60)
    _settle(root)
    a = _build(root, tmp_path / "a.tgz", None, None)
    p = root / "d1" / "f013.py"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2] + b"# one edit\n" + data[len(data) // 2 :])
    _settle(root)
    b = _build(root, tmp_path / "b.tgz", a, tmp_path / "a.tgz")
    old, new = (tmp_path / "a.tgz").read_bytes(), (tmp_path / "b.tgz").read_bytes()
    delta = b"".join(encode_layout(a.index, old, b.index, new))
    assert _patch(old, delta, a.index.archive_hash) == new
    # The rolling delta of the same pair, with the agent's fine signature blocks.
    sb = deltabkp.SignatureBuilder(256)
    sb.feed(old)
    enc = deltabkp.DeltaEncoder(deltabkp.Signature.parse(sb.finish()))
    rolling = len(enc.feed(new) + enc.finish())
    # Measured: 653 bytes (header, records, the edit, the changed tar headers) against
    # 6,594 for the rolling delta (the deflate window after the edit, cut short here by
    # the tree's end).
    assert len(delta) < 2000 and 4 * len(delta) < rolling, (len(delta), rolling)


def test_pieces_come_out_while_the_delta_is_still_being_applied(tmp_path: Path) -> None:
    """``pieces`` hands out each rebuilt piece before the records after it are decoded (the
    server writes, and the kernel flushes, the new archive while it is patched): a small
    delta arrives whole, yet its first piece comes before its END record is read."""
    rng = random.Random(11)
    root = tmp_path / "tree"
    _make_tree(root, rng, 60)
    _settle(root)
    a = _build(root, tmp_path / "a.tgz", None, None)
    for name in ("f005.py", "f040.py"):
        p = next(root.rglob(name))
        p.write_bytes(p.read_bytes() + b"# appended\n")
    _settle(root)
    b = _build(root, tmp_path / "b.tgz", a, tmp_path / "a.tgz")
    old, new = (tmp_path / "a.tgz").read_bytes(), (tmp_path / "b.tgz").read_bytes()
    delta = b"".join(encode_layout(a.index, old, b.index, new))
    p = LayoutPatcher(old, base_hash=a.index.archive_hash, max_size=1 << 30)
    it = p.pieces(delta)
    first = bytes(next(it))
    with pytest.raises(FormatError, match="no END record"):
        p.finish()  # not read that far yet
    assert first + b"".join(it) == new
    p.finish()
    assert (p.new_size, p.new_hash) == (len(new), b.index.archive_hash)


# -- golden file ------------------------------------------------------------------------------


def _golden_edited(w: Path) -> tuple[Path, IncrementalBuilder]:
    """The golden pair's tree, built (``w/old.tgz``) then edited: the tree, that build."""
    rng = random.Random(2026)
    root = w / "tree"
    _make_tree(root, rng, 12)
    _settle(root)
    a = _build(root, w / "old.tgz", None, None)
    for kind, n in (("edit", 3), ("append", 5), ("add", 1), ("delete", 8)):
        _edit(root, rng, kind, n)
    _settle(root)
    return root, a


def _golden_pair(w: Path) -> tuple[Path, Path, ArchiveIndex, ArchiveIndex]:
    root, a = _golden_edited(w)
    b = _build(root, w / "new.tgz", a, w / "old.tgz")
    return w / "old.tgz", w / "new.tgz", a.index, b.index


def write_golden() -> None:  # pragma: no cover - run by hand: python -c "import tests...."
    GOLDEN.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        old, new, ia, ib = _golden_pair(Path(d))
        delta = b"".join(encode_layout(ia, old.read_bytes(), ib, new.read_bytes()))
        (GOLDEN / "v1-base.tgz").write_bytes(old.read_bytes())
        (GOLDEN / "v1.dbkpld").write_bytes(delta)
        (GOLDEN / "v1-new.b3").write_text(blake3.blake3(new.read_bytes()).hexdigest() + "\n")


def test_golden_v1_decodes_to_the_recorded_archive() -> None:
    base = (GOLDEN / "v1-base.tgz").read_bytes()
    delta = (GOLDEN / "v1.dbkpld").read_bytes()
    assert delta[:7] == b"DBKPLD\x01"
    want = (GOLDEN / "v1-new.b3").read_text().strip()
    got = _patch(base, delta, blake3.blake3(base).digest())
    assert blake3.blake3(got).hexdigest() == want


def _golden(delta: str = "v1.dbkpld") -> tuple[bytes, bytes, bytes]:
    """The golden base, a delta of it (``v2.dbkpld``: the streamed form of the same pair,
    ``test_layout_stream``) and the base's blake3."""
    base = (GOLDEN / "v1-base.tgz").read_bytes()
    return base, (GOLDEN / delta).read_bytes(), blake3.blake3(base).digest()


def test_refusals() -> None:
    base, delta, h = _golden()
    with pytest.raises(FormatError, match="bad magic"):
        LayoutPatcher(base).feed(b"DBKPXX" + delta[6:])
    with pytest.raises(UnsupportedVersion):  # 2 and 3 are the streamed forms (test_layout_stream)
        LayoutPatcher(base).feed(delta[:6] + b"\x04" + delta[7:])
    with pytest.raises(IntegrityError, match="another base"):
        LayoutPatcher(base, base_hash=bytes(32)).feed(delta)
    p = LayoutPatcher(base, base_hash=h)
    p.feed(delta[:-5])
    with pytest.raises(FormatError, match="truncated"):
        p.finish()
    with pytest.raises(LimitExceeded):
        LayoutPatcher(base, max_size=1000).feed(delta)
    # Made with another deflater (format 2's header named the zlib version alone): its runs
    # would not compress to the sender's bytes here.
    zlen = delta[81]
    assert delta[82 : 82 + zlen].startswith(b"zlib ") and b" tune " in delta[82 : 82 + zlen]
    with pytest.raises(IntegrityError, match="layout delta needs 1.2.13, this is zlib "):
        LayoutPatcher(base).feed(delta[:81] + bytes([6]) + b"1.2.13" + delta[82 + zlen :])
    # A record announcing more than the limit is refused before it is buffered.
    head_len = 6 + 1 + 1 + 32 + 8 + 32 + 1 + 1 + delta[81]
    with pytest.raises(LimitExceeded):
        LayoutPatcher(base).feed(delta[:head_len] + struct.pack("<BI", 1, MAX_RECORD + 1))


@pytest.mark.parametrize("version", ["v1.dbkpld", "v2.dbkpld", "v3.dbkpld"])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_a_damaged_delta_fails_only_with_deltabkp_errors(version: str, data: st.DataObject) -> None:
    base, delta, h = _golden(version)
    buf = bytearray(delta)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        buf = buf[: data.draw(st.integers(0, len(buf)))]
    try:
        got = _patch(base, bytes(buf), h)
    except DeltabkpError:
        return
    # Undamaged where it matters (e.g. a flipped byte of an unused field): still verified.
    assert blake3.blake3(got).hexdigest() == (GOLDEN / "v1-new.b3").read_text().strip()


# -- negotiation ------------------------------------------------------------------------------


def _keys(msg: protocol.Message) -> set[str]:
    return set(msgpack.unpackb(protocol.encode(msg)[4:], raw=False))


def test_accepts_is_left_out_for_older_agents_and_parsed_by_new_ones() -> None:
    plain = protocol.BackupRequest("/srv", bytes(32))
    assert "accepts" not in _keys(plain)  # an agent that predates it parses every request
    offer = protocol.BackupRequest("/srv", bytes(32), accepts=(layout_capability(),))
    assert "accepts" in _keys(offer)
    frames = protocol.FrameDecoder()
    frames.feed(protocol.encode(offer))
    assert frames.next_message() == offer
    cap = layout_capability()
    assert cap == f"layout-1/{deflater(6).replace(' ', '-')}/archive-{ARCHIVE_VERSION}"
    assert cap.startswith("layout-1/zlib-") and "-tune-" in cap  # format 3: tuned deflate


def test_content_copied_from_far_behind_the_kept_old_tar(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new file repeating an old one further back than the old tar the sender keeps
    (``KEEP``, made small here so the trees can be): the segments after it still COPY, and the
    run that follows takes its window from the new archive instead of failing (found on a tree
    holding five copies of one source, with the real 8 MiB)."""
    import deltabkp.archive._layout as layout

    monkeypatch.setattr(layout, "KEEP", 128 << 10)  # both sides read the module's value
    monkeypatch.setattr(layout, "_STEP", 4 << 10)  # inflated pieces well under KEEP
    rng = random.Random(3)
    root = tmp_path / "tree"
    for sub in ("a", "m", "z"):
        (root / sub).mkdir(parents=True)
    big = _text(rng, 100_000)  # ~400 KB: three times KEEP
    (root / "a" / "big").write_bytes(big)
    (root / "m" / "big2").write_bytes(_text(rng, 200_000))
    (root / "z" / "f").write_bytes(b"tail\n")
    _settle(root)
    a = _build(root, tmp_path / "a.tgz", None, None)
    with open(root / "m" / "big2", "ab") as f:
        f.write(b"appended\n")
    (root / "n").mkdir()
    (root / "n" / "copy").write_bytes(big)
    _settle(root)
    b = _build(root, tmp_path / "b.tgz", a, tmp_path / "a.tgz")
    old, new = (tmp_path / "a.tgz").read_bytes(), (tmp_path / "b.tgz").read_bytes()
    used = []
    real = layout._Encoder._new_tar

    def spy(self: layout._Encoder) -> layout.TarStream:
        used.append(1)
        return real(self)

    monkeypatch.setattr(layout._Encoder, "_new_tar", spy)
    delta = b"".join(encode_layout(a.index, old, b.index, new))
    assert used, "the case meant here (a window behind the kept old tar) did not occur"
    # Every old tar range the receiver is asked for lies within the sender's reach of the
    # furthest one asked for before it (what a receiver of the first release still had).
    reads: list[tuple[int, int]] = []
    real_read = layout.TarStream.read

    def spy_read(self: layout.TarStream, lo: int, hi: int) -> bytes | None:
        reads.append((lo, hi))
        return real_read(self, lo, hi)

    monkeypatch.setattr(layout.TarStream, "read", spy_read)
    assert _patch(old, delta, a.index.archive_hash) == new
    far = 0
    for lo, hi in reads:
        far = max(far, hi)
        assert lo >= far - layout._reach(), (lo, hi, far)
    assert len(delta) < len(big) // 10  # the repeated file went as COPY, not as literals


# -- the pieces: old tar by reads, copies by keys ---------------------------------------------


@functools.cache
def _gzipped(zeros: bool) -> tuple[bytes, bytes]:
    tar = bytes(300_000) if zeros else _text(random.Random(5), 60_000)[:300_000]
    comp = zlib.compressobj(6, zlib.DEFLATED, -15)
    return tar, b"\x1f\x8b\x08\0\0\0\0\0\0\xff" + comp.compress(tar) + comp.flush()


@settings(max_examples=40, deadline=None)
@given(reads=st.lists(st.tuples(st.integers(0, 300_000), st.integers(0, 70_000)), min_size=1,
                      max_size=12),
       step=st.sampled_from((512, 4096, 256 * 1024)), zeros=st.booleans())
# All input fed, ISA-L still held output back: the stream once ended there (None).
@example(reads=[(0, 1), (0, 65537), (126609, 70000), (131074, 65536)], step=256 * 1024,
         zeros=False)
def test_old_tar_kept_is_a_function_of_the_reads(
    reads: list[tuple[int, int]], step: int, zeros: bool
) -> None:
    """``TarStream`` gives the true tar bytes, and what it still has depends only on the
    reads asked for (never on how much one input step inflated to, nor on the inflater):
    a read within ``keep`` of the furthest byte asked for always succeeds.  What it holds
    stays bounded, also while a read far ahead inflates its way there (a step of zeros
    inflates ~1000-fold)."""
    import deltabkp.archive._layout as layout

    tar, archive = _gzipped(zeros)
    keep = 64 << 10
    old_step = layout._STEP
    layout._STEP = step
    try:
        stream = layout.TarStream(archive, keep)
        far = 0
        for lo, n in reads:
            hi = lo + n
            counts = lo >= stream._base  # not behind what it still has: it counts
            got = stream.read(lo, hi)
            if counts:
                far = max(far, hi)
            if hi > len(tar):
                assert got is None
            elif lo >= far - keep:
                assert got == tar[lo:hi]
            else:
                assert got in (None, tar[lo:hi])
            assert all(len(p) <= layout._PIECE for p in stream._pieces)
            assert sum(map(len, stream._pieces)) <= keep + n + 2 * layout._PIECE
    finally:
        layout._STEP = old_step


def test_a_read_far_ahead_holds_little() -> None:
    """Inflating its way to a read far ahead, the stream drops what it passes (the server and
    agent once held ~500 MB doing this on a 1 GB tree)."""
    import tracemalloc

    import deltabkp.archive._layout as layout

    comp = zlib.compressobj(6, zlib.DEFLATED, -15)
    archive = b"\x1f\x8b\x08\0\0\0\0\0\0\xff" + comp.compress(bytes(24 << 20)) + comp.flush()
    stream = layout.TarStream(archive, 64 << 10)
    assert stream.read(0, 10) == bytes(10)
    tracemalloc.start()
    try:
        assert stream.read(23 << 20, (23 << 20) + 10) == bytes(10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * layout._PIECE, peak


def test_comparing_a_long_stretch_holds_little() -> None:
    """Copied stretches are compared a block at a time: a 1 GB tree's archive has stretches
    of ~300 MB, and comparing them whole made as many bytes of booleans (the agent once
    peaked at ~350 MB doing it)."""
    import array
    import tracemalloc

    import deltabkp.archive._layout as layout

    size, seg = 24 << 20, 64 << 10
    archive = bytes(10 + size + 8)
    enc = object.__new__(layout._Encoder)  # only what _confirm reads
    enc.old = enc.new = memoryview(archive)
    enc.od = enc.nd = array.array("q", range(0, size + 1, seg))
    n = size // seg
    confirmed = array.array("q", bytes(8 * n))
    tracemalloc.start()
    try:
        enc._confirm(array.array("q", range(n)), confirmed)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert list(confirmed) == list(range(1, n + 1))
    assert peak < 4 * layout._PIECE, peak


def test_copies_are_the_segments_with_equal_bytes(tmp_path: Path) -> None:
    """The encoder chooses, per new segment, the old one a byte-by-byte search would (the
    continuation first, then the nearest ahead), though it compares stretches at once: also
    where keys collide — right after an edit the same tar bytes, compressed after another
    window, often have the same length and CRC but other bytes."""
    import deltabkp.archive._layout as layout

    rng = random.Random(11)
    root = tmp_path / "tree"
    _make_tree(root, rng, 60)
    (root / "twin").mkdir()
    for n in range(3):  # repeated content: several candidates per key
        (root / "twin" / f"c{n}").write_bytes((root / "d1" / "f005.py").read_bytes() * 8)
    _settle(root)
    a = _build(root, tmp_path / "a.tgz", None, None)
    for kind, n in (("edit", 3), ("edit", 29), ("append", 40), ("add", 7)):
        _edit(root, rng, kind, n)
    _settle(root)
    b = _build(root, tmp_path / "b.tgz", a, tmp_path / "a.tgz")
    old, new = (tmp_path / "a.tgz").read_bytes(), (tmp_path / "b.tgz").read_bytes()
    got = [j if j >= 0 else None for j in layout._Encoder(a.index, old, b.index, new).copies()]

    def table(index: ArchiveIndex) -> list[tuple[int, int, int, int]]:
        t, d = [0, *index.segments.tar_ends.tolist()], [0, *index.segments.deflate_ends.tolist()]
        crc = index.segments.crcs.tolist()
        return [(t[k + 1] - t[k], d[k], d[k + 1] - d[k], crc[k]) for k in range(len(crc))]

    ot, nt = table(a.index), table(b.index)
    want: list[int | None] = []
    expect, collisions, several = -1, 0, 0
    for tl, d, dl, crc in nt:
        found = None
        cands = [j for j, o in enumerate(ot) if (o[0], o[2], o[3]) == (tl, dl, crc)]
        several += len(cands) > 1
        for j in sorted(cands, key=lambda j: (j != expect, j < expect, j)):
            if old[10 + ot[j][1] : 10 + ot[j][1] + dl] == new[10 + d : 10 + d + dl]:
                found, expect = j, j + 1
                break
            collisions += 1
        want.append(found)
    assert got == want
    # The cases meant here all occurred: keys colliding with other bytes, several candidates
    # for one segment, and mostly copies.
    assert collisions and several, (collisions, several)
    assert sum(w is not None for w in want) > len(want) // 2


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_choose_is_the_one_by_one_choice(data: st.DataObject) -> None:
    """``_choose`` (vectorised over single candidates) takes what the plain rule takes
    visiting every segment in order: the continuation of the previous choice, then the
    nearest ahead; ``sure`` only spares asking about pairs that are equal anyway."""
    import array

    import numpy as np

    import deltabkp.archive._layout as layout

    n = data.draw(st.integers(0, 40))
    m = data.draw(st.integers(1, 6))  # old segments
    cands = data.draw(st.lists(st.integers(-1, m - 1), min_size=n, max_size=n))
    multi: dict[int, list[int]] = {}
    for i in range(n):
        if data.draw(st.integers(0, 3)) == 0:
            cands[i] = -2
            multi[i] = data.draw(st.lists(st.integers(0, m - 1), min_size=1, max_size=4, unique=True))
    # Mostly equal, as in an archive: candidates are pairs whose lengths and CRCs match.
    eq = data.draw(st.lists(st.integers(0, 3), min_size=n * m, max_size=n * m))
    equal_pairs = {(i, j) for i in range(n) for j in range(m) if eq[i * m + j]}
    sure = [c >= 0 and (i, c) in equal_pairs and data.draw(st.booleans()) for i, c in enumerate(cands)]

    def equal(i: int, j: int) -> bool:
        return (i, j) in equal_pairs

    want, expect = [], -1
    for i, c in enumerate(cands):
        found = -1
        if c >= 0:
            found = c if equal(i, c) else -1
        elif c == -2:
            for j in sorted(multi[i], key=lambda j: (j != expect, j < expect, j)):
                if equal(i, j):
                    found = j
                    break
        if found >= 0:
            expect = found + 1
        want.append(found)
    pairs = [(i, j) for i in sorted(multi) for j in multi[i]]
    packed = layout._Multi.of(np.array([i for i, _ in pairs], np.int64),
                              np.array([j for _, j in pairs], np.int64))
    got = layout._choose(np.array(cands, np.int64), packed, equal, np.array(sure, bool))
    assert isinstance(got, array.array) and list(got) == want


def test_encoding_the_golden_pair_gives_the_golden_delta(tmp_path: Path) -> None:
    """The encoder's output is pinned, not only its decoding: the golden pair, built again,
    encodes to the recorded delta byte for byte (a faster encoder must send the same)."""
    old, new, ia, ib = _golden_pair(tmp_path)
    assert old.read_bytes() == (GOLDEN / "v1-base.tgz").read_bytes()  # the build is as it was
    delta = b"".join(encode_layout(ia, old.read_bytes(), ib, new.read_bytes()))
    assert delta == (GOLDEN / "v1.dbkpld").read_bytes()


def test_old_entries_are_found_as_a_dict_of_paths_finds_them(tmp_path: Path) -> None:
    """The encoder finds a new entry's old one near where the last was found, else by
    bisection in the walk's order: the entry a dict of all old paths names, for names that
    sort awkwardly (a prefix, '.', '-', ' ', upper case, UTF-8, not UTF-8), added, removed,
    in order and out of it."""
    import deltabkp.archive._layout as layout

    root = tmp_path / "tree"
    names = ["a", "a.b", "a-b", "a b", "A", "ab", "é", os.fsdecode(b"\xffz"), "a/b", "a/b/c",
             "a/b.c", "ab/c", "z/a", "z/a-"]
    for n in names:
        p = root / n / "f.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(n.encode("utf-8", "surrogateescape") * 50)
    _settle(root)
    a = _build(root, tmp_path / "a.tgz", None, None)
    for n in ("a.b", "z/a"):
        (root / n / "f.txt").unlink()
    for n in ("a/a0", "a b/new", "ab/c/d", os.fsdecode(b"\xffz/\xfe"), "zz"):
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        (root / n).write_bytes(b"new")
    _settle(root)
    b = _build(root, tmp_path / "b.tgz", a, tmp_path / "a.tgz")
    old, new = (tmp_path / "a.tgz").read_bytes(), (tmp_path / "b.tgz").read_bytes()
    # The old entry's fields as the encoder reads them (its tar range: one entry's alone).
    want = {a.index.entries.path(k): layout._ent(a.index.entries, k)
            for k in range(len(a.index.entries))}
    count = len(b.index.entries)
    order = list(range(count)) + random.Random(5).sample(range(count), count)
    enc = layout._Encoder(a.index, old, b.index, new)
    for i in order:
        path = b.index.entries.path(i)
        assert enc._old_entry(path, i) == want.get(path), path
    assert sum(b.index.entries.path(i) not in want for i in range(count)) >= 5


def test_a_run_is_checked_against_the_index(tmp_path: Path) -> None:
    """The encoder does not send a run whose tar is not the builder's: a segment whose CRC-32
    is not the index's, or a final segment that does not compress back, is refused."""
    import attrs

    import deltabkp.archive._layout as layout
    from deltabkp.archive._incremental import SegmentTable

    rng = random.Random(3)
    root = tmp_path / "tree"
    _make_tree(root, rng, 30)
    _settle(root)
    a = _build(root, tmp_path / "a.tgz", None, None)
    _edit(root, rng, "edit", 7)
    _settle(root)
    b = _build(root, tmp_path / "b.tgz", a, tmp_path / "a.tgz")
    old, new = (tmp_path / "a.tgz").read_bytes(), (tmp_path / "b.tgz").read_bytes()
    assert _patch(old, b"".join(encode_layout(a.index, old, b.index, new)),
                  a.index.archive_hash) == new
    fresh = [i for i, j in enumerate(layout._Encoder(a.index, old, b.index, new).copies()) if j < 0]
    assert fresh
    segs = b.index.segments
    crcs = segs.crcs.copy()
    crcs[fresh[0]] ^= 1
    wrong = attrs.evolve(b.index, segments=SegmentTable.from_columns(
        segs.tar_ends, segs.deflate_ends, crcs))
    with pytest.raises(IntegrityError, match="CRC-32"):
        b"".join(encode_layout(a.index, old, wrong, new))
    # The final segment's last deflate bytes changed (the trailer kept): it inflates to
    # other bytes, or not at all, and is refused either way.
    bad = bytearray(new)
    bad[-10] ^= 0x55
    with pytest.raises(IntegrityError):
        b"".join(encode_layout(a.index, old, b.index, bytes(bad)))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), edits=st.lists(EDITS, min_size=0, max_size=1))
def test_the_leading_copy_goes_out_before_the_plan_and_changes_no_byte(
    seed: int, edits: list[list[tuple[str, int]]]
) -> None:
    """The encoder's first COPY (the segments both archives hold alike, from the start) is
    yielded before the plan is made (``copies``), and the delta is the same bytes as the
    plan alone makes: for random edits, none, and an edit of the first file."""
    import deltabkp.archive._layout as layout

    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as d:
        w = Path(d)
        root = w / "tree"
        _make_tree(root, rng, 24)
        _settle(root)
        a = _build(root, w / "a.tgz", None, None)
        for kind, n in [*(edits[0] if edits else []), *([("edit", 0)] if seed % 4 == 0 else [])]:
            _edit(root, rng, kind, n)
        _settle(root)
        b = _build(root, w / "b.tgz", a, w / "a.tgz")
        old, new = (w / "a.tgz").read_bytes(), (w / "b.tgz").read_bytes()
        order: list[str] = []
        copies = layout._Encoder.copies

        def noted(self: layout._Encoder) -> object:
            order.append("plan")
            return copies(self)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(layout._Encoder, "copies", noted)
            records = list(layout._Encoder(a.index, old, b.index, new).records())
            order.clear()
            gen = layout._Encoder(a.index, old, b.index, new).records()
            next(gen)
            second = next(gen)
            early = not order  # the plan not made yet
            gen.close()
            mp.setattr(layout._Encoder, "_lead", lambda self: 0)
            plan_only = list(layout._Encoder(a.index, old, b.index, new).records())
        assert b"".join(records) == b"".join(plan_only)
        assert _patch(old, b"".join(records), a.index.archive_hash) == new
        lead = 0
        if second[0] == layout.T_COPY and early:
            offset, lead = struct.unpack("<QQ", second[5:21])
            assert offset == 0
        # It is the plan's first COPY, of every leading segment equal in both archives.
        same = 0
        ot, nt = a.index.segments, b.index.segments
        while (same < min(len(ot), len(nt)) and ot[same] == nt[same]
               and old[: 10 + nt[same][1]] == new[: 10 + nt[same][1]]):
            same += 1
        assert lead == (10 + nt[same - 1][1] if same else 0), (lead, same)
