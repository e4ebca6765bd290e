"""The scheduler: when each target's next execution runs, and how many run at once.

Job: run every active target every ``every_s`` seconds; after a failure put it in
*retrying*: probe its node with ``Ping`` under capped exponential backoff plus jitter (never
longer than the target's own period) and run the backup as soon as the node answers; an
``Announce`` from the node, or ``backup-now``, runs it at once.
Invariants:
- at most one execution per target at a time; at most ``max_concurrent`` overall and
  ``max_per_node`` per node (``trio.CapacityLimiter``s, always taken global-then-node so
  they cannot deadlock);
- the loop sleeps until the earliest due time or until ``wake()`` (register, unregister,
  backup-now, announce, an execution ending) — no polling;
- schedule state (state, next due, last outcome/error) is written to the catalog after each
  execution or probe, so a restart resumes where it stopped;
- every task lives in the scheduler's nursery (structured concurrency): cancelling the
  scheduler cancels probes and executions, which log themselves as failed.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable

import attrs
import trio

from deltabkp.errors import DeltabkpError, ErrorCode, RequestRefused
from deltabkp.net import Address
from deltabkp_server.agents import ping
from deltabkp_server.catalog import AsyncCatalog
from deltabkp_server.execution import Executor
from deltabkp_server.model import ExecutionRecord, Target

__all__ = ["Scheduler", "Waiter", "backoff_delay"]

log = logging.getLogger("deltabkp_server")

RETRY_BASE_S = 1.0
RETRY_CAP_S = 60.0
PROBE_TIMEOUT_S = 5.0


def backoff_delay(attempt: int, every_s: float, rng: random.Random) -> float:
    """Delay before retry probe ``attempt`` (1-based): 1 s, 2 s, 4 s … capped at 60 s and at
    the target's period, times a jitter in [0.5, 1] so that many targets of one dead node do
    not probe in lock-step."""
    raw = min(RETRY_CAP_S, RETRY_BASE_S * 2 ** min(attempt - 1, 30), float(every_s))
    return float(raw * (0.5 + 0.5 * rng.random()))


class Waiter:
    """Filled with the record of the first execution of a target that starts after it."""

    def __init__(self) -> None:
        self._event = trio.Event()
        self.record: ExecutionRecord | None = None
        self.error: DeltabkpError | None = None

    def set(self, record: ExecutionRecord | None, error: DeltabkpError | None = None) -> None:
        self.record, self.error = record, error
        self._event.set()

    async def wait(self) -> ExecutionRecord:
        await self._event.wait()
        if self.error is not None:
            raise self.error
        assert self.record is not None
        return self.record


@attrs.define
class _Slot:
    """In-memory schedule of one target (mirrored to the catalog)."""

    target: Target
    next_due: float
    state: str = "ok"
    attempt: int = 0
    running: bool = False
    probing: bool = False
    queued: str | None = None  # trigger of a run requested for now ("manual", "announce", "retry")
    waiters: list[Waiter] = attrs.Factory(list)


class Scheduler:
    def __init__(
        self,
        *,
        executor: Executor,
        catalog: AsyncCatalog,
        key: bytes,
        max_concurrent: int = 8,
        max_per_node: int = 2,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.executor = executor
        self.catalog = catalog
        self.key = key
        self.clock = clock
        self.rng = rng or random.Random()
        self.global_limiter = trio.CapacityLimiter(max_concurrent)
        self.max_per_node = max_per_node
        self._node_limiters: dict[str, trio.CapacityLimiter] = {}
        self._slots: dict[int, _Slot] = {}
        # Targets with an execution in flight, also across unregister + register again (the
        # new slot must not start a second execution of the same target meanwhile).
        self._busy: set[int] = set()
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None

    # -- API for the control plane -----------------------------------------------------------

    def add(self, target: Target) -> None:
        """Schedule a (newly registered or loaded) target from its catalog state."""
        slot = _Slot(target=target, next_due=target.next_due, state=target.state)
        if target.state == "retrying":
            slot.attempt = 1
        self._slots[target.id] = slot
        self.wake()

    def remove(self, target_id: int) -> None:
        """Stop scheduling (a running execution finishes, nothing new starts)."""
        slot = self._slots.pop(target_id, None)
        if slot is not None:
            for w in slot.waiters:
                w.set(None, RequestRefused(
                    ErrorCode.NOT_FOUND, "was unregistered before it ran",
                    node=slot.target.node, path=slot.target.path,
                ))
            slot.waiters.clear()
        self.wake()

    def request_now(self, target_id: int) -> Waiter:
        slot = self._slots.get(target_id)
        if slot is None:
            raise RequestRefused(ErrorCode.NOT_FOUND, f"target {target_id} is not scheduled")
        waiter = Waiter()
        slot.waiters.append(waiter)
        slot.queued = "manual"
        self.wake()
        return waiter

    def announce(self, host: str, port: int, peer_host: str) -> list[Target]:
        """An agent came up: run the pending retries of its node now; returns those targets."""
        # A wildcard listener is reached at the address the announcement came from.
        if host in ("", "0.0.0.0", "::"):
            host = peer_host
        names = {str(Address(host.lower(), port))}
        hit = []
        for slot in self._slots.values():
            if slot.target.node in names and slot.state == "retrying":
                slot.queued = slot.queued or "announce"
                hit.append(slot.target)
        if hit:
            self.wake()
        return hit

    def is_running(self, target_id: int) -> bool:
        return target_id in self._busy

    @property
    def running(self) -> int:
        return len(self._busy)

    def wake(self) -> None:
        self._wake.set()

    # -- the loop ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                # A fresh event before scanning: a wake() during the scan is not lost.
                self._wake = trio.Event()
                wake_at = self._launch_due(nursery)
                delay = wake_at - self.clock()
                if delay > 0:
                    with trio.move_on_after(delay if math.isfinite(delay) else math.inf):
                        await self._wake.wait()

    def _launch_due(self, nursery: trio.Nursery) -> float:
        now = self.clock()
        wake_at = math.inf
        for slot in list(self._slots.values()):
            if slot.running or slot.probing or slot.target.id in self._busy:
                continue
            if slot.queued is not None:
                trigger, slot.queued = slot.queued, None
                slot.running = True
                nursery.start_soon(self._execute, slot, trigger)
            elif slot.next_due <= now:
                if slot.state == "retrying":
                    slot.probing = True
                    nursery.start_soon(self._probe, slot)
                else:
                    slot.running = True
                    nursery.start_soon(self._execute, slot, "schedule")
            else:
                wake_at = min(wake_at, slot.next_due)
        return wake_at

    def _limiter(self, node: str) -> trio.CapacityLimiter:
        lim = self._node_limiters.get(node)
        if lim is None:
            lim = self._node_limiters[node] = trio.CapacityLimiter(self.max_per_node)
        return lim

    async def _execute(self, slot: _Slot, trigger: str) -> None:
        waiters, slot.waiters = slot.waiters, []
        target = slot.target
        self._busy.add(target.id)
        try:
            async with self.global_limiter, self._limiter(target.node):
                ran = await self.executor.run(target, trigger)
            record = ran.record
            await self._after(slot, record, ran.retry)
            for w in waiters:
                w.set(record)
        except DeltabkpError as exc:
            # The catalog itself failed: report to waiters, keep the daemon alive, retry later.
            log.error("%s %s: execution could not be recorded: %s", target.node, target.path, exc)
            for w in waiters:
                w.set(None, exc)
            slot.state = "retrying"
            slot.attempt += 1
            slot.next_due = self.clock() + backoff_delay(slot.attempt, target.every_s, self.rng)
        finally:
            slot.running = False
            self._busy.discard(target.id)
            self.wake()

    async def _after(self, slot: _Slot, record: ExecutionRecord, retry: bool) -> None:
        now = self.clock()
        every = slot.target.every_s
        error = record.error
        if record.outcome in ("stored", "unchanged") or not retry:
            if slot.state == "retrying" or record.trigger == "schedule":
                # Keep the cadence; if we fell behind, start a fresh period from now.
                nxt = slot.next_due + every
                slot.next_due = nxt if nxt > now else now + every
            slot.state, slot.attempt = "ok", 0
            if record.outcome != "failed":
                error = None
        else:
            slot.state = "retrying"
            slot.attempt += 1
            slot.next_due = now + backoff_delay(slot.attempt, every, self.rng)
            log.info(
                "%s %s: retrying; next probe in %.1f s",
                slot.target.node, slot.target.path, slot.next_due - now,
            )
        if slot.target.id not in self._slots:
            return  # unregistered meanwhile: the catalog row is inactive, leave it be
        tid, state, due, outcome = slot.target.id, slot.state, slot.next_due, record.outcome
        await self.catalog.call(lambda c: c.set_schedule(
            tid, state=state, next_due=due, last_outcome=outcome, last_error=error
        ))

    async def _probe(self, slot: _Slot) -> None:
        target = slot.target
        try:
            pinged = await ping(target.node, self.key, timeout=PROBE_TIMEOUT_S)
            if pinged.answered:
                # The node is back: back it up at once instead of waiting for the period.
                log.info("%s answers again: retrying %s now", target.node, target.path)
                slot.queued = slot.queued or "retry"
            else:
                slot.attempt += 1
                slot.next_due = self.clock() + backoff_delay(slot.attempt, target.every_s, self.rng)
                if target.id in self._slots:
                    tid, due = target.id, slot.next_due
                    await self.catalog.call(
                        lambda c: c.set_schedule(tid, state="retrying", next_due=due)
                    )
        finally:
            slot.probing = False
            self.wake()
