"""The one atomic write: whole or nothing, exclusive creation keeps the first, modes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deltabkp._atomic import atomic_write, write_bytes_atomic


def test_success_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write(b"half")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_exclusive_keeps_the_first_file(tmp_path: Path) -> None:
    target = tmp_path / "key"
    write_bytes_atomic(target, b"first", exclusive=True, mode=0o600)
    write_bytes_atomic(target, b"second", exclusive=True, mode=0o600)
    assert target.read_bytes() == b"first"
    assert target.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key"]


def test_default_mode_follows_the_umask(tmp_path: Path) -> None:
    # In a child process: the umask is process-wide.
    code = (
        "import os, sys; os.umask(0o077); from deltabkp._atomic import write_bytes_atomic;"
        "write_bytes_atomic(sys.argv[1], b'x'); print(oct(os.stat(sys.argv[1]).st_mode & 0o777))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "private")],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0o600"
    write_bytes_atomic(tmp_path / "shared", b"x")
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o666 & ~umask
