"""How the daemons' log records look: ``--log-format text`` (one human line) or ``json`` (one
JSON object per line), and the context fields a record about one execution carries.

Job: the two ``logging.Formatter``s ``configure_logging`` installs, and ``log_context()``, which
builds the ``extra=`` of a record about a node, a path, an execution or a peer.
Invariants:
- a JSON line is one object with ``time`` (ISO 8601 UTC, milliseconds), ``level``,
  ``logger``, ``daemon``, ``message`` (the rendered text, as the text format shows it) and
  each context field the record carries (``node``, ``path``, ``execution``, ``peer``,
  ``event``); a traceback is one ``exception`` string, never extra lines;
- the text format shows the same context fields (but ``event``, which its words say), as
  ``key=value`` after the message, except those the message already names (no line says
  its node twice);
- formatting never fails on odd values: anything not JSON-able is written as its ``str``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from typing import Any

__all__ = ["CONTEXT_FIELDS", "LOG_FORMATS", "formatter", "log_context"]

LOG_FORMATS = ("text", "json")
#: Context a record may carry (``extra=log_context(...)``), in the order they are shown.
CONTEXT_FIELDS = ("event", "execution", "node", "path", "peer")


def log_context(
    *, node: str | None = None, path: str | None = None, execution: int | None = None,
    peer: str | None = None, event: str | None = None,
) -> dict[str, Any]:
    """``extra=`` for a record about these (the ones given)."""
    given = {"node": node, "path": path, "execution": execution, "peer": peer, "event": event}
    return {k: v for k, v in given.items() if v is not None}


def _context(record: logging.LogRecord) -> dict[str, Any]:
    return {k: getattr(record, k) for k in CONTEXT_FIELDS if getattr(record, k, None) is not None}


class _Text(logging.Formatter):
    def __init__(self, daemon: str) -> None:
        super().__init__(f"%(asctime)s {daemon} %(levelname)s %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        message = record.message
        # The event is for machines (the message says it in words): JSON only.
        extra = [f"{k}={v}" for k, v in _context(record).items()
                 if k != "event" and str(v) not in message]
        return f"{line} [{' '.join(extra)}]" if extra else line


class _Json(logging.Formatter):
    def __init__(self, daemon: str) -> None:
        super().__init__()
        self.daemon = daemon

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": _dt.datetime.fromtimestamp(record.created, _dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "daemon": self.daemon,
            "message": record.getMessage(),
            **_context(record),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        return json.dumps(out, default=str, ensure_ascii=False)


def formatter(fmt: str, daemon: str) -> logging.Formatter:
    """The formatter of ``--log-format fmt`` for ``daemon`` (``deltabkp-agent``…)."""
    if fmt == "json":
        return _Json(daemon)
    if fmt == "text":
        return _Text(daemon)
    raise ValueError(f"unknown log format {fmt!r} (known: {', '.join(LOG_FORMATS)})")
