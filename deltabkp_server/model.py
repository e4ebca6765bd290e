"""Values the server passes around: targets, archives, executions, and frequency parsing.

Invariants: every value is an attrs frozen class built from catalog rows or validated input;
times are POSIX seconds (float, UTC) inside the server and ISO 8601 UTC strings on the wire.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from typing import Any

import attrs

from deltabkp.errors import ErrorCode, RequestRefused

__all__ = [
    "Target",
    "ServerRecord",
    "ArchiveRecord",
    "ExecutionRecord",
    "ExecutionResult",
    "parse_every",
    "iso",
    "OUTCOMES",
    "STATES",
    "QUEUED",
]

OUTCOMES = ("stored", "unchanged", "failed", "skipped")
STATES = ("ok", "retrying")
#: What may wait in ``Target.queued``; "manual" outranks "announce" (never overwritten by it).
QUEUED = ("manual", "announce")

_EVERY = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_UNIT = {"": 60, "s": 1, "m": 60, "h": 3600, "d": 86400}
# A year caps nothing real but keeps next_due arithmetic far from overflow.
MAX_EVERY_S = 366 * 86400


def parse_every(text: object) -> int:
    """Frequency → seconds: integer minutes ("5") as the requirements say; "90s", "5m", "2h", "1d".

    Anything else (zero, negative, garbage) is refused with code "invalid".
    """
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise RequestRefused(ErrorCode.INVALID, f"frequency must be a string like '5', '90s', '5m', '2h', got {text!r}")
    m = _EVERY.match(str(text))
    if not m:
        raise RequestRefused(
            ErrorCode.INVALID,
            f"bad frequency {text!r}: use integer minutes ('5') or a number with s, m, h or d ('90s', '2h')",
        )
    seconds = int(m.group(1)) * _UNIT[m.group(2)]
    if seconds <= 0:
        raise RequestRefused(ErrorCode.INVALID, f"bad frequency {text!r}: must be greater than zero")
    if seconds > MAX_EVERY_S:
        raise RequestRefused(ErrorCode.INVALID, f"bad frequency {text!r}: more than a year")
    return seconds


def iso(t: float | None) -> str | None:
    """POSIX seconds → ISO 8601 UTC with milliseconds (sortable, JSON-able)."""
    if t is None:
        return None
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="milliseconds")


@attrs.frozen
class Target:
    """One registered (node, path): the unit of scheduling.

    ``queued`` is a trigger waiting to run at once ("manual" | "announce", else None);
    ``lease_owner``/``lease_until`` name the server that holds the target and until when
    (POSIX seconds); a lease is live while ``lease_until`` is not past.
    """

    id: int
    node: str
    path: str
    every_s: int
    state: str
    next_due: float
    last_outcome: str | None
    last_error: str | None
    active: bool
    created: float
    queued: str | None = None
    lease_owner: str | None = None
    lease_until: float | None = None

    @property
    def name(self) -> str:
        return f"{self.node} {self.path}"

    def to_wire(self, archives: int = 0, running: bool = False) -> dict[str, Any]:
        return {
            "node": self.node,
            "path": self.path,
            "every_seconds": self.every_s,
            "state": "running" if running else self.state,
            "next_due": iso(self.next_due),
            "last_outcome": self.last_outcome,
            "last_error": self.last_error,
            "archives": archives,
        }


@attrs.frozen
class ArchiveRecord:
    """One stored archive version; ``retained`` false once rotated out (the row stays forever)."""

    target_id: int
    seq: int
    created: float
    size: int
    hash: bytes
    transferred: int
    execution_id: int | None
    retained: bool
    deleted_at: float | None
    missing: bool

    def to_wire(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "created": iso(self.created),
            "size": self.size,
            "transferred": self.transferred,
            "retained": self.retained and not self.missing,
            "missing": self.missing,
            "deleted_at": iso(self.deleted_at),
            "hash": self.hash.hex(),
        }


@attrs.frozen
class ExecutionResult:
    """How one execution ended, as the execution code reports it to the catalog."""

    outcome: str = attrs.field(validator=attrs.validators.in_(OUTCOMES))
    ended: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    archive_size: int | None = None
    archive_seq: int | None = None
    archive_hash: bytes | None = None
    files: int | None = None
    changed: tuple[tuple[str, ...], ...] = ()
    skipped: tuple[tuple[str, ...], ...] = ()
    error: str | None = None
    note: str | None = None

    @property
    def transferred(self) -> int:
        return self.bytes_sent + self.bytes_received


@attrs.frozen
class ExecutionRecord:
    """One logged attempt (never trimmed); ``outcome`` is None while it runs."""

    id: int
    target_id: int
    node: str
    path: str
    trigger: str
    started: float
    ended: float | None
    outcome: str | None
    bytes_sent: int
    bytes_received: int
    archive_size: int | None
    archive_seq: int | None
    files: int | None
    changed: tuple[tuple[str, ...], ...]
    skipped: tuple[tuple[str, ...], ...]
    error: str | None
    note: str | None
    #: When the run was due (None for runs logged before schema v2): ``started - due`` is lag.
    due: float | None = None

    @property
    def transferred(self) -> int:
        return self.bytes_sent + self.bytes_received

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "node": self.node,
            "path": self.path,
            "trigger": self.trigger,
            "due": iso(self.due),
            "started": iso(self.started),
            "ended": iso(self.ended),
            "outcome": self.outcome,
            "transferred": self.transferred,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "archive_size": self.archive_size,
            "seq": self.archive_seq,
            "files": self.files,
            "changed": len(self.changed),
            "changed_detail": [list(c) for c in self.changed],
            "skipped": [list(s) for s in self.skipped],
            "error": self.error,
            "note": self.note,
        }


@attrs.frozen
class ServerRecord:
    """One server sharing the catalog, as its last heartbeat left it."""

    id: str
    address: str
    started: float
    heartbeat: float
    running: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "address": self.address,
            "started": iso(self.started),
            "heartbeat": iso(self.heartbeat),
            "running": self.running,
        }


def pairs_to_json(pairs: tuple[tuple[str, ...], ...]) -> str:
    return json.dumps([list(p) for p in pairs])


def pairs_from_json(text: str | None) -> tuple[tuple[str, ...], ...]:
    if not text:
        return ()
    return tuple(tuple(str(x) for x in p) for p in json.loads(text))
