"""``benchmarks/bench_link.sh`` parses and documents what its driver accepts (the benchmark
itself needs root, namespaces and minutes: it is run by hand, not here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def test_bench_link_script_parses_and_its_help_matches_the_driver() -> None:
    script = BENCH / "bench_link.sh"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    usage = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True,
                           check=True, timeout=30).stdout
    driver = subprocess.run([sys.executable, str(BENCH / "_link.py"), "--help"],
                            capture_output=True, text=True, check=True, timeout=30).stdout
    for option in ("--repeat", "--tree", "--rate", "--json", "--keep-dir"):
        assert option in usage and option in driver, option
    assert "tc tbf" in usage and "rsync" in usage
