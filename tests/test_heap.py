"""The daemons' heap tuning (deltabkp/_heap.py): applied where the C library is glibc."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_bound_heap_applies_on_glibc() -> None:
    # In a child: the tuning is process-wide and must not leak into the test process.
    out = subprocess.run(
        [sys.executable, "-c", "from deltabkp._heap import bound_heap; print(bound_heap())"],
        capture_output=True, text=True, check=True, timeout=60,
    )
    assert out.stdout.strip() == "True"
