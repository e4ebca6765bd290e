"""Restore: faithful (odd trees round trip to the nanosecond, owners as root), safe (hostile
hand-made tars are refused with an error naming the entry and no byte is written outside the
destination) and all or nothing (any failure leaves the destination exactly as it was)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import random
import re
import shutil
import stat
import subprocess
import tarfile
import zlib
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltabkp.archive import build_archive, extract_archive
from deltabkp.errors import ArchiveError, UnsafeArchiveError, UsageError

GOLDEN = Path(__file__).parent / "golden" / "archive"
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="owners can be set and restored by root only")


def entry(name: str, data: bytes = b"", type_: bytes = tarfile.REGTYPE,
          linkname: str = "", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.size = len(data) if type_ in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    ti.linkname = linkname
    ti.mode = mode
    ti.mtime = 1_700_000_000
    return ti, data


def tgz(*entries: tuple[tarfile.TarInfo, bytes], format: int = tarfile.GNU_FORMAT) -> bytes:
    """A tgz written entry by entry, exactly as given (tarfile does not sanitise on write)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=format) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return gzip.compress(buf.getvalue(), mtime=0)  # fixed bytes: fuzzing is reproducible


# -- the odd tree: every entry kind an application directory holds ---------------------------

OTHER_UID, OTHER_GID = 4242, 4343


def odd_tree(root: Path, seed: int = 7) -> Path:
    """Absolute, escaping, dangling symlinks; a FIFO; a hard link; setuid; a read-only and an
    empty directory; sub-second (and one pre-1970) mtimes on files, directories and links;
    as root, entries owned by another uid/gid (a link and the FIFO too)."""
    rng = random.Random(seed)
    (root / "app" / "bin").mkdir(parents=True)
    (root / "app" / "bin" / "run").write_bytes(b"#!/bin/sh\necho run\n")
    (root / "app" / "data.bin").write_bytes(rng.randbytes(70_000))
    (root / "app" / "whole-second").write_text("an mtime without a fraction\n")
    (root / "app" / "old").write_text("from before 1970\n")
    os.symlink("/srv/releases/42", root / "current")
    os.symlink("/etc/app", root / "config")
    os.symlink("../../include/x", root / "app" / "llvm")
    os.symlink("nowhere/at/all", root / "dangling")
    os.mkfifo(root / "app" / "pipe", 0o640)
    os.link(root / "app" / "data.bin", root / "hard")
    (root / "empty").mkdir()
    (root / "ro").mkdir()
    (root / "ro" / "f").write_text("inside a read-only directory\n")
    suid = root / "app" / "bin" / "suid"
    suid.write_bytes(b"#!/bin/sh\n")
    if ROOT:
        os.chown(root / "app" / "data.bin", OTHER_UID, OTHER_GID)
        os.chown(root / "app", OTHER_UID, OTHER_GID)
        os.chown(root / "current", OTHER_UID + 1, OTHER_GID + 1, follow_symlinks=False)
        os.chown(root / "app" / "pipe", OTHER_UID, OTHER_GID + 2)
        os.chown(suid, OTHER_UID, OTHER_GID)
    os.chmod(suid, 0o4755)  # after chown, which clears it
    os.chmod(root / "ro", 0o555)
    base = 1_600_000_000 * 10**9
    for i, p in enumerate(sorted(root.rglob("*"))):
        ns = base + i * 10**9 + rng.randrange(1, 10**9)
        os.utime(p, ns=(ns, ns), follow_symlinks=False)
    os.utime(root / "app" / "whole-second", ns=(base, base))
    os.utime(root / "app" / "old", ns=(-1_250_000_000, -1_250_000_000))
    return root


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Per relative path: type, mode, uid, gid, mtime_ns, link count and content / target."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            s = os.lstat(p)
            kind = stat.S_IFMT(s.st_mode)
            what: object = None
            if stat.S_ISLNK(s.st_mode):
                what = os.readlink(p)
            elif stat.S_ISREG(s.st_mode):
                what = hashlib.sha256(Path(p).read_bytes()).hexdigest()
            nlink = None if stat.S_ISDIR(s.st_mode) else s.st_nlink
            out[os.path.relpath(p, root)] = (
                kind, stat.S_IMODE(s.st_mode), s.st_uid, s.st_gid, s.st_mtime_ns, nlink, what
            )
    return out


def diff_r(a: Path, b: Path) -> list[str]:
    """``diff -r --no-dereference``'s complaints (GNU diff reports every pair of FIFOs, even
    equal ones: those lines are left to ``snapshot``)."""
    r = subprocess.run(["diff", "-r", "--no-dereference", str(a), str(b)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode in (0, 1), r.stderr
    fifo = re.compile(r"File (.*) is a fifo while file (.*) is a fifo")
    return [ln for ln in r.stdout.splitlines() if not fifo.fullmatch(ln)] + r.stderr.splitlines()


def test_odd_tree_round_trips_exactly(tmp_path: Path) -> None:
    tree = odd_tree(tmp_path / "t")
    out = tmp_path / "t.tgz"
    built = build_archive(tree, out)
    assert built.skipped == () and built.fifos == 1 and built.symlinks == 4
    dest = tmp_path / "x"
    rep = extract_archive(out, dest)
    assert (rep.files, rep.symlinks, rep.hardlinks, rep.fifos) == (6, 4, 1, 1)
    assert diff_r(tree, dest) == []
    assert snapshot(dest) == snapshot(tree)
    assert os.readlink(dest / "current") == "/srv/releases/42"
    assert os.lstat(dest / "app" / "old").st_mtime_ns == -1_250_000_000
    if ROOT:
        assert os.lstat(dest / "current").st_uid == OTHER_UID + 1
        assert os.stat(dest / "app" / "bin" / "suid").st_mode & 0o7777 == 0o4755
    # tar reads the same archive to the same tree (the PAX records are standard).
    by_tar = tmp_path / "by-tar"
    by_tar.mkdir()
    subprocess.run(["tar", "xzf", str(out), "-C", str(by_tar), "--same-owner"], check=True)
    assert snapshot(by_tar) == snapshot(tree)


def test_a_trickling_stream_restores_the_same(tmp_path: Path) -> None:
    """A stream that returns a few bytes per read (a pipe, a slow socket) gives the same tree."""
    tree = odd_tree(tmp_path / "t")
    out = tmp_path / "t.tgz"
    build_archive(tree, out)

    class Trickle(io.BytesIO):
        def read(self, n: int | None = -1) -> bytes:
            return super().read(min(7, n) if n is not None and n >= 0 else 7)

    extract_archive(Trickle(out.read_bytes()), tmp_path / "x")
    assert snapshot(tmp_path / "x") == snapshot(tree)


def test_owners_are_not_restored_unless_asked(tmp_path: Path) -> None:
    tree = odd_tree(tmp_path / "t")
    out = tmp_path / "t.tgz"
    build_archive(tree, out)
    extract_archive(out, tmp_path / "x", owners=False)
    me = (os.geteuid(), os.getegid())
    assert {(s[2], s[3]) for s in snapshot(tmp_path / "x").values()} == {me}


def test_posix_tar_archives_restore_to_the_nanosecond(tmp_path: Path) -> None:
    """GNU tar's own PAX archives (with atime/ctime records too) keep their exact mtimes."""
    tree = odd_tree(tmp_path / "t")
    out = tmp_path / "posix.tgz"
    subprocess.run(["tar", "--format=posix", "-czf", str(out), "-C", str(tree), "."], check=True)
    extract_archive(out, tmp_path / "x")
    assert snapshot(tmp_path / "x") == snapshot(tree)


def test_version_1_archives_still_restore(tmp_path: Path) -> None:
    """The format-1 golden (whole-second GNU headers, no PAX) restores as before."""
    rep = extract_archive(GOLDEN / "tree.tgz", tmp_path / "x")
    assert (rep.files, rep.symlinks, rep.hardlinks, rep.fifos) == (7, 3, 1, 0)
    got = snapshot(tmp_path / "x")
    assert {s[4] for s in got.values()} == {1_700_000_000 * 10**9}
    assert got["dangling"][6] == "does/not/exist" and got["ro-dir"][1] == 0o555
    if ROOT:
        assert {(s[2], s[3]) for s in got.values()} == {(0, 0)}


_names = st.sampled_from(["a", "b", "c", "d", "ü"])
_targets = st.sampled_from(["/etc/passwd", "../../x", "..", ".", "nowhere", "a", "d/e"])
_node = st.tuples(
    st.sampled_from(["file", "dir", "link", "fifo"]),
    st.integers(0, 2**40).map(lambda x: 1_000_000_000 * 10**9 + x),  # mtime_ns
    st.sampled_from([0o644, 0o600, 0o755, 0o4750, 0o2755, 0o1777, 0o444]),
    st.integers(0, 70_000),  # owner
    _targets,
    st.binary(max_size=600),
)


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.tuples(_names, _names), _node, max_size=8))
def test_any_tree_round_trips(entries: dict[tuple[str, str], tuple[object, ...]]) -> None:
    """Property: whatever mix of entries, modes, owners and mtimes, the restore is identical."""
    box = Path(tempfile.mkdtemp(prefix="deltabkp-prop-"))
    try:
        tree = box / "t"
        tree.mkdir()
        subdirs = {top for (top, _), _ in entries.items()}
        for top in subdirs:
            (tree / top).mkdir()
        for (top, name), (kind, ns, mode, owner, target, data) in entries.items():
            p = tree / top / name
            if kind == "file":
                p.write_bytes(data)  # type: ignore[arg-type]
            elif kind == "dir":
                p.mkdir()
            elif kind == "link":
                os.symlink(target, p)  # type: ignore[arg-type]
            else:
                os.mkfifo(p)
            if ROOT:
                os.chown(p, owner, owner + 1, follow_symlinks=False)  # type: ignore[operator]
            if kind != "link":
                os.chmod(p, mode)  # type: ignore[arg-type]
        for p in [*sorted(tree.rglob("*"), reverse=True)]:
            ns = entries.get(tuple(p.relative_to(tree).parts), (None, 1_234_567_891_234_567_891))[1]  # type: ignore[arg-type]
            os.utime(p, ns=(ns, ns), follow_symlinks=False)  # type: ignore[arg-type]
        out = box / "t.tgz"
        build_archive(tree, out)
        extract_archive(out, box / "x")
        assert snapshot(box / "x") == snapshot(tree)
    finally:
        for dirpath, dirs, _files in os.walk(box):
            for n in dirs:
                os.chmod(os.path.join(dirpath, n), 0o700)
        shutil.rmtree(box)


# -- hostile archives --------------------------------------------------------------------------


@pytest.fixture
def box(tmp_path: Path) -> tuple[Path, Path]:
    """(dest, outside): dest is an empty directory; outside a sibling that must stay as is."""
    dest = tmp_path / "box" / "dest"
    dest.mkdir(parents=True)
    outside = tmp_path / "box" / "outside"
    outside.mkdir()
    (outside / "victim").write_text("original")
    return dest, outside


def untouched(dest: Path, outside: Path, tmp_path: Path) -> None:
    """Nothing written outside dest, dest as it was (empty), no temp directory left."""
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert (outside / "victim").read_text() == "original"
    assert not (tmp_path / "evil").exists() and not (tmp_path / "box" / "evil").exists()
    assert sorted(p.name for p in (tmp_path / "box").iterdir()) == ["dest", "outside"]
    assert list(dest.iterdir()) == []


def hostile(outside: str) -> dict[str, tuple[str, list[tuple[tarfile.TarInfo, bytes]]]]:
    """case -> (the entry the refusal must name, entries)."""
    sym, lnk, dir_ = tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE
    return {
        "absolute path": ("/tmp/deltabkp-evil-abs", [entry("/tmp/deltabkp-evil-abs", b"x")]),
        "dot-dot escape": ("../outside/victim", [entry("ok.txt", b"fine"),
                                                 entry("../outside/victim", b"pwned")]),
        "dot-dot inside a path": ("a/../../outside/victim",
                                  [entry("a/../../outside/victim", b"pwned")]),
        "file through an absolute symlink": ("a/victim", [
            entry("a", type_=sym, linkname=outside), entry("a/victim", b"pwned")]),
        "file through a relative symlink": ("esc/victim", [
            entry("esc", type_=sym, linkname="../outside"), entry("esc/victim", b"pwned")]),
        "link to .. then ../..": ("a/../../x", [
            entry("a", type_=sym, linkname=".."), entry("a/../../x", b"pwned")]),
        "hard link to /etc/passwd": ("h", [entry("h", type_=lnk, linkname="/etc/passwd")]),
        "hard link escape": ("h", [entry("h", type_=lnk, linkname="../outside/victim")]),
        "hard link to a file not in the archive": ("h", [entry("h", type_=lnk, linkname="nothere")]),
        "hard link through a symlinked parent": ("l/h", [
            entry("f", b"file"), entry("l", type_=sym, linkname=outside),
            entry("l/h", type_=lnk, linkname="f")]),
        "write through a symlinked directory": ("d/x", [
            entry("d", type_=sym, linkname="sub"), entry("sub/", type_=dir_, mode=0o755),
            entry("d/x", b"through the link")]),
        "symlink replacing a directory with children": ("d", [
            entry("d/", type_=dir_, mode=0o755), entry("d/f", b"child"),
            entry("d", type_=sym, linkname=outside), entry("d/g", b"pwned")]),
        "PAX path escape": ("../outside/victim", [
            _pax_named("innocent", "../outside/victim")]),
        "device node": ("null", [entry("null", type_=tarfile.CHRTYPE)]),
    }


def _pax_named(name: str, pax_path: str) -> tuple[tarfile.TarInfo, bytes]:
    ti, data = entry(name, b"pwned")
    ti.pax_headers = {"path": pax_path}
    return ti, data


CASES = sorted(hostile("/x"))


@pytest.mark.parametrize("case", CASES)
def test_hostile_archive_is_refused(case: str, box: tuple[Path, Path], tmp_path: Path) -> None:
    dest, outside = box
    name, entries = hostile(str(outside))[case]
    fmt = tarfile.PAX_FORMAT if case.startswith("PAX") else tarfile.GNU_FORMAT
    data = tgz(*entries, format=fmt)
    with pytest.raises(UnsafeArchiveError) as err:
        extract_archive(io.BytesIO(data), dest)
    assert repr(name) in str(err.value), str(err.value)
    untouched(dest, outside, tmp_path)
    assert not os.path.exists("/tmp/deltabkp-evil-abs")


def test_hostile_cases_are_extracted_by_plain_tarfile(box: tuple[Path, Path], tmp_path: Path) -> None:
    """Control: the crafted archives really are hostile (an unfiltered extract escapes)."""
    dest, outside = box
    _name, entries = hostile(str(outside))["file through a relative symlink"]
    with tarfile.open(fileobj=io.BytesIO(tgz(*entries))) as tf:
        tf.extractall(dest, filter="fully_trusted")
    assert (outside / "victim").read_text() == "pwned"


def test_symlinks_are_data_whatever_they_point_to(tmp_path: Path) -> None:
    """Links out of the tree, to its parent, chains that only escape together: all restored
    as links (the safety is in never writing through one, not in refusing them)."""
    data = tgz(
        entry("abs", type_=tarfile.SYMTYPE, linkname="/etc"),
        entry("up", type_=tarfile.SYMTYPE, linkname="../../.."),
        entry("s", type_=tarfile.SYMTYPE, linkname="."),
        entry("t", type_=tarfile.SYMTYPE, linkname="s/.."),
        entry("f", b"after the links"),
    )
    rep = extract_archive(io.BytesIO(data), tmp_path / "d")
    assert rep.symlinks == 4
    assert {n: os.readlink(tmp_path / "d" / n) for n in ("abs", "up", "s", "t")} == {
        "abs": "/etc", "up": "../../..", "s": ".", "t": "s/.."}
    assert (tmp_path / "d" / "f").read_bytes() == b"after the links"


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
    data = tgz(entry("f", b"first"), entry("f", b"second"),
               entry("l", type_=tarfile.SYMTYPE, linkname="x"), entry("l", b"a file now"),
               entry("g", b"a file first"), entry("g", type_=tarfile.SYMTYPE, linkname="y"))
    extract_archive(io.BytesIO(data), tmp_path / "d")
    assert (tmp_path / "d" / "f").read_bytes() == b"second"
    assert (tmp_path / "d" / "l").read_bytes() == b"a file now"
    assert os.readlink(tmp_path / "d" / "g") == "y"


# -- all or nothing ----------------------------------------------------------------------------


def test_destination_must_be_missing_or_empty(box: tuple[Path, Path], tmp_path: Path) -> None:
    dest, outside = box
    data = tgz(entry("f", b"x"))
    os.symlink(outside, dest / "pre")
    with pytest.raises(UsageError, match="not empty"):
        extract_archive(io.BytesIO(data), dest)
    assert os.listdir(dest) == ["pre"] and os.readlink(dest / "pre") == str(outside)
    with pytest.raises(UsageError, match="not a directory"):
        extract_archive(io.BytesIO(data), outside / "victim")
    with pytest.raises(UsageError, match="parent"):
        extract_archive(io.BytesIO(data), tmp_path / "no" / "such" / "dir")
    assert sorted(p.name for p in (tmp_path / "box").iterdir()) == ["dest", "outside"]


def test_an_empty_destination_is_replaced_and_keeps_its_mode(tmp_path: Path) -> None:
    dest = tmp_path / "d"
    dest.mkdir(mode=0o750)
    os.chmod(dest, 0o750)
    extract_archive(io.BytesIO(tgz(entry("sub/f", b"x"))), dest)
    assert (dest / "sub" / "f").read_bytes() == b"x"
    assert os.stat(dest).st_mode & 0o777 == 0o750
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def _big_tree_archive(tmp_path: Path) -> bytes:
    tree = tmp_path / "t"
    for i in range(30):
        (tree / f"d{i}").mkdir(parents=True)
        (tree / f"d{i}" / "f").write_bytes(random.Random(i).randbytes(20_000))
    os.symlink("/etc", tree / "zz-link")
    out = tmp_path / "t.tgz"
    build_archive(tree, out)
    return out.read_bytes()


@pytest.mark.parametrize("dest_exists", [True, False])
def test_interrupted_restore_leaves_dest_untouched(tmp_path: Path, dest_exists: bool) -> None:
    good = _big_tree_archive(tmp_path)
    raw = gzip.decompress(good)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        last = tf.getmembers()[-1]  # the symlink: its header is its end
    late = tarfile.TarInfo("../late").tobuf(tarfile.GNU_FORMAT)  # refused, after all the rest
    bad_late = gzip.compress(raw[: last.offset_data] + late + bytes(10240))
    box = tmp_path / "box"
    box.mkdir()
    dest = box / "dest"
    for bad, err in ((good[: len(good) // 2], ArchiveError), (bad_late, UnsafeArchiveError)):
        if dest_exists:
            dest.mkdir(exist_ok=True)
        with pytest.raises(err):
            extract_archive(io.BytesIO(bad), dest)
        assert os.listdir(box) == (["dest"] if dest_exists else [])
        if dest_exists:
            assert os.listdir(dest) == []
    extract_archive(io.BytesIO(good), dest)
    assert len(os.listdir(dest)) == 31


@pytest.mark.parametrize("trailer", [False, True])
def test_an_archive_cut_at_a_member_boundary_is_refused(tmp_path: Path, trailer: bool) -> None:
    """``tarfile`` stops quietly when the stream ends inside a header block: a tgz cut in
    its deflate stream right at a member boundary (``trailer``: or a few hundred bytes into
    the next header) must not restore as if whole (found as a rare flake of the test above,
    whose halfway cut sometimes fell in a header or its padding)."""
    good = _big_tree_archive(tmp_path)
    raw = gzip.decompress(good)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        at = tf.getmembers()[10].offset  # the 11th member's header: a boundary
    comp = zlib.compressobj(6, zlib.DEFLATED, 31)
    cut = comp.compress(raw[:at]) + comp.flush(zlib.Z_SYNC_FLUSH)
    if trailer:  # the rest of the stream arrives, but ends before the deflate's end
        cut += comp.compress(raw[at : at + 300]) + comp.flush(zlib.Z_SYNC_FLUSH)
    dest = tmp_path / "dest"
    with pytest.raises(ArchiveError, match="truncated"):
        extract_archive(io.BytesIO(cut), dest)
    assert not dest.exists()
    extract_archive(io.BytesIO(good), dest)
    assert len(os.listdir(dest)) == 31


def test_destination_filled_meanwhile_is_left_alone(tmp_path: Path) -> None:
    """Someone writes into the empty DEST during the restore: the final rename fails, their
    file stays, ours go."""
    good = _big_tree_archive(tmp_path)
    dest = tmp_path / "box" / "dest"
    dest.mkdir(parents=True)

    class Intruding(io.BytesIO):
        def read(self, n: int | None = -1) -> bytes:
            if self.tell() > len(good) // 2 and not (dest / "theirs").exists():
                (dest / "theirs").write_text("written by someone else")
            return super().read(n)

    with pytest.raises(ArchiveError, match="changed meanwhile"):
        extract_archive(Intruding(good), dest)
    assert os.listdir(dest) == ["theirs"]
    assert os.listdir(tmp_path / "box") == ["dest"]


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
        assert not (tmp_path / "x").exists()
    with pytest.raises(ArchiveError):
        extract_archive(tmp_path / "missing.tgz", tmp_path / "x")


@pytest.mark.parametrize("type_", [tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE])
def test_oversized_extended_headers_are_refused_before_being_read(tmp_path: Path, type_: bytes) -> None:
    """A long-name or PAX header announcing 8 GiB: refused from its size, nothing allocated
    (tarfile alone would try to read it whole)."""
    ti = tarfile.TarInfo("././@LongLink")
    ti.type = type_
    ti.size = 8 * 1024**3
    data = gzip.compress(ti.tobuf(tarfile.GNU_FORMAT) + b"x" * 4096)
    with pytest.raises(ArchiveError, match="limit"):
        extract_archive(io.BytesIO(data), tmp_path / "d")
    assert not (tmp_path / "d").exists()
    # A real PAX header just over the limit, then a member: refused too.
    big, data_ = entry("f", b"x")
    big.pax_headers = {"comment": "c" * (1024 * 1024)}
    with pytest.raises(ArchiveError, match="limit"):
        extract_archive(io.BytesIO(tgz((big, data_), format=tarfile.PAX_FORMAT)), tmp_path / "d")


def test_bad_pax_mtime_is_an_archive_error(tmp_path: Path) -> None:
    ti, data = entry("f", b"x")
    ti.pax_headers = {"mtime": "12e5"}
    with pytest.raises(ArchiveError, match="mtime"):
        extract_archive(io.BytesIO(tgz((ti, data), format=tarfile.PAX_FORMAT)), tmp_path / "d")
    assert not (tmp_path / "d").exists()


# -- fuzzing -----------------------------------------------------------------------------------


def _fuzz_base() -> bytes:
    return tgz(
        entry("dir/", type_=tarfile.DIRTYPE, mode=0o755),
        entry("dir/a.txt", b"alpha " * 200),
        entry("dir/l", type_=tarfile.SYMTYPE, linkname="a.txt"),
        entry("h", type_=tarfile.LNKTYPE, linkname="dir/a.txt"),
        entry("p", type_=tarfile.FIFOTYPE),
        entry("b.bin", bytes(range(256)) * 20),
    )


FUZZ_BASE = _fuzz_base()


@pytest.mark.parametrize("flag", range(1, 32))
def test_gzip_header_flags_with_truncated_fields(tmp_path: Path, flag: int) -> None:
    """Found by fuzzing: tarfile raised TypeError on a header announcing missing fields."""
    bad = FUZZ_BASE[:3] + bytes([flag]) + FUZZ_BASE[4:10]
    with pytest.raises(ArchiveError, match="not a valid tgz"):
        extract_archive(io.BytesIO(bad), tmp_path / "d")


def _fuzz_one(data: bytes) -> None:
    """Only ArchiveErrors; after one, nothing at all is left (no dest, no temp dir)."""
    box = Path(tempfile.mkdtemp(prefix="deltabkp-fuzz-"))
    try:
        try:
            extract_archive(io.BytesIO(data), box / "dest")
        except ArchiveError:
            assert os.listdir(box) == []
        else:
            assert os.listdir(box) == ["dest"]
    finally:
        for dirpath, dirs, _files in os.walk(box):
            for n in dirs:
                os.chmod(os.path.join(dirpath, n), 0o700)
        shutil.rmtree(box)


@settings(max_examples=300, deadline=None)  # timing is not under test
@given(st.lists(st.tuples(st.integers(0, len(FUZZ_BASE) - 1), st.integers(0, 255)), max_size=6),
       st.integers(0, len(FUZZ_BASE)))
def test_fuzzed_archives_fail_only_with_archive_errors(muts: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(FUZZ_BASE)
    for at, val in muts:
        data[at] = val
    _fuzz_one(bytes(data[:cut]))


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=3000))
def test_fuzzed_uncompressed_tar_fails_only_with_archive_errors(raw: bytes) -> None:
    """Garbage inside a valid gzip member: only the tar parser is exercised."""
    base = bytearray(gzip.decompress(FUZZ_BASE))
    base[: len(raw)] = raw
    _fuzz_one(gzip.compress(bytes(base)))
