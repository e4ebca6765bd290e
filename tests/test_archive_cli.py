"""``deltabkp archive`` / ``deltabkp extract`` as real processes: summaries, --json, exit codes."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

CLI = [sys.executable, "-m", "deltabkp"]


def run(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*CLI, *args], capture_output=True, input=input, timeout=120)


def tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha\n" * 100)
    (root / "sub" / "b.log").write_text("log\n")
    (root / "sub" / "c.py").write_text("print('c')\n")
    with socket.socket(socket.AF_UNIX) as s:  # a socket file: skipped (FIFOs are stored)
        s.bind(str(root / "pipe"))
    return root


def test_archive_summary_and_extract(tmp_path: Path) -> None:
    src = tree(tmp_path / "src")
    out = tmp_path / "o.tgz"
    r = run("archive", "--exclude", "*.log", str(src), str(out))
    assert r.returncode == 0, r.stderr
    text = r.stdout.decode()
    assert "files: 2 " in text
    assert "changed while read: 0" in text
    assert "pipe: socket not archived" in text
    size = out.stat().st_size
    assert f"bytes out: {size} " in text
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]  # no temp left
    names = subprocess.run(["tar", "tzf", str(out)], capture_output=True, check=True).stdout.split()
    assert sorted(names) == [b"a.txt", b"sub/", b"sub/c.py"]
    r = run("extract", str(out), str(tmp_path / "x"))
    assert r.returncode == 0, r.stderr
    assert "2 files" in r.stdout.decode()
    assert (tmp_path / "x" / "sub" / "c.py").read_text() == "print('c')\n"


def test_json_output(tmp_path: Path) -> None:
    src = tree(tmp_path / "src")
    out = tmp_path / "o.tgz"
    r = run("archive", "--json", str(src), str(out))
    report = json.loads(r.stdout)
    assert report["files"] == 3 and report["bytes_out"] == out.stat().st_size
    assert report["skipped"] == [{"path": "pipe", "what": "socket not archived"}]
    r = run("extract", "--json", str(out), str(tmp_path / "x"))
    assert json.loads(r.stdout) == {"files": 3, "dirs": 1, "symlinks": 0, "hardlinks": 0,
                                    "fifos": 0, "bytes": 600 + 4 + 11}


def test_stdout_and_stdin(tmp_path: Path) -> None:
    src = tree(tmp_path / "src")
    r = run("archive", str(src), "-")
    assert r.returncode == 0
    assert b"files: 3" in r.stderr  # the summary goes to stderr when stdout is the archive
    assert tarfile.open(fileobj=io.BytesIO(r.stdout)).getnames() == ["a.txt", "sub", "sub/b.log", "sub/c.py"]
    r2 = run("extract", "-", str(tmp_path / "x"), input=r.stdout)
    assert r2.returncode == 0, r2.stderr
    assert (tmp_path / "x" / "a.txt").exists()


def test_errors_have_exit_codes(tmp_path: Path) -> None:
    r = run("archive", str(tmp_path / "missing"), str(tmp_path / "o.tgz"))
    assert r.returncode == 5 and b"no such directory" in r.stderr
    assert not (tmp_path / "o.tgz").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]
    r = run("extract", str(tmp_path / "missing.tgz"), str(tmp_path / "x"))
    assert r.returncode == 5 and b"no such archive" in r.stderr
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        ti = tarfile.TarInfo("../escape")
        ti.size = 1
        tf.addfile(ti, io.BytesIO(b"x"))
    bad = tmp_path / "bad.tgz"
    bad.write_bytes(buf.getvalue())
    r = run("extract", str(bad), str(tmp_path / "x"))
    assert r.returncode == 5 and b"'../escape'" in r.stderr
    assert not (tmp_path / "escape").exists()
    assert not (tmp_path / "x").exists()  # all or nothing
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "mine").write_text("kept")
    r = run("extract", str(bad), str(tmp_path / "x"))
    assert r.returncode == 2 and b"not empty" in r.stderr
    r = run("archive")
    assert r.returncode == 2


def test_output_inside_the_tree_is_not_archived(tmp_path: Path) -> None:
    src = tree(tmp_path / "src")
    (src / "sub" / "old[1].tgz").write_bytes(b"an earlier archive, kept")
    out = src / "sub" / "old[1].tgz"
    r = run("archive", str(src), str(out))
    assert r.returncode == 0, r.stderr
    assert b"changed while read: 0" in r.stdout
    names = tarfile.open(out).getnames()
    assert "sub/old[1].tgz" not in names
    assert not [n for n in names if n.endswith(".part")]  # nor its temp file, half written
    assert "sub/c.py" in names
