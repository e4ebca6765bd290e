"""Ingest: patch an incoming delta onto the base into a new archive, verify it, commit it.

Job: the sink of ``pull`` and the only writer of new archives (and, after their commit, of
their signatures: ``sign``).
Invariants:
- the part file is opened at the first delta byte (an ``unchanged`` answer writes nothing);
- patching, signature building, hashing and file writes run in worker threads behind the
  server's files limiter, never on the event loop;
- the new archive's rolling signature is no part of the backup's answer: ``sign`` makes it
  from the committed archive after the catalog commit (still under the target's lease, before
  the reverse-delta conversion that reads it); a crash in between leaves a version without
  one, never a fault: start-up signs it in the background (``sign_unsigned``, under the
  target's lease), or its first reader does before that (``store.signature``: the one
  home) — so a missing or damaged signature never marks the base missing nor fails a backup;
- a new archive becomes visible only through ``Catalog.commit_archive``, after the patched
  file matched the delta's END and the agent's ``backup-done`` (size and blake3) and was
  fsynced into place; on any failure or cancellation ``aclose`` leaves no file behind;
- the delta is the rolling one (``engine.Patcher``) or, when the agent took the offer, the
  layout delta (``archive.LayoutPatcher``), told apart by its magic; both end verified the
  same way; the layout patcher gets the base's seek points when the server has them
  (``seeks``: made after the base was committed), else inflates the base from its start;
  with them, the new archive's seek points are carried from the base's (``SeekCache``);
- it laps the execution's timeline (``deltabkp._phases``): open, verify, store-commit,
  catalog-commit (three fsyncs before the answer, each needed: the archive's data before its
  rename, the directory's so the rename survives a crash, the catalog's commit; the
  writeback hints make the first one wait for the tail only);
- a base that cannot be read is marked missing (never offered again) and reported as an
  ``IntegrityError``, which the executor retries as a full transfer.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import trio

import deltabkp
from deltabkp import protocol
from deltabkp._phases import Phases
from deltabkp.archive import LAYOUT_EARLY_VERSION, LAYOUT_MAGIC, LayoutPatcher
from deltabkp.errors import DeltabkpError, IntegrityError, StoreError, StoreUnavailable
from deltabkp_server.catalog import AsyncCatalog
from deltabkp_server.model import (
    ArchiveRecord,
    ExecutionRecord,
    ExecutionResult,
    Target,
)
from deltabkp_server.seeks import SeekCache
from deltabkp_server.store import PartWriter, Store, signature
from deltabkp_server.store import sign as _sign

__all__ = ["UNSIGNED_RETRY_S", "Ingest", "sign", "sign_unsigned"]

log = logging.getLogger("deltabkp_server")

#: Pause before the start-up signer asks again for the lease of a target busy with a backup
#: (a lease query; it ends with that backup, which signs or converts the version itself).
UNSIGNED_RETRY_S = 2.0
#: Worker threads of a layout delta's apply (``LayoutPatcher(threads=...)``; 1: all in the
#: ingest's thread).  For version 1 (made after the agent's build, sent at once) 2 rebuild
#: the RUN records' tar in turn and compress them side by side while the ingest's thread
#: hashes and writes (the same bytes either way).  On ``bench_system.sh`` (both daemons on 2
#: cores) a quiet machine (load ~2) gave apply phases of 190/205 and 151/183 ms wall/CPU
#: against 207/202 and 202/195 one by one, executions 0.187 and 0.164 of a full build against
#: 0.205 twice; at load 5-7 (no free core) nothing, for ~15-35 ms more CPU.
APPLY_THREADS = 2
#: The same for versions 2 and 3, streamed while the agent builds: its records come at the
#: pace of the build, which one thread keeps up with (the server waited for records ~60-130 ms of a
#: ~250 ms backup), and the second's handoffs cost ~25 ms of CPU the agent's build then lacks
#: where both share the cores: 16 executions each on ``bench_system.sh``'s pair, alternating
#: (/tmp harness, 2 cores, quiet), median 0.246 s one by one against 0.260 s with two.
APPLY_THREADS_STREAMED = 1


class _Patch:
    """Patcher over the base + part file; driven from worker threads only."""

    def __init__(
        self, base_buf: Any, base: ArchiveRecord | None, part: PartWriter, max_size: int
    ) -> None:
        self._base_buf, self._base, self._max_size = base_buf, base, max_size
        # Chosen by the delta's magic once its first bytes are in (keep-alives are empty).
        self.patcher: Any = None
        self._pieces: Callable[[Any], Iterable[bytes | memoryview]] | None = None
        self._head = bytearray()
        self.part = part
        #: The base's seek points, for a layout delta (``seeks.SeekCache``); None: none.
        self.load_seek: Callable[[], Any] | None = None

    def _choose(self) -> Any:
        base = self._base
        # A layout delta is accepted only against a base (pull offers it only then); with
        # base_hash either patcher refuses, from the header on, a delta made for another.
        kind: Any = deltabkp.Patcher
        extra: dict[str, Any] = {}
        if base is not None and self._head.startswith(LAYOUT_MAGIC):
            kind = LayoutPatcher
            if self.load_seek is not None:
                extra["seek"] = self.load_seek()
            # Version 1 is sent at once; the others as the agent builds.
            streamed = self._head[len(LAYOUT_MAGIC) : len(LAYOUT_MAGIC) + 1] != b"\x01"
            extra["threads"] = APPLY_THREADS_STREAMED if streamed else APPLY_THREADS
        self.patcher = kind(
            self._base_buf, base_hash=base.hash if base else None, max_size=self._max_size,
            **extra,
        )
        # The layout patcher hands each piece over as soon as it is rebuilt: written (and
        # flushed by the kernel) while the rest is still being patched, not all at the end.
        self._pieces = self.patcher.pieces if kind is LayoutPatcher else self.patcher.feed
        return self.patcher

    def _write(self, data: bytes) -> None:
        assert self._pieces is not None
        for piece in self._pieces(data):
            self.part.write(piece)

    def feed(self, data: bytes) -> None:
        if self.patcher is None:
            self._head += data
            if len(self._head) <= len(LAYOUT_MAGIC):  # the magic and the version byte
                return
            self._choose()
            data, self._head = bytes(self._head), bytearray()
        self._write(data)

    def finish(self, done: protocol.BackupDone) -> protocol.BackupDone:
        """Check the new archive against ``done``; ``done`` with the archive's size and
        blake3 (a layout delta's version 3: the agent answered before it compressed, and
        said neither — the patcher checked the tar it rebuilt against the delta's END)."""
        if self.patcher is None:
            self._choose()
            self._write(bytes(self._head))
        self.patcher.finish()  # raises IntegrityError on a length or blake3 mismatch
        if not done.archive_hash and not done.archive_size and \
                getattr(self.patcher, "version", 0) == LAYOUT_EARLY_VERSION:
            done = attrs.evolve(done, archive_hash=self.patcher.new_hash,
                                archive_size=self.patcher.new_size)
        if self.patcher.new_hash != done.archive_hash or self.patcher.new_size != done.archive_size:
            raise IntegrityError(
                f"patched archive ({self.patcher.new_size} bytes, {self.patcher.new_hash.hex()[:16]}) "
                f"differs from the agent's ({done.archive_size} bytes, {done.archive_hash.hex()[:16]})"
            )
        if self.part.size != done.archive_size:
            raise IntegrityError(
                f"wrote {self.part.size} bytes but the archive has {done.archive_size}"
            )
        return done


class Ingest:
    """One new archive of ``target`` against ``base`` (None: a full transfer)."""

    def __init__(
        self,
        *,
        catalog: AsyncCatalog,
        store: Store,
        target: Target,
        base: ArchiveRecord | None,
        limiter: trio.CapacityLimiter,
        max_size: int,
        phases: Phases | None = None,
        seeks: SeekCache | None = None,
    ) -> None:
        self.catalog, self.store, self.target, self.base = catalog, store, target, base
        self._seeks = seeks
        #: Laps "verify" (finish), "store-commit" (fsyncs, renames), "catalog-commit".
        self.phases = phases if phases is not None else Phases()
        self._limiter = limiter
        self._max_size = max_size
        self._stack = contextlib.ExitStack()
        self._patch: _Patch | None = None
        self._part: PartWriter | None = None
        self.seq: int | None = None
        self.committed = False

    async def _thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def _base_io(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Read the base archive or its signature; if it is gone or damaged, stop offering
        it (marked missing) and fall back to a full transfer, like any integrity failure.  A
        store that cannot be reached just fails this execution (retried later): the base
        may well be fine."""
        base = self.base
        assert base is not None
        try:
            return await self._thread(fn, *args)
        except StoreUnavailable:
            raise
        except StoreError as exc:
            tid, seq = self.target.id, base.seq
            await self.catalog.call(lambda c: c.mark_missing(tid, seq))
            log.error("%s: archive %d marked missing: %s", self.target.name, seq, exc)
            raise IntegrityError(f"base archive {seq} is unreadable ({exc})") from None

    async def read_signature(self) -> bytes:
        """The signature of the base (the agent asked for it), made now if a crash left the
        base without one: only the archive being unreadable marks it missing."""
        base = self.base
        assert base is not None
        sig: bytes = await self._base_io(functools.partial(
            signature, self.store, self.target.id, base.seq, size=base.size, digest=base.hash
        ))
        return sig

    async def _open(self) -> _Patch:
        if self._patch is None:
            tid = self.target.id
            self.seq = seq = await self.catalog.call(lambda c: c.next_seq(tid))
            # A crash between the store's commit and the catalog's can leave an archive at
            # this seq; no row names it and we hold the target's lease: it is garbage.
            await self._thread(self.store.delete, tid, seq)
            self._part = await self._thread(self.store.begin, tid, seq)
            buf: Any = b""
            if self.base is not None:
                buf = await self._base_io(self._stack.enter_context, self.store.base(
                    tid, self.base.seq, size=self.base.size, digest=self.base.hash
                ))
            self._patch = _Patch(buf, self.base, self._part, self._max_size)
            if self._seeks is not None and self.base is not None:
                # Read when a layout delta is chosen (in the patch's worker thread).
                seeks, tid, base = self._seeks, self.target.id, self.base
                self._patch.load_seek = lambda: seeks.load(tid, base)
            self.phases.lap("open")
        return self._patch

    async def feed(self, data: bytes) -> None:
        patch = await self._open()
        await self._thread(patch.feed, data)

    async def finish(self, done: protocol.BackupDone) -> protocol.BackupDone | None:
        """Verify the new archive: ``done`` with its size and blake3 (the patcher's where
        the agent could not say them, ``_Patch.finish``); None when it is byte-identical to
        the base."""
        patch = await self._open()
        done = await self._thread(patch.finish, done)
        self.phases.lap("verify")
        patcher = patch.patcher
        if self._seeks is not None and isinstance(patcher, LayoutPatcher) and \
                patcher.seek is not None:
            # The new archive's seek file is then made from the base's and the COPY records
            # (``SeekCache.make``, after the commit): the cost of what changed.
            self._seeks.carry_from(self.target.id, patcher.new_hash, patcher.seek,
                                   patcher.copies)
        # The patcher may hold views into the base's mmap: let go before it closes.
        self._patch = None
        del patch
        self._stack.close()
        return done if self.base is None or done.archive_hash != self.base.hash else None

    async def commit(
        self, eid: int, result: Callable[[int], ExecutionResult]
    ) -> ExecutionRecord:
        """Put the verified archive in place and commit its catalog row (the point of truth);
        ``result(seq)`` is the execution's result as of now."""
        assert self._part is not None and self.seq is not None
        await self._thread(self._part.commit)
        self.phases.lap("store-commit")
        tid, seq, res = self.target.id, self.seq, result(self.seq)
        try:
            _archive, record = await self.catalog.call(
                lambda c: c.commit_archive(eid, tid, seq, res)
            )
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._thread(self.store.delete, tid, seq)
            raise
        self.committed = True
        self.phases.lap("catalog-commit")
        return record

    async def aclose(self) -> None:
        """Abort the part file unless committed; release the base (shielded: runs on cancel)."""
        patch, self._patch = self._patch, None
        close = getattr(patch.patcher if patch is not None else None, "close", None)
        if close is not None:
            # A layout patcher given up mid-delta: end its worker threads now, not at its
            # garbage collection.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(close)
        self._stack.close()
        if self._part is not None and not self.committed:
            with trio.CancelScope(shield=True):
                await self._thread(self._part.abort)



async def sign(
    catalog: AsyncCatalog, store: Store, target: Target, seq: int | None, *,
    limiter: trio.CapacityLimiter,
) -> None:
    """Make and store the signature of archive ``seq`` of ``target``, just committed
    (``store.sign``): off the backup's critical path, after its catalog commit, under the
    target's lease.  Never fails the execution: a failure is logged and the archive's first
    reader signs it instead."""
    tid = target.id
    try:
        newest = await catalog.call(lambda c: c.newest_retained(tid))
        # Only the archive just stored (a retention of keep=0 may have retired it already).
        if seq is None or newest is None or newest.seq != seq:
            return
        await trio.to_thread.run_sync(functools.partial(
            _sign, store, tid, seq, size=newest.size, digest=newest.hash
        ), limiter=limiter)
    except DeltabkpError as exc:
        log.warning("%s: archive %s not signed now (its first reader will): %s",
                    target.name, seq, exc)
    except Exception:  # noqa: BLE001 - a bug here must not undo "stored" nor skip retention
        log.exception("%s: archive %s not signed now (its first reader will)", target.name, seq)


async def sign_unsigned(
    catalog: AsyncCatalog, store: Store, keys: Iterable[tuple[int, int]], *, server_id: str,
    lease_ttl: float, limiter: trio.CapacityLimiter, clock: Callable[[], float],
) -> None:
    """Sign the whole versions ``keys`` (target id, seq) that start-up found without a
    signature (``ReconcileReport.unsigned``: a crash between an archive's commit and
    ``sign``), in the background, so that the next backup does not make a multi-GB base's
    signature while its agent waits.  One version at a time (the newest first: the next
    base), in a worker thread behind ``limiter``, each under its target's lease
    (``AsyncCatalog.leased``): a backup or a conversion of that target never runs beside it,
    so nothing signs one version twice nor converts it away mid-signing.  A target busy
    with a backup is asked again every ``UNSIGNED_RETRY_S``; a version signed, converted or
    retired meanwhile is done.  Never fails: an error is logged with the version and its
    file, and leaves the version to its first reader (``store.signature``)."""
    pending = sorted(set(keys), key=lambda k: (-k[1], k[0]))
    names: dict[int, str] = {}
    while pending:
        busy: list[tuple[int, int]] = []
        for tid, seq in pending:
            try:
                if tid not in names:
                    names[tid] = (await catalog.call(lambda c: c.get_target(tid))).name  # noqa: B023
                async with catalog.leased(server_id, tid, ttl=lease_ttl, clock=clock,
                                          what="start-up signing") as held:
                    if not held:
                        busy.append((tid, seq))
                        continue
                    await _sign_held(catalog, store, tid, seq, names[tid], limiter)
            except DeltabkpError as exc:
                log.warning("start-up: %s: archive %d not signed now (its first reader will): "
                            "%s", names.get(tid, f"target {tid}"), seq, exc)
            except Exception:  # a bug here must not take the server down
                log.exception("start-up: %s: archive %d not signed now (its first reader will)",
                              names.get(tid, f"target {tid}"), seq)
        pending = busy
        if pending:
            await trio.sleep(UNSIGNED_RETRY_S)


async def _sign_held(
    catalog: AsyncCatalog, store: Store, tid: int, seq: int, name: str,
    limiter: trio.CapacityLimiter,
) -> None:
    """``sign_unsigned``'s step for one version, its target's lease held."""
    rows = await catalog.call(lambda c: c.archives(tid))
    rec = next((r for r in rows if r.seq == seq), None)
    # Retired, marked missing or corrupt, or a reverse delta by now: no signature to make.
    if rec is None or not rec.usable or rec.form != "whole":
        return
    # The stored one if a backup made it meanwhile (read and checked), else made now.
    await trio.to_thread.run_sync(functools.partial(
        signature, store, tid, seq, size=rec.size, digest=rec.hash
    ), limiter=limiter)
    log.info("start-up: %s: archive %d signed", name, seq)
