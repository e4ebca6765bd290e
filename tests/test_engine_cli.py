"""The rdiff-style CLI (signature / delta / patch) as real processes, and its interop with the API."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import deltabkp
from deltabkp import Signature
from deltabkp.cli import main


def run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "deltabkp", *args], input=stdin, capture_output=True, timeout=60
    )


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    base = os.urandom(300_000)
    new = base[:1000] + b"hello" + base[1000:200_000] + os.urandom(5000) + base[210_000:]
    (tmp_path / "base").write_bytes(base)
    (tmp_path / "new").write_bytes(new)
    return {"base": tmp_path / "base", "new": tmp_path / "new", "dir": tmp_path}


def test_cli_roundtrip_real_processes(files: dict[str, Path]) -> None:
    d = files["dir"]
    assert run("signature", str(files["base"]), str(d / "sig")).returncode == 0
    assert run("delta", str(d / "sig"), str(files["new"]), str(d / "delta")).returncode == 0
    r = run("patch", str(files["base"]), str(d / "delta"), str(d / "out"))
    assert r.returncode == 0, r.stderr
    assert (d / "out").read_bytes() == files["new"].read_bytes()
    assert (d / "delta").stat().st_size < 20_000
    assert not list(d.glob("*.part"))


def test_cli_pipes_with_dash(files: dict[str, Path]) -> None:
    base, new = files["base"].read_bytes(), files["new"].read_bytes()
    sig = run("signature", "--block-size", "2048", "-", "-", stdin=base)
    assert sig.returncode == 0 and sig.stdout == deltabkp.signature(base, 2048)
    # without a block size, stdin is sized first: same default as for a file
    assert run("signature", "-", "-", stdin=base).stdout == deltabkp.signature(base)
    (files["dir"] / "sig").write_bytes(sig.stdout)
    dlt = run("delta", str(files["dir"] / "sig"), "-", "-", stdin=new)
    assert dlt.returncode == 0
    out = run("patch", str(files["base"]), "-", "-", stdin=dlt.stdout)
    assert out.returncode == 0 and out.stdout == new


def test_cli_and_api_interoperate(files: dict[str, Path]) -> None:
    d = files["dir"]
    base, new = files["base"].read_bytes(), files["new"].read_bytes()
    # CLI signature -> API delta -> CLI patch
    assert main(["signature", "-b", "1024", str(files["base"]), str(d / "sig")]) == 0
    cli_sig = (d / "sig").read_bytes()
    assert cli_sig == deltabkp.signature(base, 1024)
    assert Signature.parse(cli_sig).block_size == 1024
    (d / "delta").write_bytes(deltabkp.delta(cli_sig, new))
    assert main(["patch", str(files["base"]), str(d / "delta"), str(d / "out")]) == 0
    assert (d / "out").read_bytes() == new
    # API signature -> CLI delta -> API patch
    (d / "sig2").write_bytes(deltabkp.signature(base))
    assert main(["delta", str(d / "sig2"), str(files["new"]), str(d / "delta2")]) == 0
    assert bytes(deltabkp.patch(base, (d / "delta2").read_bytes())) == new
    # default block size from the file's size, same as the API's
    assert main(["signature", str(files["base"]), str(d / "sig3")]) == 0
    assert (d / "sig3").read_bytes() == (d / "sig2").read_bytes()


def test_cli_errors_are_one_line_and_typed(files: dict[str, Path]) -> None:
    d = files["dir"]
    assert main(["signature", str(files["base"]), str(d / "sig")]) == 0
    assert main(["delta", str(d / "sig"), str(files["new"]), str(d / "delta")]) == 0
    # wrong base: integrity failure, no output left behind
    r = run("patch", str(files["new"]), str(d / "delta"), str(d / "out"))
    assert r.returncode == 6
    assert r.stderr.decode().count("\n") == 1 and "delta" in r.stderr.decode()
    assert not (d / "out").exists()
    assert not [p for p in d.iterdir() if p.name.endswith(".part")]
    # a delta given as a signature: format error naming the file
    r = run("delta", str(d / "delta"), str(files["new"]), str(d / "x"))
    assert r.returncode == 5 and str(d / "delta") in r.stderr.decode()
    # truncated delta
    (d / "short").write_bytes((d / "delta").read_bytes()[:-3])
    r = run("patch", str(files["base"]), str(d / "short"), str(d / "out"))
    assert r.returncode == 5 and "truncated" in r.stderr.decode()
    # missing file, bad block size, two stdins
    r = run("signature", str(d / "missing"), str(d / "x"))
    assert r.returncode == 1 and "missing" in r.stderr.decode()
    assert main(["signature", "--block-size", "5", str(files["base"]), str(d / "x")]) == 2
    assert main(["signature", "--strong-len", "17", str(files["base"]), str(d / "x")]) == 2
    assert main(["signature", "-S", "16", str(files["base"]), str(d / "s16")]) == 0
    assert Signature.parse((d / "s16").read_bytes()).strong_len == 16
    assert main(["patch", "-", "-", str(d / "x")]) == 2
    r = run("patch")
    assert r.returncode == 2


def test_cli_empty_files(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    assert main(["signature", str(tmp_path / "empty"), str(tmp_path / "sig")]) == 0
    assert main(["delta", str(tmp_path / "sig"), str(tmp_path / "empty"), str(tmp_path / "d")]) == 0
    assert main(["patch", str(tmp_path / "empty"), str(tmp_path / "d"), str(tmp_path / "o")]) == 0
    assert (tmp_path / "o").read_bytes() == b""


def test_engine_demo_runs() -> None:
    demo = Path(__file__).resolve().parent.parent / "examples" / "engine_demo.py"
    r = subprocess.run([sys.executable, str(demo)], capture_output=True, timeout=120, text=True)
    assert r.returncode == 0, r.stderr
    assert "blake3 verified" in r.stdout and "saved" in r.stdout
