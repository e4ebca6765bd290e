"""The server's HTTP routes on ``--metrics-listen``: the status page ``/``, ``/metrics``
(Prometheus) and ``/healthz``; served by ``deltabkp.net._http``.

The page: the targets (failing ones first) with state, last outcome, last success, next due
and a small inline SVG plot of their versions (one circle per retained version: its size;
one square: the bytes its execution moved), then the execution log, a keyset page at a time
(``/?before=ID``, newest first).
Invariants:
- read-only: the catalog is only read (worker threads, ``AsyncCatalog``);
- every text that comes from the catalog (node names, paths, errors: what agents and users
  wrote) goes through ``html.escape``; the SVG is built from numbers only; no JavaScript;
- bounded cost per request: at most ``MAX_TARGETS`` targets, ``PLOT_POINTS`` versions
  each, ``LOG_PAGE`` log rows; the targets part is cached ``CACHE_S`` seconds, so a page
  reloaded in a loop costs one catalog read per period.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Callable, Mapping

import attrs

from deltabkp.ctl._render import format_size, when
from deltabkp.errors import DeltabkpError
from deltabkp.net._http import Handler, Request, Response, metrics_handler
from deltabkp_server.catalog import AsyncCatalog, Catalog
from deltabkp_server.metrics import CACHE_S, ServerMetrics
from deltabkp_server.model import ArchiveRecord, ExecutionRecord, Target, iso

__all__ = ["StatusPage", "plot_svg", "routes"]

MAX_TARGETS = 500
PLOT_POINTS = 50
LOG_PAGE = 50
PLOT_W, PLOT_H, PAD = 200, 56, 6

_HTML = "text/html; charset=utf-8"


@attrs.frozen
class TargetView:
    """One row of the targets table."""

    target: Target
    #: ``Target.shown_state`` when read: what ctl shows too.
    state: str
    last_success: float | None
    #: Retained versions, oldest first.
    versions: tuple[ArchiveRecord, ...]

    @property
    def failing(self) -> bool:
        return self.target.last_outcome == "failed" or self.state in ("retrying", "failing")


def _read_targets(c: Catalog) -> tuple[list[TargetView], int]:
    """The targets to show, failing first, and how many there are in all (one thread call)."""
    now = time.time()
    targets = c.targets()
    shown = {t.id: t.shown_state(now) for t in targets}
    # Failures first, then by name: the operator's eye lands on what needs them.
    targets.sort(key=lambda t: (
        t.last_outcome != "failed" and shown[t.id] not in ("retrying", "failing"), t.node, t.path))
    views = []
    for t in targets[:MAX_TARGETS]:
        good = [e.ended for o in ("stored", "unchanged")
                for e in c.execution_page(limit=1, target_id=t.id, outcome=o) if e.ended]
        arch = [a for a in c.archive_page(t.id, limit=PLOT_POINTS) if a.retained]
        views.append(TargetView(t, shown[t.id], max(good, default=None), tuple(reversed(arch))))
    return views, len(targets)


def _t(t: float | None) -> str:
    return when(iso(t)) if t is not None else "-"


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def plot_svg(versions: tuple[ArchiveRecord, ...]) -> str:
    """Sizes (circles, joined) and bytes transferred (squares) per version, log scale."""
    if not versions:
        return '<span class="none">no versions</span>'
    values = [v for a in versions for v in (a.size, a.transferred) if v > 0]
    lo = math.log10(min(values, default=1))
    hi = math.log10(max(values, default=1))
    span = hi - lo or 1.0
    step = (PLOT_W - 2 * PAD) / max(len(versions) - 1, 1)

    def y(v: int) -> float:
        return PLOT_H - PAD - (PLOT_H - 2 * PAD) * ((math.log10(v) - lo) / span if v > 0 else 0)

    xs = [PAD + i * step for i in range(len(versions))]
    line = " ".join(f"{x:.1f},{y(a.size):.1f}" for x, a in zip(xs, versions, strict=True))
    parts = [
        (f'<svg class="plot" width="{PLOT_W}" height="{PLOT_H}" '
         f'viewBox="0 0 {PLOT_W} {PLOT_H}" xmlns="http://www.w3.org/2000/svg" role="img">'),
        f'<polyline points="{line}" fill="none" stroke="#4a7ab5" stroke-width="1"/>',
    ]
    for x, a in zip(xs, versions, strict=True):
        tip = (f"version {a.seq}, {_t(a.created)}: {format_size(a.size)}, "
               f"{format_size(a.transferred)} transferred")
        # The square on top: a first version's transfer is about its size (same spot).
        parts.append(f'<circle class="version" cx="{x:.1f}" cy="{y(a.size):.1f}" r="3.5" '
                     f'fill="#4a7ab5"><title>{_e(tip)}</title></circle>')
        parts.append(f'<rect class="transferred" x="{x - 2:.1f}" y="{y(a.transferred) - 2:.1f}" '
                     f'width="4" height="4" fill="#d9822b"><title>{_e(tip)}</title></rect>')
    parts.append("</svg>")
    return "".join(parts)


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em;margin:0}h2{font-size:1.15em;margin:1.4em 0 .4em}
.meta{color:#666;margin:.2em 0 1em}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #ddd;vertical-align:middle}
th{background:#f3f3f3;font-weight:600}
tr.failing td{background:#fdecea}tr.failing td.state{color:#b3261e;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.t{white-space:nowrap}
td.err{color:#b3261e;max-width:24em;overflow-wrap:anywhere}
td.path{overflow-wrap:anywhere;min-width:14em}
.outcome-failed{color:#b3261e;font-weight:600}.outcome-stored{color:#1e6b2f}
.legend{color:#666;font-weight:400;font-size:.85em}.none{color:#999}
nav{margin:.8em 0}nav a{margin-right:1.2em}
"""


class StatusPage:
    """The ``/`` handler: the page, its targets part cached ``CACHE_S`` seconds."""

    def __init__(self, *, catalog: AsyncCatalog, server_id: str, address: Callable[[], str],
                 clock: Callable[[], float] = time.time) -> None:
        self.catalog = catalog
        self.server_id = server_id
        self.address = address
        self.clock = clock
        self._cached: tuple[float, list[TargetView], int] | None = None

    async def _targets(self) -> tuple[list[TargetView], int]:
        now = time.monotonic()
        if self._cached is None or now - self._cached[0] >= CACHE_S:
            views, total = await self.catalog.call(_read_targets)
            self._cached = (now, views, total)
        return self._cached[1], self._cached[2]

    async def __call__(self, req: Request) -> Response:
        before: int | None = None
        if req.query.get("before"):
            try:
                before = int(req.query["before"])
            except ValueError:
                return Response.text(400, "before= must be an execution id\n")
        try:
            views, total = await self._targets()
            log = await self.catalog.call(
                lambda c: c.execution_page(limit=LOG_PAGE, before_id=before))
        except DeltabkpError as exc:
            return Response.text(503, f"catalog unavailable: {exc}\n")
        return Response(200, self.render(views, total, log, before).encode(), _HTML)

    def render(self, views: list[TargetView], total: int, log: list[ExecutionRecord],
               before: int | None) -> str:
        failing = sum(v.failing for v in views)
        out = [
            '<!doctype html><html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width">',
            f"<title>deltabkp status — {_e(self.address())}</title><style>{_STYLE}</style>",
            "</head><body><h1>deltabkp status</h1>",
            (f'<p class="meta">server {_e(self.server_id)} on {_e(self.address())} · {total} '
             f'target(s), <span id="failing-count">{failing}</span> failing · '
             f"{_e(_t(self.clock()))}</p>"),
            ('<h2>Targets <span class="legend">versions: <span style="color:#4a7ab5">●</span> '
             'size, <span style="color:#d9822b">■</span> transferred (log scale)</span></h2>'),
            ('<table id="targets"><thead><tr><th>Node</th><th>Path</th><th>State</th>'
             "<th>Last</th><th>Last success</th><th>Next due</th><th>Versions</th>"
             "<th>Last error</th></tr></thead><tbody>"),
        ]
        for v in views:
            t = v.target
            out.append(
                f'<tr class="target{" failing" if v.failing else ""}" data-target="{t.id}" '
                f'data-versions="{len(v.versions)}">'
                f'<td>{_e(t.node)}</td><td class="path">{_e(t.path)}</td>'
                f'<td class="state">{_e(v.state)}</td>'
                f'<td class="outcome-{_e(t.last_outcome or "none")}">{_e(t.last_outcome or "-")}</td>'
                f'<td class="t">{_e(_t(v.last_success))}</td><td class="t">{_e(_t(t.next_due))}</td>'
                f'<td class="plot">{plot_svg(v.versions)}</td>'
                f'<td class="err">{_e(t.last_error or "")}</td></tr>'
            )
        if not views:
            out.append('<tr><td colspan="8" class="none">no targets registered</td></tr>')
        out.append("</tbody></table>")
        if total > len(views):
            out.append(f'<p class="meta">first {len(views)} of {total} targets shown</p>')
        out.append('<h2 id="log">Execution log</h2><table id="executions"><thead><tr>'
                   "<th>#</th><th>Started</th><th>Node</th><th>Path</th><th>Trigger</th>"
                   "<th>Outcome</th><th>Archive</th><th>On the wire</th><th>Took</th>"
                   "<th>Error / note</th></tr></thead><tbody>")
        for r in log:
            took = f"{r.ended - r.started:.1f} s" if r.ended is not None else "running"
            outcome = r.outcome or "running"
            if r.count > 1:
                outcome += f" ×{r.count}"
            out.append(
                f'<tr class="execution" data-id="{r.id}"><td class="num">{r.id}</td>'
                f'<td class="t">{_e(_t(r.started))}</td><td>{_e(r.node)}</td><td class="path">{_e(r.path)}</td>'
                f"<td>{_e(r.trigger)}</td>"
                f'<td class="outcome-{_e(r.outcome or "running")}">{_e(outcome)}</td>'
                f'<td class="num">{_e(format_size(r.archive_size))}</td>'
                f'<td class="num">{_e(format_size(r.transferred + r.earlier_bytes))}</td>'
                f'<td class="num">{_e(took)}</td>'
                f'<td class="err">{_e(r.error or r.note or "")}</td></tr>'
            )
        if not log:
            out.append('<tr><td colspan="10" class="none">no executions</td></tr>')
        out.append("</tbody></table><nav>")
        if before is not None:
            out.append('<a href="/#log">newest</a>')
        if len(log) == LOG_PAGE:
            out.append(f'<a id="older" href="/?before={log[-1].id}#log">older →</a>')
        out.append("</nav></body></html>")
        return "\n".join(out)


def routes(catalog: AsyncCatalog, metrics: ServerMetrics, page: StatusPage) -> Mapping[str, Handler]:
    """``/`` and ``/metrics`` (``/healthz`` comes with ``net._http``)."""

    async def refresh() -> None:
        await metrics.refresh(catalog)

    return {"/": page, "/metrics": metrics_handler(metrics.registry, refresh)}
