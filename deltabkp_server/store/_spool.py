"""A file a store writer is filling: counted writes, and what was written so far read back.

The one home for what every part writer shares (local and S3, whole archive and reverse
delta): a write failure and a read-back failure are ``StoreError`` naming the file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from deltabkp.errors import StoreError

__all__ = ["Spool"]


class Spool:
    def __init__(self, path: Path, file: BinaryIO) -> None:
        self.spool_path = path
        self.spool_file = file
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        try:
            self.spool_file.write(data)
        except OSError as exc:
            raise StoreError(f"cannot write {self.spool_path}: {exc.strerror}") from None
        self.size += len(data)

    def read_back(self, chunk_size: int) -> Iterator[bytes]:
        """What was written so far (used to sign a first archive of unknown size)."""
        try:
            self.spool_file.flush()
            with open(self.spool_path, "rb") as f:
                while block := f.read(chunk_size):
                    yield block
        except OSError as exc:
            raise StoreError(f"cannot read back {self.spool_path}: {exc.strerror}") from None
