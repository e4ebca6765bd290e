"""Keep a daemon's C heap from holding on to freed buffers (glibc only; elsewhere a no-op).

Why: the daemons churn through ~0.1-1 MiB buffers (archive chunks, compression jobs, delta
output) in several threads.  glibc serves a request past ``M_MMAP_THRESHOLD`` with its own
mmap, returned to the kernel on free, but by default it *raises* that threshold to the size
of every such block freed (up to 32 MiB), after which those buffers come from the
per-thread arenas, which fragment and keep their pages: the resident set then grows with
the work done, not with what is live.  Fixing the threshold keeps big buffers in their own
maps (measured with ``benchmarks/bench_memory.py``: docs/architecture.md "Memory").

Invariant: called once, before the daemon's threads start; never raises.
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["MMAP_THRESHOLD", "bound_heap"]

#: Requests at least this big get their own mmap (glibc's default before it adapts).
MMAP_THRESHOLD = 128 * 1024
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def bound_heap() -> bool:
    """Fix glibc's mmap threshold (and the heap trim threshold with it); True if applied."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # Setting either threshold explicitly turns glibc's adaptive raising off.
    ok: bool = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD) == 1 and ok
    return ok
