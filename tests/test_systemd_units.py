"""examples/systemd: the units pass `systemd-analyze verify` and their command lines parse.

systemd-analyze needs the ExecStart binary to exist, so each unit is checked with the path of
the console script installed here substituted for /usr/local/bin.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from deltabkp_agent.__main__ import build_parser as agent_parser
from deltabkp_server.__main__ import build_parser as server_parser

UNITS = Path(__file__).resolve().parent.parent / "examples" / "systemd"
ANALYZE = shutil.which("systemd-analyze")
# .ci/run installs it; a machine without systemd cannot run this check at all.
pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")


def _installed(name: str, tmp_path: Path, text: str | None = None) -> Path:
    exe = shutil.which(name)
    assert exe is not None, f"{name} is not installed (pip install -e .)"
    body = (UNITS / f"{name}.service").read_text() if text is None else text
    unit = tmp_path / f"{name}.service"
    unit.write_text(body.replace(f"/usr/local/bin/{name}", exe))
    return unit


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name", ["deltabkp-server", "deltabkp-agent"])
def test_unit_verifies_cleanly(name: str, tmp_path: Path) -> None:
    done = _verify(_installed(name, tmp_path))
    # Unknown keys are only warnings (exit 0): any output at all is a defect in the unit.
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr


def test_a_misspelled_key_is_caught(tmp_path: Path) -> None:
    text = (UNITS / "deltabkp-server.service").read_text().replace("ProtectSystem=", "ProtectSystm=")
    done = _verify(_installed("deltabkp-server", tmp_path, text))
    assert "ProtectSystm" in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("name", "parser"), [("deltabkp-server", server_parser), ("deltabkp-agent", agent_parser)]
)
def test_exec_start_arguments_are_the_daemons_own(
    name: str, parser: Callable[[], argparse.ArgumentParser]
) -> None:
    lines = [ln for ln in (UNITS / f"{name}.service").read_text().splitlines() if ln.startswith("ExecStart=")]
    assert len(lines) == 1
    argv = shlex.split(lines[0].removeprefix("ExecStart="))
    assert argv[0] == f"/usr/local/bin/{name}"
    parser().parse_args(argv[1:])  # exits (fails the test) on an unknown or bad flag


def test_agent_reads_only_what_it_backs_up() -> None:
    unit = (UNITS / "deltabkp-agent.service").read_text()
    allowed = {a for a in shlex.split(unit.split("ExecStart=", 1)[1].splitlines()[0]) if a.startswith("/srv")}
    read_only = {ln.split("=", 1)[1] for ln in unit.splitlines() if ln.startswith("ReadOnlyPaths=")}
    assert allowed and allowed <= read_only
    assert "ProtectSystem=strict" in unit and "CapabilityBoundingSet=CAP_DAC_READ_SEARCH" in unit
