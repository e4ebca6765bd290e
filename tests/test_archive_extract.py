"""Safe restore: hand-crafted hostile tar files are refused with an error naming the entry,
and nothing is ever written outside the destination."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltabkp.archive import build_archive, extract_archive
from deltabkp.errors import ArchiveError, UnsafeArchiveError


def entry(name: str, data: bytes = b"", type_: bytes = tarfile.REGTYPE,
          linkname: str = "", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.size = len(data) if type_ in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    ti.linkname = linkname
    ti.mode = mode
    ti.mtime = 1_700_000_000
    return ti, data


def tgz(*entries: tuple[tarfile.TarInfo, bytes]) -> bytes:
    """A tgz written entry by entry, exactly as given (tarfile does not sanitise on write)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=tarfile.GNU_FORMAT) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return gzip.compress(buf.getvalue(), mtime=0)  # fixed bytes: fuzzing is reproducible


@pytest.fixture
def box(tmp_path: Path) -> tuple[Path, Path]:
    """(dest, outside): outside is a sibling that must stay untouched."""
    dest = tmp_path / "box" / "dest"
    dest.mkdir(parents=True)
    outside = tmp_path / "box" / "outside"
    outside.mkdir()
    (outside / "victim").write_text("original")
    return dest, outside


def untouched(outside: Path, tmp_path: Path) -> None:
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert (outside / "victim").read_text() == "original"
    assert not (tmp_path / "evil").exists() and not (tmp_path / "box" / "evil").exists()


HOSTILE = {
    "absolute path": [entry("/tmp/deltabkp-evil-abs", b"x")],
    "dot-dot escape": [entry("ok.txt", b"fine"), entry("../outside/victim", b"pwned")],
    "dot-dot inside a path": [entry("a/../../outside/victim", b"pwned")],
    "symlink escape (relative)": [entry("esc", type_=tarfile.SYMTYPE, linkname="../outside"),
                                  entry("esc/victim", b"pwned")],
    "symlink escape (absolute)": [entry("abs", type_=tarfile.SYMTYPE, linkname="/etc")],
    "hard link escape": [entry("h", type_=tarfile.LNKTYPE, linkname="../outside/victim")],
    "hard link to an absolute path": [entry("h", type_=tarfile.LNKTYPE, linkname="/etc/passwd")],
    "hard link to a file not in the archive": [entry("h", type_=tarfile.LNKTYPE, linkname="nothere")],
    "symlink chain escape": [entry("s", type_=tarfile.SYMTYPE, linkname="."),
                             entry("t", type_=tarfile.SYMTYPE, linkname="s/..")],
    "write through a symlinked directory": [entry("d", type_=tarfile.SYMTYPE, linkname="sub"),
                                            entry("sub/", type_=tarfile.DIRTYPE, mode=0o755),
                                            entry("d/x", b"through the link")],
    "device node": [entry("null", type_=tarfile.CHRTYPE)],
    "fifo": [entry("pipe", type_=tarfile.FIFOTYPE)],
}

EXPECTED_ENTRY = {
    "absolute path": "/tmp/deltabkp-evil-abs",
    "dot-dot escape": "../outside/victim",
    "dot-dot inside a path": "a/../../outside/victim",
    "symlink escape (relative)": "esc",
    "symlink escape (absolute)": "abs",
    "hard link escape": "h",
    "hard link to an absolute path": "h",
    "hard link to a file not in the archive": "h",
    "symlink chain escape": "t",
    "write through a symlinked directory": "d/x",
    "device node": "null",
    "fifo": "pipe",
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_is_refused(case: str, box: tuple[Path, Path], tmp_path: Path) -> None:
    dest, outside = box
    data = tgz(*HOSTILE[case])
    with pytest.raises(UnsafeArchiveError) as err:
        extract_archive(io.BytesIO(data), dest)
    assert repr(EXPECTED_ENTRY[case]) in str(err.value), str(err.value)
    untouched(outside, tmp_path)
    assert not os.path.exists("/tmp/deltabkp-evil-abs")
    # No symlink left in dest that points outside it.
    real = os.path.realpath(dest)
    for dirpath, dirs, files in os.walk(dest):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            if os.path.islink(p):
                assert os.path.realpath(p).startswith(real + os.sep), p


def test_hostile_cases_are_extracted_by_plain_tarfile(box: tuple[Path, Path], tmp_path: Path) -> None:
    """Control: the crafted archives really are hostile (an unfiltered extract escapes)."""
    dest, outside = box
    with tarfile.open(fileobj=io.BytesIO(tgz(*HOSTILE["symlink escape (relative)"]))) as tf:
        tf.extractall(dest, filter="fully_trusted")
    assert (outside / "victim").read_text() == "pwned"


def test_existing_symlink_in_dest_is_not_written_through(box: tuple[Path, Path], tmp_path: Path) -> None:
    dest, outside = box
    os.symlink(outside, dest / "pre")
    with pytest.raises(UnsafeArchiveError, match="'pre/victim'"):
        extract_archive(io.BytesIO(tgz(entry("pre/victim", b"pwned"))), dest)
    untouched(outside, tmp_path)


def test_safe_links_inside_dest_are_restored(tmp_path: Path) -> None:
    data = tgz(
        entry("dir/", type_=tarfile.DIRTYPE, mode=0o750),
        entry("dir/f", b"content", mode=0o600),
        entry("dir/up", type_=tarfile.SYMTYPE, linkname="../top"),
        entry("top", b"top"),
        entry("same", type_=tarfile.SYMTYPE, linkname="./dir/../top"),
        entry("hl", type_=tarfile.LNKTYPE, linkname="dir/f"),
        entry("./dot/relative", b"./ prefixes are fine"),
    )
    dest = tmp_path / "d"
    rep = extract_archive(io.BytesIO(data), dest)
    assert (rep.files, rep.symlinks, rep.hardlinks) == (3, 2, 1)
    assert rep.links == 3
    assert (dest / "dir" / "up").read_bytes() == b"top"
    assert os.readlink(dest / "same") == "./dir/../top"
    assert os.stat(dest / "hl").st_ino == os.stat(dest / "dir" / "f").st_ino
    assert os.stat(dest / "dir").st_mode & 0o777 == 0o750
    assert os.stat(dest / "dir" / "f").st_mtime == 1_700_000_000
    assert (dest / "dot" / "relative").read_bytes() == b"./ prefixes are fine"


def test_later_entry_wins_like_tar(tmp_path: Path) -> None:
    data = tgz(entry("f", b"first"), entry("f", b"second"))
    extract_archive(io.BytesIO(data), tmp_path / "d")
    assert (tmp_path / "d" / "f").read_bytes() == b"second"


def test_corrupt_and_truncated_archives_are_archive_errors(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "f").write_bytes(os.urandom(100_000))
    good = tmp_path / "g.tgz"
    build_archive(tree, good)
    data = good.read_bytes()
    for bad in (data[: len(data) // 2], b"not a gzip at all", data[:10] + b"\xff" * 100):
        with pytest.raises(ArchiveError) as err:
            extract_archive(io.BytesIO(bad), tmp_path / "x")
        assert type(err.value) is ArchiveError
    with pytest.raises(ArchiveError):
        extract_archive(tmp_path / "missing.tgz", tmp_path / "x")


def test_read_only_directories_still_get_their_contents(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    (tree / "ro").mkdir(parents=True)
    (tree / "ro" / "f").write_text("inside a read-only dir")
    os.symlink("f", tree / "ro" / "l")
    os.chmod(tree / "ro", 0o555)
    out = tmp_path / "o.tgz"
    build_archive(tree, out)
    extract_archive(out, tmp_path / "x")
    assert (tmp_path / "x" / "ro" / "f").read_text() == "inside a read-only dir"
    assert os.stat(tmp_path / "x" / "ro").st_mode & 0o777 == 0o555


def _fuzz_base() -> bytes:
    return tgz(
        entry("dir/", type_=tarfile.DIRTYPE, mode=0o755),
        entry("dir/a.txt", b"alpha " * 200),
        entry("dir/l", type_=tarfile.SYMTYPE, linkname="a.txt"),
        entry("h", type_=tarfile.LNKTYPE, linkname="dir/a.txt"),
        entry("b.bin", bytes(range(256)) * 20),
    )


FUZZ_BASE = _fuzz_base()


@pytest.mark.parametrize("flag", range(1, 32))
def test_gzip_header_flags_with_truncated_fields(tmp_path: Path, flag: int) -> None:
    """Found by fuzzing: tarfile raised TypeError on a header announcing missing fields."""
    bad = FUZZ_BASE[:3] + bytes([flag]) + FUZZ_BASE[4:10]
    with pytest.raises(ArchiveError, match="not a valid tgz"):
        extract_archive(io.BytesIO(bad), tmp_path / "d")


@settings(max_examples=300)
@given(st.lists(st.tuples(st.integers(0, len(FUZZ_BASE) - 1), st.integers(0, 255)), max_size=6),
       st.integers(0, len(FUZZ_BASE)))
def test_fuzzed_archives_fail_only_with_archive_errors(muts: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(FUZZ_BASE)
    for at, val in muts:
        data[at] = val
    box = Path(tempfile.mkdtemp(prefix="deltabkp-fuzz-"))
    try:
        try:
            extract_archive(io.BytesIO(bytes(data[:cut])), box / "dest")
        except ArchiveError:
            pass
        assert os.listdir(box) == ["dest"]
    finally:
        shutil.rmtree(box)


@settings(max_examples=100)
@given(st.binary(max_size=3000))
def test_fuzzed_uncompressed_tar_fails_only_with_archive_errors(raw: bytes) -> None:
    """Garbage inside a valid gzip member: only the tar parser is exercised."""
    box = Path(tempfile.mkdtemp(prefix="deltabkp-fuzz-"))
    try:
        base = bytearray(gzip.decompress(FUZZ_BASE))
        base[: len(raw)] = raw
        try:
            extract_archive(io.BytesIO(gzip.compress(bytes(base))), box / "dest")
        except ArchiveError:
            pass
        assert os.listdir(box) == ["dest"]
    finally:
        shutil.rmtree(box)
