"""Serving a listening port safely: the pre-authentication budget, the accept loop, and
refusal logs that a flood cannot turn into a flood of log lines.  Both daemons use these.

Invariants:
- at most ``max_pending`` handshakes (TLS + protocol) are pending at once, each under a short
  deadline.  A new connection beyond that evicts the oldest pending handshake of the address
  holding the most — except from that very address while it is flooding (more than
  ``FLOOD_FACTOR`` × the budget new connections within a second): those are closed at once,
  in the accept loop (no task, no TLS), so the kernel's accept queue drains at the speed of
  ``accept`` + ``close`` and a real peer's connection does not wait behind thousands of
  them.  So neither silent nor reconnecting sockets from a few hosts can lock a real peer on
  another host out, and a peer on the same host as a few silent sockets still gets in;
- running out of file descriptors (``EMFILE``/``ENFILE``, or kernel memory) on accept is not a
  bug: the loop sheds the oldest pending handshake, backs off briefly and logs one warning per
  ``LOG_EVERY_S`` (never a traceback);
- a refused connection is logged at most once per peer address and reason per
  ``LOG_EVERY_S``; what was held back is summed up once per period ("suppressed K …"); the
  table of addresses is bounded.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable

import trio

from deltabkp.errors import AuthError, DeltabkpError
from deltabkp.net import _tls
from deltabkp.net._address import Address
from deltabkp.net._channel import Channel, accept

__all__ = [
    "FLOOD_FACTOR", "HandshakeGate", "RateLimitedLog", "serve", "HANDSHAKE_TIMEOUT",
    "MAX_PENDING_HANDSHAKES",
]

#: How long a new connection has to finish TLS and prove the cluster key: a real peer needs a
#: few round trips; a silent one holds a handshake slot this long at most.
HANDSHAKE_TIMEOUT = 5.0
MAX_PENDING_HANDSHAKES = 64
#: A host opening more than this many times the budget of new connections in a second is
#: flooding (a real peer opens a handful).
FLOOD_FACTOR = 4
#: Refusals (per peer address) and accept failures are news at most once per this long.
LOG_EVERY_S = 60.0
_MAX_TRACKED = 4096  # peer addresses remembered for rate limiting
_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_BACKOFF_FIRST_S = 0.05
_BACKOFF_CAP_S = 1.0


class RateLimitedLog:
    """Warnings keyed (by peer address): the first of each key per ``every`` seconds is logged,
    the rest counted (and logged at DEBUG); ``summary`` reports the count once per period."""

    def __init__(self, log: logging.Logger, every: float = LOG_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log = log
        self.every = every
        self.clock = clock
        self._next: dict[str, float] = {}
        self.suppressed = 0
        self._suppressed_keys: set[str] = set()

    def __call__(
        self, key: str, fmt: str, *args: object, extra: dict[str, object] | None = None
    ) -> None:
        """``extra``: the record's context fields (``log_context``: peer, node, event)."""
        now = self.clock()
        if now < self._next.get(key, 0.0):
            self.suppressed += 1
            if len(self._suppressed_keys) < _MAX_TRACKED:
                self._suppressed_keys.add(key)
            self.log.debug(fmt, *args, extra=extra)
            return
        if len(self._next) >= _MAX_TRACKED:
            # Forget the expired entries; a table still full of live ones starts afresh
            # (at worst one more line per address).
            self._next = {k: t for k, t in self._next.items() if t > now}
            if len(self._next) >= _MAX_TRACKED:
                self._next.clear()
        self._next[key] = now + self.every
        self.log.warning(fmt, *args, extra=extra)

    def summary(self) -> None:
        """Log what was held back since the last summary, if anything."""
        if self.suppressed:
            self.log.warning(
                "suppressed %d more refused connection(s) from %d address(es) in the last %g s",
                self.suppressed, len(self._suppressed_keys), self.every,
            )
        self.suppressed = 0
        self._suppressed_keys.clear()


def _peer_host(stream: trio.SocketStream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except (OSError, IndexError, TypeError):
        return "?"


def _host(peer: str) -> str:
    try:
        return Address.parse(peer).host
    except DeltabkpError:
        return peer


class HandshakeGate:
    """The pre-authentication side of a listener: a bounded, evicting budget of pending
    handshakes, each under ``timeout``; refusals logged through ``refused``."""

    def __init__(
        self, log: logging.Logger, *, max_pending: int = MAX_PENDING_HANDSHAKES,
        timeout: float = HANDSHAKE_TIMEOUT, log_every: float = LOG_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = log
        self.max_pending = max_pending
        self.timeout = timeout
        self.refused = RateLimitedLog(log, log_every)
        #: Pending handshakes, oldest first (dicts keep insertion order): peer host, scope.
        self._pending: dict[object, tuple[str, trio.CancelScope]] = {}
        self.evicted = 0
        #: Connections closed unserved by the accept loop (see ``sheds``).
        self.shed = 0
        self._clock = clock
        self._arrivals: dict[str, tuple[int, float]] = {}  # host → (new connections, since)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _holders(self) -> collections.Counter[str]:
        return collections.Counter(host for host, _ in self._pending.values())

    def sheds(self, host: str) -> bool:
        """Note a new connection from ``host``; whether it is to be closed unserved: the
        budget is full, ``host`` is flooding and already holds the most of it."""
        now = self._clock()
        n, since = self._arrivals.get(host, (0, now))
        if now - since >= 1.0:
            n, since = 0, now
        if host not in self._arrivals and len(self._arrivals) >= _MAX_TRACKED:
            self._arrivals.clear()
        self._arrivals[host] = (n + 1, since)
        if len(self._pending) < self.max_pending or n + 1 <= FLOOD_FACTOR * self.max_pending:
            return False
        held = self._holders()
        return held[host] >= max(held.values())

    def evict_oldest(self) -> bool:
        """Drop the oldest pending handshake of the host holding the most (its socket is
        closed); False if none is pending."""
        if not self._pending:
            return False
        held = self._holders()
        greedy = max(held, key=held.__getitem__)  # the first such host in age order on ties
        victim = next(t for t, (host, _) in self._pending.items() if host == greedy)
        self._pending.pop(victim)[1].cancel()
        self.evicted += 1
        return True

    async def admit(
        self, stream: trio.SocketStream, *, key: bytes, role: str, roles: tuple[str, ...],
        info: dict[str, object] | None = None, tls: _tls.TlsSettings | None = None,
    ) -> Channel | None:
        """The authenticated channel, or None (refused, timed out or evicted; logged)."""
        if len(self._pending) >= self.max_pending:
            self.evict_oldest()
            self.refused("budget", "more than %d handshakes pending: dropped the oldest",
                         self.max_pending)
        token = object()
        scope = trio.CancelScope()
        self._pending[token] = (_peer_host(stream), scope)
        try:
            with scope:
                return await accept(
                    stream, key=key, role=role, roles=roles, timeout=self.timeout, info=info,
                    tls=tls,
                )
        except DeltabkpError as exc:
            peer = exc.peer or "peer"
            # Keyed by address *and* reason: a flood is one line a minute, while a wrong key
            # still shows beside the idle sockets of the same address.
            if isinstance(exc, AuthError):  # a member of another cluster, or a stale key file
                self.refused(f"{_host(peer)} {exc.reason}",
                             "refused connection from %s: authentication failed: %s", peer,
                             exc.reason if exc.peer else exc,
                             extra={"peer": peer, "event": "auth-failed"})
            else:
                self.refused(f"{_host(peer)} {exc.reason}", "refused connection from %s: %s",
                             peer, exc.reason if exc.peer else exc,
                             extra={"peer": peer, "event": "handshake-refused"})
            return None
        finally:
            self._pending.pop(token, None)
        return None  # evicted: the cancel scope swallowed the cancellation


def _is_capacity_error(exc: OSError) -> bool:
    return exc.errno in _CAPACITY_ERRNOS


async def _accept_loop(
    listener: trio.SocketListener, nursery: trio.Nursery,
    handler: Callable[[trio.SocketStream], Awaitable[object]], gate: HandshakeGate,
    warn: RateLimitedLog,
) -> None:
    backoff = _BACKOFF_FIRST_S
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if not _is_capacity_error(exc):
                    raise
                # Out of descriptors: free one (the oldest pending handshake, likely a silent
                # socket), then let the handlers run before the next try.
                gate.evict_oldest()
                warn("accept", "cannot accept connections: %s (%s); backing off, dropping the "
                     "oldest of %d pending handshakes", errno.errorcode.get(exc.errno or 0, "?"),
                     os.strerror(exc.errno or 0), gate.pending)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_CAP_S)
                continue
            backoff = _BACKOFF_FIRST_S
            host = _peer_host(stream)
            if gate.sheds(host):
                gate.shed += 1
                stream.socket.close()
                gate.refused(f"{host} budget", "more than %d handshakes pending, most of them "
                             "from %s: closing its new connections", gate.max_pending, host)
                continue
            nursery.start_soon(handler, stream)


async def _summaries(gate: HandshakeGate, warn: RateLimitedLog) -> None:
    while True:
        await trio.sleep(gate.refused.every)
        gate.refused.summary()
        warn.suppressed = 0  # the accept warning is its own summary ("… N in all")


async def serve(
    handler: Callable[[trio.SocketStream], Awaitable[object]],
    listeners: list[trio.SocketListener],
    gate: HandshakeGate,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``trio.serve_listeners`` with capacity errors handled (see the module's invariants)
    and the gate's refusal summaries; ``handler`` owns each accepted stream."""
    warn = RateLimitedLog(gate.log, gate.refused.every)
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept_loop, listener, nursery, handler, gate, warn)
        nursery.start_soon(_summaries, gate, warn)
        task_status.started()

