"""Swap races: a directory or file of the tree replaced by a symlink (or another directory)
between the walk listing it and the build opening it must never bring content from outside
the tree into the archive; the swap is reported.  Deterministic: the swaps are made from
hooks on the walk's own listing / opening functions, in process."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

from deltabkp.archive import TgzBuilder, tree_fingerprint
from deltabkp.archive import _walk
from deltabkp.errors import ArchiveError

SECRET = b"TOP-SECRET-outside-the-tree"


@pytest.fixture
def box(tmp_path: Path) -> tuple[Path, Path]:
    """``root`` (the tree) and ``outside`` (a directory the backup must never read)."""
    root = tmp_path / "root"
    (root / "d" / "sub").mkdir(parents=True)
    (root / "d" / "secret.txt").write_bytes(b"inside d\n")
    (root / "d" / "sub" / "secret.txt").write_bytes(b"inside d/sub\n")
    (root / "f.txt").write_bytes(b"inside f\n")
    (root / "z.txt").write_bytes(b"last\n")
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "secret.txt").write_bytes(SECRET)
    (outside / "sub" / "secret.txt").write_bytes(SECRET)
    (outside / "f.txt").write_bytes(SECRET)
    return root, outside


def build(root: Path) -> tuple[dict[str, bytes | str], TgzBuilder]:
    """The archive's members (name -> content, or '->target' / 'dir'), and the builder."""
    builder = TgzBuilder(root, threads=0)
    data = b"".join(builder)
    members: dict[str, bytes | str] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tf:
        for m in tf:
            if m.isfile():
                f = tf.extractfile(m)
                assert f is not None
                members[m.name] = f.read()
            elif m.issym():
                members[m.name] = "->" + m.linkname
            else:
                members[m.name] = "dir" if m.isdir() else m.type.decode()
    assert SECRET not in data  # the stored tgz compresses: also check the members
    assert not any(isinstance(v, bytes) and SECRET in v for v in members.values())
    return members, builder


def swap_for_symlink(path: Path, target: Path) -> None:
    os.rename(path, path.with_name(path.name + ".moved"))
    os.symlink(target, path)


def test_directory_swapped_for_a_symlink_before_it_is_opened(
    box: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, outside = box
    real_open_dir = _walk.open_dir

    def open_dir(parent: int, name: str, seen: os.stat_result) -> int | str:
        if name == "d" and not (root / "d").is_symlink():
            swap_for_symlink(root / "d", outside)  # listed and lstat'ed as a directory
        return real_open_dir(parent, name, seen)

    monkeypatch.setattr(_walk, "open_dir", open_dir)
    members, builder = build(root)
    assert sorted(members) == ["f.txt", "z.txt"]  # d is gone: neither followed nor stored
    assert [(i.path, i.what) for i in builder.report.skipped] == [
        ("d", "replaced while read (by a symlink or a non-directory); not followed")
    ]


def test_directory_swapped_for_another_directory_before_it_is_opened(
    box: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, outside = box
    real_open_dir = _walk.open_dir

    def open_dir(parent: int, name: str, seen: os.stat_result) -> int | str:
        if name == "d" and outside.exists():
            os.rename(root / "d", root / "d.moved")
            os.rename(outside, root / "d")
        return real_open_dir(parent, name, seen)

    monkeypatch.setattr(_walk, "open_dir", open_dir)
    members, builder = build(root)
    assert sorted(members) == ["f.txt", "z.txt"]
    assert [(i.path, i.what) for i in builder.report.skipped] == [
        ("d", "replaced while read (by another directory); not followed")
    ]


def test_directory_swapped_after_it_was_listed(
    box: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The review's repro: its entries are opened through the fd of the directory listed,
    so they are the original directory's, never the symlink target's."""
    root, outside = box
    d_ino = (root / "d").stat().st_ino
    real_listdir = _walk._listdir

    def listdir(where: int) -> list[os.DirEntry[str]]:
        entries = real_listdir(where)
        if os.stat(where).st_ino == d_ino and not (root / "d").is_symlink():
            swap_for_symlink(root / "d", outside)
        return entries

    monkeypatch.setattr(_walk, "_listdir", listdir)
    members, builder = build(root)
    assert members == {
        "d": "dir", "d/secret.txt": b"inside d\n", "d/sub": "dir",
        "d/sub/secret.txt": b"inside d/sub\n", "f.txt": b"inside f\n", "z.txt": b"last\n",
    }
    assert builder.report.skipped == ()


def test_file_swapped_for_a_symlink_before_it_is_opened(
    box: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, outside = box
    root_ino = root.stat().st_ino
    real_listdir = _walk._listdir

    def listdir(where: int) -> list[os.DirEntry[str]]:
        entries = real_listdir(where)
        if os.stat(where).st_ino == root_ino and not (root / "f.txt").is_symlink():
            for e in entries:
                e.stat(follow_symlinks=False)  # the walk sees the lstat of the listing
            swap_for_symlink(root / "f.txt", outside / "f.txt")
        return entries

    monkeypatch.setattr(_walk, "_listdir", listdir)
    members, builder = build(root)
    assert "f.txt" not in members and members["z.txt"] == b"last\n"
    assert [(i.path, i.what) for i in builder.report.skipped] == [
        ("f.txt", "replaced while read (by a symlink); not followed")
    ]


def test_file_swapped_for_a_fifo_is_not_read(
    box: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _outside = box
    root_ino = root.stat().st_ino
    real_listdir = _walk._listdir

    def listdir(where: int) -> list[os.DirEntry[str]]:
        entries = real_listdir(where)
        if os.stat(where).st_ino == root_ino and (root / "f.txt").is_file():
            for e in entries:
                e.stat(follow_symlinks=False)
            os.unlink(root / "f.txt")
            os.mkfifo(root / "f.txt")  # opened O_NONBLOCK: must not hang
        return entries

    monkeypatch.setattr(_walk, "_listdir", listdir)
    members, builder = build(root)
    assert "f.txt" not in members
    assert [(i.path, i.what) for i in builder.report.skipped] == [
        ("f.txt", "replaced while read (by a non-regular file); not read")
    ]


def test_fingerprint_does_not_follow_a_swapped_directory(
    box: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, outside = box
    outside_dirs = {outside.stat().st_ino, (outside / "sub").stat().st_ino}
    real_open_dir = _walk.open_dir
    real_fingerprint_dir = _walk._fingerprint_dir
    listed: list[int] = []

    def open_dir(parent: int, name: str, seen: os.stat_result) -> int | str:
        if name == "d" and not (root / "d").is_symlink():
            swap_for_symlink(root / "d", outside)
        return real_open_dir(parent, name, seen)

    def fingerprint_dir(h: Any, prefix: bytes, fd: int, *rest: Any) -> Any:
        listed.append(os.fstat(fd).st_ino)
        return real_fingerprint_dir(h, prefix, fd, *rest)

    monkeypatch.setattr(_walk, "open_dir", open_dir)
    monkeypatch.setattr(_walk, "_fingerprint_dir", fingerprint_dir)
    tree_fingerprint(root)
    assert listed == [root.stat().st_ino]  # d was swapped: not listed, neither its target
    assert not outside_dirs & set(listed)


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_directory_fds_are_bounded_and_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "deep"
    p = root
    for i in range(30):
        p = p / f"l{i}"
        for j in range(3):
            (p.parent / f"w{i}-{j}").mkdir(parents=True, exist_ok=True)
            (p.parent / f"w{i}-{j}" / "x").write_bytes(b"x")
        p.mkdir(parents=True)
        (p / "f").write_bytes(b"%d" % i)
    start = open_fds()
    peak = [0]
    real_listdir = _walk._listdir

    def listdir(where: int) -> list[os.DirEntry[str]]:
        peak[0] = max(peak[0], len(open_fds() - start))
        return real_listdir(where)

    monkeypatch.setattr(_walk, "_listdir", listdir)
    members, builder = build(root)
    assert builder.report.skipped == () and builder.report.dirs == 30 + 90
    # One fd per level of the current path (root + 30 levels), nothing per sibling.
    assert peak[0] <= 31 + 2
    assert open_fds() == start
    # Stopped part-way (the agent cancels a build): the generator's close closes them all.
    it = iter(TgzBuilder(root, threads=0, level=1))
    next(it)
    it.close()  # type: ignore[attr-defined]
    assert open_fds() == start
    tree_fingerprint(root)
    assert open_fds() == start


def test_a_symlink_root_is_refused(box: tuple[Path, Path], tmp_path: Path) -> None:
    """The root itself is not followed (the agent passes the real path it checked);
    symlinks in the components above it are, like in any path."""
    root, _outside = box
    link = tmp_path / "link"
    os.symlink(root, link)
    with pytest.raises(ArchiveError, match="is a symlink"):
        list(TgzBuilder(link))
    with pytest.raises(ArchiveError, match="is a symlink"):
        tree_fingerprint(link)
    via = link / "d"  # a real directory reached through a symlinked parent
    members, _b = build(via)
    assert members["secret.txt"] == b"inside d\n"



def test_no_links_refuses_a_root_path_with_a_symlinked_component(tmp_path: Path) -> None:
    # The agent checks realpath(path) and then builds with no_links=True: if a folder on
    # that resolved path has been swapped for a symlink since, the build must refuse, not
    # follow it out of the checked tree.
    allowed = tmp_path / "allowed"
    (allowed / "mid" / "app").mkdir(parents=True)
    (allowed / "mid" / "app" / "f.txt").write_text("inside\n")
    outside = tmp_path / "outside"
    (outside / "app").mkdir(parents=True)
    (outside / "app" / "secret.txt").write_text("SECRET\n")
    real = os.path.realpath(allowed / "mid" / "app")
    def names(data: bytes) -> list[str]:
        return tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))).getnames()

    assert any(n.endswith("f.txt") for n in names(b"".join(TgzBuilder(real, no_links=True))))
    assert tree_fingerprint(real, no_links=True).digest
    # The swap: "mid" becomes a symlink to the outside folder, same spelling of the path.
    os.rename(allowed / "mid", tmp_path / "mid-old")
    os.symlink(outside, allowed / "mid")
    with pytest.raises(ArchiveError, match="symlink"):
        b"".join(TgzBuilder(real, no_links=True))
    with pytest.raises(ArchiveError, match="symlink"):
        tree_fingerprint(real, no_links=True)
    # Without the flag the same path is followed (the CLI's behaviour for user-given paths).
    assert any(n.endswith("secret.txt") for n in names(b"".join(TgzBuilder(real))))
