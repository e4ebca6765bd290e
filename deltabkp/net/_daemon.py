"""Shared life cycle of the two daemons: their common flags, run under Trio, stop cleanly on
SIGTERM/SIGINT, announce the bound address, and turn expected failures into one line and an
exit code.

Invariant: a ``DeltabkpError`` (even wrapped by nurseries in exception groups) ends the
process with one ``NAME: error: …`` line and its ``exit_code``; anything else is a bug and
keeps its full traceback.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Awaitable, Callable

import trio

from deltabkp import __version__
from deltabkp._heap import bound_heap
from deltabkp.errors import DeltabkpError, UsageError
from deltabkp.net import _logfmt, _tls
from deltabkp.net._address import Address
from deltabkp.net._serve import MAX_PENDING_HANDSHAKES

__all__ = [
    "Starter",
    "configure_logging",
    "run_daemon",
    "daemon_main",
    "add_daemon_arguments",
    "at_least_one",
]

KEY_FILE_HELP = (
    "cluster key file (default: $DELTABKP_KEY_FILE, else ~/.config/deltabkp/cluster.key, "
    "created on first use)"
)

Starter = Callable[..., Awaitable[object]]


def configure_logging(name: str, level: int = logging.INFO, fmt: str = "text") -> None:
    """Log the daemon's package (``deltabkp-agent`` → logger ``deltabkp_agent``) to stderr,
    as text lines or JSON objects (``fmt``, ``--log-format``; see ``_logfmt``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_logfmt.formatter(fmt, name))
    root = logging.getLogger(name.replace("-", "_"))
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def add_daemon_arguments(p: argparse.ArgumentParser, *, listen: str, listen_help: str) -> None:
    """The flags every daemon has: ``--version``, ``--listen``, ``--key-file``, the TLS flags,
    ``-q``."""
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--listen", default=listen, metavar="HOST:PORT", help=listen_help)
    p.add_argument("--key-file", metavar="F", default=None, help=KEY_FILE_HELP)
    _tls.add_tls_arguments(p)
    p.add_argument("--max-handshakes", type=int, default=MAX_PENDING_HANDSHAKES, metavar="N",
                   help="connections still in their TLS/key handshake at once; beyond this the "
                   f"oldest is dropped, so idle sockets cannot lock peers out (default "
                   f"{MAX_PENDING_HANDSHAKES})")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    p.add_argument("--log-format", choices=_logfmt.LOG_FORMATS, default="text",
                   help="log lines on stderr as text (default) or as one JSON object per line "
                   "(time, level, logger, message, and node, path, execution, peer, event "
                   "when the record is about one)")


def at_least_one(args: argparse.Namespace, *names: str) -> None:
    """Counts and sizes given on the command line must be positive."""
    for name in names:
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")


def daemon_main(
    name: str,
    args: argparse.Namespace,
    build: Callable[[], tuple[Starter, Callable[[str], None] | None]],
) -> int:
    """Log, ``build`` the daemon from its checked flags (a bad flag is one line and its exit
    code), then ``run_daemon`` it."""
    configure_logging(name, logging.WARNING if args.quiet else logging.INFO,
                      getattr(args, "log_format", "text"))
    log = logging.getLogger(name.replace("-", "_"))
    try:
        at_least_one(args, "max_handshakes")
        tls = _tls.tls_from_args(args)
        if tls.plaintext:  # refused off loopback now, before anything starts
            _tls.check_plaintext_address(Address.parse(args.listen, 0).host, "--listen")
        _tls.install_tls(tls)
        if tls.plaintext:
            log.warning("%s: INSECURE, every byte of every connection travels in clear "
                        "(debugging only; loopback addresses only)", _tls.PLAINTEXT_FLAG)
        start, on_ready = build()
    except DeltabkpError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return exc.exit_code

    def ready(address: str) -> None:
        log.info("connections: %s", tls.mode)  # once up: a failed start stays one line
        if on_ready is not None:
            on_ready(address)

    return run_daemon(name, start, ready)


def _expected(exc: BaseException) -> DeltabkpError | KeyboardInterrupt | None:
    """The error to report for ``exc``, unwrapped from exception groups; None for a bug."""
    if isinstance(exc, (DeltabkpError, KeyboardInterrupt)):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        found = [_expected(e) for e in exc.exceptions]
        if found and all(f is not None for f in found):
            # A real error says more than the interrupt that came with it.
            return next((f for f in found if isinstance(f, DeltabkpError)), found[0])
    return None


async def _watch_signals(
    name: str,
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            # The daemon's package logger: "deltabkp-agent" logs as "deltabkp_agent".
            logging.getLogger(name.replace("-", "_")).info(
                "%s: shutting down", signal.Signals(signum).name
            )
            scope.cancel()
            return


def run_daemon(name: str, start: Starter, on_ready: Callable[[str], None] | None = None) -> int:
    """Run ``start`` (a ``nursery.start``-able task that reports its address) until a signal.

    Prints ``NAME listening on ADDRESS`` once it is ready (tests and scripts wait for it).
    """

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            # Signals first, so a SIGTERM during start-up also ends cleanly.
            await nursery.start(_watch_signals, name, nursery.cancel_scope)
            address = await nursery.start(start)
            print(f"{name} listening on {address}", flush=True)
            if on_ready is not None:
                on_ready(str(address))

    bound_heap()  # before any thread: freed buffers go back to the kernel (_heap.py)
    try:
        trio.run(main)
    except (DeltabkpError, KeyboardInterrupt, BaseExceptionGroup) as exc:
        err = _expected(exc)
        if err is None:
            raise  # a bug: keep the whole traceback
        if isinstance(err, KeyboardInterrupt):
            return 130
        print(f"{name}: error: {err}", file=sys.stderr)
        return err.exit_code
    return 0
