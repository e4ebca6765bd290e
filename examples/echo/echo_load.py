"""A small load generator for the echo app: keeps its files changing while backups run.

Job: send lines to one or more echo apps at a steady rate and check each echo. Every line is
``<client> <seq> <random words>``, so what lands in the app's files (and then in the backups)
can be traced back to the message that caused it.

Invariants: the run is bounded in count and in time (``--count``, ``--duration``; it always
stops by itself); an app that is down or restarting is retried with capped backoff and counted,
never fatal; an echo that differs from what was sent is fatal (exit 1) — that would be a bug in
the app. Prints one summary line on stdout at the end; with ``--count 1`` it doubles as a health
check (exit 0 only if the echo came back).

    python examples/echo/echo_load.py 127.0.0.1:7000 --rate 5 --duration 60
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
from collections.abc import Sequence

import trio

from deltabkp.errors import UsageError
from deltabkp.net import Address

WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
         "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo")


class Mismatch(Exception):
    """A fatal outcome: the app echoed something else, or a counted run found no app."""


class Stats:
    def __init__(self) -> None:
        self.sent = 0
        self.echoed = 0
        self.failed_connects = 0
        #: Set when the run must end in failure (wrong echo, or a --count run that cannot connect).
        self.error: str | None = None


async def _read_line(stream: trio.SocketStream, buf: bytearray, limit: int) -> bytes:
    while (nl := buf.find(b"\n")) < 0:
        if len(buf) > limit:
            raise Mismatch("echo longer than anything sent")
        data = await stream.receive_some(65536)
        if not data:
            raise trio.BrokenResourceError("connection closed by the app")
        buf += data
    line = bytes(buf[:nl])
    del buf[: nl + 1]
    return line


async def drive(target: str, args: argparse.Namespace, stats: Stats, budget: list[int]) -> None:
    """Send to one app until the shared message budget is spent (or the run is cancelled)."""
    addr = Address.parse(target)
    rnd = random.Random(f"{args.client}-{target}")
    backoff = 0.2
    seq = 0
    while budget[0] > 0:
        try:
            with trio.fail_after(args.timeout):
                stream = await trio.open_tcp_stream(addr.host, addr.port)
        except (OSError, trio.TooSlowError) as exc:
            stats.failed_connects += 1
            if not args.quiet:
                print(f"echo-load: {target}: {exc}; retrying in {backoff:.1f}s", file=sys.stderr)
            if args.count and stats.sent == 0 and stats.failed_connects >= args.connect_tries:
                raise Mismatch(f"cannot reach {target}: {exc}") from None
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
            continue
        backoff = 0.2
        buf = bytearray()
        try:
            async with stream:
                while budget[0] > 0:
                    budget[0] -= 1
                    seq += 1
                    words = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(3, args.words)))
                    line = f"{args.client} {seq} {words}".encode()
                    with trio.fail_after(args.timeout):
                        await stream.send_all(line + b"\n")
                        stats.sent += 1
                        echoed = await _read_line(stream, buf, len(line) + 1)
                    if echoed != line:
                        raise Mismatch(f"{target} echoed {echoed!r} for {line!r}")
                    stats.echoed += 1
                    await trio.sleep(1.0 / args.rate if args.rate > 0 else 0)
        except (trio.BrokenResourceError, trio.TooSlowError, OSError) as exc:
            if not args.quiet:
                print(f"echo-load: {target}: {exc!r}; reconnecting", file=sys.stderr)
            await trio.sleep(backoff)


async def drive_or_stop(
    target: str, args: argparse.Namespace, stats: Stats, budget: list[int], scope: trio.CancelScope
) -> None:
    # A fatal error ends the whole run (all targets) with the error recorded, not raised, so
    # that main() sees one plain outcome instead of an exception group.
    try:
        await drive(target, args, stats, budget)
    except Mismatch as exc:
        stats.error = str(exc)
        scope.cancel()


async def run(args: argparse.Namespace) -> Stats:
    stats = Stats()
    # One shared budget: --count N means N messages in total, spread over the targets.
    budget = [args.count if args.count else sys.maxsize]
    with trio.move_on_after(args.duration):
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                async def stop_on_signal() -> None:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(stop_on_signal)
                async with trio.open_nursery() as senders:
                    for target in args.targets:
                        senders.start_soon(
                            drive_or_stop, target, args, stats, budget, nursery.cancel_scope
                        )
                nursery.cancel_scope.cancel()
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="echo-load", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("targets", nargs="+", metavar="HOST:PORT", help="echo apps to load")
    ap.add_argument("--rate", type=float, default=5.0,
                    help="messages per second per target (default %(default)s; 0 = as fast as echoed)")
    ap.add_argument("--count", type=int, default=0,
                    help="stop after this many messages in total (default: no count limit)")
    ap.add_argument("--duration", type=float, default=3600.0,
                    help="stop after this many seconds (default %(default)s)")
    ap.add_argument("--client", default="load", help="name at the start of every line")
    ap.add_argument("--words", type=int, default=12, help="most random words per line")
    ap.add_argument("--timeout", type=float, default=10.0,
                    help="longest wait for a connect or an echo, seconds (default %(default)s)")
    ap.add_argument("--connect-tries", type=int, default=3,
                    help="with --count: give up after this many failed connects (default %(default)s)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no retry messages on stderr")
    args = ap.parse_args(argv)
    if args.duration <= 0 or args.count < 0 or args.words < 3 or args.timeout <= 0:
        ap.error("--duration and --timeout must be positive, --count >= 0, --words >= 3")
    for t in args.targets:
        try:
            Address.parse(t)
        except UsageError as exc:
            ap.error(f"bad target: {exc}")
    try:
        stats = trio.run(run, args)
    except KeyboardInterrupt:
        return 130
    if stats.error:
        print(f"echo-load: {stats.error}", file=sys.stderr)
        return 1
    print(f"echo-load: sent {stats.sent}, echoed {stats.echoed}, "
          f"failed connects {stats.failed_connects}", flush=True)
    if args.count and stats.echoed < min(args.count, 1):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
