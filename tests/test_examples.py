"""The README's main job really runs: the cluster demo, start to finish, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_cluster_demo_runs_and_sends_less_than_whole_archives(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "cluster_demo.py"), "--rounds", "1"],
        capture_output=True, text=True, env=env, timeout=240,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert text.count("first backup:") == 2
    assert text.count("round 1:") == 2 and "stored" in text
    assert "no change:" in text and "unchanged" in text.split("no change:")[1].splitlines()[0]
    assert "identical to the live tree" in text
    # The demo cleans up after itself: its run directory is gone.
    assert not list(tmp_path.glob("deltabkp-demo-*"))
