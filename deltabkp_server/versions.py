"""Version storage: reverse deltas, rebuilding any retained version, verifying them.

Job: keep each target's newest archive whole (with its signature: the next backup's base) and
every older retained version as a reverse delta — an engine delta (``DBKD``, the format of
``deltabkp.engine``) that rebuilds it from its successor, the next newer usable version —
so ten versions cost little more than one; rebuild any version byte-identically; check stored
versions against the catalog's blake3.
Invariants:
- a conversion goes: delta object committed in the store → catalog row flipped to
  ``delta`` (``Catalog.set_delta``) → whole copy deleted.  The catalog says which form is
  real, so a kill -9 between any two steps leaves the version restorable from the form the
  catalog names and the other as garbage that ``Store.reconcile(committed, deltas)`` removes;
- a delta is recorded only once proved: the encoder's blake3 of the version's bytes equals
  the catalog's, and patching the base with the delta (``Patcher``, which checks END's
  blake3) reproduces them; a whole copy that does not match is marked corrupt instead;
- successor chaining: a version's base is always newer, so retention (which retires the
  oldest) only ever drops a leaf and never rewrites a delta; a new version costs one delta;
- intermediates of a rebuild are spooled to the store's temp files (a patch needs random
  access to its base), at most two at once, removed whatever happens; the served buffer's
  blake3 is checked against the catalog before a byte of it is used;
- every function here blocks (store, engine, hashing): the async wrappers run them in worker
  threads behind the server's files limiter; catalog calls go through ``AsyncCatalog``;
- ``StoreUnavailable`` (the store cannot be reached) never marks anything corrupt;
- a whole version's signature is read through ``store.signature`` (made from the archive if
  a crash left it unmade, or if it is damaged): a signature is derived data, never a reason
  to call a version corrupt.
Longer than ~450 lines on purpose: converting, rebuilding and verifying share the walk down a
chain of bases, the spools and the proofs; split, one invariant would live in three places.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import attrs
import blake3
import trio

import deltabkp
from deltabkp.errors import DeltabkpError, IntegrityError, StoreUnavailable
from deltabkp_server._crash import crash_point
from deltabkp_server.catalog import AsyncCatalog
from deltabkp_server.model import ArchiveRecord, Target
from deltabkp_server.store import Store, signature
from deltabkp_server.store._cache import BaseCache

__all__ = [
    "Check", "Corrupt", "settle", "opened", "verify_target", "verify_versions", "open_version",
    "make_delta", "plan_conversions",
]

log = logging.getLogger("deltabkp_server")

CHUNK = 1 << 20


class Corrupt(IntegrityError):
    """A stored version does not rebuild to the bytes the catalog's blake3 names."""


@attrs.frozen
class Check:
    """The verdict on one retained version: ``reason`` None when it rebuilt to its hash."""

    seq: int
    form: str
    size: int
    reason: str | None

    @property
    def ok(self) -> bool:
        return self.reason is None

    def to_wire(self) -> dict[str, Any]:
        return {"seq": self.seq, "storage": self.form, "size": self.size,
                "ok": self.ok, "error": self.reason}


# -- rebuilding ---------------------------------------------------------------------------------


def _by_seq(rows: Sequence[ArchiveRecord]) -> dict[int, ArchiveRecord]:
    return {r.seq: r for r in rows}


def _chain(rows: dict[int, ArchiveRecord], rec: ArchiveRecord) -> list[ArchiveRecord]:
    """``rec``, its base, its base's base… down to a whole version (``Corrupt`` if broken)."""
    chain = [rec]
    while chain[-1].form == "delta":
        cur = chain[-1]
        base = rows.get(cur.base_seq) if cur.base_seq is not None else None
        if base is None or not base.retained or base.missing:
            raise Corrupt(f"version {rec.seq}: its base version {cur.base_seq} is gone")
        if base.corrupt is not None:
            raise Corrupt(f"version {rec.seq}: its base version {base.seq} is corrupt")
        if len(chain) > len(rows):  # a cycle would be a catalog bug: never loop for ever
            raise Corrupt(f"version {rec.seq}: its chain of bases loops")
        chain.append(base)
    return chain


class _Spool:
    """A rebuilt version in a temp file of the store, mapped read-only once written.

    Its own failures (disk full) are ``StoreUnavailable``: they say nothing about the
    version, so they never mark one corrupt."""

    def __init__(self, store: Store) -> None:
        self.path, self.file = store.scratch()
        self._map: contextlib.ExitStack | None = None
        self.buf: memoryview | bytes = b""

    def write(self, data: bytes | memoryview) -> None:
        try:
            self.file.write(data)
        except OSError as exc:
            raise StoreUnavailable(f"cannot write the temp file {self.path}: "
                                   f"{exc.strerror}") from None

    def seal(self) -> memoryview | bytes:
        stack = contextlib.ExitStack()
        try:
            self.file.flush()
            f = open(self.path, "rb")  # noqa: SIM115 - closed by the stack
            self.buf = stack.enter_context(BaseCache.mapped(f))
        except OSError as exc:
            stack.close()
            raise StoreUnavailable(f"cannot map the temp file {self.path}: "
                                   f"{exc.strerror}") from None
        self._map = stack
        return self.buf

    def close(self) -> None:
        self.buf = b""
        if self._map is not None:
            self._map.close()
        with contextlib.suppress(OSError):
            self.file.close()
        self.path.unlink(missing_ok=True)


def _patch(
    store: Store, tid: int, rec: ArchiveRecord, base_buf: memoryview | bytes,
    base: ArchiveRecord, out: Callable[[bytes | memoryview], object] | None,
) -> None:
    """Patch ``base_buf`` (version ``base``) with ``rec``'s stored delta; every output piece
    to ``out`` (None: only checked).  ``Corrupt`` unless it rebuilds ``rec`` exactly."""
    patcher = deltabkp.Patcher(base_buf, base_hash=base.hash, max_size=rec.size)
    try:
        for chunk in store.read_delta_chunks(tid, rec.seq, CHUNK):
            for piece in patcher.feed(chunk):
                if out is not None:
                    out(piece)
        patcher.finish()
    except StoreUnavailable:
        raise
    except DeltabkpError as exc:
        raise Corrupt(f"version {rec.seq}: its reverse delta does not rebuild it ({exc})") from None
    if patcher.new_hash != rec.hash or patcher.new_size != rec.size:
        raise Corrupt(f"version {rec.seq}: its reverse delta rebuilds {patcher.new_size} bytes "
                      f"with another blake3 than the catalog's")


def _check_whole(rec: ArchiveRecord, buf: memoryview | bytes) -> None:
    if len(buf) != rec.size:
        raise Corrupt(f"version {rec.seq}: the archive has {len(buf)} bytes, the catalog "
                      f"says {rec.size}")
    if blake3.blake3(buf, max_threads=blake3.blake3.AUTO).digest() != rec.hash:
        raise Corrupt(f"version {rec.seq}: the archive's blake3 differs from the catalog's")


@contextlib.contextmanager
def open_version(
    store: Store, tid: int, rows: Sequence[ArchiveRecord], rec: ArchiveRecord
) -> Iterator[memoryview | bytes]:
    """Version ``rec`` as a read-only buffer whose size and blake3 match the catalog.

    A whole version is the store's copy (an mmap); a delta is rebuilt down its chain,
    each step spooled to a temp file (removed on exit).  ``Corrupt`` if it does not rebuild.
    """
    chain = _chain(_by_seq(rows), rec)
    top = chain[-1]
    with contextlib.ExitStack() as stack:
        try:
            buf = stack.enter_context(store.base(tid, top.seq, size=top.size, digest=top.hash))
        except StoreUnavailable:
            raise
        except DeltabkpError as exc:
            raise Corrupt(f"version {top.seq}: {exc}") from None
        if len(chain) == 1:
            _check_whole(rec, buf)
            yield buf
            return
        base, prev = top, None
        try:
            for cur in reversed(chain[:-1]):
                spool = _Spool(store)
                try:
                    _patch(store, tid, cur, buf, base, spool.write)
                    buf = spool.seal()
                except BaseException:
                    spool.close()
                    raise
                if prev is not None:
                    prev.close()  # two spools at most: the base and the one just built
                prev, base = spool, cur
            # _patch checked every step's blake3; a last check of the buffer served costs
            # one hash and guards against anything between the spool and the mmap.
            _check_whole(rec, buf)
            yield buf
        finally:
            del buf
            if prev is not None:
                prev.close()


# -- converting a whole version into a reverse delta -----------------------------------------


def plan_conversions(rows: Sequence[ArchiveRecord]) -> list[tuple[ArchiveRecord, ArchiveRecord]]:
    """(version, base) pairs to convert, oldest first: every whole, usable version but the
    newest usable one, against the next newer usable version.  Oldest first keeps each base
    whole while its predecessor is converted (one stored signature, no rebuild)."""
    usable = sorted((r for r in rows if r.usable), key=lambda r: r.seq)
    return [(r, usable[i + 1]) for i, r in enumerate(usable[:-1]) if r.form == "whole"]


def make_delta(
    store: Store, tid: int, rows: Sequence[ArchiveRecord], rec: ArchiveRecord,
    base: ArchiveRecord,
) -> int:
    """Write and commit ``rec``'s reverse delta against ``base``, proved; its size in bytes.

    ``Corrupt`` if ``rec``'s whole copy does not match the catalog (nothing is written).
    """
    with contextlib.ExitStack() as stack:
        base_buf = stack.enter_context(open_version(store, tid, rows, base))
        sig: bytes | deltabkp.Signature
        if base.form == "whole":
            # The one stored beside it (made from these checked bytes if it is not there).
            sig = signature(store, tid, base.seq, size=base.size, digest=base.hash,
                            buf=base_buf)
        else:
            builder = deltabkp.SignatureBuilder(base_size=base.size)
            builder.feed(base_buf)
            sig = builder.finish_signature()
        encoder = deltabkp.DeltaEncoder(sig)
        writer = store.begin_delta(tid, rec.seq)
        try:
            for chunk in store.read_chunks(tid, rec.seq, CHUNK):
                writer.write(encoder.feed(chunk))
            writer.write(encoder.finish())
            if encoder.new_hash != rec.hash or encoder.new_size != rec.size:
                raise Corrupt(f"version {rec.seq}: the archive's blake3 differs from the "
                              f"catalog's ({encoder.new_size} bytes read, {rec.size} expected)")
            # Proof before trust: the delta must rebuild exactly these bytes from the base.
            patcher = deltabkp.Patcher(base_buf, base_hash=base.hash, max_size=rec.size)
            for chunk in writer.read_back(CHUNK):
                patcher.feed(chunk)
            patcher.finish()
            crash_point("delta-written")
            writer.commit()
            crash_point("delta-committed")
        except BaseException:
            writer.abort()
            raise
        return writer.size


async def _thread(limiter: trio.CapacityLimiter, fn: Callable[..., Any], *args: Any) -> Any:
    return await trio.to_thread.run_sync(fn, *args, limiter=limiter)


async def settle(
    catalog: AsyncCatalog, store: Store, target: Target, *, limiter: trio.CapacityLimiter,
    clock: Callable[[], float] = time.time,
) -> int:
    """Convert every whole version of ``target`` but the newest into a reverse delta (the
    caller holds the target's lease); returns how many.  A failure is logged and leaves the
    version whole (the next settle retries); a whole copy found corrupt is marked so."""
    tid = target.id
    rows = await catalog.call(lambda c: c.archives(tid))
    done = 0
    for rec, base in plan_conversions(rows):
        try:
            size = await _thread(limiter, make_delta, store, tid, rows, rec, base)
        except Corrupt as exc:
            reason = exc.reason
            now = clock()
            await catalog.call(lambda c: c.record_verify(tid, [(rec.seq, reason)], now))
            log.error("%s: version %d is corrupt: %s", target.name, rec.seq, reason)
            rows = await catalog.call(lambda c: c.archives(tid))
            continue
        except (DeltabkpError, OSError) as exc:
            log.warning("%s: version %d stays whole for now: %s", target.name, rec.seq, exc)
            continue
        now = clock()
        seq, bseq = rec.seq, base.seq
        if await catalog.call(lambda c: c.set_delta(tid, seq, bseq, size, now)):
            crash_point("recorded")
            # The catalog now names the delta: the whole copy is garbage from here on (a
            # crash before this delete leaves it to reconcile).
            with contextlib.suppress(DeltabkpError):
                await _thread(limiter, store.delete_whole, tid, seq)
            crash_point("whole-deleted")
            done += 1
        rows = await catalog.call(lambda c: c.archives(tid))
    if done:
        log.info("%s: %d version(s) now stored as reverse deltas", target.name, done)
    return done


# -- serving ------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def opened(
    store: Store, tid: int, rows: Sequence[ArchiveRecord], rec: ArchiveRecord, *,
    limiter: trio.CapacityLimiter,
) -> AsyncIterator[memoryview | bytes]:
    """``open_version`` from Trio: entered and left in worker threads (left shielded)."""
    stack = contextlib.ExitStack()
    try:
        buf: memoryview | bytes = await _thread(
            limiter, stack.enter_context, open_version(store, tid, rows, rec)
        )
        yield buf
    finally:
        buf = b""
        with trio.CancelScope(shield=True):
            await _thread(limiter, stack.close)


# -- verifying ----------------------------------------------------------------------------------


def verify_versions(
    store: Store, tid: int, rows: Sequence[ArchiveRecord],
    pace: Callable[[int], None] | None = None,
) -> list[Check]:
    """Check every retained version of one target, newest first: a whole one is re-read
    from the store (never from a cache) and hashed, its signature checked against it (made
    again if missing or damaged: ``store.signature``); a delta
    is patched onto its base's checked bytes.  ``pace(n)`` is called after each ``n`` bytes
    read (a throttle).  ``StoreUnavailable`` aborts (nothing is judged)."""
    by_seq = _by_seq(rows)
    retained = sorted((r for r in rows if r.retained), key=lambda r: -r.seq)
    wanted: dict[int, int] = {}  # seq → retained deltas still to check that patch onto it
    for r in retained:
        if r.form == "delta" and r.base_seq is not None:
            wanted[r.base_seq] = wanted.get(r.base_seq, 0) + 1
    spools: dict[int, _Spool] = {}
    out: list[Check] = []
    try:
        for rec in retained:
            keep = wanted.get(rec.seq, 0) > 0
            spool = _Spool(store) if keep else None
            reason: str | None = None
            try:
                if rec.missing:
                    raise Corrupt(f"version {rec.seq}: missing from the store")
                if rec.form == "whole":
                    _verify_whole(store, tid, rec, spool, pace)
                else:
                    base = by_seq.get(rec.base_seq) if rec.base_seq is not None else None
                    bspool = spools.get(rec.base_seq) if rec.base_seq is not None else None
                    if base is None or bspool is None:
                        why = next((c.reason for c in out if c.seq == rec.base_seq), None)
                        raise Corrupt(f"version {rec.seq}: its base version {rec.base_seq} "
                                      f"is {'corrupt' if why else 'gone'}")
                    _patch(store, tid, rec, bspool.buf, base, spool.write if spool else None)
                    if pace is not None:
                        pace(rec.size)
                if spool is not None:
                    spool.seal()
                    spools[rec.seq] = spool
            except StoreUnavailable:
                if spool is not None:
                    spool.close()
                raise
            except DeltabkpError as exc:
                if spool is not None:
                    spool.close()
                reason = exc.reason if isinstance(exc, Corrupt) else f"version {rec.seq}: {exc}"
            out.append(Check(rec.seq, rec.form, rec.size, reason))
            if rec.form == "delta" and rec.base_seq is not None:
                wanted[rec.base_seq] -= 1
                if wanted[rec.base_seq] <= 0 and rec.base_seq in spools:
                    spools.pop(rec.base_seq).close()
    finally:
        for s in spools.values():
            s.close()
    return out


def _verify_whole(
    store: Store, tid: int, rec: ArchiveRecord, spool: _Spool | None,
    pace: Callable[[int], None] | None,
) -> None:
    hasher = blake3.blake3()
    size = 0
    try:
        for chunk in store.read_chunks(tid, rec.seq, CHUNK):
            hasher.update(chunk)
            size += len(chunk)
            if spool is not None:
                spool.write(chunk)
            if pace is not None:
                pace(len(chunk))
    except StoreUnavailable:
        raise
    except DeltabkpError as exc:
        raise Corrupt(f"version {rec.seq}: {exc}") from None
    if size != rec.size or hasher.digest() != rec.hash:
        raise Corrupt(f"version {rec.seq}: the archive ({size} bytes) does not match the "
                      f"catalog's blake3 ({rec.size} bytes)")
    try:
        # Checked against the archive, and made again (stored) when missing or damaged.
        signature(store, tid, rec.seq, size=rec.size, digest=rec.hash)
    except StoreUnavailable:
        raise
    except DeltabkpError as exc:
        raise Corrupt(f"version {rec.seq}: {exc}") from None


async def verify_target(
    catalog: AsyncCatalog, store: Store, target: Target, *, limiter: trio.CapacityLimiter,
    clock: Callable[[], float] = time.time, rate: float | None = None,
    settle_first: bool = True,
) -> list[Check]:
    """Verify ``target``'s retained versions and record the verdicts in the catalog (the
    caller holds its lease).  Versions a crash left whole are converted first.  ``rate``
    (bytes/s) throttles the reading: the worker thread sleeps between chunks."""
    if settle_first:
        await settle(catalog, store, target, limiter=limiter, clock=clock)
    tid = target.id
    rows = await catalog.call(lambda c: c.archives(tid))
    pace = _Pace(rate) if rate else None
    checks: list[Check] = await _thread(limiter, verify_versions, store, tid, rows, pace)
    now = clock()
    verdicts = [(c.seq, c.reason) for c in checks]
    await catalog.call(lambda c: c.record_verify(tid, verdicts, now))
    return checks


class _Pace:
    """A bytes/s budget for a worker thread: sleeps so that reading never runs ahead of it."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.start = time.monotonic()
        self.done = 0

    def __call__(self, n: int) -> None:
        self.done += n
        ahead = self.done / self.rate - (time.monotonic() - self.start)
        if ahead > 0:
            time.sleep(min(ahead, 5.0))

