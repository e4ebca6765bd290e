"""The tgz builder: determinism, readability by tar and tarfile, round trips, the report,
the rsyncable gzip layer (cut points, thread independence, goldens)."""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import os
import shutil
import random
import socket
import stat
import subprocess
import tarfile
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import deltabkp
from deltabkp.archive import ArchiveReport, TgzBuilder, build_archive, extract_archive
from deltabkp.archive import _gzip
from deltabkp.archive._gzip import MAX_SEGMENT, MIN_SEGMENT, WINDOW, CutFinder, RsyncableGzip
from deltabkp.errors import ArchiveError

try:
    from deltabkp.engine import _blockloop
except ImportError:  # built without a compiler
    _blockloop = None  # type: ignore[assignment]

GOLDEN = Path(__file__).parent / "golden" / "archive"
T0 = 1_700_000_000


def make_tree(root: Path, seed: int = 1) -> Path:
    """A small tree with every kind of entry the archive stores, fixed times and modes."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.txt").write_bytes(b"hello world\n" * 50)
    (root / "empty").write_bytes(b"")
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "sub" / "deeper" / "random.bin").write_bytes(rng.randbytes(200_000))
    (root / "sub" / "code.py").write_bytes(b"".join(b"def f%d(): return %d\n" % (i, i) for i in range(3000)))
    (root / "sub" / "exec.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "sub" / "exec.sh", 0o750)
    os.chmod(root / "a.txt", 0o640)
    long_dir = root / ("long" * 30)
    long_dir.mkdir()
    (long_dir / ("name" * 40 + ".txt")).write_bytes(b"long names need GNU longname headers\n")
    (root / "ünïcode-名前.txt").write_bytes(b"utf-8 name\n")
    os.symlink("a.txt", root / "link-to-a")
    os.symlink("../a.txt", root / "sub" / "up-link")
    os.symlink("does/not/exist", root / "dangling")
    os.link(root / "a.txt", root / "sub" / "hard-a")
    os.mkdir(root / "ro-dir", 0o555)
    for dirpath, dirs, files in os.walk(root):
        for n in files + dirs:
            os.utime(os.path.join(dirpath, n), ns=(T0 * 10**9, T0 * 10**9), follow_symlinks=False)
    os.utime(root, (T0, T0))
    return root


def build_bytes(root: Path, **kw: object) -> tuple[bytes, ArchiveReport]:
    b = TgzBuilder(root, **kw)  # type: ignore[arg-type]
    data = b"".join(b)
    return data, b.report


def test_byte_identical_builds_apart_in_time(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t")
    first, r1 = build_bytes(tree)
    # Reading updates atimes (and the clock moves on): neither may leak into the archive.
    for p in tree.rglob("*"):
        if p.is_file() and not p.is_symlink():
            os.utime(p, ns=(time.time_ns(), p.stat().st_mtime_ns))
    time.sleep(1.5)
    second, r2 = build_bytes(tree)
    assert first == second
    assert r1 == r2
    # Same tree content and metadata copied elsewhere: same bytes.
    again = make_tree(tmp_path / "u")
    assert build_bytes(again)[0] == first


def test_tar_lists_every_entry_and_gzip_is_valid(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t")
    out = tmp_path / "t.tgz"
    report = build_archive(tree, out)
    subprocess.run(["gzip", "-t", str(out)], check=True)
    listed = subprocess.run(["tar", "tzf", str(out)], check=True, capture_output=True).stdout
    names = {os.fsdecode(n).rstrip("/") for n in listed.splitlines()}
    expected = {str(p.relative_to(tree)) for p in tree.rglob("*")}
    assert names == expected
    assert report.files == 7
    assert report.symlinks == 3
    assert report.hardlinks == 1
    assert report.dirs == 4
    assert report.changed == () and report.skipped == ()
    assert report.bytes_out == out.stat().st_size
    assert report.bytes_in == len(gzip.decompress(out.read_bytes()))
    assert report.bytes_in % 10240 == 0
    # Python's tarfile reads it too, with numeric owners and no owner names.
    with tarfile.open(out) as tf:
        members = tf.getmembers()
    assert [m.name for m in members] == sorted(
        (m.name for m in members), key=lambda n: [os.fsencode(x) for x in n.split("/")]
    )
    assert all(m.uname == "" and m.gname == "" for m in members)


def test_gzip_header_is_fixed(tmp_path: Path) -> None:
    data, _ = build_bytes(make_tree(tmp_path / "t"))
    assert data[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    raw = gzip.decompress(data)
    assert data[-8:] == (zlib.crc32(raw).to_bytes(4, "little") + len(raw).to_bytes(4, "little"))


@pytest.mark.parametrize("tool", ["tar", "python"])
def test_extract_reproduces_contents_modes_mtimes_links(tmp_path: Path, tool: str) -> None:
    tree = make_tree(tmp_path / "t")
    out = tmp_path / "t.tgz"
    build_archive(tree, out)
    dest = tmp_path / "x"
    if tool == "tar":
        dest.mkdir()
        subprocess.run(["tar", "xzf", str(out), "-C", str(dest)], check=True)
    else:
        rep = extract_archive(out, dest)
        assert (rep.files, rep.symlinks, rep.hardlinks, rep.dirs) == (7, 3, 1, 4)
    assert snapshot(dest) == snapshot(tree)
    assert os.stat(dest / "a.txt").st_ino == os.stat(dest / "sub" / "hard-a").st_ino


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything the archive promises to keep, per relative path (mtimes to the second)."""
    out: dict[str, tuple[object, ...]] = {}
    for p in sorted(root.rglob("*")):
        st_ = os.lstat(p)
        rel = str(p.relative_to(root))
        if stat.S_ISLNK(st_.st_mode):
            out[rel] = ("link", os.readlink(p), st_.st_mtime_ns // 10**9)
        elif stat.S_ISDIR(st_.st_mode):
            out[rel] = ("dir", stat.S_IMODE(st_.st_mode), st_.st_mtime_ns // 10**9)
        else:
            out[rel] = ("file", stat.S_IMODE(st_.st_mode), st_.st_mtime_ns // 10**9,
                        st_.st_nlink, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def test_fifos_are_stored_and_sockets_skipped_neither_opened(tmp_path: Path) -> None:
    """Format 2: a FIFO is a type-6 entry from its lstat (opening it for reading would block
    the build forever: this test would hang); a socket is skipped and reported."""
    tree = make_tree(tmp_path / "t")
    os.mkfifo(tree / "fifo", 0o640)
    os.utime(tree / "fifo", ns=(T0 * 10**9 + 5, T0 * 10**9 + 5))
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tree / "sock"))
    try:
        data, report = build_bytes(tree)
    finally:
        sock.close()
    assert {(i.path, i.what) for i in report.skipped} == {("sock", "socket not archived")}
    assert report.fifos == 1
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = {m.name: m for m in tf}
    assert "sock" not in members
    fifo = members["fifo"]
    assert fifo.type == tarfile.FIFOTYPE and fifo.size == 0 and fifo.mode == 0o640
    assert fifo.pax_headers == {"mtime": "1700000000.000000005"}


def test_exclude_patterns(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t")
    (tree / "sub" / "x.log").write_text("log")
    (tree / "y.log").write_text("log")
    (tree / "cache").mkdir()
    (tree / "cache" / "big").write_text("c")
    (tree / "sub" / "cache").write_text("a file named cache")
    data, report = build_bytes(tree, exclude=["*.log", "cache/", "sub/deeper"])
    names = set(tarfile.open(fileobj=io.BytesIO(data)).getnames())
    assert not {n for n in names if n.endswith(".log")}
    assert "cache" not in names and "cache/big" not in names
    assert "sub/cache" in names  # 'cache/' matches directories only
    assert "sub/deeper" not in names and "sub/deeper/random.bin" not in names
    assert "a.txt" in names
    with pytest.raises(ArchiveError, match="sequence of patterns"):
        TgzBuilder(tree, exclude="*.log")


def skipped_as_user(root: Path) -> list[tuple[str, str]]:
    """Build ``root`` and return the skipped entries; as root, in a forked child that has
    dropped to ``nobody`` (root reads any file whatever its mode)."""
    if os.geteuid() != 0:
        return [(i.path, i.what) for i in build_bytes(root)[1].skipped]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        code = 1
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            issues = build_bytes(root, threads=0)[1].skipped
            os.write(w, json.dumps([(i.path, i.what) for i in issues]).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return [tuple(x) for x in json.loads(out)]


def test_unreadable_entries_are_skipped_and_reported() -> None:
    top = Path(tempfile.mkdtemp(prefix="deltabkp-unreadable-"))
    try:
        os.chmod(top, 0o755)
        (top / "ok.txt").write_text("readable")
        (top / "secret").write_text("x")
        os.chmod(top / "secret", 0)
        (top / "closed").mkdir()
        (top / "closed" / "inside").write_text("y")
        os.chmod(top / "closed", 0)
        assert skipped_as_user(top) == [
            ("closed/", "cannot list directory: Permission denied"),
            ("secret", "cannot open: Permission denied"),
        ]
    finally:
        os.chmod(top / "closed", 0o755)
        shutil.rmtree(top)


def test_missing_root_and_file_root(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="no such directory"):
        list(TgzBuilder(tmp_path / "nope"))
    (tmp_path / "f").write_text("x")
    with pytest.raises(ArchiveError, match="not a directory"):
        build_archive(tmp_path / "f", tmp_path / "o.tgz")


def test_report_only_after_iteration_and_single_use(tmp_path: Path) -> None:
    b = TgzBuilder(make_tree(tmp_path / "t"))
    with pytest.raises(ArchiveError, match="iterated"):
        b.report
    it = iter(b)
    next(it)
    with pytest.raises(ArchiveError):
        b.report
    with pytest.raises(ArchiveError, match="only once"):
        iter(b)
    it.close()  # abandoning the iteration stops the workers
    assert not [t for t in threading.enumerate() if t.name.startswith("deltabkp-gzip")]


def test_iterated_in_another_thread_like_the_agent(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t")
    builder = TgzBuilder(tree)
    chunks: list[bytes] = []
    worker = threading.Thread(target=lambda: chunks.extend(builder))
    worker.start()
    worker.join(60)
    assert not worker.is_alive()
    assert b"".join(chunks) == build_bytes(tree)[0]
    assert builder.report.files == 7


def test_empty_tree(tmp_path: Path) -> None:
    (tmp_path / "e").mkdir()
    data, report = build_bytes(tmp_path / "e")
    assert tarfile.open(fileobj=io.BytesIO(data)).getnames() == []
    assert report.files == 0 and report.bytes_in == 10240


def test_non_utf8_names_round_trip(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    raw = b"caf\xe9-latin1.txt"
    with open(os.path.join(os.fsencode(tree), raw), "wb") as f:
        f.write(b"bytes name")
    out = tmp_path / "o.tgz"
    build_archive(tree, out)
    extract_archive(out, tmp_path / "x")
    assert os.listdir(os.fsencode(tmp_path / "x")) == [raw]


def test_bounded_chunks_and_large_file_streamed(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    rng = random.Random(3)
    big = rng.randbytes(3 << 20)
    (tree / "big").write_bytes(big)
    (tree / "text").write_bytes(b"abc" * 1_000_000)
    b = TgzBuilder(tree, mem_limit=1 << 20, spool_limit=0)  # 'big' is streamed
    chunks = list(b)
    assert max(len(c) for c in chunks) <= 1 << 20
    assert len(chunks) > 3
    # Read whole into memory (the default limit) or spooled: the same bytes, small chunks.
    for other in (TgzBuilder(tree), TgzBuilder(tree, mem_limit=1 << 20)):
        chunks2 = list(other)
        assert b"".join(chunks2) == b"".join(chunks)
        assert max(len(c) for c in chunks2) <= 1 << 20
        assert other.report == b.report
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as tf:
        f = tf.extractfile("big")
        assert f is not None and f.read() == big
    assert b.report.changed == ()


def test_output_independent_of_threads(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t")
    (tree / "more").write_bytes(random.Random(5).randbytes(1 << 20) + b"text " * 300_000)
    outs = {build_bytes(tree, threads=n)[0] for n in (0, 1, 2, 4)}
    assert len(outs) == 1


def test_rsyncable_change_stays_local(tmp_path: Path) -> None:
    """An insert in one file changes a small region of the tgz, not everything after it."""
    rng = random.Random(9)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"epsilon", b"\n", b"=", b"(", b")"]
    tree = tmp_path / "t"
    tree.mkdir()
    for i in range(40):
        (tree / f"f{i:02}.py").write_bytes(b" ".join(rng.choice(words) for _ in range(20_000)))
    before, _ = build_bytes(tree)
    p = tree / "f05.py"
    data = p.read_bytes()
    p.write_bytes(data[:5000] + b"# an inserted line\n" + data[5000:])
    os.utime(p, (T0, T0))
    after, _ = build_bytes(tree)
    sig = deltabkp.signature(before)
    d = deltabkp.delta(sig, after)
    assert bytes(deltabkp.patch(before, d)) == after
    assert len(d) < 0.1 * len(after), (len(d), len(after))
    # Plain gzip of the same tar: the change spreads to the end (the control).
    plain_b = gzip.compress(gzip.decompress(before), 6, mtime=0)
    plain_a = gzip.compress(gzip.decompress(after), 6, mtime=0)
    assert len(deltabkp.delta(deltabkp.signature(plain_b), plain_a)) > 0.5 * len(plain_a)


# -- the rsyncable gzip layer ---------------------------------------------------------------


def _fed(finder: CutFinder, data: bytes, splits: list[int]) -> list[int]:
    """``finder``'s cuts of ``data`` fed in pieces of the sizes ``splits``, then the rest."""
    got: list[int] = []
    at = 0
    for n in splits + [len(data)]:
        got += finder.feed(data[at : at + n])
        at += n
    return got


@given(st.binary(min_size=0, max_size=300_000), st.lists(st.integers(1, 70_000), max_size=20))
def test_cut_points_do_not_depend_on_buffering(data: bytes, splits: list[int]) -> None:
    whole = CutFinder().feed(data)
    assert _fed(CutFinder(), data, splits) == whole
    prev = 0
    for c in whole:
        assert MIN_SEGMENT <= c - prev <= MAX_SEGMENT
        prev = c
    assert len(data) - prev < MAX_SEGMENT


def spec_cut_points(data: bytes) -> list[int]:
    """Cut points straight from docs/formats.md ("Cut points"), with none of ``CutFinder``'s
    tricks (pair lookups, doubling, chunks): gear values from blake2b, each 64-byte window
    summed by a cumulative sum in 64-bit ints, then the min/max segment rules."""
    gear = np.array([
        int.from_bytes(hashlib.blake2b(b"deltabkp-gear-v1" + bytes([b]), digest_size=2).digest(), "little")
        for b in range(256)
    ], dtype=np.int64)
    g = np.concatenate(([0], np.cumsum(gear[np.frombuffer(data, dtype=np.uint8)])))
    # window ending at byte p (p >= 63): sum of g values of bytes p-63..p
    ends = np.arange(63, len(data))
    sums = (g[ends + 1] - g[ends - 63]) % 65536
    cuts: list[int] = []
    last = 0
    for p in ends[sums < 16].tolist():
        c = p + 1  # the cut is after byte p
        while c - last > MAX_SEGMENT:
            last += MAX_SEGMENT
            cuts.append(last)
        if c - last >= MIN_SEGMENT:
            cuts.append(c)
            last = c
    while len(data) - last >= MAX_SEGMENT:
        last += MAX_SEGMENT
        cuts.append(last)
    return cuts


def test_cut_points_follow_the_spec() -> None:
    """The fast finder gives the documented cut points, fed in odd and even pieces, at odd
    offsets of a buffer (unaligned 16-bit views), across its internal chunks, and resumed
    with ``at_cut`` (the incremental build); random data, text, and zeros (forced cuts)."""
    rng = random.Random(11)
    data = (rng.randbytes(700_001) + bytes(150_000) + b"abc\n" * 60_000
            + rng.randbytes(3) + golden_stream()[:99_999])
    want = spec_cut_points(data)
    assert len(want) > 100 and any(b - a == MAX_SEGMENT for a, b in itertools.pairwise(want))
    assert CutFinder().feed(data) == want
    for sizes in ([1, 62, 63, 64, 65, 2, 3], [131_071, 131_073, 5], [300_001, 7]):
        f = CutFinder()
        got: list[int] = []
        view = memoryview(b"x" + data)[1:]  # every piece starts at an odd address
        at = 0
        for i in range(40):
            n = sizes[i % len(sizes)]
            got += f.feed(view[at : at + n])
            at += n
        got += f.feed(view[at:])
        assert got == want, sizes
    for c in want[::37]:
        assert CutFinder.at_cut(c, data[:c]).feed(data[c:]) == [x for x in want if x > c]


def test_the_c_cut_finder_is_built_and_used() -> None:
    """The test install builds the C module (as tests/test_blake2.py checks for its loop):
    unless turned off, the build's cuts come from C; a module that is missing or fails its
    load check fails here, it is not skipped."""
    if os.environ.get("DELTABKP_CUT_FINDER") == "numpy":
        pytest.skip("DELTABKP_CUT_FINDER=numpy")
    assert _blockloop is not None and callable(_blockloop.gear_cuts)
    assert _gzip.cut_finder() == "C" and CutFinder().implementation == "C"


def _c_finder_or_skip() -> None:
    if _gzip.cut_finder() != "C":
        pytest.skip("the C cut finder is not built (or DELTABKP_CUT_FINDER=numpy)")


#: Two-byte patterns whose every 64-byte window is a candidate (32 * (G[a] + G[b]) = 0 mod
#: 2^16): runs of them offer a candidate at every byte, so the minimum decides every cut.
_CANDIDATE_PAIRS = [bytes(p) for p in itertools.product(range(256), repeat=2)
                    if 32 * (int(_gzip._GEAR[p[0]]) + int(_gzip._GEAR[p[1]])) % 65536 < 16]

_stream_pieces = st.one_of(
    st.binary(max_size=20_000),
    # candidates at every byte
    st.builds(lambda p, n: p * n, st.sampled_from(_CANDIDATE_PAIRS), st.integers(1, 6_000)),
    # no candidate (64 zeros sum to 40192): forced cuts every 64 KiB
    st.builds(bytes, st.integers(1, 200_000)),
)


@given(st.lists(_stream_pieces, max_size=6),
       st.lists(st.one_of(st.integers(0, 70), st.integers(0, 140_000)), max_size=30),
       st.data())
def test_c_cut_finder_gives_numpy_cuts(pieces: list[bytes], splits: list[int], data: st.DataObject) -> None:
    """The C scan's cuts are the numpy finder's, whatever the feeds: empty ones, ones shorter
    than the window, ones that cross candidate runs and forced cuts; and resumed with
    ``at_cut`` (the incremental build)."""
    _c_finder_or_skip()
    stream = b"".join(pieces)
    want = CutFinder("numpy").feed(stream)
    assert _fed(CutFinder("C"), stream, splits) == want
    if want:
        c = data.draw(st.sampled_from(want))
        before = stream[: c][-data.draw(st.integers(WINDOW - 1, WINDOW + 5)) :]
        assert CutFinder.at_cut(c, before, "C").feed(stream[c:]) == [x for x in want if x > c]


def test_c_cut_finder_checks_its_state() -> None:
    """Given rules or a state no feed could leave, the C scan raises ValueError before it
    reads a byte; a finder whose state was broken does too."""
    _c_finder_or_skip()
    assert _blockloop is not None
    table = _gzip._GEAR_BYTES
    data = bytes(10_000)
    ok = (table, WINDOW, 16, MIN_SEGMENT, MAX_SEGMENT, b"x" * 63, data, 100, 0)
    assert _blockloop.gear_cuts(*ok) == ([], bytes(63), 10_100, 0)
    bad_rules = [
        (table[:-2], WINDOW, 16, MIN_SEGMENT, MAX_SEGMENT),
        (table + b"\0\0", WINDOW, 16, MIN_SEGMENT, MAX_SEGMENT),
        (table, 0, 16, MIN_SEGMENT, MAX_SEGMENT),
        (table, WINDOW, -1, MIN_SEGMENT, MAX_SEGMENT),
        (table, WINDOW, 16, 0, MAX_SEGMENT),
        (table, WINDOW, 16, MIN_SEGMENT, MIN_SEGMENT - 1),
    ]
    for rules in bad_rules:
        with pytest.raises(ValueError, match="bad cut rule"):
            _blockloop.gear_cuts(*rules, b"", data, 0, 0)
    bad_states = [
        (b"x" * 64, 100, 0),  # more tail than the window holds
        (b"x" * 10, 5, 0),  # more tail than the stream
        (b"", -1, -1),
        (b"", 100, 101),  # a cut ahead of the stream
        (b"", MAX_SEGMENT, 0),  # a forced cut missed
        (b"", 2**63 - 5, 2**63 - 6),  # the offset would overflow
    ]
    for tail, pos, last in bad_states:
        with pytest.raises(ValueError, match="bad cut finder state"):
            _blockloop.gear_cuts(*ok[:5], tail, data, pos, last)
    with pytest.raises(TypeError):
        _blockloop.gear_cuts(*ok[:6], "text", 0, 0)  # type: ignore[arg-type]
    with pytest.raises(OverflowError):
        _blockloop.gear_cuts(*ok[:7], 2**64, 0)
    f = CutFinder("C")
    f.feed(data)
    f._last = f._pos + 1
    with pytest.raises(ValueError, match="bad cut finder state"):
        f.feed(data)


def test_cut_finder_falls_back_to_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    """``DELTABKP_CUT_FINDER=numpy``, a module that is missing or stale (no ``gear_cuts``),
    or a scan that disagrees with numpy on the load check: ``CutFinder()`` uses numpy, and
    gives the same cuts."""
    import sys
    import types

    import deltabkp.engine

    data = random.Random(5).randbytes(300_000)
    want = CutFinder("numpy").feed(data)

    def fresh(*, env: str | None = None, module: object = "real") -> str:
        monkeypatch.setattr(_gzip, "_scan_tried", False)
        monkeypatch.setattr(_gzip, "_scan", None)
        if env is None:
            monkeypatch.delenv("DELTABKP_CUT_FINDER", raising=False)
        else:
            monkeypatch.setenv("DELTABKP_CUT_FINDER", env)
        if module is None:  # not built: the import fails
            monkeypatch.delattr(deltabkp.engine, "_blockloop", raising=False)
            monkeypatch.setitem(sys.modules, "deltabkp.engine._blockloop", None)
        elif module != "real":
            monkeypatch.setattr(deltabkp.engine, "_blockloop", module, raising=False)
        assert CutFinder().feed(data) == want
        return _gzip.cut_finder()

    assert fresh(env="numpy") == "numpy"
    with pytest.raises(RuntimeError, match="not available"):
        CutFinder("C")
    assert fresh(module=types.ModuleType("stale_build_without_gear_cuts")) == "numpy"
    if _blockloop is not None:
        wrong = types.ModuleType("off_by_one")
        real = _blockloop.gear_cuts

        def off_by_one(*args: Any) -> tuple[list[int], bytes, int, int]:
            cuts, tail, pos, last = real(*args)
            return [c + 1 for c in cuts], tail, pos, last

        wrong.gear_cuts = off_by_one  # type: ignore[attr-defined]
        assert fresh(module=wrong) == "numpy"
        assert fresh(module=_blockloop) == "C"
    assert fresh(module=None) == "numpy"
    with pytest.raises(ValueError, match="no cut finder"):
        CutFinder("fortran")


def test_cut_points_resynchronise_after_insert() -> None:
    rng = random.Random(4)
    data = rng.randbytes(400_000)
    cuts = CutFinder().feed(data)
    edited = data[:100_000] + b"INSERTED" * 10 + data[100_000:]
    cuts2 = CutFinder().feed(edited)
    later = {c for c in cuts if c > 130_000}
    assert later and later == {c - 80 for c in cuts2 if c > 130_080}
    mean = len(data) / len(cuts)
    assert 4_000 < mean < 9_000  # ~6 KiB (docs/formats.md)


@given(st.lists(st.binary(max_size=200_000), max_size=8), st.integers(0, 3))
def test_rsyncable_gzip_round_trip(pieces: list[bytes], threads: int) -> None:
    g = RsyncableGzip(6, threads)
    out = b"".join(g.compress(pieces))
    assert gzip.decompress(out) == b"".join(pieces)
    assert g.bytes_in == sum(map(len, pieces)) and g.bytes_out == len(out)
    assert out == b"".join(RsyncableGzip(6, 0).compress([b"".join(pieces)]))


def golden_stream() -> bytes:
    rng = random.Random(20261126)
    text = b"".join(b"line %d: %s\n" % (i, rng.choice([b"foo", b"bar", b"baz qux"])) for i in range(20_000))
    return text + rng.randbytes(100_000) + bytes(50_000) + text[:70_000]


def test_golden_rsyncable_stream() -> None:
    """The gzip layer's exact bytes for a fixed stream (format 3: cuts, tuned deflate,
    header); format 1/2's golden (zlib -6 untuned) holds the same stream."""
    out = b"".join(RsyncableGzip(6, 2).compress([golden_stream()]))
    golden = GOLDEN / "stream-v3.gz"
    if os.environ.get("DELTABKP_REGEN_GOLDEN"):
        golden.write_bytes(out)
    assert gzip.decompress(golden.read_bytes()) == golden_stream()
    same_zlib(out, golden.read_bytes())
    old = (GOLDEN / "stream.gz").read_bytes()
    assert gzip.decompress(old) == golden_stream() and old != out


#: The deflate bytes are zlib's own: the goldens were recorded with this zlib (the libz
#: ``_libz`` loads, which makes the archive's deflate, not necessarily Python's own zlib).
GOLDEN_ZLIB = "1.2.13"


def same_zlib(out: bytes, golden: bytes) -> None:
    """Byte-exact against the golden where zlib is the one that made it; elsewhere the
    uncompressed stream (ours) must still match exactly (docs/formats.md, "Deflate")."""
    assert gzip.decompress(out) == gzip.decompress(golden)
    assert out[:10] == golden[:10] and out[-8:] == golden[-8:]
    from deltabkp.archive import _libz

    if _libz.library().version == GOLDEN_ZLIB:
        assert out == golden


def test_golden_tree_archive(tmp_path: Path) -> None:
    """The whole archive's exact bytes for a fixed tree (owners 0:0, so root only)."""
    if os.geteuid() != 0:
        pytest.skip("the golden tree needs owner 0:0, which only root can set")
    tree = make_tree(tmp_path / "t")
    for dirpath, dirs, files in os.walk(tree):
        for n in files + dirs:
            os.chown(os.path.join(dirpath, n), 0, 0, follow_symlinks=False)
    # Link counts are not in tar headers, but the hard link is: keep the fixture as is.
    for dirpath, dirs, files in os.walk(tree):
        for n in files + dirs:
            os.utime(os.path.join(dirpath, n), ns=(T0 * 10**9, T0 * 10**9), follow_symlinks=False)
    data, _ = build_bytes(tree)
    golden = GOLDEN / "tree.tgz"
    # Format 2 only added PAX records (for fractions of a second) and FIFO entries, format 3
    # only changed the deflate: a tree with neither still gives the format-1 golden's tar.
    assert gzip.decompress(data) == gzip.decompress(golden.read_bytes())
    assert data[:10] == golden.read_bytes()[:10] and data[-8:] == golden.read_bytes()[-8:]


def test_fingerprint_covers_the_archive_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent upgraded across a format change must rebuild once: same tree, other format
    version, other fingerprint (the cached one no longer answers "unchanged")."""
    from deltabkp.archive import _walk, tree_fingerprint

    tree = make_tree(tmp_path / "t")
    now = tree_fingerprint(tree)
    monkeypatch.setattr(_walk, "ARCHIVE_VERSION", _walk.ARCHIVE_VERSION - 1)
    assert tree_fingerprint(tree).digest != now.digest


def test_golden_tree_archive_v3(tmp_path: Path) -> None:
    """Format 3's exact bytes (format 2's tar, the tuned deflate): the golden tree plus a FIFO, absolute and escaping symlinks,
    an entry of another owner, and sub-second mtimes (PAX records) on files, directories,
    links and the FIFO (root only: owners)."""
    if os.geteuid() != 0:
        pytest.skip("the golden tree needs chosen owners, which only root can set")
    tree = make_tree(tmp_path / "t")
    os.mkfifo(tree / "sub" / "fifo")
    os.chmod(tree / "sub" / "fifo", 0o620)  # not through mkfifo: the umask would apply
    os.symlink("/srv/releases/42", tree / "current")
    os.symlink("../../include/x", tree / "sub" / "llvm")
    for dirpath, dirs, files in os.walk(tree):
        for n in files + dirs:
            os.chown(os.path.join(dirpath, n), 0, 0, follow_symlinks=False)
    os.chown(tree / "sub" / "code.py", 4242, 4343)
    os.chown(tree / "current", 4242, 4343, follow_symlinks=False)
    for i, p in enumerate(sorted(tree.rglob("*"))):
        # Every other entry with a fraction (so both header forms appear), one of them < 0.
        ns = T0 * 10**9 + (i * 123_456_789 if i % 2 else 0)
        os.utime(p, ns=(ns, ns), follow_symlinks=False)
    os.utime(tree / "empty", ns=(-1_500_000_000, -1_500_000_000))
    data, report = build_bytes(tree)
    assert report.fifos == 1 and report.skipped == ()
    golden = GOLDEN / "tree-v3.tgz"
    if os.environ.get("DELTABKP_REGEN_GOLDEN"):
        golden.write_bytes(data)
    same_zlib(data, golden.read_bytes())
    # Format 2's golden: the same tar, deflated by zlib -6 untuned.
    assert gzip.decompress((GOLDEN / "tree-v2.tgz").read_bytes()) == gzip.decompress(data)
    with tarfile.open(fileobj=io.BytesIO(golden.read_bytes())) as tf:
        pax = [m.name for m in tf if m.pax_headers]
    assert "sub/fifo" in pax or "current" in pax
    assert len(pax) >= 8


@given(
    name=st.binary(min_size=1, max_size=160).filter(lambda b: b"\0" not in b),
    link=st.binary(max_size=130).filter(lambda b: b"\0" not in b),
    mode=st.integers(0, 0o7777),
    ids=st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    size=st.integers(0, 2**40),
    mtime=st.integers(-(2**33), 2**40),
    frac=st.sampled_from([0, 0, 1, 7, 500_000_000, 999_999_999]) | st.integers(0, 10**9 - 1),
    type_=st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                           tarfile.FIFOTYPE]),
)
def test_fast_tar_header_equals_tarfile(
    name: bytes, link: bytes, mode: int, ids: tuple[int, int], size: int, mtime: int, frac: int,
    type_: bytes,
) -> None:
    from types import SimpleNamespace

    from deltabkp.archive._build import _header, _pax_mtime, _slow_header

    n, lk = os.fsdecode(name), os.fsdecode(link)
    ns = mtime * 10**9 + frac
    fake = SimpleNamespace(st_mode=stat.S_IFREG | mode, st_mtime_ns=ns,
                           st_uid=ids[0], st_gid=ids[1])
    fast = _header(n, fake, type_, size, lk)  # type: ignore[arg-type]
    pax = _pax_mtime(ns) if frac else b""
    assert fast == pax + _slow_header(n, mode, mtime, ids[0], ids[1], type_, size, lk)
    with tarfile.open(fileobj=io.BytesIO(fast + bytes(size % 512 and 0) + bytes(1024)), mode="r:") as tf:
        ti = tf.next()
        assert ti is not None and ti.mode == mode
    if not frac:
        assert ti.mtime == mtime and ti.pax_headers == {}
        return
    # Format 2: the exact mtime in a PAX record, written as GNU tar does and byte for byte
    # what tarfile writes for that record (tarfile's own float mtime is not exact).
    sec, f = divmod(abs(ns), 10**9)
    text = ("-" if ns < 0 else "") + f"{sec}." + f"{f:09d}".rstrip("0")
    assert ti.pax_headers == {"mtime": text}
    assert pax == tarfile.TarInfo._create_pax_generic_header(  # type: ignore[attr-defined]
        {"mtime": text}, tarfile.XHDTYPE, "utf-8")


@given(st.binary(min_size=512, max_size=512) | st.just(b"\xff" * 512) | st.just(bytes(512)))
def test_header_byte_sum_is_exact(block: bytes) -> None:
    # The checksum's sum from two adler32s: exact even for a block of 0xff (130,560).
    from deltabkp.archive._build import _byte_sum

    assert _byte_sum(block) == sum(block)
