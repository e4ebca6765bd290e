"""This agent's Prometheus metrics: requests by outcome, archive builds and their throughput,
bytes on the wire; served on ``--metrics-listen`` (``/metrics``, ``/healthz``).

Invariants:
- fed by the real events in ``agent.py`` (a request answered, a backup served or failed,
  a session's channel counters); nothing here reads files or the network;
- label values are bounded sets (kind, outcome, direction): never a path or a server;
- one ``CollectorRegistry`` per agent object, never the process-global one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from deltabkp.net._http import Handler, LiveBytes, metrics_handler
from deltabkp_agent.backup import BackupOutcome

__all__ = ["BACKUP_OUTCOMES", "AgentMetrics"]

#: What became of a backup request: "sent" (a delta), "unchanged", "refused" (not allowed),
#: "busy" (that path is being backed up), "stopped" (the server cancelled), "abandoned" (the
#: server went away or broke the protocol), "failed" (an error was sent back).
BACKUP_OUTCOMES = ("sent", "unchanged", "refused", "busy", "stopped", "abandoned", "failed")
DURATION_BUCKETS = (0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600)


class AgentMetrics:
    """One agent's registry and the hooks ``Agent`` calls."""

    def __init__(self, running: Callable[[], float] | None = None) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter(
            "deltabkp_agent_requests", "Requests served, by kind and outcome",
            ["kind", "outcome"], registry=reg)
        self.requests.labels("ping", "ok")
        for outcome in BACKUP_OUTCOMES:
            self.requests.labels("backup", outcome)
        self.builds = Counter(
            "deltabkp_agent_builds", "Archives built (a delta sent, or the same hash found)",
            registry=reg)
        self.build_bytes = Counter(
            "deltabkp_agent_build_bytes", "Bytes of the archives built", registry=reg)
        self.build_seconds = Counter(
            "deltabkp_agent_build_seconds",
            "Wall time of the backups that built an archive (build + delta + sending): "
            "build_bytes / build_seconds is the build throughput", registry=reg)
        self.delta_bytes = Counter(
            "deltabkp_agent_delta_bytes", "Bytes of the deltas sent (before framing and TLS)",
            registry=reg)
        self.duration = Histogram(
            "deltabkp_agent_backup_duration_seconds",
            "Wall time of the backups served, by outcome", ["outcome"], registry=reg,
            buckets=DURATION_BUCKETS)
        self.wire = LiveBytes(
            "deltabkp_agent_wire_bytes",
            "Bytes on the wire of the servers' sessions (TLS and framing included; open "
            "sessions counted as they go)", reg)
        self.running = Gauge("deltabkp_agent_backups_running", "Backups being served now",
                             registry=reg)
        if running is not None:
            self.running.set_function(running)

    def request(self, kind: str, outcome: str) -> None:
        self.requests.labels(kind, outcome).inc()

    def backup(self, out: BackupOutcome, seconds: float) -> None:
        """A backup served to the end."""
        self.request("backup", out.outcome)
        self.duration.labels(out.outcome).observe(seconds)
        if out.outcome == "sent" or out.reason == "hash":  # an archive was built
            self.builds.inc()
            self.build_bytes.inc(out.archive_size)
            self.build_seconds.inc(seconds)
            self.delta_bytes.inc(out.delta_bytes)

    def failed(self, outcome: str, seconds: float) -> None:
        """A backup that ended otherwise (``BACKUP_OUTCOMES``)."""
        self.request("backup", outcome)
        self.duration.labels(outcome).observe(seconds)

    def routes(self) -> Mapping[str, Handler]:
        return {"/metrics": metrics_handler(self.registry)}
