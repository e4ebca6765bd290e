"""One backup execution: ``pull`` (the exchange) → ``ingest`` (patch, verify, commit) →
``retention`` (keep the newest N), each in its own module; this one logs the execution.

Job: turn one due target into exactly one logged execution row, whatever happens.
Invariants:
- the execution row is opened before the first byte moves and always closed (stored,
  unchanged or failed), also on cancellation (shielded write) — a kill -9 leaves it open,
  and start-up closes it as failed;
- a new archive becomes visible only through ``Catalog.commit_archive``, after the patched
  file has been verified (whole-file blake3 from the delta's END and from ``BackupDone``)
  and fsynced into place; anything else leaves no file behind (``Ingest.aclose``);
- a verification failure (``IntegrityError``) is retried once as a full transfer
  (``base_hash`` None), logged in the execution's note; it is never stored as good;
- "unchanged" is a verdict of the attempt, not an exception; errors get the target's node
  and path as fields (``with_context``), never by editing their text;
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

import attrs
import trio

from deltabkp import net, protocol
from deltabkp._phases import Phases
from deltabkp.errors import (
    AuthError,
    DeltabkpError,
    ErrorCode,
    IntegrityError,
    PeerUnavailable,
    RequestRefused,
)
from deltabkp_server._crash import crash_point
from deltabkp_server.catalog import AsyncCatalog
from deltabkp_server.config import ExecutionSettings
from deltabkp_server.ingest import Ingest, sign
from deltabkp_server.metrics import ServerMetrics
from deltabkp_server.model import ArchiveRecord, ExecutionRecord, ExecutionResult, Target
from deltabkp_server.pull import Unchanged, offers_layout, pull
from deltabkp_server.retention import rotate
from deltabkp_server.seeks import SeekCache
from deltabkp_server.store import Store

__all__ = ["Executor", "ExecutionSettings", "Ran"]

log = logging.getLogger("deltabkp_server")


@attrs.frozen
class Ran:
    """What ``Executor.run`` reports to the scheduler."""

    record: ExecutionRecord
    retry: bool


@attrs.define
class _Meter:
    """Bytes on the wire over all attempts of one execution (closed ones + the open channel)."""

    done_sent: int = 0
    done_received: int = 0
    current: net.Channel | None = None

    @property
    def sent(self) -> int:
        return self.done_sent + (self.current.bytes_sent if self.current else 0)

    @property
    def received(self) -> int:
        return self.done_received + (self.current.bytes_received if self.current else 0)

    def close(self, chan: net.Channel) -> None:
        self.done_sent += chan.bytes_sent
        self.done_received += chan.bytes_received
        self.current = None


@attrs.frozen
class _Live:
    """A running execution: what it is about and its bytes on the wire so far."""

    target: Target
    started: float
    meter: _Meter


@attrs.frozen
class _Same:
    """An attempt's verdict: the agent's archive is the base archive."""

    base: ArchiveRecord
    note: str
    #: What the agent's build skipped (only known when it built the archive again).
    skipped: tuple[tuple[str, ...], ...] = ()


@attrs.define(kw_only=True)
class Executor:
    """Runs executions; only the scheduler calls it (``backup-now`` too goes through the
    scheduler, so one target never runs twice at once)."""

    key: bytes = attrs.field(repr=False)
    catalog: AsyncCatalog
    store: Store
    files: trio.CapacityLimiter = attrs.field(alias="files_limiter")
    settings: ExecutionSettings = ExecutionSettings()
    clock: Callable[[], float] = time.time
    #: The executions running here, by id: their bytes so far (``Scheduler`` writes them to
    #: the catalog every ``PROGRESS_S``; ``ctl status`` and ``backup-now --wait`` read them).
    live: dict[int, _Live] = attrs.Factory(dict)
    #: This server's counters (``Server`` shares one with the status page).
    metrics: ServerMetrics = attrs.Factory(ServerMetrics)
    #: The newest execution row closed here, per target, and an event set (then replaced) at
    #: each close: ``backup-now --wait`` answers the moment its row closes on this server
    #: instead of at its next look at the catalog (it still looks, for other servers' runs).
    closed: dict[int, ExecutionRecord] = attrs.Factory(dict)
    #: Seek files of each target's newest archive (None: none made or used).
    seeks: SeekCache | None = None
    _closing: trio.Event = attrs.Factory(trio.Event)
    #: Per target: its agent offered the layout delta on the last connection.
    _layout_peers: dict[int, bool] = attrs.Factory(dict)

    def on_close(self) -> trio.Event:
        """Set when the next execution row closes here (take it before looking at ``closed``
        or the catalog, so a close in between is not missed)."""
        return self._closing

    def _closed(self, record: ExecutionRecord) -> ExecutionRecord:
        self.closed[record.target_id] = record
        self._closing.set()
        self._closing = trio.Event()
        return record

    async def run(self, target: Target, trigger: str, *, due: float | None = None) -> Ran:
        """One execution of ``target`` (``due``: when it was due, for the log's lag): its
        finished log row, and whether a failure is worth retrying before the next period.
        Raises no ``DeltabkpError`` but a catalog failure."""
        started = self.clock()
        eid = await self.catalog.call(
            # The claim's request number: the backup-now requests this run answers.
            lambda c: c.start_execution(
                target.id, started, trigger, due=due, request_seq=target.request_seq
            )
        )
        about = net.log_context(node=target.node, path=target.path, execution=eid)
        log.info("execution %d of %s started (%s)", eid, target.name, trigger,
                 extra={**about, "event": "execution-started"})
        failure = "execution-failed"
        meter = _Meter()
        self.live[eid] = _Live(target, started, meter)
        note: str | None = None
        retry = False
        stored = False  # the archive's row is committed (closed as stored)
        try:
            try:
                got = await self._attempt(target, eid, meter, full=False, note=None)
            except IntegrityError as exc:
                note = f"delta result failed verification ({exc.reason}); retried as a full transfer"
                log.warning("execution %d of %s: %s", eid, target.name, note,
                            extra={**about, "event": "integrity-fallback"})
                got = await self._attempt(target, eid, meter, full=True, note=note)
            if isinstance(got, _Same):
                record = await self._finish(eid, ExecutionResult(
                    outcome="unchanged", ended=self.clock(), bytes_sent=meter.sent,
                    bytes_received=meter.received, archive_size=got.base.size,
                    archive_seq=got.base.seq, archive_hash=got.base.hash, note=note or got.note,
                    skipped=got.skipped,
                ))
            else:
                record = got
                stored = True
                # The new archive's signature, made now that the answer is out (ingest.sign):
                # before the conversion below, which reads it.  A crash here leaves it
                # unsigned: start-up signs it (``Server.reconcile``).
                crash_point("archive-committed")
                await sign(self.catalog, self.store, target, record.archive_seq,
                           limiter=self.files)
                try:
                    await rotate(self.catalog, self.store, target, self.settings.keep,
                                 limiter=self.files, clock=self.clock)
                except DeltabkpError as exc:
                    # The row is closed as stored (``--wait`` may have answered so already):
                    # retention and conversion failing must not rewrite it; the next
                    # backup's rotation retries them.
                    log.warning("execution %d of %s: stored; retention or conversion failed: %s",
                                eid, target.name, exc, extra={**about, "event": "rotate-failed"})
                await self._make_seek(target)
        except DeltabkpError as exc:
            exc.with_context(node=target.node, path=target.path)
            # The node refusing this path will refuse it again: wait for the next period.
            # Anything else (unreachable, broken transfer, bad data) retries when it answers.
            retry = not (isinstance(exc, RequestRefused) and isinstance(exc.code, ErrorCode)
                         and exc.code.permanent)
            # What an operator greps for: the agent is down, or holds another cluster's key.
            if isinstance(exc, AuthError):
                failure = "auth-failed"
            elif isinstance(exc, PeerUnavailable):
                failure = "agent-unreachable"
            record = await self._finish(eid, ExecutionResult(
                outcome="failed", ended=self.clock(), bytes_sent=meter.sent,
                bytes_received=meter.received, error=str(exc), note=note,
            ))
        except trio.Cancelled:
            if not stored:  # cancelled in the rotation: the row stays closed as stored
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    await self._finish(eid, ExecutionResult(
                        outcome="failed", ended=self.clock(), bytes_sent=meter.sent,
                        bytes_received=meter.received,
                        error=f"{target.name}: cancelled (server shutting down)",
                    ))
            self.live.pop(eid, None)
            raise
        self.live.pop(eid, None)
        _log_record(record, failure)
        self.metrics.executed(record)
        return Ran(record, retry)

    async def _make_seek(self, target: Target) -> None:
        """The seek points of the target's newest archive (the next backup's base), so the
        next layout delta inflates it only around what changed: after the commit (``--wait``
        has its answer), still under the lease; never fails the execution."""
        tid = target.id
        # An agent that sends no layout delta (an older one, or its archive cache off) would
        # never use them: making them costs a full inflate per backup for nothing.
        if self.seeks is None or not self._layout_peers.get(tid, False):
            return
        try:
            newest = await self.catalog.call(lambda c: c.newest_retained(tid))
        except DeltabkpError as exc:
            log.debug("execution of %s: no seek points: %s", target.name, exc)
            return
        if newest is not None:
            await trio.to_thread.run_sync(self.seeks.make, self.store, tid, newest.seq,
                                          newest.size, newest.hash, limiter=self.files)

    async def _finish(self, eid: int, result: ExecutionResult) -> ExecutionRecord:
        return self._closed(await self.catalog.call(lambda c: c.finish_execution(eid, result)))

    async def _attempt(
        self, target: Target, eid: int, meter: _Meter, *, full: bool, note: str | None
    ) -> ExecutionRecord | _Same:
        """Pull (protocol) → ingest (patch, verify, commit) over one connection."""
        tid = target.id
        ph = Phases()  # where this attempt's time went: one log line at its end
        quiet = False  # an unchanged check: its timeline is logged at DEBUG
        base = None if full else await self.catalog.call(lambda c: c.newest_retained(tid))
        try:
            chan = await net.connect(
                net.Address.parse(target.node), key=self.key, role="server",
                timeout=self.settings.connect_timeout,
            )
        except PeerUnavailable:
            self.metrics.contact(target.node, False)
            raise
        self.metrics.contact(target.node, True)
        # Silence is bounded by --idle-timeout both ways: an agent that stops reading (its
        # acknowledgements lost on a partition) is as gone as one that stops writing.
        chan.send_timeout = self.settings.idle_timeout
        # Seek points are kept only for an agent that sends layout deltas (``_make_seek``).
        self._layout_peers[tid] = offers_layout(chan)
        ph.lap("connect")  # the base's row, TCP, TLS and the hello
        meter.current = chan
        ingest = Ingest(
            catalog=self.catalog, store=self.store, target=target, base=base,
            limiter=self.files, max_size=self.settings.max_archive_size, phases=ph,
            seeks=self.seeks,
        )
        # Counted as they move: a scrape during a long backup sees the bytes grow.
        counted = self.metrics.wire.add(lambda: (chan.bytes_sent, chan.bytes_received))
        try:
            pulled = await pull(
                chan, target.path, base.hash if base else None, idle=self.settings.idle_timeout,
                read_signature=ingest.read_signature, sink=ingest, bwlimit=target.bwlimit,
                phases=ph,
            )
            if isinstance(pulled, Unchanged):
                assert base is not None  # the conversation refuses "unchanged" without a base
                quiet = True
                return _Same(base, f"unchanged ({pulled.reason})")
            verified = await ingest.finish(pulled.done)
            if verified is None:
                assert base is not None
                quiet = True
                return _Same(base, "unchanged (hash)", pulled.done.skipped)
            done = verified

            def result(seq: int) -> ExecutionResult:
                return ExecutionResult(
                    outcome="stored", ended=self.clock(), bytes_sent=meter.sent,
                    bytes_received=meter.received, archive_size=done.archive_size,
                    archive_seq=seq, archive_hash=done.archive_hash, files=done.files,
                    changed=done.changed, skipped=done.skipped, note=note,
                )

            # Closed with the archive's commit: retention and the reverse-delta conversion
            # that follow are no part of the answer "stored" (a crash in them is reconciled).
            return self._closed(await ingest.commit(eid, result))
        except BaseException:
            # Tell the agent to stop building (best effort) before hanging up.
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                with contextlib.suppress(DeltabkpError):
                    await chan.send(protocol.Cancel())
            raise
        finally:
            self.metrics.wire.done(counted)
            # The minute-by-minute unchanged checks fold into one log row: their timelines
            # only at DEBUG.
            log.log(logging.DEBUG if quiet else logging.INFO,
                    "execution %d of %s: phases %s", eid, target.name, ph.render(),
                    extra={**net.log_context(node=target.node, path=target.path, execution=eid),
                           "event": "execution-phases"})
            await ingest.aclose()
            meter.close(chan)
            await chan.aclose()


def _log_record(r: ExecutionRecord, failure: str = "execution-failed") -> None:
    """One line per finished execution: INFO, or WARNING when it failed (``failure`` is the
    JSON ``event``: ``execution-failed``, ``agent-unreachable`` or ``auth-failed``)."""
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
    about = net.log_context(node=r.node, path=r.path, execution=r.id)
    if r.outcome == "failed":
        log.warning("%s", what, extra={**about, "event": failure})
    else:
        log.info("%s", what, extra={**about, "event": "execution-ended"})
