"""``ctl restore``: download one archive into a temp file beside DEST, then extract it into DEST.

Invariants: DEST is checked (a directory, empty, or missing with an existing parent) and the
temp file created before anything is asked of the server, so a place we cannot write to fails
first; nothing is extracted until the download is complete and ``protocol.ControlSession``
has checked its size and blake3 against what the server announced (it raises
``IntegrityError`` otherwise); extraction is all or nothing (``extract_archive``: beside
DEST, renamed onto it at the end), so a failed restore leaves DEST exactly as it was and the
next restore can run; the temp file is removed whatever happens; the download's progress
is drawn on stderr only when asked (a terminal, no ``--json``: ``_progress``).  Exit codes:
1 the temp file cannot be written (``RestoreWriteError``), 2 a bad DEST, 3/4 refused /
unreachable, 5/6 malformed (or unsafe) / corrupt.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from deltabkp import protocol
from deltabkp.ctl._client import Client
from deltabkp.ctl._progress import Progress
from deltabkp.errors import (
    ArchiveError,
    DeltabkpError,
    IntegrityError,
    RemoteProtocolError,
    UsageError,
)

if TYPE_CHECKING:
    from deltabkp.net import BlockingChannel, Channel

__all__ = ["RestoreWriteError", "download", "prepare_dest", "restore"]


class RestoreWriteError(DeltabkpError):
    """``restore`` could not write the downloaded archive next to DEST (permissions, disk full)."""

    exit_code = 1


def prepare_dest(dest: Path, about: Mapping[str, str]) -> Path:
    """``dest`` if a restore may extract into it (UsageError naming the target otherwise)."""
    # The archive library (numpy) only for the commands that extract: not for every ctl.
    from deltabkp.archive import check_destination

    try:
        check_destination(dest)  # the one rule, also applied by extract_archive itself
    except UsageError as exc:
        raise exc.with_context(**about)
    return dest


def restore(
    client: Client, args: Mapping[str, Any], dest: Path, *, show_progress: bool = False
) -> dict[str, Any]:
    """Check ``dest``, fetch the archive ``args`` names and extract it into ``dest``; returns
    the archive's header from the server, plus ``dest`` and what was ``extracted``.
    ``show_progress``: draw the download's progress on stderr (``_progress.wanted``)."""
    from deltabkp.archive import extract_archive

    about = {k: str(args[k]) for k in ("node", "path")}
    prepare_dest(dest, about)
    # The temp file first: a destination we cannot write to fails before anything is asked.
    try:
        fd, tmp_name = tempfile.mkstemp(
            dir=dest.absolute().parent, prefix=f".{dest.name}.", suffix=".tgz.part"
        )
    except OSError as exc:
        raise RestoreWriteError(
            f"cannot create a temp file next to the restore destination {dest}: "
            f"{exc.strerror or exc}", **about,
        ) from None
    tmp = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as f, Progress(
                "restore", enabled=show_progress
            ) as bar:
                meta = download(client, args, f, bar)
        except OSError as exc:  # the network's own are PeerUnavailable already: these are ours
            raise RestoreWriteError(
                f"cannot write the archive to {tmp} (restore destination {dest}): "
                f"{exc.strerror or exc}", **about,
            ) from None
        except IntegrityError as exc:
            raise exc.with_context(**about, hint=f"nothing was extracted into {dest}")
        try:
            # All or nothing: on any error dest is left exactly as it was.
            report = extract_archive(tmp, dest)
        except ArchiveError as exc:
            raise exc.with_context(**about)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    meta["dest"] = str(dest)
    meta["extracted"] = {
        "files": report.files, "dirs": report.dirs, "symlinks": report.symlinks,
        "hardlinks": report.hardlinks, "fifos": report.fifos, "bytes": report.bytes,
    }
    return meta


def download(
    client: Client, args: Mapping[str, Any], f: BinaryIO, progress: Progress | None = None
) -> dict[str, Any]:
    """Stream the archive into ``f``; the server's header (seq, size, hash, created, ...).
    ``progress`` counts the bytes against the size the header announces.

    The conversation checks the header, the byte count and the blake3 as chunks arrive and
    raises on ``DataEnd`` if they do not match: reaching the return means a verified archive.
    On the blocking edge: a write that blocks holds up no other task, and every read from
    the server still has its deadline.
    """
    with client.blocking_session(args) as chan:
        chan.send(protocol.Request("fetch", dict(args)))
        meta, bar = _header(chan.receive_a(protocol.Response, client.timeout), progress)
        while (data := _chunk(chan.receive(client.timeout), chan)) is not None:
            f.write(data)
            bar.update(len(data))
        f.flush()
    return meta


def _header(head: protocol.Response, progress: Progress | None) -> tuple[dict[str, Any], Progress]:
    meta: dict[str, Any] = dict(head.data)  # a dict: the conversation checked the header
    bar = progress if progress is not None else Progress("", enabled=False)
    bar.set_total(meta.get("size") if isinstance(meta.get("size"), int) else None)
    return meta, bar


def _chunk(msg: protocol.Message, chan: Channel | BlockingChannel) -> bytes | None:
    """A download's next bytes, or None at its (verified) end."""
    if isinstance(msg, protocol.DataEnd):
        return None
    if not isinstance(msg, protocol.DataChunk):  # the conversation allows no other
        raise RemoteProtocolError(
            f"sent {msg.TYPE} inside an archive", peer=chan.peer, peer_role=chan.peer_role
        )
    return msg.data
