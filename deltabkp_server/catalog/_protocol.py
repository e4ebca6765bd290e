"""What the server needs from a catalog backend, and the bridge that runs it off the event loop.

Job: the ``Catalog`` protocol every backend implements (SQLite, PostgreSQL) and
``AsyncCatalog``, which calls a backend from Trio in worker threads.
Invariants:
- every ``Catalog`` method is blocking, is safe to call from several threads at once, and
  raises ``CatalogError`` for any failure of the database (never a driver's own exception);
  ``RequestRefused`` only where a method says so;
- leases: a target runs only on the server named by its ``lease_owner`` while ``lease_until``
  has not passed; ``claim_due`` (executions) and ``lease_target`` (upkeep) are the only ways
  to take a lease, ``renew``/``release`` act only for the server that holds it, so two servers never hold one target at once;
- ``AsyncCatalog`` never runs more threads than the backend's ``max_threads``;
  ``AsyncCatalog.leased`` is the one way upkeep (verification, start-up signing) holds a
  target's lease: taken with ``lease_target``, renewed, its body stopped if it is lost;
- an upkeep lease is held under an owner of its own (``upkeep_owner``: the server's id,
  ``#``, the work and a random tag), never the server's id itself: renewals match the owner
  exactly, so after a stalled catalog let the lease run out and the same server's scheduler
  claimed the target, the upkeep's renewal fails (and the scheduler's would for the upkeep's)
  instead of both running.  ``lease_server`` names the server behind any owner.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from typing import Any, Protocol, TypeVar

import trio

from deltabkp.errors import CatalogError
from deltabkp_server.model import (
    ArchiveRecord,
    ExecutionRecord,
    ExecutionResult,
    ServerRecord,
    Target,
)

__all__ = ["Catalog", "AsyncCatalog", "UNSET", "lease_server", "upkeep_owner"]

T = TypeVar("T")

log = logging.getLogger("deltabkp_server")

#: How often ``AsyncCatalog.leased`` asks again for a lease it waits for.
_LEASE_POLL_S = 0.5

#: Between a server's id and the rest of an upkeep lease's owner (not in a server id:
#: host/pid/hex).
_UPKEEP_SEP = "#"


def upkeep_owner(server_id: str, what: str) -> str:
    """A fresh ``lease_owner`` for one piece of upkeep by ``server_id`` (see the invariants)."""
    tag = "-".join(what.split()) or "upkeep"
    return f"{upkeep_prefix(server_id)}{tag}-{secrets.token_hex(4)}"


def upkeep_prefix(server_id: str) -> str:
    """What every upkeep lease owner of ``server_id`` starts with (``upkeep_owner``)."""
    return server_id + _UPKEEP_SEP


def lease_server(owner: str) -> str:
    """The server behind a ``lease_owner``: itself for an execution's, the prefix of an
    upkeep lease's (``upkeep_owner``)."""
    return owner.split(_UPKEEP_SEP, 1)[0]


#: "Leave this column as it is" for the optional arguments of ``set_schedule``/``release``.
UNSET: Any = object()


class Catalog(Protocol):
    """A catalog backend (blocking calls; see ``AsyncCatalog``).  Times are POSIX seconds."""

    #: How many threads may call this catalog at once (1 for SQLite: one connection).
    max_threads: int

    def close(self) -> None: ...

    # -- targets -----------------------------------------------------------------------------
    def register(
        self, node: str, path: str, every_s: int, now: float, *, bwlimit: int | None = None
    ) -> Target:
        """New target due at ``now``, or reactivate an unregistered one (same id, history
        continues), with its bandwidth cap (bytes/s, None: none).  ``RequestRefused(EXISTS)``
        if it is active."""
        ...

    def unregister(self, node: str, path: str) -> Target:
        """Deactivate (the row and its history stay).  ``RequestRefused(NOT_FOUND)`` if none."""
        ...

    def find_target(self, node: str, path: str, *, active_only: bool = True) -> Target | None: ...
    def get_target(self, target_id: int) -> Target:
        """The target, active or not; ``CatalogError`` if the id is unknown."""
        ...

    def targets(self, *, active_only: bool = True) -> list[Target]:
        """All targets ordered by node, path."""
        ...

    def set_schedule(
        self, target_id: int, *, state: str, next_due: float,
        last_outcome: str | None = ..., last_error: str | None = ...,
    ) -> None:
        """Write the schedule regardless of leases (one-server use and tests); the omitted
        optional columns keep their values."""
        ...

    # -- leases and the queue ----------------------------------------------------------------
    def claim_due(
        self, server_id: str, now: float, until: float, limit: int
    ) -> list[tuple[Target, str]]:
        """Atomically lease up to ``limit`` runnable targets to ``server_id`` until ``until``.

        Candidates: active, with no live lease (``lease_until`` NULL or < ``now``), and
        runnable now (``queued`` set, or ``next_due <= now``); queued ones first, then by
        ``next_due`` (then id).  Each claimed target gets ``lease_owner=server_id``,
        ``lease_until=until`` and ``queued`` cleared, and is returned as it is after the
        claim, with its trigger: the queued value if there was one, else "retry" if its state
        is "retrying", else "schedule".  Its ``request_seq`` is the newest request made
        before the claim: the run started under it (``start_execution(request_seq=…)``)
        answers that request and every earlier one, never a later one.  Executions of a claimed target still open (a server
        that lost the lease died or stalled) are closed as failed: nobody else can be running
        it.  Concurrent callers never get the same target.
        """
        ...

    def renew(self, server_id: str, target_ids: Sequence[int], until: float) -> set[int]:
        """Set ``lease_until=until`` on those of ``target_ids`` that ``server_id`` still
        holds (even if its lease ran out, so long as nobody claimed the target since); return
        their ids.  An id missing from the answer is no longer ours: stop running it."""
        ...

    def release(
        self, server_id: str, target_id: int, *, state: str, next_due: float,
        last_outcome: str | None = ..., last_error: str | None = ...,
    ) -> bool:
        """Write the schedule (like ``set_schedule``) and drop the lease, only if
        ``server_id`` still holds it; return whether it did.  ``active`` is never touched (a
        target unregistered during its run stays inactive) and neither is ``queued`` (a
        request that came during the run gets a run after it)."""
        ...

    def drop_leases(self, server_id: str) -> int:
        """Drop every lease ``server_id`` holds, its upkeep's (``upkeep_owner``) too,
        schedule untouched (a clean shutdown, or a restart after a crash, hands its targets
        over at once); return how many."""
        ...

    def request_now(self, target_id: int, trigger: str) -> int:
        """Queue ``trigger`` ("manual" | "announce") on the target: the next ``claim_due``
        after its lease (if any) is released takes it first.  "announce" never replaces
        "manual".  Return the request's number (the target's ``request_seq``, one more than
        the previous request's): ``answer_to`` finds the run that answers it.  Requests made
        before one claim are answered by that one run.  ``CatalogError`` for an unknown
        id; ``ValueError`` for another trigger."""
        ...

    def announce(self, nodes: Collection[str]) -> list[Target]:
        """Agents on ``nodes`` (``HOST:PORT`` names) came up: queue "announce" on their
        active targets in state "retrying" (a "manual" already queued stays), whichever
        server will run them; return those targets as they are now."""
        ...

    # -- servers -----------------------------------------------------------------------------
    def heartbeat(self, server_id: str, address: str, now: float, running: int) -> None:
        """Upsert the server's row (``started`` is set by the first heartbeat only)."""
        ...

    def servers(self, now: float, ttl: float) -> list[ServerRecord]:
        """Servers whose last heartbeat is within ``ttl`` of ``now``, by id."""
        ...

    # -- executions --------------------------------------------------------------------------
    def start_execution(
        self, target_id: int, started: float, trigger: str, due: float | None = None, *,
        request_seq: int | None = None,
    ) -> int:
        """Open an execution row (``due``: when the run was due; ``request_seq``: the claimed
        target's, the requests this run answers — None for a run under no claim); return
        its id."""
        ...

    def record_progress(self, progress: Sequence[tuple[int, int, int]]) -> None:
        """(execution id, bytes sent, bytes received so far) of running executions: written
        to their open rows (a finished row is left alone), so any server sharing the catalog
        can show them (``ctl status``, ``backup-now --wait``)."""
        ...

    def running_executions(self, target_id: int | None = None) -> list[ExecutionRecord]:
        """Open executions (of one target) whose target is leased, oldest first, with the
        bytes of their last ``record_progress``."""
        ...

    def finish_execution(self, execution_id: int, result: ExecutionResult) -> ExecutionRecord:
        """Close an open execution; ``CatalogError`` if unknown or already finished."""
        ...

    def commit_archive(
        self, execution_id: int, target_id: int, seq: int, result: ExecutionResult
    ) -> tuple[ArchiveRecord, ExecutionRecord]:
        """The archive row and the finished execution, in one transaction (all or nothing)."""
        ...

    def execution(self, execution_id: int) -> ExecutionRecord: ...
    def executions(
        self, target_id: int | None = None, *, limit: int | None = None
    ) -> list[ExecutionRecord]:
        """Newest first."""
        ...

    def execution_page(
        self, *, limit: int, before_id: int | None = None, target_id: int | None = None,
        since: float | None = None, outcome: str | None = None,
    ) -> list[ExecutionRecord]:
        """Up to ``limit`` log rows with id < ``before_id``, newest first, optionally of one
        target / started at or after ``since`` / with one outcome (a keyset page).  A row
        may stand for several executions (``count``): a finished ``unchanged`` execution
        absorbs the identical ``unchanged`` one right before it (``finish_execution``)."""
        ...

    def answer_to(self, target_id: int, request_seq: int) -> ExecutionRecord | None:
        """The first finished execution of the target that answers request ``request_seq``
        (its ``request_seq`` is at least that: it was claimed after the request), or None
        while there is none (``backup-now --wait``)."""
        ...

    def fail_unfinished(self, now: float, reason: str, *, target_id: int | None = None) -> int:
        """Close open executions (of one target, or all) as failed with ``reason``; return
        how many.  Only safe where no live server may be running them."""
        ...

    # -- archives ----------------------------------------------------------------------------
    def archives(self, target_id: int) -> list[ArchiveRecord]: ...
    def archive_page(
        self, target_id: int, *, limit: int, before_seq: int | None = None
    ) -> list[ArchiveRecord]:
        """Up to ``limit`` archives with seq < ``before_seq``, newest first (a keyset page)."""
        ...

    def newest_skipped(self, target_id: int) -> tuple[tuple[str, ...], ...]:
        """The entries the build of the target's newest archive skipped (() if none)."""
        ...

    def newest_retained(self, target_id: int) -> ArchiveRecord | None: ...
    def next_seq(self, target_id: int) -> int: ...
    def retire(self, target_id: int, keep: int, now: float) -> list[ArchiveRecord]: ...
    def retained_keys(self) -> set[tuple[int, int]]: ...
    def mark_missing(self, target_id: int, seq: int) -> None: ...
    def count_retained(self, target_id: int) -> int: ...

    # -- version storage and verification ----------------------------------------------------
    def delta_keys(self) -> set[tuple[int, int]]:
        """Retained, present versions held as reverse deltas (the rest of ``retained_keys``
        are whole)."""
        ...

    def set_delta(
        self, target_id: int, seq: int, base_seq: int, stored_size: int, now: float
    ) -> bool:
        """Version ``seq`` is now a reverse delta against ``base_seq``; False (no change)
        unless it was retained, whole and not corrupt."""
        ...

    def record_verify(
        self, target_id: int, checks: Sequence[tuple[int, str | None]], now: float
    ) -> None:
        """Per (seq, reason): checked at ``now``, sound (None) or corrupt (why)."""
        ...

    def scrub_due(self, cutoff: float) -> list[int]:
        """Ids of targets with a retained version last checked before ``cutoff``."""
        ...

    def lease_target(self, server_id: str, target_id: int, now: float, until: float) -> bool:
        """Lease one target if no live lease exists; schedule and queue untouched."""
        ...

    def drop_lease(self, server_id: str, target_id: int) -> bool:
        """Drop ``server_id``'s lease on one target (schedule untouched)."""
        ...

    # -- health ------------------------------------------------------------------------------
    def integrity_check(self) -> str:
        """"ok", or what the engine found wrong."""
        ...


class AsyncCatalog:
    """Runs a blocking ``Catalog`` in worker threads behind a capacity limiter.

    Usage: ``await acat.call(lambda c: c.targets())``.  The limiter's size defaults to the
    backend's ``max_threads`` (SQLite: 1, its one connection; PostgreSQL: its pool size).  A
    cancelled Trio task does not stop its thread; the backends bound every call instead.
    """

    def __init__(self, catalog: Catalog, limiter: trio.CapacityLimiter | None = None) -> None:
        self.sync = catalog
        self.limiter = limiter or trio.CapacityLimiter(max(1, catalog.max_threads))

    async def call(self, fn: Callable[[Catalog], T]) -> T:
        return await trio.to_thread.run_sync(fn, self.sync, limiter=self.limiter)

    @contextlib.asynccontextmanager
    async def leased(
        self, server_id: str, target_id: int, *, ttl: float, clock: Callable[[], float],
        wait: float = 0.0, what: str = "work",
    ) -> AsyncIterator[bool]:
        """Hold one target's lease (``lease_target``) around the body — upkeep beside the
        scheduler's executions (a verification, a start-up signing): the body sees False
        (and holds nothing) if the lease stayed taken for ``wait`` seconds.  Renewed every
        ``ttl``/3; once lost (another holder claimed the target, or renewals failed until the
        lease is about to run out: ``lease_running_out``) the body is cancelled, as the
        scheduler stops an execution, and the block ends early (``what`` names the work in the
        log).  Dropped at the end, shielded, unless lost.  The body's error leaves
        as it is (not as the renewing nursery's exception group).  Held under an owner of its
        own (``upkeep_owner``), not ``server_id`` itself."""
        server_id = upkeep_owner(server_id, what)
        until = await self._take_lease(server_id, target_id, ttl, clock, wait)
        if until is None:
            yield False
            return
        failed: list[Exception] = []
        lost: list[bool] = []
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._renew_lease, server_id, target_id, ttl, clock, what,
                                   nursery.cancel_scope, until, lost)
                try:
                    yield True
                except Exception as exc:  # noqa: BLE001 - raised below: itself, not a group
                    failed.append(exc)
                nursery.cancel_scope.cancel()
        finally:
            # Once lost, the lease is someone else's (or nobody's): not ours to drop.
            if not lost:
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    await self.call(lambda c: c.drop_lease(server_id, target_id))
        if failed:
            raise failed[0]

    async def _take_lease(
        self, sid: str, tid: int, ttl: float, clock: Callable[[], float], wait: float
    ) -> float | None:
        """The time the lease runs out, once taken; None if it stayed taken for ``wait`` s."""
        deadline = trio.current_time() + wait
        while True:
            now = clock()
            if await self.call(functools.partial(_lease_target, sid, tid, now, ttl)):
                return now + ttl
            if trio.current_time() >= deadline:
                return None
            await trio.sleep(_LEASE_POLL_S)

    async def _renew_lease(
        self, sid: str, tid: int, ttl: float, clock: Callable[[], float], what: str,
        scope: trio.CancelScope, held_until: float, lost: list[bool],
    ) -> None:
        while True:
            await trio.sleep(ttl / 3)
            until = clock() + ttl
            try:
                held = await self.call(functools.partial(_renew, sid, tid, until))
            except CatalogError as exc:
                log.warning("%s: renewing the lease of target %d: %s", what, tid, exc)
                if not lease_running_out(held_until, ttl, clock()):
                    continue
                held = set()
            if tid not in held:
                log.error("%s of target %d: lease lost, stopped", what, tid)
                lost.append(True)
                scope.cancel()
                return
            held_until = until


def lease_running_out(until: float, ttl: float, now: float) -> bool:
    """A lease held ``until`` is as good as lost at ``now``: past it another server may claim
    the target, so whoever holds it stops first — one renewal period (``ttl``/3) early."""
    return until - ttl / 3 <= now


def _lease_target(sid: str, tid: int, now: float, ttl: float, c: Catalog) -> bool:
    return c.lease_target(sid, tid, now, now + ttl)


def _renew(sid: str, tid: int, until: float, c: Catalog) -> set[int]:
    return c.renew(sid, [tid], until)
