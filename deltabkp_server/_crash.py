"""Tests only: kill -9 the server at a named step, to prove each step crash-safe.

Job: one hook for every crash test with real daemons: a server started with
``DELTABKP_TEST_CRASH_AT=STEP`` kills itself (SIGKILL: no cleanup, no shielded write) the
first time it reaches ``crash_point(STEP)``.  Steps: "archive-committed" (``execution``: an
archive's catalog commit done, its signature not made), and the conversion's
"delta-written", "delta-committed", "recorded", "whole-deleted" (``versions``).
Invariant: unset (any daemon outside a test) it costs one environment lookup.
"""

from __future__ import annotations

import os
import signal

__all__ = ["CRASH_ENV", "crash_point"]

CRASH_ENV = "DELTABKP_TEST_CRASH_AT"


def crash_point(step: str) -> None:
    if os.environ.get(CRASH_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)
