"""Progress on a terminal: bytes, rate and ETA for ``ctl restore``, ``fetch`` and
``backup-now --wait``, drawn with ``tqdm`` on stderr.

Job: ``Progress`` (a bar, or nothing) and ``watch_backup``, which polls the server's
``progress`` op while ``backup-now --wait`` waits.
Invariants:
- a bar is drawn only when stderr is a terminal and ``--json`` is off; otherwise nothing is
  printed and ``tqdm`` is not even imported (scripts and pipes see exactly the output they
  saw before);
- the bar is on stderr, so stdout keeps only the answer (``fetch -`` writes the archive there);
- a bar is always closed (its line finished) before the answer is printed;
- a server that does not know ``progress`` (older) or fails to answer it only means no bar:
  the wait itself is never disturbed.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, TextIO

from deltabkp import protocol
from deltabkp.ctl._client import Client
from deltabkp.errors import DeltabkpError

__all__ = ["POLL_S", "Progress", "ask_with_progress", "wanted", "watch_backup"]

#: How often ``backup-now --wait`` asks the server how far the execution got.
POLL_S = 0.5


def wanted(as_json: bool, stream: TextIO | None = None) -> bool:
    """Draw progress? Only for a person: on a terminal, and not with ``--json``."""
    out = stream if stream is not None else sys.stderr
    try:
        return not as_json and out.isatty()
    except (AttributeError, ValueError):  # closed or not a real file
        return False


class Progress:
    """A byte counter drawn on ``stream`` when ``enabled``; a no-op otherwise.

    ``total`` (bytes) may come later (``set_total``): without it the bar shows the bytes so
    far and the rate, with it also the share done and the ETA.
    """

    def __init__(self, desc: str, *, enabled: bool, total: int | None = None,
                 stream: TextIO | None = None) -> None:
        self._bar: Any = None
        if enabled:
            from tqdm import tqdm  # only for a terminal: pipes never pay for the import

            self._bar = tqdm(
                desc=desc, total=total, unit="B", unit_scale=True, unit_divisor=1024,
                file=stream if stream is not None else sys.stderr, leave=True,
                dynamic_ncols=True, mininterval=0.2,
            )

    @property
    def enabled(self) -> bool:
        return self._bar is not None

    def set_total(self, total: int | None) -> None:
        if self._bar is not None and total is not None and total != self._bar.total:
            self._bar.total = total
            self._bar.refresh()

    def update(self, n: int) -> None:
        """``n`` more bytes."""
        if self._bar is not None and n:
            self._bar.update(n)

    def update_to(self, done: int) -> None:
        """``done`` bytes in all (a counter read from the server)."""
        if self._bar is not None and done > self._bar.n:
            self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def watch_backup(client: Client, args: Mapping[str, Any], bar: Progress) -> None:
    """Until cancelled: ask the server (one connection) how many bytes the target's running
    execution has moved, and show them on ``bar``."""
    import trio

    if not bar.enabled:
        return
    try:
        async with client.session(args) as chan:
            while True:
                await chan.send(protocol.Request("progress", dict(args)))
                answer = await chan.receive_a(protocol.Response, client.timeout)
                data = answer.data if isinstance(answer.data, Mapping) else {}
                if data.get("running"):
                    expected = data.get("expected")
                    if isinstance(expected, int):
                        bar.set_total(expected)
                    done = data.get("transferred")
                    if isinstance(done, int):
                        bar.update_to(done)
                await trio.sleep(POLL_S)
    except DeltabkpError:
        return  # an older server, or a hiccup: the wait goes on without a bar


def ask_with_progress(
    client: Client, op: str, request: Mapping[str, Any], timeout: float | None, *,
    enabled: bool,
) -> Any:
    """``client.request(op, request, timeout)`` (``backup-now --wait``), with a bar of the
    target's running execution drawn meanwhile when ``enabled``; the answer or its error."""
    if not enabled:  # one question, one answer: the blocking edge, no Trio
        return client.ask(op, request, timeout)
    import trio

    async def main() -> Any:
        got: dict[str, Any] = {}
        with Progress("backup", enabled=True) as bar:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_backup, client, request, bar)
                try:
                    got["data"] = await client.request(op, request, timeout)
                except DeltabkpError as exc:  # raised below: not wrapped in a group
                    got["error"] = exc
                nursery.cancel_scope.cancel()
        if "error" in got:
            raise got["error"]
        return got["data"]

    return trio.run(main)
