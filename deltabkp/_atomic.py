"""The one atomic file write of deltabkp: a temp file beside the target, renamed into place.

Readers see the old file or the whole new one, never a half-written one; a failure (or a
cancellation) removes the temp file and leaves the target untouched.  With ``durable`` the
data and the directory entry are fsynced (catalog-grade); with ``exclusive`` an existing
target wins (``os.link`` instead of ``os.replace``: two processes creating the same file at
the same instant end with one of their files, whole).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "write_bytes_atomic", "fsync_dir"]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` sets it, racing threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


@contextlib.contextmanager
def atomic_write(
    target: str | os.PathLike[str], *, durable: bool = True, exclusive: bool = False,
    mode: int | None = None,
) -> Iterator[BinaryIO]:
    """Yield a file to write; on a clean exit it becomes ``target``, else it vanishes.

    Raises ``OSError`` as the system reports it; callers turn it into their typed error.
    ``mode`` is the new file's permission bits (0o600 for secrets and private caches);
    by default 0o666 less the umask, as ``open()`` would create it.
    With ``exclusive``, an existing ``target`` is kept and the new data dropped.
    """
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        os.fchmod(fd, mode if mode is not None else 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        if exclusive:
            with contextlib.suppress(FileExistsError):
                os.link(tmp, target)
            os.unlink(tmp)
        else:
            os.replace(tmp, target)
        if durable:
            fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(
    target: str | os.PathLike[str], data: bytes, **kw: bool | int | None
) -> None:
    """``atomic_write`` of one bytes value."""
    with atomic_write(target, **kw) as f:  # type: ignore[arg-type]
        f.write(data)
