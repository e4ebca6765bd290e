"""A file a store writer is filling: counted writes, and what was written so far read back.

The one home for what every part writer shares (local and S3, whole archive and reverse
delta): a write failure and a read-back failure are ``StoreError`` naming the file.

With ``writeback`` (a file that will be fsynced at its commit), the kernel is asked to start
writing each ``WRITEBACK_STEP`` out as soon as it is written (Linux ``sync_file_range``,
``SYNC_FILE_RANGE_WRITE``: asynchronous, pages stay cached for the next backup's base), so
the commit's fsync waits for the last step instead of the whole archive.  Only a hint: the
durability guarantee is still, and only, that fsync; where the call is missing it is skipped.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import BinaryIO

from deltabkp.errors import StoreError

__all__ = ["WRITEBACK_STEP", "Spool", "start_writeback"]

#: Bytes written between two writeback hints: big enough that the hint costs nothing,
#: small enough that the commit's fsync has little left to wait for.
WRITEBACK_STEP = 8 << 20
_SYNC_FILE_RANGE_WRITE = 2


@cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (None off Linux/glibc); ctypes drops the GIL around it."""
    try:
        fn = ctypes.CDLL(None).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``[offset, offset + length)`` of ``fd`` out (no wait)."""
    fn = _sync_file_range()
    if fn is not None:
        fn(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # a failed hint changes nothing


class Spool:
    def __init__(self, path: Path, file: BinaryIO, *, writeback: bool = False) -> None:
        self.spool_path = path
        self.spool_file = file
        self.size = 0
        self._writeback = writeback
        self._hinted = 0  # bytes already handed to start_writeback

    def write(self, data: bytes | memoryview) -> None:
        try:
            self.spool_file.write(data)
            self.size += len(data)
            if self._writeback and self.size - self._hinted >= WRITEBACK_STEP:
                self.spool_file.flush()
                start_writeback(self.spool_file.fileno(), self._hinted, self.size - self._hinted)
                self._hinted = self.size
        except OSError as exc:
            raise StoreError(f"cannot write {self.spool_path}: {exc.strerror}") from None

    def read_back(self, chunk_size: int) -> Iterator[bytes]:
        """What was written so far (used to sign a first archive of unknown size)."""
        try:
            self.spool_file.flush()
            with open(self.spool_path, "rb") as f:
                while block := f.read(chunk_size):
                    yield block
        except OSError as exc:
            raise StoreError(f"cannot read back {self.spool_path}: {exc.strerror}") from None
