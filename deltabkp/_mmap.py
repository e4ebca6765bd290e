"""The one read-only file map: an open file as a buffer, closed without masking errors.

Why a helper: ``mmap.close()`` raises ``BufferError`` while a view of the map is alive, and an
exception on its way out (its traceback holds the frames that hold the views) is exactly such
a case; a plain ``with mmap.mmap(...)`` would then replace the real error with that one.
Here a map whose views outlive the block is left to be unmapped with the last of them.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Iterator
from typing import IO

__all__ = ["mapped"]


@contextlib.contextmanager
def mapped(f: IO[bytes]) -> Iterator[memoryview | bytes]:
    """The open file ``f`` as a read-only buffer (``b""`` when empty: mmap refuses those).

    ``f`` stays open (the caller's); the map is released at the end of the block."""
    if os.fstat(f.fileno()).st_size == 0:
        yield b""
        return
    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    view = memoryview(m)
    try:
        yield view
    finally:
        with contextlib.suppress(BufferError):
            view.release()
            m.close()
