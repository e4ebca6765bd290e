"""Bandwidth caps: the one parser of a rate (``1M``, ``500K``) and the one token bucket.

Job: ``parse_rate`` turns what an operator types (``--bwlimit 1M``) into bytes per second;
``TokenBucket`` paces the bytes a ``Channel`` sends (``Channel.limits``) so that, over any
stretch of time, no more than ``rate × t + burst`` bytes leave through it.
Invariants:
- Trio-native: a sender waits with one ``trio.sleep`` on ``trio.current_time()`` (so a
  ``MockClock`` drives it in tests), never in a busy loop;
- a take is deducted *before* the wait, so concurrent senders on one bucket queue up behind
  each other's debt instead of all seeing the same tokens (no lock needed);
- what really crossed the wire beyond the estimate (TLS records, frame headers) is charged
  afterwards with ``charge``, so the long-run rate is the rate on the wire;
- the wait happens outside the channel's send deadline: a slow cap is not a dead peer.
"""

from __future__ import annotations

import math
import re

import trio

from deltabkp.errors import UsageError

__all__ = ["BURST_S", "MAX_RATE", "MIN_RATE", "TokenBucket", "parse_rate"]

#: Tokens a bucket may save up while idle, in seconds of its rate: a short burst after a pause
#: is harmless, a long one would break the cap the operator asked for.
BURST_S = 0.25
#: The lowest cap accepted (bytes/s): below this a single 256 KiB chunk takes minutes.
MIN_RATE = 1024
#: The highest (1 TiB/s): anything above is no cap at all, and must fit every catalog's BIGINT.
MAX_RATE = 1 << 40
#: rsync's convention: K/M/G are binary (KiB/MiB/GiB); KB/MB/GB decimal; a bare number is
#: bytes per second.
_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*?)\s*(?:/s)?\s*$", re.IGNORECASE)


def parse_rate(text: str, what: str = "--bwlimit") -> int:
    """``"1M"`` → 1048576 bytes per second (``K``/``M``/``G`` binary, ``KB``/``MB``/``GB``
    decimal, a bare number in bytes, an optional ``/s``).  ``UsageError`` naming ``what`` for
    anything else, or for less than 1 KiB/s."""
    m = _RATE.match(text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise UsageError(
            f"{what} {text!r}: give bytes per second, e.g. '1M' (MiB/s), '500K' (KiB/s), "
            "'2MB' (10^6 bytes/s) or '65536'"
        )
    rate = math.floor(float(m.group(1)) * _UNITS[unit])
    if rate < MIN_RATE:
        raise UsageError(f"{what} {text!r}: at least {MIN_RATE} bytes per second (1K)")
    if rate > MAX_RATE:
        raise UsageError(f"{what} {text!r}: at most {MAX_RATE} bytes per second (1024G)")
    return rate


class TokenBucket:
    """``rate`` bytes per second, at most ``burst`` saved up (default ``BURST_S`` of rate).

    The bucket starts full.  ``take(n)`` deducts ``n`` and waits until the balance is back
    to zero (a debt is repaid at ``rate``); ``charge(n)`` deducts without waiting (bytes
    that already went out).
    """

    def __init__(self, rate: int, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("a token bucket needs a positive rate")
        self.rate = rate
        self.burst = float(burst) if burst is not None else max(rate * BURST_S, 1.0)
        self._tokens = self.burst
        self._last: float | None = None  # set at first use: buckets are built before trio.run
        #: Bytes taken or charged in all (what went through this bucket).
        self.total = 0

    def _refill(self) -> None:
        now = trio.current_time()
        if self._last is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now

    def charge(self, n: int) -> None:
        """Count ``n`` bytes that were sent anyway; a later ``take`` repays them."""
        if n <= 0:
            return
        self._refill()
        self._tokens -= n
        self.total += n

    async def take(self, n: int) -> None:
        """Account for ``n`` bytes about to be sent; return once the cap allows them."""
        self.charge(n)
        if self._tokens < 0:
            await trio.sleep(-self._tokens / self.rate)
        else:
            await trio.lowlevel.checkpoint()
