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
    "from_iso",
    "DETAIL_MAX",
    "OUTCOMES",
    "STATES",
    "SHOWN_STATES",
    "QUEUED",
]

OUTCOMES = ("stored", "unchanged", "failed", "skipped")
STATES = ("ok", "retrying")
#: What ``Target.shown_state`` can say of an active target (ctl, metrics, the status page).
SHOWN_STATES = ("ok", "running", "retrying", "failing")
#: What may wait in ``Target.queued``; "manual" outranks "announce" (never overwritten by it).
QUEUED = ("manual", "announce")

_EVERY = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_UNIT = {"": 60, "s": 1, "m": 60, "h": 3600, "d": 86400}
#: Entries of an execution's changed / skipped lists shown on the wire (the counts are whole).
DETAIL_MAX = 20
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


def from_iso(text: object, what: str = "time") -> float:
    """ISO 8601 (as ``iso`` writes it; no offset means UTC) → POSIX seconds; "invalid" else."""
    refused = RequestRefused(
        ErrorCode.INVALID, f"{what} must be an ISO 8601 date/time, got {text!r}"
    )
    if not isinstance(text, str):
        raise refused
    try:
        t = _dt.datetime.fromisoformat(text)
    except ValueError:
        raise refused from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.UTC)
    return t.timestamp()


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
    #: Bytes per second the agent may send for this target (sent in each backup request);
    #: None: no cap of its own.
    bwlimit: int | None = None
    #: The number of the target's newest run request (``request_now``; 0: none yet).  On a
    #: target returned by ``claim_due`` it is the newest request the claimed run answers.
    request_seq: int = 0

    @property
    def name(self) -> str:
        return f"{self.node} {self.path}"

    def shown_state(self, now: float) -> str:
        """The state users see (ctl ``targets``/``status``), the first that holds:
        "unregistered" (inactive; its archives stay), "running" (a live lease: a server runs or
        probes it now), "retrying" (the last execution failed, a retry is pending), "failing"
        (the last finished execution failed and no retry is pending: the next try is the next
        period), else "ok"."""
        if not self.active:
            return "unregistered"
        if self.lease_until is not None and self.lease_until > now:
            return "running"
        if self.state == "retrying":
            return "retrying"
        return "failing" if self.last_outcome == "failed" else "ok"

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
            "bwlimit": self.bwlimit,
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
    #: How the store holds it: "whole" (tgz + signature) or "delta" (a reverse delta that
    #: rebuilds it from version ``base_seq``, a newer one); ``stored_size``: bytes in the store.
    form: str = "whole"
    base_seq: int | None = None
    stored_size: int | None = None
    #: When its bytes last matched ``hash`` (None: only at ingest, ``created``).
    verified_at: float | None = None
    #: Why a verification found it unrestorable (None: sound, as far as anyone checked).
    corrupt: str | None = None

    @property
    def usable(self) -> bool:
        """Retained, present and not known corrupt: it may be served and rebuilt from."""
        return self.retained and not self.missing and self.corrupt is None

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
            "storage": self.form,
            "base_seq": self.base_seq,
            "stored_size": self.stored_size,
            "verified": iso(self.verified_at if self.verified_at is not None else self.created),
            "corrupt": self.corrupt is not None,
            "corrupt_reason": self.corrupt,
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
    #: Schema v3 folding: the row stands for ``count`` executions — itself (the newest) and
    #: the consecutive identical ``unchanged`` ones before it, the first of which started at
    #: ``first``; ``earlier_bytes`` is what those earlier ones moved on the wire.
    count: int = 1
    first: float | None = None
    earlier_bytes: int = 0
    #: Schema v5: the target's ``request_seq`` when this run was claimed: it answers every
    #: request up to that number, and none after (None: a verification, or a pre-v5 row).
    #: Not on the wire: ``backup-now --wait`` uses it to pick its answer.
    request_seq: int | None = None

    @property
    def transferred(self) -> int:
        return self.bytes_sent + self.bytes_received

    def answers(self, request_seq: int) -> bool:
        """This finished run was claimed at or after request ``request_seq`` of its target."""
        return (self.outcome is not None and self.request_seq is not None
                and self.request_seq >= request_seq)

    def to_wire(self) -> dict[str, Any]:
        started = iso(self.started)  # once: it is also "last" (and "first" of a single row)
        return {
            "id": self.id,
            "node": self.node,
            "path": self.path,
            "trigger": self.trigger,
            "due": iso(self.due),
            "started": started,
            "ended": iso(self.ended),
            "outcome": self.outcome,
            "transferred": self.transferred,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "archive_size": self.archive_size,
            "seq": self.archive_seq,
            "files": self.files,
            "changed": len(self.changed),
            # The lists are cut (the counts are not) so that one row always fits in a frame.
            "changed_detail": [list(c) for c in self.changed[:DETAIL_MAX]],
            "skipped": [list(s) for s in self.skipped[:DETAIL_MAX]],
            "skipped_count": len(self.skipped),
            "error": self.error,
            "note": self.note,
            "count": self.count,
            "first": started if self.first is None else iso(self.first),
            "last": started,
            "run_transferred": self.transferred + self.earlier_bytes,
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
