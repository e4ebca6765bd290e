"""Verification of stored versions: ``ctl verify`` on demand and the server's periodic scrub.

Job: check every retained version of a target (``versions.verify_target``: rebuilt or
re-read, blake3 against the catalog), record the verdicts on the archive rows, and log the
verification as an execution of the target (trigger ``verify``; outcome ``unchanged`` when
every version is sound, ``failed`` with an error naming the corrupt versions otherwise).
Invariants:
- a verification holds the target's lease (``AsyncCatalog.leased``, renewed while it runs),
  so it never runs beside a backup of the same target, on this server or another; a target
  whose lease is taken is waited for (``ctl verify``) or left for the next round (scrub);
- the scrub checks one target at a time, within a bytes/s budget, the targets whose versions
  were checked longest ago (``Catalog.scrub_due``); several servers sharing a catalog share
  the work (a verified target is no longer due anywhere);
- the scrub's own failures (catalog or store down) are logged and retried later (a target
  whose verification could not run waits up to an hour); they never take the server down
  and never mark a version corrupt;
- a whole version whose signature a crash left unmade (or that is damaged) is signed on the
  way (``store.signature``): derived data, never a verdict of corrupt.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import attrs
import trio

from deltabkp.errors import CatalogError, DeltabkpError
from deltabkp_server.catalog import AsyncCatalog
from deltabkp_server.model import ExecutionRecord, ExecutionResult, Target
from deltabkp_server.store import Store
from deltabkp_server.versions import Check, verify_target

__all__ = ["Verifier", "Verified", "run_scrub", "VERIFY_TRIGGER", "VERIFY_WAIT_S"]

log = logging.getLogger("deltabkp_server")

#: The execution log's trigger for a verification.
VERIFY_TRIGGER = "verify"
#: How long ``ctl verify`` waits for a running backup of the target to end.
VERIFY_WAIT_S = 600.0
#: How often the scrub looks for due targets (at most; less with a shorter period).
_SCRUB_POLL_S = 60.0
#: Longest pause before a target whose verification could not run is tried again.
_SCRUB_BACKOFF_S = 3600.0


@attrs.frozen
class Verified:
    """One target's verification: its logged execution and each version's verdict."""

    target: Target
    record: ExecutionRecord
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_wire(self) -> dict[str, Any]:
        return {
            "node": self.target.node, "path": self.target.path, "ok": self.ok,
            "execution": self.record.id, "error": self.record.error,
            "versions": [c.to_wire() for c in self.checks],
        }


@attrs.define(kw_only=True)
class Verifier:
    """Verifies targets under their lease and logs each verification."""

    catalog: AsyncCatalog
    store: Store
    server_id: str
    lease_ttl: float
    limiter: trio.CapacityLimiter
    clock: Callable[[], float] = time.time

    async def verify(
        self, target: Target, *, wait: float = 0.0, rate: float | None = None,
    ) -> Verified | None:
        """Verify ``target``; None if its lease stayed taken for ``wait`` seconds."""
        done: Verified | None = None
        async with self.catalog.leased(
            self.server_id, target.id, ttl=self.lease_ttl, clock=self.clock, wait=wait,
            what="verification",
        ) as held:
            if not held:
                return None
            done = await self._run(target, rate)
        if done is None:  # the lease was lost midway (the log row says so)
            raise CatalogError(f"{target.name}: the verification lost the target's lease")
        return done

    async def _run(self, target: Target, rate: float | None) -> Verified:
        tid = target.id
        started = self.clock()
        eid = await self.catalog.call(
            lambda c: c.start_execution(tid, started, VERIFY_TRIGGER)
        )
        checks: list[Check] = []
        try:
            checks = await verify_target(
                self.catalog, self.store, target, limiter=self.limiter, clock=self.clock,
                rate=rate,
            )
        except DeltabkpError as exc:
            exc.with_context(node=target.node, path=target.path)
            result = ExecutionResult(outcome="failed", ended=self.clock(),
                                     error=f"verification could not run: {exc}")
        except trio.Cancelled:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await self.catalog.call(lambda c: c.finish_execution(eid, ExecutionResult(
                    outcome="failed", ended=self.clock(),
                    error=f"{target.name}: verification cancelled (server shutting down, "
                    "or its lease was lost)",
                )))
            raise
        else:
            bad = [c for c in checks if not c.ok]
            total = sum(c.size for c in checks)
            note = f"verified {len(checks)} version(s), {total} bytes rebuilt or re-read"
            if bad:
                seqs = ", ".join(str(c.seq) for c in bad)
                result = ExecutionResult(
                    outcome="failed", ended=self.clock(), note=note,
                    error=(f"{target.name}: corrupt version(s) {seqs}: "
                           + "; ".join(c.reason or "" for c in bad)),
                )
                log.error("%s: verification found corrupt version(s) %s", target.name, seqs)
            else:
                result = ExecutionResult(outcome="unchanged", ended=self.clock(), note=note)
                log.info("%s: %s, all sound", target.name, note)
        record = await self.catalog.call(lambda c: c.finish_execution(eid, result))
        return Verified(target, record, tuple(checks))


async def run_scrub(
    verifier: Verifier, *, every: float, rate: float,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Verify, one target at a time within ``rate`` bytes/s, every target whose versions
    were last checked more than ``every`` seconds ago; runs until cancelled."""
    task_status.started()
    poll = min(_SCRUB_POLL_S, max(1.0, every / 4))
    # A verification that could not run (store unreachable) leaves its target due: wait
    # before the next try, so that an outage does not add a log row every poll.
    backoff = min(every, _SCRUB_BACKOFF_S)
    not_before: dict[int, float] = {}
    cat = verifier.catalog
    while True:
        try:
            now = verifier.clock()
            cutoff = now - every
            for tid in await cat.call(lambda c: c.scrub_due(cutoff)):
                if not_before.get(tid, 0.0) > now:
                    continue
                target = await cat.call(lambda c: c.get_target(tid))  # noqa: B023 - awaited at once
                # A target busy with a backup stays due: the next round takes it.
                done = await verifier.verify(target, rate=rate if math.isfinite(rate) else None)
                if done is not None and not done.checks and done.record.outcome == "failed":
                    not_before[tid] = verifier.clock() + backoff
        except DeltabkpError as exc:
            log.error("scrub: %s (retried in %g s)", exc, poll)
        await trio.sleep(poll)
