"""The quick "unchanged?" check: metadata only, sensitive to every change that alters the
archive, racy entries flagged, a versioned byte form."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deltabkp.archive import Fingerprint, tree_fingerprint
from deltabkp.archive._walk import FINGERPRINT_MAGIC, RACY_NS
from deltabkp.errors import ArchiveError, FormatError, UnsupportedVersion

OLD = 1_600_000_000


def settled_tree(root: Path) -> Path:
    """A tree whose mtimes and ctimes are all older than the racy window."""
    (root / "d" / "e").mkdir(parents=True)
    for i in range(20):
        (root / "d" / f"f{i}.txt").write_text(f"file {i}\n" * 10)
    (root / "d" / "e" / "g.bin").write_bytes(os.urandom(5000))
    (root / "skip.log").write_text("excluded")
    os.symlink("d/f1.txt", root / "link")
    for p in [root, *root.rglob("*")]:
        os.utime(p, (OLD, OLD), follow_symlinks=False)
    # ctimes cannot be set: wait until they are out of the racy window.
    time.sleep(RACY_NS / 1e9 + 0.2)
    return root


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return settled_tree(tmp_path_factory.mktemp("fp") / "t")


def test_stable_and_not_racy(base: Path) -> None:
    a = tree_fingerprint(base)
    b = tree_fingerprint(base)
    assert a == b and not a.racy and len(a.digest) == 32
    assert tree_fingerprint(base, exclude=["*.log"]) != a


def mutate_cases() -> list[str]:
    return ["same-size rewrite, mtime restored", "chmod", "rename", "new file", "delete",
            "retarget symlink", "append", "new empty dir"]


@pytest.mark.parametrize("case", mutate_cases())
def test_every_change_changes_the_digest(tmp_path: Path, case: str) -> None:
    root = tmp_path / "t"
    root.mkdir()
    (root / "f").write_text("hello")
    (root / "g").write_text("world")
    os.symlink("f", root / "l")
    before = tree_fingerprint(root)
    f = root / "f"
    if case == "same-size rewrite, mtime restored":
        st = f.stat()
        f.write_text("HELLO")
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # only ctime tells
    elif case == "chmod":
        os.chmod(f, 0o600)
    elif case == "rename":
        os.rename(root / "g", root / "h")
    elif case == "new file":
        (root / "n").write_text("")
    elif case == "delete":
        (root / "g").unlink()
    elif case == "retarget symlink":
        os.unlink(root / "l")
        os.symlink("g", root / "l")
    elif case == "append":
        with open(f, "a") as fh:
            fh.write("!")
    elif case == "new empty dir":
        (root / "dir").mkdir()
    assert tree_fingerprint(root).digest != before.digest


def test_excluded_changes_do_not_count(base: Path) -> None:
    before = tree_fingerprint(base, exclude=["*.log"])
    (base / "skip.log").write_text("changed and excluded")
    after = tree_fingerprint(base, exclude=["*.log"])
    assert after == before and not after.racy


def test_recent_change_is_racy(base: Path, tmp_path: Path) -> None:
    root = settled_tree(tmp_path / "t")
    assert not tree_fingerprint(root).racy
    (root / "d" / "f3.txt").write_text("just now")  # within the filesystem's clock tick
    assert tree_fingerprint(root).racy


def test_future_mtime_is_racy(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    future = time.time() + 3600
    os.utime(tmp_path / "f", (future, future))
    assert tree_fingerprint(tmp_path).racy


AUDIT = r"""
import os, sys, json
root = os.path.realpath(sys.argv[1])
opened = []
def hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes)):
        p = os.fsdecode(args[0])
        if not os.path.isabs(p):
            # A name relative to a directory fd (the walk's opens): a file unless O_DIRECTORY.
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            if not flags & os.O_DIRECTORY:
                opened.append(p)
            return
        p = os.path.realpath(p)
        if p.startswith(root + os.sep) and not os.path.isdir(p):
            opened.append(p)
sys.addaudithook(hook)
import deltabkp
if sys.argv[2] == "fingerprint":
    fp = deltabkp.tree_fingerprint(sys.argv[1])
else:
    for _ in deltabkp.TgzBuilder(sys.argv[1]):
        pass
print(json.dumps(sorted(set(opened))))
"""


@pytest.mark.parametrize("what", ["fingerprint", "build"])
def test_fingerprint_reads_no_file_content(base: Path, what: str) -> None:
    """Every open of a file goes through the audit hook ('open' events): the fingerprint
    opens none; the build (the control) opens every regular file."""
    out = subprocess.run(
        [sys.executable, "-c", AUDIT, str(base), what], check=True, capture_output=True, text=True
    ).stdout
    opened = json.loads(out)
    if what == "fingerprint":
        assert opened == []
    else:
        assert len(opened) == 22  # 21 files + the excluded-by-nobody skip.log


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="no such directory"):
        tree_fingerprint(tmp_path / "missing")


def test_encode_parse() -> None:
    fp = Fingerprint(digest=bytes(range(32)), racy=True)
    raw = fp.encode()
    assert raw.startswith(FINGERPRINT_MAGIC) and len(raw) == 40
    assert Fingerprint.parse(raw) == fp
    assert Fingerprint.parse(Fingerprint(bytes(32), False).encode()).racy is False
    with pytest.raises(FormatError, match="magic"):
        Fingerprint.parse(b"XXXXXX" + raw[6:])
    with pytest.raises(UnsupportedVersion):
        Fingerprint.parse(raw[:6] + b"\x02" + raw[7:])
    with pytest.raises(FormatError, match="40 bytes"):
        Fingerprint.parse(raw[:-1])
    with pytest.raises(FormatError, match="flags"):
        Fingerprint.parse(raw[:7] + b"\x04" + raw[8:])
    with pytest.raises(FormatError):
        Fingerprint.parse(raw[:6])
