"""The scheduler: which due targets this server runs, claimed from the shared catalog with leases.

Job: run every active target every ``every_s`` seconds, on whichever server claims it first.
After a failure the target is *retrying*: the server that claims it probes the node with
``Ping`` under capped exponential backoff plus jitter (never longer than the target's own
period) and runs the backup as soon as the node answers; ``backup-now`` and an agent's
``announce`` (to any server) queue a run in the catalog, which the next claim picks first.
Invariants:
- a request is numbered in the catalog (``request_seq``) and the claim reads that number
  under its lock: the run it starts answers the requests made before the claim and never a
  later one (a request during a run queues the next run; ``backup-now --wait`` waits for it);
- the catalog is the queue: a target runs only under a lease this server holds
  (``Catalog.claim_due``; ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, one writer on SQLite), so
  no target ever runs on two servers at once; leases are renewed while the execution runs, and
  an execution whose lease could not be renewed before it expired is cancelled rather than
  overlap with the server that may take it over; a server killed with -9 loses its leases
  within ``lease_ttl``;
- at most ``max_concurrent`` executions here (claims never exceed the free slots) and
  ``max_per_node`` per node (limiters taken global-then-node, so they cannot deadlock);
- schedule state (state, next due, last outcome/error) is written back with the release of
  the lease, so any server resumes where another stopped;
- the loop sleeps until ``poll`` seconds pass or ``wake()`` (register, backup-now, announce,
  an execution ending); every task lives in the scheduler's nursery, so cancelling it cancels
  probes and executions, which log themselves as failed.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

import attrs
import trio

from deltabkp.errors import AuthError, DeltabkpError
from deltabkp.net import Address, RateLimitedLog, log_context
from deltabkp_server.agents import ping
from deltabkp_server.catalog import AsyncCatalog, lease_running_out
from deltabkp_server.execution import Executor
from deltabkp_server.model import ExecutionRecord, Target

__all__ = ["Scheduler", "backoff_delay", "next_schedule", "LEASE_TTL_S"]

log = logging.getLogger("deltabkp_server")

RETRY_BASE_S = 1.0
RETRY_CAP_S = 60.0
PROBE_TIMEOUT_S = 5.0
#: A lease not renewed for this long is free for another server (kill -9 → takeover).
LEASE_TTL_S = 30.0
#: How often an idle scheduler looks at the catalog for due work (other servers' registers).
POLL_S = 1.0
#: How often the bytes of running executions are written to their catalog rows (one
#: transaction for all of them: the write rate does not grow with the executions running).
PROGRESS_S = 1.0


def backoff_delay(attempt: int, every_s: float, rng: random.Random) -> float:
    """Delay before retry probe ``attempt`` (1-based): 1 s, 2 s, 4 s … capped at 60 s and at
    the target's period, times a jitter in [0.5, 1] so that many targets of one dead node do
    not probe in lock-step."""
    raw = min(RETRY_CAP_S, RETRY_BASE_S * 2 ** min(attempt - 1, 30), float(every_s))
    return float(raw * (0.5 + 0.5 * rng.random()))


@attrs.frozen
class Schedule:
    """What a target's row says after an execution or a probe."""

    state: str
    next_due: float
    last_outcome: str | None
    last_error: str | None


def next_schedule(
    target: Target, record: ExecutionRecord, retry: bool, attempt: int, now: float,
    rng: random.Random,
) -> Schedule:
    """The schedule after ``record`` (``attempt``: failures in a row, for the backoff)."""
    every = target.every_s
    if record.outcome in ("stored", "unchanged") or not retry:
        due = target.next_due
        if target.state == "retrying" or record.trigger == "schedule":
            # Keep the cadence; if we fell behind, start a fresh period from now.
            due = due + every if due + every > now else now + every
        # A manual or announced run leaves the cadence alone.
        error = record.error if record.outcome == "failed" else None
        return Schedule("ok", due, record.outcome, error)
    return Schedule(
        "retrying", now + backoff_delay(attempt, every, rng), record.outcome, record.error
    )


@attrs.define
class _Held:
    """A target this server holds a lease on."""

    target: Target
    until: float
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)


class Scheduler:
    def __init__(
        self,
        *,
        executor: Executor,
        catalog: AsyncCatalog,
        key: bytes,
        server_id: str,
        max_concurrent: int = 8,
        max_per_node: int = 2,
        lease_ttl: float = LEASE_TTL_S,
        poll: float = POLL_S,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.executor = executor
        self.catalog = catalog
        self.key = key
        self.server_id = server_id
        self.max_concurrent = max_concurrent
        self.lease_ttl = lease_ttl
        self.poll = poll
        self.clock = clock
        self.rng = rng or random.Random()
        #: A node that stays down is one warning per node a minute, not one per probe.
        self._unreachable = RateLimitedLog(log)
        self.global_limiter = trio.CapacityLimiter(max_concurrent)
        self.max_per_node = max_per_node
        self._node_limiters: dict[str, trio.CapacityLimiter] = {}
        self._held: dict[int, _Held] = {}
        #: Failed attempts in a row per target (for the backoff), as seen by this server.
        self._attempts: dict[int, int] = {}
        self._wake = trio.Event()

    # -- API for the control plane -----------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    @property
    def running(self) -> int:
        return len(self._held)

    async def request_now(self, target_id: int, trigger: str = "manual") -> int:
        """Queue a run of the target now; return the request's number (``answer_to``)."""
        seq = await self.catalog.call(lambda c: c.request_now(target_id, trigger))
        self.wake()
        return seq

    async def announce(self, host: str, port: int, peer_host: str) -> list[Target]:
        """An agent came up: its node's pending retries run now, on whichever server."""
        # A wildcard listener is reached at the address the announcement came from.
        if host in ("", "0.0.0.0", "::"):
            host = peer_host
        names = {str(Address(host.lower(), port))}
        self.executor.metrics.announcements.inc()
        for name in names:
            self.executor.metrics.contact(name, True)
        hit = await self.catalog.call(lambda c: c.announce(names))
        if hit:
            self.wake()
        return hit

    # -- the loop ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keep_leases)
            nursery.start_soon(self._report_progress)
            task_status.started()
            while True:
                # A fresh event before looking: a wake() meanwhile is not lost.
                self._wake = trio.Event()
                try:
                    await self._claim(nursery)
                except DeltabkpError as exc:  # the catalog is down: keep trying, stay alive
                    log.error("scheduler: cannot claim due targets: %s", exc)
                with trio.move_on_after(self.poll):
                    await self._wake.wait()

    async def _claim(self, nursery: trio.Nursery) -> None:
        free = self.max_concurrent - len(self._held)
        if free <= 0:
            return
        now = self.clock()
        sid, until = self.server_id, now + self.lease_ttl
        claimed = await self.catalog.call(lambda c: c.claim_due(sid, now, until, free))
        for target, trigger in claimed:
            held = self._held[target.id] = _Held(target, until)
            nursery.start_soon(self._run_claimed, held, trigger)

    async def _keep_leases(self) -> None:
        """Renew our leases well before they expire; cancel what we could not keep."""
        while True:
            await trio.sleep(self.lease_ttl / 3)
            now = self.clock()
            ids, sid, until = list(self._held), self.server_id, now + self.lease_ttl
            try:
                kept = await self.catalog.call(lambda c: c.renew(sid, ids, until))
            except DeltabkpError as exc:
                log.error("scheduler: cannot renew leases: %s", exc)
                kept = set()
            else:
                for tid in kept:
                    if tid in self._held:
                        self._held[tid].until = until
            for tid, held in list(self._held.items()):
                # Past its lease another server may start the same target: stop first.
                if tid not in kept and lease_running_out(held.until, self.lease_ttl, self.clock()):
                    log.error("%s: lease lost; stopping this server's execution", held.target.name,
                              extra=log_context(node=held.target.node, path=held.target.path,
                                                event="lease-lost"))
                    held.scope.cancel()

    async def _report_progress(self) -> None:
        """Write the bytes of this server's running executions to their open catalog rows,
        so every server sharing the catalog can show them; best effort (a failed write is
        retried at the next tick, and the row gets its final count when it closes)."""
        while True:
            await trio.sleep(PROGRESS_S)
            rows = [(eid, r.meter.sent, r.meter.received)
                    for eid, r in self.executor.live.items()]
            if not rows:
                continue
            try:
                await self.catalog.call(lambda c: c.record_progress(rows))
            except DeltabkpError as exc:
                log.debug("scheduler: cannot record progress: %s", exc)

    def _limiter(self, node: str) -> trio.CapacityLimiter:
        lim = self._node_limiters.get(node)
        if lim is None:
            lim = self._node_limiters[node] = trio.CapacityLimiter(self.max_per_node)
        return lim

    async def _run_claimed(self, held: _Held, trigger: str) -> None:
        target = held.target
        try:
            with held.scope:
                if trigger == "retry" and not await self._probe(target):
                    return
                async with self.global_limiter, self._limiter(target.node):
                    ran = await self.executor.run(target, trigger, due=target.next_due)
                failed = ran.record.outcome == "failed"
                attempt = self._attempts.pop(target.id, 0) + 1 if failed else 0
                sched = next_schedule(target, ran.record, ran.retry, max(attempt, 1),
                                      self.clock(), self.rng)
                if sched.state == "retrying":
                    self._attempts[target.id] = attempt
                if sched.state == "retrying":
                    log.info("%s: retrying; next probe in %.1f s", target.name,
                             sched.next_due - self.clock(),
                             extra=log_context(node=target.node, path=target.path,
                                               execution=ran.record.id, event="retrying"))
                await self._release(target, sched)
        except DeltabkpError as exc:
            # The catalog itself failed: the lease runs out and the target is claimed again.
            log.error("%s: execution could not be recorded: %s", target.name, exc)
        finally:
            self._held.pop(target.id, None)
            self.wake()

    async def _probe(self, target: Target) -> bool:
        """A retrying target: run it now if its node answers, else back off again."""
        pinged = await ping(target.node, self.key, timeout=PROBE_TIMEOUT_S)
        self.executor.metrics.contact(target.node, pinged.answered)
        about = log_context(node=target.node, path=target.path)
        if pinged.answered:
            log.info("%s answers again: retrying %s now", target.node, target.path,
                     extra={**about, "event": "agent-back"})
            return True
        attempt = self._attempts[target.id] = self._attempts.get(target.id, 1) + 1
        due = self.clock() + backoff_delay(attempt, target.every_s, self.rng)
        if isinstance(pinged.error, AuthError):  # it answers, with another cluster's key
            self._unreachable(
                f"{target.node} auth", "agent %s: authentication failed (%s); %s retries when "
                "it holds this cluster's key", target.node, pinged.error.reason, target.path,
                extra={**about, "event": "auth-failed"},
            )
        else:
            self._unreachable(
                target.node, "agent %s still unreachable (%s); %s retries when it answers "
                "(%d failed attempts so far)", target.node,
                pinged.error.reason if pinged.error is not None else "no answer", target.path,
                attempt - 1, extra={**about, "event": "agent-unreachable"},
            )
        await self._release(target, Schedule("retrying", due, target.last_outcome,
                                             target.last_error))
        return False

    async def _release(self, target: Target, s: Schedule) -> None:
        sid, tid = self.server_id, target.id
        await self.catalog.call(lambda c: c.release(
            sid, tid, state=s.state, next_due=s.next_due, last_outcome=s.last_outcome,
            last_error=s.last_error,
        ))

