"""This server's Prometheus metrics: counters and histograms fed by the real events
(execution finished, bytes on the channels, announcements, contacts with agents), plus
gauges of the catalog's targets read at scrape time.

Invariants:
- counters count this process's own work: several servers sharing one catalog each expose
  their own executions and bytes (Prometheus sums them); only the targets gauges describe the
  shared catalog, and every server shows the same values for them;
- label values are bounded sets (outcome, direction, state, status): never a node or a path;
- the catalog is read at most once per ``CACHE_S`` however often it is scraped (one query,
  in a worker thread); a catalog that cannot be read keeps the last values and is logged;
- one ``CollectorRegistry`` per server object, never the process-global one.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from deltabkp.errors import DeltabkpError
from deltabkp.net._http import LiveBytes
from deltabkp_server.catalog import AsyncCatalog
from deltabkp_server.model import OUTCOMES, SHOWN_STATES, ExecutionRecord

__all__ = ["CACHE_S", "ServerMetrics"]

log = logging.getLogger("deltabkp_server")

#: Gauges read from the catalog are at most this old.
CACHE_S = 5.0
#: 1 KiB … 64 GiB by powers of 4: archives of a config dir to a database's.
SIZE_BUCKETS = tuple(float(1 << s) for s in range(10, 37, 2))
DURATION_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600)
LAG_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600)


class ServerMetrics:
    """One server's registry and the hooks its scheduler and executor call."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.executions = Counter(
            "deltabkp_server_executions", "Executions finished by this server, by outcome",
            ["outcome"], registry=reg)
        for outcome in OUTCOMES:
            self.executions.labels(outcome)  # present at 0 from the start
        self.wire = LiveBytes(
            "deltabkp_server_wire_bytes",
            "Bytes on the wire of this server's backups (TLS and framing included; running "
            "transfers counted as they go)", reg)
        self.archive_size = Histogram(
            "deltabkp_server_archive_size_bytes", "Size of the archives stored by this server",
            registry=reg, buckets=SIZE_BUCKETS)
        self.duration = Histogram(
            "deltabkp_server_execution_duration_seconds",
            "Wall time of this server's executions, by outcome", ["outcome"], registry=reg,
            buckets=DURATION_BUCKETS)
        self.lag = Histogram(
            "deltabkp_server_scheduler_lag_seconds",
            "How late scheduled executions started after they were due", registry=reg,
            buckets=LAG_BUCKETS)
        self.announcements = Counter(
            "deltabkp_server_agent_announcements", "Agent announcements received", registry=reg)
        self._clock = clock
        #: node → reachable at this server's last contact (bounded by the targets' nodes).
        self._nodes: dict[str, bool] = {}
        self._targets: dict[str, int] = {}
        self._last_failed = 0
        self._read_at = -math.inf
        reg.register(_Gauges(self))

    # -- hooks -------------------------------------------------------------------------------

    def executed(self, record: ExecutionRecord) -> None:
        """A finished execution (its log row) of this server."""
        outcome = record.outcome or "failed"
        self.executions.labels(outcome).inc()
        if record.ended is not None:
            self.duration.labels(outcome).observe(max(0.0, record.ended - record.started))
        if outcome == "stored" and record.archive_size is not None:
            self.archive_size.observe(record.archive_size)
        if record.trigger == "schedule" and record.due is not None:
            self.lag.observe(max(0.0, record.started - record.due))

    def contact(self, node: str, reached: bool) -> None:
        """The outcome of this server's last attempt to reach ``node`` (backup or probe)."""
        self._nodes[node] = reached

    # -- scrape ------------------------------------------------------------------------------

    async def refresh(self, catalog: AsyncCatalog) -> None:
        """Re-read the targets gauges if they are older than ``CACHE_S``."""
        now = self._clock()
        if now - self._read_at < CACHE_S:
            return
        self._read_at = now
        try:
            targets = await catalog.call(lambda c: c.targets())
        except DeltabkpError as exc:
            log.error("metrics: cannot read targets from the catalog: %s", exc)
            return
        wall = time.time()
        counts = collections.Counter(t.shown_state(wall) for t in targets)
        self._targets = {s: counts.get(s, 0) for s in (*SHOWN_STATES, *counts)}
        self._last_failed = sum(t.last_outcome == "failed" for t in targets)
        # Nodes no longer registered are forgotten (the dict stays bounded).
        nodes = {t.node for t in targets}
        self._nodes = {n: ok for n, ok in self._nodes.items() if n in nodes}


class _Gauges:
    """The gauges computed at scrape time from the cached catalog read and contacts."""

    def __init__(self, m: ServerMetrics) -> None:
        self._m = m

    def collect(self) -> list[Metric]:
        m = self._m
        targets = GaugeMetricFamily(
            "deltabkp_server_targets", "Active targets in the catalog, by the state ctl shows (ok, running, retrying, failing)",
            labels=["state"])
        for state, n in sorted(m._targets.items()):
            targets.add_metric([state], n)
        failed = GaugeMetricFamily(
            "deltabkp_server_targets_last_failed",
            "Active targets whose last execution failed", value=m._last_failed)
        agents = GaugeMetricFamily(
            "deltabkp_server_agents",
            "Nodes this server has contacted, by the result of its last contact", labels=["status"])
        reached = sum(m._nodes.values())
        agents.add_metric(["seen"], reached)
        agents.add_metric(["unreachable"], len(m._nodes) - reached)
        return [targets, failed, agents]
