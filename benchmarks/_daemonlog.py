"""What the system benchmarks read from the daemons' logs: the one home of those patterns.

    python benchmarks/_daemonlog.py AGENT_LOG SERVER_LOG     (the last backup's timelines)

Used by ``bench_system.sh`` (its closing "phases" lines), ``_link.py`` (``bench_link.sh``)
and ``_append.py`` (``bench_system.sh --append``): each daemon's per-phase timeline of a
backup (``deltabkp._phases``: the agent's "backup of …; phases" line, the server's
"execution N … phases" line, ms wall/cpu), the agent's account of its incremental build
(the "archive of …" line), the server's end-of-execution line and the two timestamps that
split a backup's wall time (the server queued ``backup-now``; the agent served the backup).

Invariants: a log is only read, never written; every wait has a deadline and fails with a
``BenchError`` naming the log and the pattern; the daemons run on this machine, so their
log timestamps (local time, milliseconds) share the benchmark's clock.
"""

from __future__ import annotations

import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

#: The agent's log line once a backup is served (its timestamp: local time, milliseconds).
SERVED_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ INFO backup of ", re.MULTILINE)
#: The server's log line once ``backup-now`` is queued (ctl started, connected, asked).
QUEUED_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ INFO backup-now of ",
                         re.MULTILINE)
#: Each daemon's per-phase timeline of a backup (deltabkp._phases).  The server logs an
#: unchanged check's at DEBUG: an INFO line per stored archive (or failed attempt).
AGENT_PHASES = re.compile(r"INFO backup of .*; phases (.*)")
SERVER_PHASES = re.compile(r"INFO execution \d+ .*: phases (.*)")
#: The agent's account of its incremental build (what it re-read and recompressed).
AGENT_BUILD = re.compile(r"INFO archive of \S+: (.*)")
#: The server's line once an execution is over: after the commit, the new archive's
#: signature, retention, the conversion to reverse deltas and the seek points (its lease's
#: work), so the next backup of the target starts from a quiet server.  Groups: the
#: execution's id, node, path and outcome.
_END = r"execution (\d+) of (\S+) ({}): (stored|unchanged|failed|skipped)"  # {}: the path
END_LINE = re.compile(_END.format(r"\S+"))
#: The same line with its timestamp (at INFO: a failed execution's, a WARNING, is not).
END_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ INFO execution \d+ of \S+ \S+: "
                       r"(?:stored|unchanged|failed|skipped)", re.MULTILINE)


def end_line_of(path: str) -> re.Pattern[str]:
    """``END_LINE`` of one target path's executions only (the same groups)."""
    return re.compile(_END.format(re.escape(path)))


class BenchError(Exception):
    """A method did not do its job (the message says which and why)."""


def read(log: Path) -> str:
    return log.read_text(errors="replace")


def stamps_in(pattern: re.Pattern[str], text: str) -> list[float]:
    """The timestamps (seconds since the epoch) of ``pattern``'s lines in a log's ``text``;
    the pattern's first group is the line's ``YYYY-mm-dd HH:MM:SS,mmm`` (local time)."""
    return [datetime.strptime(x, "%Y-%m-%d %H:%M:%S,%f").astimezone().timestamp()
            for x in pattern.findall(text)]


def stamps(pattern: re.Pattern[str], log: Path) -> list[float]:
    """``stamps_in`` of the log file ``log``."""
    return stamps_in(pattern, read(log))


def wait_line(log: Path, pattern: re.Pattern[str], timeout: float, what: str) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = pattern.search(read(log))
        if m:
            return m
        time.sleep(0.05)
    raise BenchError(f"{what}: no line matching {pattern.pattern!r} in {log} within {timeout:g} s")


def wait_count(log: Path, pattern: re.Pattern[str], n: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while len(pattern.findall(read(log))) < n:
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: fewer than {n} lines matching {pattern.pattern!r} in "
                             f"{log} after {timeout:g} s")
        time.sleep(0.05)


def daemon_phases(agent_log: Path, server_log: Path, agent_at: int = -1,
                  server_at: int | None = -1) -> str:
    """A backup's timeline as each daemon logged it (ms wall/cpu per phase), and what the
    agent's build re-read: the work a change costs depends on which files it touches (a
    64-byte edit in a 1.7 MB .so recompresses that whole entry on the agent).  ``agent_at``
    is the backup's index among the agent's phases lines (the last by default), and
    ``server_at`` among the server's (None: the server logged none at INFO, an unchanged
    check); the build line is the one before that agent line (none for a quick check)."""
    text = read(agent_log)
    agent = list(AGENT_PHASES.finditer(text))
    line = build = srv = None
    if -len(agent) <= agent_at < len(agent):
        i = range(len(agent))[agent_at]
        line = agent[i].group(1)
        builds = AGENT_BUILD.findall(text, agent[i - 1].end() if i else 0, agent[i].start())
        build = builds[-1] if builds else None
    if server_at is not None:
        server = SERVER_PHASES.findall(read(server_log))
        srv = server[server_at] if -len(server) <= server_at < len(server) else None
    return (f"\n  agent build:   {build or '(not logged)'}"
            f"\n  agent phases:  {line or '(not logged)'}"
            f"\n  server phases: {srv or '(not logged)'}")


def timeline(start: float, end: float, execution: dict[str, Any], agent_log: Path,
             server_log: Path) -> str:
    """Where the wall time of a measurement from ``start`` to ``end`` (``time.time()``)
    went: until the server started the execution, split at the server's "backup-now of …
    queued" log line (ctl's start-up, connection and request; then the queue and the
    scheduler's claim), the execution (record's started → ended) split at the agent's
    "backup of … served" log line (agent: build and stream; server: the rest of ingest,
    commit), and from its end until the measurement ended (the commit in the catalog,
    ``--wait``'s answer, ctl's exit; or the log line)."""

    def within(pattern: re.Pattern[str], log: Path, lo: float, hi: float) -> list[float]:
        return [t for t in stamps(pattern, log) if lo <= t <= hi]

    started, ended = (datetime.fromisoformat(execution[k]).timestamp() for k in ("started", "ended"))
    before = split = ""
    queued = within(QUEUED_LINE, server_log, start - 0.01, started + 0.01)
    if queued:
        before = (f" (ctl until the server queued it {queued[-1] - start:.2f} s, queue and "
                  f"claim {started - queued[-1]:.2f} s)")
    served = within(SERVED_LINE, agent_log, started, ended + 0.01)
    if served:
        split = (f" (agent until it served the backup {served[-1] - started:.2f} s, server "
                 f"after it {ended - served[-1]:.2f} s)")
    return (f"until the execution started {started - start:.2f} s{before}, execution "
            f"{ended - started:.2f} s{split}, from its end {end - ended:.2f} s")


def main(argv: list[str]) -> int:
    """``bench_system.sh``'s closing lines: the last backup's phases, each daemon's."""
    agent = AGENT_PHASES.findall(read(Path(argv[0])))
    server = SERVER_PHASES.findall(read(Path(argv[1])))
    print(f"  agent:  {agent[-1] if agent else '(not logged)'}")
    print(f"  server: {server[-1] if server else '(not logged)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
