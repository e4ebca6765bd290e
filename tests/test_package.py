"""The package's public face: the error tree, __all__, the console script, typing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import deltabkp
from deltabkp import errors

ROOT = Path(__file__).resolve().parent.parent


def test_all_names_exist() -> None:
    for name in deltabkp.__all__:
        assert hasattr(deltabkp, name), name


def test_every_error_is_rooted() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        if cls is errors.ErrorCode:
            continue
        assert issubclass(cls, deltabkp.DeltabkpError), name
        assert isinstance(cls.exit_code, int)


def test_error_codes_are_one_enum() -> None:
    # Every wire code is a member; an unknown one (a newer peer) survives as plain text.
    assert errors.ErrorCode.parse("path-not-allowed") is errors.ErrorCode.PATH_NOT_ALLOWED
    assert errors.ErrorCode.parse("from-the-future") == "from-the-future"
    refused = errors.RequestRefused("busy", "try later")
    assert refused.code is errors.ErrorCode.BUSY


def test_errors_take_context_as_fields() -> None:
    exc = errors.RequestRefused(errors.ErrorCode.NOT_FOUND, "is not registered")
    assert str(exc) == "is not registered [not-found]"
    exc.with_context(node="n:1", path="/p").with_context(node="other:2")
    assert (exc.node, exc.path, exc.reason) == ("n:1", "/p", "is not registered")
    assert str(exc) == "n:1 /p: is not registered [not-found]"
    lost = errors.PeerUnavailable("connection closed by peer", peer="s:7470", peer_role="server")
    lost.with_context(node="n:1", path="/p", hint="is it running?")
    assert str(lost) == "n:1 /p: server s:7470: connection closed by peer; is it running?"
    # The peer is not repeated when it is the node itself.
    same = errors.PeerUnavailable("gone", peer="n:1", node="n:1", path="/p")
    assert str(same) == "n:1 /p: gone"


def test_cli_help_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "deltabkp", "--help"], capture_output=True, text=True, check=True
    )
    assert "deltabkp" in out.stdout


def test_cli_without_command_is_usage_error() -> None:
    out = subprocess.run([sys.executable, "-m", "deltabkp"], capture_output=True, text=True)
    assert out.returncode == 2


def test_library_is_mypy_strict_clean() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_daemons_are_mypy_strict_clean() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--config-file", str(ROOT / "pyproject.toml"),
         "deltabkp_server", "deltabkp_agent"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
