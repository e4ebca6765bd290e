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
        assert issubclass(cls, deltabkp.DeltabkpError), name
        assert isinstance(cls.exit_code, int)


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
