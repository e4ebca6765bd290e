"""Retention: after a new archive commits, keep the newest ``keep`` of its target, and store
the older ones that stay as reverse deltas.

Invariants: the catalog rows flip first (``retained`` false, ``deleted_at`` set; the rows and
the execution log stay for ever), then the files go; a file whose deletion fails is an
orphan that start-up reconciliation removes.  Retiring comes before converting, so a version
about to be dropped is never converted; with successor chaining the retired versions are the
oldest, which no retained version uses as a base (``versions``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import trio

from deltabkp.errors import DeltabkpError
from deltabkp_server.catalog import AsyncCatalog
from deltabkp_server.model import ArchiveRecord, Target
from deltabkp_server.store import Store
from deltabkp_server.versions import settle

__all__ = ["rotate"]

log = logging.getLogger("deltabkp_server")


async def rotate(
    catalog: AsyncCatalog,
    store: Store,
    target: Target,
    keep: int,
    *,
    limiter: trio.CapacityLimiter,
    clock: Callable[[], float] = time.time,
) -> list[ArchiveRecord]:
    """Retire all but the newest ``keep`` archives of ``target``, then turn the whole ones
    left behind the newest into reverse deltas; returns those retired."""
    now = clock()
    retired = await catalog.call(lambda c: c.retire(target.id, keep, now))
    for a in retired:
        try:
            await trio.to_thread.run_sync(store.delete, target.id, a.seq, limiter=limiter)
        except DeltabkpError as exc:
            log.warning("%s: rotating out archive %d: %s", target.name, a.seq, exc)
        else:
            log.info("%s: archive %d rotated out", target.name, a.seq)
    try:
        await settle(catalog, store, target, limiter=limiter, clock=clock)
    except DeltabkpError as exc:  # the new archive is committed: never fail the execution
        log.warning("%s: converting older versions to reverse deltas: %s", target.name, exc)
    return retired
