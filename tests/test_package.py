"""The package's public face: the error tree, __all__, the console script, typing."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
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


def test_lazy_public_names_are_the_subpackages_all() -> None:
    # ``deltabkp`` lists the engine's and the archive's names without importing them.
    from deltabkp import archive, engine, net

    assert deltabkp._ENGINE_NAMES == tuple(engine.__all__)
    assert deltabkp._ARCHIVE_NAMES == tuple(archive.__all__)
    assert deltabkp.TgzBuilder is archive.TgzBuilder and deltabkp.Patcher is engine.Patcher
    assert set(dir(deltabkp)) >= set(deltabkp.__all__)
    assert sorted(net._LAZY) == sorted(net.__all__)
    for name in net.__all__:
        assert getattr(net, name) is getattr(sys.modules[net._LAZY[name]], name), name


def test_import_and_ctl_help_do_not_import_numpy_or_the_archive_library() -> None:
    # Every ctl command starts like this: numpy and the archive builders are for the
    # commands that use them (``import deltabkp`` is inside ``deltabkp.cli``).
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "deltabkp", "ctl", "--help"],
        capture_output=True, text=True, check=True,
    )
    assert "backup-now" in out.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines()}
    assert "deltabkp.cli" in imported  # the list is real
    assert not {m for m in imported if m.split(".")[0] == "numpy"
                or m.startswith(("deltabkp.engine", "deltabkp.archive"))}


def test_engine_help_names_the_engine_default() -> None:
    from deltabkp import _cli_engine
    from deltabkp.engine._signature import DEFAULT_STRONG_LEN

    assert _cli_engine._DEFAULT_STRONG_LEN == DEFAULT_STRONG_LEN


def test_cli_help_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "deltabkp", "--help"], capture_output=True, text=True, check=True
    )
    assert "deltabkp" in out.stdout


def test_cli_without_command_is_usage_error() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "deltabkp"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 2


def test_library_is_mypy_strict_clean() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_daemons_are_mypy_strict_clean() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--config-file", str(ROOT / "pyproject.toml"),
         "deltabkp_server", "deltabkp_agent"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_one_version_source() -> None:
    # pyproject.toml reads the version from deltabkp.__version__; nothing else spells it.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    dynamic = project["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "deltabkp.__version__"}
    out = subprocess.run(
        [sys.executable, "-m", "deltabkp", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"deltabkp {deltabkp.__version__}"


def test_changelog_keeps_a_changelog() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    heads = re.findall(r"^## (.+)$", text, re.MULTILINE)
    # Newest first, unreleased work on top; every entry sorted under Added/Changed/... .
    assert heads and heads[0] == "[Unreleased]"
    kinds = set(re.findall(r"^### (.+)$", text, re.MULTILINE))
    assert kinds and kinds <= {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}
