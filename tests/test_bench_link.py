"""``benchmarks/bench_link.sh`` parses and documents what its driver accepts (the benchmark
itself needs root, namespaces and minutes: it is run by hand, not here)."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

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


def _daemonlog_module() -> Any:
    saved = list(sys.path)
    sys.path.insert(0, str(BENCH))
    try:
        import _daemonlog  # type: ignore[import-not-found]  # benchmarks/ is no package
    finally:
        sys.path[:] = saved
    return _daemonlog


def test_the_benchmarks_report_both_daemons_timelines_from_their_log_lines(tmp_path: Path) -> None:
    # Lines as the daemons write them (a real run's logs); the last backup's are reported,
    # or the one asked for (bench_system.sh --append reports each backup's).
    _daemonlog = _daemonlog_module()
    agent, server = tmp_path / "agent.log", tmp_path / "server.log"
    agent.write_text(
        "2026-11-29 21:33:53,109 deltabkp-agent INFO archive of /r/app: 0 of 5047 entries "
        "reused, 4828 files read (full build; previous build: none); 102.7 MB of tar "
        "compressed, 0.0 MB of deflate copied\n"
        "2026-11-29 21:33:55,982 deltabkp-agent INFO backup of /r/app: archive a62ee9e24d6f0e2b,"
        " 29548558 bytes, 4828 files, delta 29550903 bytes (100.0%), signature from none, 0 "
        "changed while read; phases index 0/0, build+delta 26132/9249 (ms wall/cpu; total "
        "29146/9907) [node=10.77.0.3:40059]\n"
        "2026-11-29 21:34:00,583 deltabkp-agent INFO archive of /r/app: 5008 of 5047 entries "
        "reused, 416 files read (incremental); 3.9 MB of tar compressed, 28.4 MB of deflate "
        "copied\n"
        "2026-11-29 21:34:01,546 deltabkp-agent INFO backup of /r/app: archive 6b3c21ec2b8fbf01,"
        " 29557016 bytes, 4828 files, delta 30312 bytes (0.1%), signature from layout, 0 "
        "changed while read; phases index 31/7, build 1022/564, layout 596/222 (ms wall/cpu; "
        "total 1649/793) [node=10.77.0.3:40059]\n")
    server.write_text(
        "2026-11-29 21:33:54,430 deltabkp-server INFO execution 1 of 10.77.0.3:40059 /r/app: "
        "phases connect 30/9, receive 24966/3722 (ms wall/cpu; total 24996/3731)\n"
        "2026-11-29 21:34:01,630 deltabkp-server INFO execution 2 of 10.77.0.3:40059 /r/app: "
        "phases connect 32/6, agent 1431/14, apply 750/288 (ms wall/cpu; total 2213/308)\n")
    got = _daemonlog.daemon_phases(agent, server)
    assert "416 files read (incremental); 3.9 MB of tar compressed" in got
    assert "agent phases:  index 31/7, build 1022/564, layout 596/222" in got
    assert "server phases: connect 32/6, agent 1431/14, apply 750/288" in got
    assert "26132" not in got and "24966" not in got  # the first backup's are not
    first = _daemonlog.daemon_phases(agent, server, 0, 0)
    assert "4828 files read (full build" in first and "416 files read" not in first
    assert "build+delta 26132/9249" in first and "receive 24966/3722" in first
    # An unchanged check: no build line before it, no server line at INFO.
    with agent.open("a") as f:
        f.write("2026-11-29 21:34:09,001 deltabkp-agent INFO backup of /r/app: unchanged "
                "(fingerprint), base 6b3c21ec2b8fbf01; phases index 1/1, quick-check 40/38 (ms "
                "wall/cpu; total 41/39) [node=10.77.0.3:40059]\n")
    quick = _daemonlog.daemon_phases(agent, server, 2, None)
    assert "agent build:   (not logged)" in quick and "quick-check 40/38" in quick
    assert "server phases: (not logged)" in quick
    # bench_system.sh's closing lines: the last backup's, as it always printed them.
    out = subprocess.run([sys.executable, str(BENCH / "_daemonlog.py"), str(agent), str(server)],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    assert out.splitlines() == [
        "  agent:  index 1/1, quick-check 40/38 (ms wall/cpu; total 41/39) [node=10.77.0.3:40059]",
        "  server: connect 32/6, agent 1431/14, apply 750/288 (ms wall/cpu; total 2213/308)"]


def test_the_end_of_an_execution_is_read_from_one_home() -> None:
    """``_daemonlog``'s end-of-execution patterns, which bench_scale.py (executions ended in
    a window) and _link.py (one target's first backup) use: lines as the server writes
    them (deltabkp_server.execution._log_record; a failure is a WARNING)."""
    dl = _daemonlog_module()
    log = (
        "2026-11-29 21:33:54,430 deltabkp-server INFO execution 1 of 10.0.0.3:7471 /r/app2: "
        "stored archive 1, 100 bytes, 100 bytes on the wire (100.0%), 0 changed while read\n"
        "2026-11-29 21:33:55,000 deltabkp-server INFO execution 2 of 10.0.0.3:7471 /r/app: "
        "phases connect 30/9 (ms wall/cpu; total 30/9)\n"
        "2026-11-29 21:33:56,250 deltabkp-server WARNING execution 3 of 10.0.0.3:7471 /r/app: "
        "failed — agent unreachable\n"
        "2026-11-29 21:33:57,500 deltabkp-server INFO execution 4 of 10.0.0.3:7471 /r/app: "
        "unchanged, 20 bytes on the wire\n"
    )
    assert [m.group(1, 3, 4) for m in dl.END_LINE.finditer(log)] == [
        ("1", "/r/app2", "stored"), ("3", "/r/app", "failed"), ("4", "/r/app", "unchanged")]
    mine = dl.end_line_of("/r/app")
    assert [m.group(1, 4) for m in mine.finditer(log)] == [("3", "failed"), ("4", "unchanged")]
    assert dl.end_line_of("/r/app2").search(log).group(1) == "1"
    assert not dl.end_line_of("/r/app.").search(log)  # the path is escaped: "." is no wildcard
    local = [datetime(2026, 11, 29, 21, 33, 54, 430_000).timestamp(),
             datetime(2026, 11, 29, 21, 33, 57, 500_000).timestamp()]
    assert dl.stamps_in(dl.END_STAMP, log) == local  # the INFO ends, in local time
