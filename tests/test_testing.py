"""``deltabkp.testing``'s launcher, on its own: what a caller sees when a daemon fails to start."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from deltabkp.testing import Daemon, DaemonStartError


def test_a_daemon_that_dies_before_its_ready_line_is_a_typed_error(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import sys; print('booting'); sys.exit('no port for you')"]
    with pytest.raises(DaemonStartError) as info:
        Daemon(argv, log=tmp_path / "d.log", name="dying", timeout=20)
    assert "no port for you" in str(info.value)  # the log's tail is in the message


def test_a_silent_daemon_is_stopped_at_the_deadline(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    with pytest.raises(DaemonStartError):
        Daemon(argv, log=tmp_path / "d.log", name="silent", timeout=1)


def test_the_ready_line_gives_the_address_and_stop_ends_it(tmp_path: Path) -> None:
    code = (
        "import signal, sys, time; print('x listening on 127.0.0.1:4242', flush=True);"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); time.sleep(60)"
    )
    d = Daemon([sys.executable, "-c", code], log=tmp_path / "d.log", name="x", timeout=20)
    assert d.address == "127.0.0.1:4242" and d.port == 4242 and d.alive()
    assert d.stop() == 0 and not d.alive()
