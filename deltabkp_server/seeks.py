"""The server's seek files: the seek points (docs/formats.md "Seek points") of each
target's newest archive, so the next layout delta inflates that base only around what
changed instead of from its start.

Job: ``make`` one after an archive is committed (the executor, off the ``--wait`` path,
under the target's lease), ``load`` it when the next backup patches against that archive.
Invariants:
- server-local: under ``<data dir>/seek/``, named ``<target id>-<archive blake3 hex>``, the
  same for the local and the S3 store (another server without the file falls back);
- only a cache: missing, torn, corrupt or another archive's (the blake3 and size inside are
  checked against the catalog's) reads as "none", logged at DEBUG; the patch then inflates
  from the start, as before; nothing here ever fails a backup;
- bounded: making a target's file deletes its others (a backup's base is the target's
  newest archive); written to a temp file and renamed (``write_bytes_atomic``), so a kill
  -9 leaves a whole file or none (plus a ``.part`` temp removed at start-up);
- made at the cost of what changed when the archive came from a layout delta patched with
  the base's seek points (``carry_from`` then ``make``: ``SeekPoints.carry``, which inflates
  only around the changes); else, or if carrying fails, from the sync markers of the whole
  archive (a first backup, a rolling delta, no seek file for the base);
- every method blocks (file I/O, an inflate of the archive): call from worker threads.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from deltabkp._atomic import atomic_write
from deltabkp._mmap import mapped
from deltabkp.archive import SeekPoints
from deltabkp.errors import DeltabkpError
from deltabkp_server.model import ArchiveRecord
from deltabkp_server.store import Store

__all__ = ["SeekCache"]

log = logging.getLogger("deltabkp_server")

#: Tar bytes between the points of the tables the server makes: a quarter of the agent's
#: (``archive.SPACING``).  Each RUN record of a layout delta reads old tar from the point
#: before its window, ~1/2 spacing further back on average: on ``bench_system.sh``'s ~1 %
#: change the apply inflated 9.1 MB of old tar instead of 20.7 (~25 ms less of its CPU,
#: in the part its worker threads take in turn).  The file is ~4x the size (~1.3 % of the
#: archive); it is mapped, not read: its windows are page cache, not the server's memory.
SPACING = 256 << 10


class SeekCache:
    """Seek files under ``directory``; see the module's invariants."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            for f in self.dir.glob(".*.part"):  # a make cut short by a crash
                f.unlink(missing_ok=True)
        except OSError as exc:
            log.debug("seek files: cannot prepare %s: %s", self.dir, exc)
        # Per target: how its newest archive was patched (its blake3, the base's table, the
        # COPY records), for the next ``make``; one per target, replaced by the next backup.
        self._carry: dict[int, tuple[bytes, SeekPoints, list[tuple[int, int, int]]]] = {}

    def carry_from(self, target_id: int, archive_hash: bytes, prior: SeekPoints,
                   copies: Sequence[tuple[int, int, int]]) -> None:
        """Archive ``archive_hash`` of the target was patched from the archive of table
        ``prior`` with these COPY records (``LayoutPatcher.copies``): ``make`` carries."""
        self._carry[target_id] = (archive_hash, prior, list(copies))

    def _file(self, target_id: int, archive_hash: bytes) -> Path:
        return self.dir / f"{target_id}-{archive_hash.hex()}.dbkpsk"

    def load(self, target_id: int, archive: ArchiveRecord) -> SeekPoints | None:
        """The seek points of ``archive`` (the catalog's row), or None."""
        f = self._file(target_id, archive.hash)
        try:
            # Mapped: the table's windows stay views of the file's pages (the map goes
            # with the last of them).
            with open(f, "rb") as fh, mapped(fh) as buf:
                seek = SeekPoints.parse(buf)
        except FileNotFoundError:
            log.debug("seek files: none for archive %d of target %d", archive.seq, target_id)
            return None
        except (OSError, DeltabkpError) as exc:
            log.debug("seek files: dropping %s: %s", f, exc)
            f.unlink(missing_ok=True)
            return None
        if not seek.matches(archive.hash, archive.size):
            log.debug("seek files: %s is not archive %d's", f, archive.seq)
            return None
        return seek

    def make(self, store: Store, target_id: int, seq: int, size: int, archive_hash: bytes
             ) -> None:
        """Make the seek file of archive ``seq`` (just committed: the target's newest) from
        the store's bytes, and delete the target's others.  Never raises."""
        f = self._file(target_id, archive_hash)
        carry = self._carry.pop(target_id, None)
        try:
            if not f.exists():
                with store.base(target_id, seq, size=size, digest=archive_hash) as buf:
                    seek = None
                    if carry is not None and carry[0] == archive_hash:
                        try:
                            seek = SeekPoints.carry(carry[1], carry[2], buf, archive_hash,
                                                    spacing=SPACING)
                        except DeltabkpError as exc:  # then the markers: a whole inflate
                            log.debug("seek files: cannot carry points to archive %d of "
                                      "target %d: %s", seq, target_id, exc)
                    if seek is None:
                        seek = SeekPoints.build(buf, archive_hash, spacing=SPACING)
                # Written piece by piece: the carried windows are views of the base's
                # mapped table, never all copied into memory at once.
                with atomic_write(f, durable=False, mode=0o600) as out:
                    out.writelines(seek.encoded())
            for other in self.dir.glob(f"{target_id}-*.dbkpsk"):
                if other != f:
                    other.unlink(missing_ok=True)
        except (OSError, DeltabkpError) as exc:
            log.debug("seek files: none made for archive %d of target %d: %s",
                      seq, target_id, exc)
            f.unlink(missing_ok=True)
