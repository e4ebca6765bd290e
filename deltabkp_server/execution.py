"""One backup execution: pull a delta from the agent, rebuild the archive, verify, store, rotate.

Job: turn one due target into exactly one logged execution row, whatever happens.
Invariants:
- the execution row is opened before the first byte moves and always closed (stored,
  unchanged or failed), also on cancellation (shielded write) — a kill -9 leaves it open,
  and start-up closes it as failed;
- a new archive becomes visible only through ``Catalog.commit_archive``, after the patched
  file has been verified (whole-file blake3 from the delta's END and from ``BackupDone``)
  and fsynced into place; anything else leaves no file behind (``PartWriter.abort``);
- a verification failure (``IntegrityError``) is retried once as a full transfer
  (``base_hash`` None), logged in the execution's note; it is never stored as good;
- patching, signature building, hashing and file writes run in worker threads behind
  ``files_limiter``; every network wait has a deadline;
- bytes on the wire are the channel's raw counters (frames and handshake included), summed
  over both directions and over the retry.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import attrs
import trio

import deltabkp
from deltabkp import transport, wire
from deltabkp.errors import (
    DeltabkpError,
    IntegrityError,
    RemoteProtocolError,
    RequestRefused,
    StoreError,
)
from deltabkp_server.catalog import AsyncCatalog
from deltabkp_server.model import ArchiveRecord, ExecutionRecord, ExecutionResult, Target
from deltabkp_server.store import PartWriter, Store

__all__ = ["Executor", "ExecutionSettings", "Ran", "PERMANENT_REFUSALS"]

log = logging.getLogger("deltabkp_server")


#: Agent error codes that say "never for this path", not "not now".
PERMANENT_REFUSALS = frozenset({"path-not-allowed", "not-found", "invalid", "refused"})


@attrs.frozen
class Ran:
    """What ``Executor.run`` reports to the scheduler."""

    record: ExecutionRecord
    retry: bool


@attrs.frozen
class ExecutionSettings:
    keep: int = 10
    connect_timeout: float = 10.0
    #: Longest silence between two messages of the agent (it may build a big archive first).
    idle_timeout: float = 300.0
    #: Largest archive accepted: a few COPY ops can describe an unbounded output, and a
    #: compromised node must not be able to fill the server's disk with one delta.
    max_archive_size: int = 64 << 30


@attrs.define
class _Meter:
    """Bytes on the wire over all attempts of one execution (closed ones + the open channel)."""

    done_sent: int = 0
    done_received: int = 0
    current: transport.Channel | None = None

    @property
    def sent(self) -> int:
        return self.done_sent + (self.current.bytes_sent if self.current else 0)

    @property
    def received(self) -> int:
        return self.done_received + (self.current.bytes_received if self.current else 0)

    def close(self, chan: transport.Channel) -> None:
        self.done_sent += chan.bytes_sent
        self.done_received += chan.bytes_received
        self.current = None


class _Unchanged(Exception):
    """Internal signal: the agent's archive is the base archive."""

    def __init__(self, base: ArchiveRecord, reason: str) -> None:
        self.base = base
        self.reason = reason


class _Patch:
    """Patcher over the base + SignatureBuilder + part file; driven from worker threads only."""

    def __init__(
        self, base_buf: Any, base: ArchiveRecord | None, part: PartWriter, max_size: int
    ) -> None:
        # With base_hash the patcher refuses, from the header on, a delta made for another base.
        self.patcher = deltabkp.Patcher(
            base_buf, base_hash=base.hash if base else None, max_size=max_size
        )
        # The signature of the new archive is built while it is written, with blocks sized
        # for the base (the new archive is usually about as big).  With no base the size is
        # unknown until the end, so that first signature is built from the written file.
        self.sig = deltabkp.SignatureBuilder(base_size=base.size) if base is not None else None
        self.part = part

    def feed(self, data: bytes) -> None:
        for piece in self.patcher.feed(data):
            self.part.write(piece)
            if self.sig is not None:
                self.sig.feed(piece)

    def finish(self, done: wire.BackupDone) -> bytes:
        self.patcher.finish()  # raises IntegrityError on a length or blake3 mismatch
        if self.patcher.new_hash != done.archive_hash or self.patcher.new_size != done.archive_size:
            raise IntegrityError(
                f"patched archive ({self.patcher.new_size} bytes, {self.patcher.new_hash.hex()[:16]}) "
                f"differs from the agent's ({done.archive_size} bytes, {done.archive_hash.hex()[:16]})"
            )
        if self.part.size != done.archive_size:
            raise IntegrityError(
                f"wrote {self.part.size} bytes but the archive has {done.archive_size}"
            )
        if self.sig is None:
            self.sig = deltabkp.SignatureBuilder(base_size=self.part.size)
            for block in self.part.read_back(1 << 20):
                self.sig.feed(block)
        sig: bytes = self.sig.finish()
        return sig


class Executor:
    """Runs executions for the scheduler and the control API."""

    def __init__(
        self,
        *,
        key: bytes,
        catalog: AsyncCatalog,
        store: Store,
        files_limiter: trio.CapacityLimiter,
        settings: ExecutionSettings = ExecutionSettings(),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.key = key
        self.catalog = catalog
        self.store = store
        self.files = files_limiter
        self.settings = settings
        self.clock = clock

    async def _thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.files)

    async def run(self, target: Target, trigger: str) -> Ran:
        """One execution of ``target``: its finished log row, and whether a failure is worth
        retrying before the next period.  Raises no ``DeltabkpError`` but a catalog failure."""
        started = self.clock()
        eid = await self.catalog.call(lambda c: c.start_execution(target.id, started, trigger))
        log.info("execution %d of %s %s started (%s)", eid, target.node, target.path, trigger)
        meter = _Meter()
        note: str | None = None
        retry = False
        try:
            try:
                record = await self._attempt(target, eid, meter, full=False, note=None)
            except IntegrityError as exc:
                note = f"delta result failed verification ({exc}); retried as a full transfer"
                log.warning("execution %d of %s %s: %s", eid, target.node, target.path, note)
                record = await self._attempt(target, eid, meter, full=True, note=note)
        except _Unchanged as u:
            record = await self._finish(eid, ExecutionResult(
                outcome="unchanged", ended=self.clock(), bytes_sent=meter.sent,
                bytes_received=meter.received, archive_size=u.base.size,
                archive_seq=u.base.seq, archive_hash=u.base.hash, note=note or u.reason,
            ))
        except DeltabkpError as exc:
            # The node refusing this path will refuse it again: wait for the next period.
            # Anything else (unreachable, broken transfer, bad data) retries when it answers.
            retry = not (isinstance(exc, RequestRefused) and exc.code in PERMANENT_REFUSALS)
            record = await self._finish(eid, ExecutionResult(
                outcome="failed", ended=self.clock(), bytes_sent=meter.sent,
                bytes_received=meter.received, error=_describe(exc, target), note=note,
            ))
        except trio.Cancelled:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await self._finish(eid, ExecutionResult(
                    outcome="failed", ended=self.clock(), bytes_sent=meter.sent,
                    bytes_received=meter.received,
                    error=f"{target.node} {target.path}: cancelled (server shutting down)",
                ))
            raise
        _log_record(record)
        return Ran(record, retry)

    async def _finish(self, eid: int, result: ExecutionResult) -> ExecutionRecord:
        return await self.catalog.call(lambda c: c.finish_execution(eid, result))

    async def _attempt(
        self, target: Target, eid: int, meter: _Meter, *, full: bool, note: str | None
    ) -> ExecutionRecord:
        base = None if full else await self.catalog.call(lambda c: c.newest_retained(target.id))
        host, port = transport.parse_hostport(target.node)
        chan = await transport.connect(
            host, port, key=self.key, role="server", timeout=self.settings.connect_timeout
        )
        meter.current = chan
        try:
            return await self._converse(chan, target, eid, base, meter, note)
        except _Unchanged:
            raise
        except BaseException:
            # Tell the agent to stop building (best effort) before hanging up.
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                with contextlib.suppress(DeltabkpError):
                    await chan.send(wire.Cancel())
            raise
        finally:
            meter.close(chan)
            await chan.aclose()

    async def _converse(
        self,
        chan: transport.Channel,
        target: Target,
        eid: int,
        base: ArchiveRecord | None,
        meter: _Meter,
        note: str | None,
    ) -> ExecutionRecord:
        idle = self.settings.idle_timeout
        await chan.send(wire.BackupRequest(target.path, base.hash if base else None, ()))
        msg = await chan.receive(timeout=idle)
        if isinstance(msg, wire.Unchanged):
            if base is None or msg.archive_hash != base.hash:
                raise RemoteProtocolError(
                    f"{target.node}: 'unchanged' for {target.path} but we sent "
                    f"{'no base' if base is None else 'another base hash'}"
                )
            raise _Unchanged(base, f"unchanged ({msg.reason})")
        if isinstance(msg, wire.NeedSignature):
            if base is None:
                raise RemoteProtocolError(f"{target.node}: asked for a signature but no base was offered")
            sig: bytes = await self._base_io(target, base, self.store.read_signature, target.id, base.seq)
            for i in range(0, len(sig), wire.MAX_CHUNK):
                await chan.send(wire.SignatureChunk(sig[i : i + wire.MAX_CHUNK]))
            await chan.send(wire.SignatureEnd())
            msg = await chan.receive(timeout=idle)
        if not isinstance(msg, (wire.DeltaChunk, wire.BackupDone)):
            raise RemoteProtocolError(f"{target.node}: unexpected {msg.TYPE} message during a backup")

        seq = await self.catalog.call(lambda c: c.next_seq(target.id))
        part: PartWriter = await self._thread(self.store.begin, target.id, seq)
        committed = False
        try:
            with contextlib.ExitStack() as stack:
                if base is not None:
                    buf = await self._base_io(
                        target, base, stack.enter_context, self.store.base(target.id, base.seq)
                    )
                else:
                    buf = b""
                patch = _Patch(buf, base, part, self.settings.max_archive_size)
                while isinstance(msg, wire.DeltaChunk):
                    await self._thread(patch.feed, msg.data)
                    msg = await chan.receive(timeout=idle)
                if not isinstance(msg, wire.BackupDone):
                    raise RemoteProtocolError(
                        f"{target.node}: expected delta-chunk or backup-done, got {msg.TYPE}"
                    )
                done = msg
                signature: bytes = await self._thread(patch.finish, done)
                # The patcher may hold views into the base's mmap: let go before it closes.
                del patch, buf
            if base is not None and done.archive_hash == base.hash:
                raise _Unchanged(base, "unchanged (hash)")
            await self._thread(part.commit, signature)
            result = ExecutionResult(
                outcome="stored", ended=self.clock(), bytes_sent=meter.sent,
                bytes_received=meter.received, archive_size=done.archive_size,
                archive_seq=seq, archive_hash=done.archive_hash, files=done.files,
                changed=done.changed, skipped=done.skipped, note=note,
            )
            try:
                _archive, record = await self.catalog.call(
                    lambda c: c.commit_archive(eid, target.id, seq, result)
                )
                committed = True
            finally:
                if not committed:
                    with trio.CancelScope(shield=True):
                        await self._thread(self.store.delete, target.id, seq)
        except BaseException:
            if not committed:
                with trio.CancelScope(shield=True):
                    await self._thread(part.abort)
            raise
        await self._rotate(target)
        return record

    async def _base_io(
        self, target: Target, base: ArchiveRecord, fn: Callable[..., Any], *args: Any
    ) -> Any:
        """Read the base archive or its signature; if it is gone or unreadable, stop offering
        it (marked missing) and fall back to a full transfer, like any integrity failure."""
        try:
            return await self._thread(fn, *args)
        except StoreError as exc:
            await self.catalog.call(lambda c: c.mark_missing(target.id, base.seq))
            log.error("%s %s: archive %d marked missing: %s", target.node, target.path, base.seq, exc)
            raise IntegrityError(f"base archive {base.seq} is unreadable ({exc})") from None

    async def _rotate(self, target: Target) -> None:
        """Keep the newest ``keep`` archives: flip the rows first, then delete the files."""
        now = self.clock()
        retired = await self.catalog.call(lambda c: c.retire(target.id, self.settings.keep, now))
        for a in retired:
            try:
                await self._thread(self.store.delete, target.id, a.seq)
            except DeltabkpError as exc:
                # The row is already not retained: start-up reconciliation removes the file.
                log.warning("%s %s: rotating out archive %d: %s", target.node, target.path, a.seq, exc)
            else:
                log.info("%s %s: archive %d rotated out", target.node, target.path, a.seq)


def _describe(exc: DeltabkpError, target: Target) -> str:
    text = str(exc)
    if isinstance(exc, RequestRefused):
        text = f"agent refused ({exc.code}): {exc.message}"
    prefix = f"{target.node} {target.path}: "
    if text.startswith(prefix):
        return text
    # Transport errors start with the peer's address: say it once.
    for head in (f"{target.node}: ", f"agent {target.node}: "):
        if text.startswith(head):
            text = text[len(head):]
    return prefix + text


def _log_record(r: ExecutionRecord) -> None:
    what = f"execution {r.id} of {r.node} {r.path}: {r.outcome}"
    if r.outcome == "stored":
        ratio = 100.0 * r.transferred / r.archive_size if r.archive_size else 0.0
        what += (
            f" archive {r.archive_seq}, {r.archive_size} bytes, {r.transferred} bytes on the wire"
            f" ({ratio:.1f}%), {len(r.changed)} changed while read"
        )
    elif r.outcome == "unchanged":
        what += f", {r.transferred} bytes on the wire"
    if r.error:
        what += f" — {r.error}"
    if r.note:
        what += f" [{r.note}]"
    log.info("%s", what)
