"""What ``deltabkp ctl`` prints: the server's answers as narrow human tables and sentences.

Invariants: every renderer takes the answer as the server sent it (plain JSON-like data) and
never fails on a missing or odd field — it prints ``-`` instead, because a newer server may
send less or more.  ``format_size`` is the one size formatter of the project.  A streamed
answer (``log``, ``list``) is printed batch by batch as it arrives (``RowPrinter``): never
held whole; its ``--json`` is one JSON list with one row per line.
"""

from __future__ import annotations

import contextvars
import datetime as _dt
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "format_size",
    "emit",
    "table",
    "when",
    "duration",
    "DISPLAY_UTC",
    "every",
    "ratio",
    "register",
    "unregister",
    "targets",
    "status",
    "backup_now",
    "restore",
    "RowPrinter",
    "skipped",
    "LOG_HEADERS",
    "log_cells",
    "log_footer",
    "BACKUP_HEADERS",
    "backup_cells",
    "backups_footer",
    "stored_cell",
    "verify",
    "fetch",
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


#: Tables show times in UTC (``--utc``) rather than local time; JSON is always ISO 8601 UTC.
DISPLAY_UTC: contextvars.ContextVar[bool] = contextvars.ContextVar("DISPLAY_UTC", default=False)


def when(iso: Any) -> str:
    """'2026-11-26T18:40:12.345+00:00' → '2026-11-26 19:40:12' in local time (here UTC+1), or
    '2026-11-26 18:40:12Z' with ``--utc`` (tables stay narrow)."""
    if not isinstance(iso, str) or "T" not in iso:
        return "-"
    try:
        t = _dt.datetime.fromisoformat(iso)
    except ValueError:
        return "-"
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.UTC)
    if DISPLAY_UTC.get():
        return t.astimezone(_dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return t.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def duration(seconds: Any) -> str:
    """A duration for people, in its two largest units: 41 → '41 s', 7500 → '2 h 5 min'."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
        return "-"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    units = (("d", 86400), ("h", 3600), ("min", 60), ("s", 1))
    for i, (name, n) in enumerate(units[:-1]):
        if s >= n:
            small_name, small_n = units[i + 1]
            small = (s % n) // small_n
            return f"{s // n} {name}" + (f" {small} {small_name}" if small else "")
    return f"{s} s"  # pragma: no cover - s >= 60 always matches a unit above


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


class RowPrinter:
    """Prints a streamed answer batch by batch: as a table (column widths from the first
    batch, widened — never narrowed — by later ones) or as a JSON list, a row per line.

    Call it with each batch of rows; ``close()`` at the end.  ``n`` counts the rows printed
    and ``marked`` those for which ``mark(row)`` holds (e.g. retained archives).
    """

    def __init__(
        self, headers: Sequence[str], cells: Callable[[Mapping[str, Any]], Sequence[Any]], *,
        as_json: bool, mark: Callable[[Mapping[str, Any]], bool] = lambda r: False,
        out: TextIO | None = None,
    ) -> None:
        self.headers, self.cells, self.as_json, self.mark = list(headers), cells, as_json, mark
        self.out = out or sys.stdout
        self.n = self.marked = 0
        self._widths: list[int] = []

    def __call__(self, batch: list[Any]) -> None:
        if self.as_json:
            # One row per line (compact: the C encoder; ``indent`` would be ten times slower
            # on a 100,000-row log), every row as it is: --json hides nothing.
            for row in batch:
                self.out.write(("[\n" if self.n == 0 else ",\n") + json.dumps(row, sort_keys=True))
                self.n += 1
        else:
            rows = _rows(batch)
            cells = [["-" if c is None else str(c) for c in self.cells(r)] for r in rows]
            lines = [self.headers] if self.n == 0 and cells else []
            widths = [max(len(r[i]) for r in [*lines, *cells] or [self.headers])
                      for i in range(len(self.headers))]
            self._widths = [max(a, b) for a, b in zip(widths, self._widths or widths)]
            for r in [*lines, *cells]:
                self.out.write("  ".join(c.ljust(w) for c, w in zip(r, self._widths)).rstrip() + "\n")
            self.n += len(rows)
            self.marked += sum(1 for r in rows if self.mark(r))
        self.out.flush()

    def close(self) -> None:
        if self.as_json:
            self.out.write("\n]\n" if self.n else "[]\n")
            self.out.flush()


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
    if isinstance(_get(d, "bwlimit"), int):
        out += f"; the agent sends at most {format_size(_get(d, 'bwlimit'))}/s for it"
    if _get(d, "warning"):
        out += f"\nwarning: {_get(d, 'warning')}"
    return out


def unregister(d: Any, req: Mapping[str, Any]) -> str:
    return (
        f"unregistered {_get(d, 'node')} {_get(d, 'path')}: no more backups; its archives and "
        "execution log stay on the server"
    )


def skipped(count: Any, entries: Any, *, first: int = 3) -> str:
    """'2 skipped: run/app.sock (socket), db/lock (permission denied)', the first few named;
    ``""`` when nothing was skipped."""
    if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
        return ""
    named = [
        f"{e[0]} ({e[1]})" if len(e) > 1 else str(e[0])
        for e in (entries if isinstance(entries, list) else [])[:first]
        if isinstance(e, list) and e
    ]
    more = count - len(named)
    return f"{count} skipped: " + ", ".join(named + ([f"+{more} more"] if more > 0 else []))


BACKUP_HEADERS = ("SEQ", "CREATED", "SIZE", "TRANSFERRED", "RATIO", "RETAINED", "STORED",
                  "HASH")


def backup_cells(r: Mapping[str, Any]) -> list[Any]:
    """One row of ``list``."""
    return [
        r.get("seq"), when(r.get("created")), format_size(r.get("size")),
        format_size(r.get("transferred")), ratio(r.get("transferred"), r.get("size")),
        "CORRUPT" if r.get("corrupt") and r.get("retained")
        else "yes" if r.get("retained") else ("missing" if r.get("missing") else "no"),
        stored_cell(r), str(r.get("hash", ""))[:16],
    ]


def stored_cell(r: Mapping[str, Any]) -> str:
    """How the store holds a retained version: 'whole', or 'delta>12 15.2 KiB' (a reverse
    delta rebuilt from version 12, and the bytes it takes)."""
    if not r.get("retained"):
        return "-"
    if r.get("storage") == "delta":
        return f"delta>{r.get('base_seq')} {format_size(r.get('stored_size'))}"
    return str(r.get("storage") or "whole")


def verify(data: Any, req: Mapping[str, Any]) -> str:
    """``verify``: one line per version checked, one summary per target."""
    out = []
    for t in _rows(data):
        versions = [v for v in t.get("versions") or [] if isinstance(v, Mapping)]
        bad = [v for v in versions if not v.get("ok")]
        out.append(f"{t.get('node')} {t.get('path')}: {len(versions)} version(s) checked, "
                   + (f"{len(bad)} CORRUPT" if bad else "all sound")
                   + (f" (execution {t.get('execution')})" if t.get("execution") else ""))
        for v in versions:
            verdict = "ok" if v.get("ok") else f"CORRUPT: {v.get('error')}"
            out.append(f"  version {v.get('seq')} ({v.get('storage')}, "
                       f"{format_size(v.get('size'))}): {verdict}")
    return "\n".join(out) if out else "nothing to verify (no stored archives)"


def fetch(meta: Mapping[str, Any], out: str) -> str:
    return (
        f"fetched {meta.get('node')} {meta.get('path')} archive {meta.get('seq')} "
        f"(created {when(meta.get('created'))}, {format_size(meta.get('size'))}, blake3 "
        f"{str(meta.get('hash', ''))[:16]}… verified) into {out}"
    )


def backups_footer(n: int, retained: int, req: Mapping[str, Any]) -> str:
    """The line after a streamed ``list`` table (the counts are known only at the end)."""
    if not n:
        return f"{_what(req)}: no backups yet"
    return f"{_what(req)}: {n} backup(s), {retained} retained"


LOG_HEADERS = ("ID", "STARTED", "NODE", "PATH", "OUTCOME", "TRIGGER", "TRANSFERRED", "SIZE",
               "CHANGED", "ERROR / NOTE")


def log_cells(r: Mapping[str, Any]) -> list[Any]:
    """One row of ``log``; a folded run of ``unchanged`` checks reads 'unchanged x1440' with
    its first time and its bytes in all in the note."""
    outcome = r.get("outcome") or "running"
    notes = [str(r.get("error") or r.get("note") or "")]
    count = r.get("count")
    if isinstance(count, int) and not isinstance(count, bool) and count > 1:
        outcome += f" x{count}"
        notes.insert(0, f"{count} checks since {when(r.get('first'))}, "
                        f"{format_size(r.get('run_transferred'))} on the wire in all")
    notes.append(skipped(r.get("skipped_count"), r.get("skipped")))
    return [
        r.get("id"), when(r.get("started")), r.get("node"), r.get("path"), outcome,
        r.get("trigger"), format_size(r.get("transferred")), format_size(r.get("archive_size")),
        r.get("changed"), "; ".join(n for n in notes if n),
    ]


def log_footer(n: int, req: Mapping[str, Any]) -> str:
    """The line after a streamed ``log`` table ("" when there is nothing to add)."""
    if not n:
        target = f" of {_what(req)}" if "node" in req else ""
        if "since" in req or "outcome" in req:
            return f"no executions{target} match (--since / --outcome)"
        return f"no executions{target} yet"
    limit = req.get("limit")
    if isinstance(limit, int) and limit > 0 and n >= limit:
        return f"(the newest {n} rows; --limit 0 shows all, --since / --outcome narrow them)"
    return ""


def targets(data: Any, req: Mapping[str, Any]) -> str:
    rows = _rows(data)
    if not rows:
        return "no targets registered (deltabkp ctl register NODE:PORT PATH --every FREQ)"
    return table(
        ["NODE", "PATH", "EVERY", "STATE", "NEXT DUE", "LAST", "ARCHIVES", "LAST ERROR / SKIPPED"],
        [
            [
                # A target's own bandwidth cap beside its frequency: "1d ≤2.0 MiB/s".
                r.get("node"), r.get("path"), every(r.get("every_seconds")) + (
                    f" ≤{format_size(r['bwlimit'])}/s" if isinstance(r.get("bwlimit"), int)
                    else ""), r.get("state"),
                "-" if r.get("state") == "unregistered" else when(r.get("next_due")),
                r.get("last_outcome"), r.get("archives"),
                "; ".join(x for x in (
                    r.get("last_error") or "",
                    skipped(r.get("skipped_count"), r.get("skipped"), first=2),
                ) if x),
            ]
            for r in rows
        ],
    )


def status(d: Any, req: Mapping[str, Any]) -> str:
    if not isinstance(d, Mapping):
        return str(d)
    # "uptime_s": 41 reads "uptime: 41 s": seconds fields as durations for people.
    lines = [f"{k.removesuffix('_s')}: {duration(v)}" if k.endswith("_s") else f"{k}: {v}"
             for k, v in d.items() if k not in ("servers", "executions")]
    running = d.get("executions")
    if isinstance(running, list) and all(isinstance(e, Mapping) for e in running) and running:
        # Bytes so far (written by the running server about once a second); a backup's
        # total is known only at its end, so EXPECTED is mostly "-".
        lines.append(f"running executions: {len(running)}")
        lines.append(table(
            ["EXEC", "NODE", "PATH", "TRIGGER", "STARTED", "SERVER", "TRANSFERRED", "EXPECTED"],
            [[e.get("execution"), e.get("node"), e.get("path"), e.get("trigger"),
              when(e.get("started")), e.get("server"), format_size(e.get("transferred")),
              format_size(e.get("expected"))] for e in running],
        ))
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
    if isinstance(d, Mapping) and d.get("timed_out"):
        return (f"{what}: still queued or running after --wait-timeout {d.get('waited')} s; "
                f"it goes on (see: deltabkp ctl log {what})")
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
    if skipped(d.get("skipped_count"), d.get("skipped")):
        line += f"; {skipped(d.get('skipped_count'), d.get('skipped'))}"
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
