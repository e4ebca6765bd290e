"""Where one request's time went: named phases, wall and CPU, rendered as one log line.

Job: the one home for the per-phase timeline of a backup, on the agent (``backup of PATH:
phases …``) and on the server (``execution N phases …``), so an operator reading the log sees
where a slow backup spent its time without a profiler.

Invariants:
- a phase costs two reads of each clock (``perf_counter``, ``process_time``): cheap enough to
  stay on in production;
- CPU is the whole process's over the phase (worker threads included: the compressor's pool
  is where most of it goes); backups running at the same time in the daemon count too;
- phases are laps: each ``lap(name)`` closes the phase that began at the previous lap (or at
  creation); a name seen twice adds up; ``add`` records one timed elsewhere (a worker
  thread's own clock);
- never raises, never blocks: a timeline is only a report.
"""

from __future__ import annotations

import time

import attrs

__all__ = ["Phases"]


@attrs.define
class Phases:
    """Laps of one request, in the order first seen: ``{name: [wall s, cpu s]}``."""

    rows: dict[str, list[float]] = attrs.Factory(dict)
    _wall: float = attrs.field(factory=time.perf_counter, init=False)
    _cpu: float = attrs.field(factory=time.process_time, init=False)

    def lap(self, name: str) -> None:
        """Close the current phase as ``name``; the next one starts now."""
        wall, cpu = time.perf_counter(), time.process_time()
        self.add(name, wall - self._wall, cpu - self._cpu)
        self._wall, self._cpu = wall, cpu

    def add(self, name: str, wall: float, cpu: float = 0.0) -> None:
        row = self.rows.setdefault(name, [0.0, 0.0])
        row[0] += wall
        row[1] += cpu

    @property
    def total(self) -> tuple[float, float]:
        return (sum(r[0] for r in self.rows.values()), sum(r[1] for r in self.rows.values()))

    def render(self) -> str:
        """``name wall/cpu`` per phase in ms, then the total: ``walk 120/118 ms, …``."""
        parts = [f"{n} {w * 1e3:.0f}/{c * 1e3:.0f}" for n, (w, c) in self.rows.items()]
        w, c = self.total
        return ", ".join(parts) + f" (ms wall/cpu; total {w * 1e3:.0f}/{c * 1e3:.0f})"
