"""What ``deltabkp ctl`` prints: the server's answers as narrow human tables and sentences.

Invariants: every renderer takes the answer as the server sent it (plain JSON-like data) and
never fails on a missing or odd field — it prints ``-`` instead, because a newer server may
send less or more.  ``format_size`` is the one size formatter of the project.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "format_size",
    "emit",
    "table",
    "when",
    "every",
    "ratio",
    "register",
    "unregister",
    "backups",
    "targets",
    "log",
    "status",
    "backup_now",
    "restore",
]


def format_size(n: Any) -> str:
    """``1536`` → ``"1.5 KiB"``; ``"-"`` for what is not a number (a field the server left out)."""
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        return "-"
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if v < 1024 or unit == "TiB":
            return f"{int(v)} B" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


def emit(data: Any, human: str, *, as_json: bool) -> None:
    """Print the answer: as JSON for scripts (``--json``), else the human rendering."""
    print(json.dumps(data, indent=2, sort_keys=True) if as_json else human)


def when(iso: Any) -> str:
    """'2026-11-26T18:40:12.345+00:00' → '2026-11-26 18:40:12Z' (tables stay narrow)."""
    if not isinstance(iso, str) or "T" not in iso:
        return "-"
    day, _, rest = iso.partition("T")
    return f"{day} {rest[:8]}Z"


def every(seconds: Any) -> str:
    """A frequency in the largest whole unit: 900 → '15m', 90 → '90s'."""
    if isinstance(seconds, bool) or not isinstance(seconds, int):
        return "-"
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % n == 0:
            return f"{seconds // n}{unit}"
    return f"{seconds}s"


def ratio(part: Any, whole: Any) -> str:
    if isinstance(part, int) and isinstance(whole, int) and whole > 0:
        return f"{100.0 * part / whole:.1f}%"
    return "-"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers], *[["-" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def _rows(data: Any) -> list[Mapping[str, Any]]:
    # A list answer whose items are not objects is a server bug: show nothing rather than crash.
    return [r for r in data if isinstance(r, Mapping)] if isinstance(data, list) else []


def _get(data: Any, key: str) -> Any:
    return data.get(key) if isinstance(data, Mapping) else None


def _what(req: Mapping[str, Any]) -> str:
    return f"{req['node']} {req['path']}"


# -- one renderer per answer: (data, request) -> text -------------------------------------------


def register(d: Any, req: Mapping[str, Any]) -> str:
    out = (
        f"registered {_get(d, 'node')} {_get(d, 'path')}: backed up every "
        f"{every(_get(d, 'every_seconds'))}, first backup due {when(_get(d, 'next_due'))}"
    )
    if _get(d, "warning"):
        out += f"\nwarning: {_get(d, 'warning')}"
    return out


def unregister(d: Any, req: Mapping[str, Any]) -> str:
    return (
        f"unregistered {_get(d, 'node')} {_get(d, 'path')}: no more backups; its archives and "
        "execution log stay on the server"
    )


def backups(data: Any, req: Mapping[str, Any]) -> str:
    """``list``: every backup of one target."""
    rows = _rows(data)
    if not rows:
        return f"{_what(req)}: no backups yet"
    kept = sum(1 for r in rows if r.get("retained"))
    body = table(
        ["SEQ", "CREATED", "SIZE", "TRANSFERRED", "RATIO", "RETAINED", "HASH"],
        [
            [
                r.get("seq"), when(r.get("created")), format_size(r.get("size")),
                format_size(r.get("transferred")), ratio(r.get("transferred"), r.get("size")),
                "yes" if r.get("retained") else ("missing" if r.get("missing") else "no"),
                str(r.get("hash", ""))[:16],
            ]
            for r in rows
        ],
    )
    return f"{_what(req)}: {len(rows)} backup(s), {kept} retained\n{body}"


def targets(data: Any, req: Mapping[str, Any]) -> str:
    rows = _rows(data)
    if not rows:
        return "no targets registered (deltabkp ctl register NODE:PORT PATH --every FREQ)"
    return table(
        ["NODE", "PATH", "EVERY", "STATE", "NEXT DUE", "LAST", "ARCHIVES", "LAST ERROR"],
        [
            [
                r.get("node"), r.get("path"), every(r.get("every_seconds")), r.get("state"),
                when(r.get("next_due")), r.get("last_outcome"), r.get("archives"),
                r.get("last_error") or "",
            ]
            for r in rows
        ],
    )


def log(data: Any, req: Mapping[str, Any]) -> str:
    rows = _rows(data)
    if not rows:
        target = f" of {_what(req)}" if "node" in req else ""
        return f"no executions{target} yet"
    return table(
        ["ID", "STARTED", "NODE", "PATH", "OUTCOME", "TRIGGER", "TRANSFERRED", "SIZE", "CHANGED",
         "ERROR / NOTE"],
        [
            [
                r.get("id"), when(r.get("started")), r.get("node"), r.get("path"),
                r.get("outcome") or "running", r.get("trigger"), format_size(r.get("transferred")),
                format_size(r.get("archive_size")), r.get("changed"),
                r.get("error") or r.get("note") or "",
            ]
            for r in rows
        ],
    )


def status(d: Any, req: Mapping[str, Any]) -> str:
    if not isinstance(d, Mapping):
        return str(d)
    lines = [f"{k}: {v}" for k, v in d.items() if k != "servers"]
    servers = d.get("servers")
    if isinstance(servers, list) and all(isinstance(s, Mapping) for s in servers):
        lines.append(f"live servers on this catalog: {len(servers)}")
        lines.append(table(
            ["SERVER", "ADDRESS", "STARTED", "LAST HEARTBEAT", "RUNNING", "TARGETS HELD"],
            [[s.get("id"), s.get("address"), when(s.get("started")),
              when(s.get("heartbeat")), s.get("running"),
              ", ".join(str(t) for t in s.get("targets") or []) or "-"] for s in servers],
        ))
    return "\n".join(lines)


def backup_now(d: Any, req: Mapping[str, Any]) -> str:
    what = _what(req)
    if not isinstance(d, Mapping) or d.get("queued"):
        return f"queued a backup of {what} (see: deltabkp ctl log {what})"
    outcome = d.get("outcome")
    line = f"{what}: {outcome}"
    if outcome == "stored":
        line += (
            f" as archive {d.get('seq')}, {format_size(d.get('archive_size'))}, "
            f"{format_size(d.get('transferred'))} on the wire "
            f"({ratio(d.get('transferred'), d.get('archive_size'))})"
        )
    elif outcome == "unchanged":
        why = str(d.get("note") or "nothing changed").removeprefix("unchanged").strip(" ()")
        line += f" ({why}), {format_size(d.get('transferred'))} on the wire"
    if d.get("changed"):
        line += f"; {d['changed']} file(s) changed while read"
    if d.get("error"):
        line += f"\nerror: {d['error']}"
    return line


def restore(meta: Mapping[str, Any], dest: Path) -> str:
    x = meta.get("extracted") or {}
    return (
        f"restored {meta.get('node')} {meta.get('path')} archive {meta.get('seq')} "
        f"(created {when(meta.get('created'))}, {format_size(meta.get('size'))}, blake3 "
        f"verified) into {dest}: {x.get('files', 0)} files, {x.get('dirs', 0)} directories, "
        f"{x.get('symlinks', 0) + x.get('hardlinks', 0)} links, "
        f"{format_size(x.get('bytes'))} of data"
    )
