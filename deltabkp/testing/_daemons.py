"""Start a daemon process and wait for its ready line: the one launcher of tests, scripts, examples.

A deltabkp daemon (``deltabkp-server``, ``deltabkp-agent``, or anything that follows the same
convention, such as the echo app of ``examples/``) prints exactly one line on stdout once its
port is bound: ``NAME listening on HOST:PORT``.  ``Daemon`` starts the command with its stdout
and stderr going to one log file, waits for that line under a deadline and knows the address,
so port 0 can be used everywhere.  The daemons speak TLS 1.3 by default (docs/security.md):
started here as an operator starts them, with no extra flag, they are secured the same way.

Invariants:
- Every wait has a deadline; a daemon that exits or stays silent past it is stopped (nothing
  is left running) and ``DaemonStartError`` carries the tail of its log.
- Only this start's output is searched and shown: a log file appended to by earlier runs
  cannot produce a stale ready line.
- A daemon started in its own session (``start_new_session=True``) is signalled as a process
  group, and the group is swept with SIGKILL before the leader is reaped, so helpers it
  spawned cannot outlive it and a reused pid is never signalled.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from deltabkp import net
from deltabkp.errors import DeltabkpError, UsageError

__all__ = ["Daemon", "DaemonStartError", "READY_LINE", "console_script"]

#: The ready line, matched against whole lines of output (log lines never match: they carry a
#: timestamp and a level before the text).
READY_LINE = re.compile(r"(\S+) listening on (\S+)")
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
_POLL_S = 0.05
_LOG_TAIL = 4000


class DaemonStartError(DeltabkpError):
    """A daemon did not come up: it exited, or did not print its ready line in time.

    ``log`` holds what it wrote (the tail is in the message too).
    """

    exit_code = 1

    def __init__(self, reason: str, *, name: str, log: str = "") -> None:
        tail = log[-_LOG_TAIL:]
        shown = f"; its log:\n{tail}" if tail.strip() else "; it wrote nothing"
        super().__init__(f"{reason}{shown}")
        self.name = name
        self.log = log


def console_script(name: str) -> str:
    """The console script ``name`` installed beside this Python (a venv), else on ``PATH``."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name) or name


class Daemon:
    """A started daemon process (like ``subprocess.Popen``, the constructor starts it).

    ``log`` receives the daemon's stdout and stderr, interleaved as written (appended to, or
    truncated with ``append=False``).  With ``wait=True`` the constructor returns once the
    ready line is there (``address``); else call ``wait_ready``.  ``name`` is used in messages
    only (default: the command's file name).  Dropping the object does not stop the process
    (a script may start daemons that outlive it); ``stop``, ``kill`` or ``with`` do.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log: str | os.PathLike[str],
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        start_new_session: bool = False,
        append: bool = True,
        wait: bool = True,
        timeout: float = START_TIMEOUT_S,
    ) -> None:
        if not argv:
            raise UsageError("a daemon needs a command")
        self.argv = [str(a) for a in argv]
        self.name = name or Path(self.argv[0]).name
        self.log = Path(log)
        self.session = start_new_session
        self._address: net.Address | None = None
        if cwd is not None:
            Path(cwd).mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab" if append else "wb") as out:
            self._log_start = out.tell()
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None, cwd=cwd,
                start_new_session=start_new_session,
            )
        self._scanned = self._log_start
        self._partial = b""
        if wait:
            self.wait_ready(timeout)

    # -- state --------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def ready(self) -> bool:
        return self._address is not None

    @property
    def endpoint(self) -> net.Address:
        """Where the daemon listens, as reported in its ready line."""
        if self._address is None:
            raise DaemonStartError(f"{self.name} has not reported its address yet", name=self.name)
        return self._address

    @property
    def address(self) -> str:
        """``HOST:PORT`` as the daemon printed it."""
        return str(self.endpoint)

    @property
    def port(self) -> int:
        return self.endpoint.port

    def log_text(self) -> str:
        """What this start of the daemon has written so far (stdout and stderr)."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self._log_start)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        """True until the daemon has exited (it is not reaped here: see ``stop``)."""
        if self.proc.returncode is not None:
            return False
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped by someone else (proc.wait)
            return self.proc.poll() is None
        return info is None

    # -- start-up -----------------------------------------------------------------------------

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> net.Address:
        """Wait for the ready line; on failure stop the daemon and raise ``DaemonStartError``."""
        deadline = time.monotonic() + timeout
        while self._address is None:
            self._address = self._scan()
            if self._address is not None:
                break
            if not self.alive():
                self._address = self._scan()  # it may have printed the line, then exited
                rc = self.stop(timeout=0)
                raise DaemonStartError(
                    f"{self.name} exited with status {rc} before it was ready ({self._cmd()})",
                    name=self.name, log=self.log_text(),
                )
            if time.monotonic() > deadline:
                self.stop(timeout=5)
                raise DaemonStartError(
                    f"{self.name} did not report its address within {timeout:g} s ({self._cmd()})",
                    name=self.name, log=self.log_text(),
                )
            time.sleep(_POLL_S)
        return self._address

    def _scan(self) -> net.Address | None:
        """Read the new whole lines of output; the address of the first ready line, if any."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self._scanned)
                data = f.read()
        except FileNotFoundError:
            return None
        self._scanned += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for raw in lines:
            m = READY_LINE.fullmatch(raw.decode(errors="replace").strip())
            if m is None:
                continue
            try:
                return net.Address.parse(m.group(2))
            except UsageError:
                continue
        return None

    def _cmd(self) -> str:
        return " ".join(self.argv)

    # -- stopping -----------------------------------------------------------------------------

    def _signal(self, sig: int) -> None:
        """Signal the daemon (its whole group when it leads a session), if not reaped yet:
        until then its pid cannot have been reused."""
        if self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self.session:
                os.killpg(self.pid, sig)
            else:
                os.kill(self.pid, sig)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL; returns the exit status."""
        if self.alive():
            self._signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.alive() and time.monotonic() < deadline:
                time.sleep(_POLL_S)
        return self.kill()

    def kill(self) -> int:
        """SIGKILL (the group, for a session leader: helpers that ignored SIGTERM too); reap."""
        if self.alive() or self.session:
            self._signal(signal.SIGKILL)
        return self.proc.wait(STOP_TIMEOUT_S)

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.address if self.ready else "not ready"
        return f"<Daemon {self.name} pid {self.pid} {where}>"
