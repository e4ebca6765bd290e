"""The control API: ``Request(op, args)`` from ``deltabkp ctl`` → ``Response(data)`` or ``Error``.

Job: validate each request completely before changing anything, then answer with a JSON-able
value (ops and shapes in docs/formats.md, "Conversations … control operations").
Invariants: a refused request changes nothing; every error carries an ``ErrorCode``; its
reason travels on the wire bare, and the client knows (and renders) the node and path it
asked about.  The API sees only its collaborators (catalog, scheduler, store, configuration),
never the server object.  Longer than ~450 lines on purpose: one op per method, each beside
the checks of its arguments (split by op, the shared checks would live in two places).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

import attrs
import trio

from deltabkp import __version__, net, protocol
from deltabkp.errors import (
    DeltabkpError,
    ErrorCode,
    LocalProtocolError,
    RequestRefused,
    UsageError,
)
from deltabkp_server.agents import ping
from deltabkp_server.catalog import AsyncCatalog, Catalog, SqliteCatalog, lease_server
from deltabkp_server.config import ServerConfig
from deltabkp_server.model import (
    DETAIL_MAX,
    OUTCOMES,
    ExecutionRecord,
    Target,
    from_iso,
    iso,
    parse_every,
)
from deltabkp_server import versions
from deltabkp_server.model import ArchiveRecord
from deltabkp_server.scheduler import Scheduler
from deltabkp_server.scrub import VERIFY_WAIT_S, Verifier
from deltabkp_server.store import LocalStore, S3Store, Store

__all__ = ["ControlAPI", "target_args"]

log = logging.getLogger("deltabkp_server")

#: How long a ctl connection may stay silent between requests.
CTL_IDLE_S = 600.0
REGISTER_PING_S = 3.0
#: ``log`` without ``limit``: the newest this many rows (``limit`` 0: all of them, streamed).
LOG_DEFAULT_LIMIT = 50
#: Rows read from the catalog per keyset page of a streamed answer (memory: one page).
PAGE_ROWS = 500
#: Tries of a fetch whose version moved meanwhile (converted or rotated by a backup).
FETCH_ATTEMPTS = 3
#: How often ``backup-now --wait`` looks in the catalog for the execution it asked for (one
#: run on this server wakes it at once: ``Executor.on_close``; this is for other servers').
WAIT_POLL_S = 0.2


def _arg(
    args: dict[str, Any], name: str, kind: type | tuple[type, ...], *, required: bool = True
) -> Any:
    if name not in args or args[name] is None:
        if required:
            raise RequestRefused(ErrorCode.INVALID, f"missing argument {name!r}")
        return None
    value = args[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
        names = " or ".join(k.__name__ for k in kinds)
        raise RequestRefused(
            ErrorCode.INVALID, f"argument {name!r} must be a {names}, got {value!r}"
        )
    return value


def target_args(args: dict[str, Any]) -> tuple[str, str]:
    """The canonical (node, path) a request names; ``invalid`` if either is malformed."""
    try:
        node = str(net.Address.parse_node(args.get("node"), default_port=None))  # canonical
        return node, net.normalise_path(args.get("path"))
    except UsageError as exc:
        raise RequestRefused(ErrorCode.INVALID, exc.reason) from None


@attrs.define(kw_only=True)
class ControlAPI:
    """Serves authenticated ``ctl`` channels (one instance per server)."""

    config: ServerConfig
    catalog: AsyncCatalog
    scheduler: Scheduler
    store: Store
    files: trio.CapacityLimiter = attrs.field(alias="files_limiter")
    address: str
    started: float
    clock: Callable[[], float]
    _ops: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = attrs.field(init=False)
    _streams: dict[
        str, Callable[[dict[str, Any]], AsyncGenerator[list[dict[str, Any]], None]]
    ] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._ops = {
            "register": self.register,
            "unregister": self.unregister,
            "targets": self.targets,
            "backup-now": self.backup_now,
            "verify": self.verify,
            "status": self.status,
            "progress": self.progress,
        }
        # Ops answered by a stream of rows (protocol.ControlSession.ANSWERS says which).
        self._streams = {"log": self.log_pages, "list": self.list_pages}

    async def serve(self, chan: net.Channel) -> None:
        while (req := await chan.next_request(CTL_IDLE_S)) is not None:
            assert isinstance(req, protocol.Request)  # the only thing a client may send now
            try:
                if req.op == "fetch":
                    await self.fetch(chan, req.args)
                    continue
                pages = self._streams.get(req.op)
                if pages is not None:
                    await self._stream(chan, req.op, pages(req.args))
                    continue
                op = self._ops.get(req.op)
                if op is None:
                    known = ", ".join(sorted([*self._ops, *self._streams, "fetch"]))
                    raise RequestRefused(
                        ErrorCode.INVALID, f"unknown operation {req.op!r} (known: {known})"
                    )
                data = await op(req.args)
            except RequestRefused as exc:
                log.info("ctl %s %s refused: %s", chan.peer, req.op, exc)
                await chan.send(protocol.Error(str(exc.code), exc.reason))
                continue
            except DeltabkpError as exc:
                log.error("ctl %s %s failed: %s", chan.peer, req.op, exc)
                await chan.send(protocol.Error(str(ErrorCode.INTERNAL), f"{req.op} failed: {exc}"))
                continue
            try:
                await chan.send(protocol.Response(data))
            except LocalProtocolError as exc:  # an answer larger than one frame
                log.warning("ctl %s %s: %s", chan.peer, req.op, exc)
                await chan.send(protocol.Error(str(ErrorCode.REFUSED), (
                    f"the answer to {req.op} is too large for one message ({exc.reason})"
                )))

    async def _stream(
        self, chan: net.Channel, op: str, pages: AsyncGenerator[list[dict[str, Any]], None]
    ) -> None:
        """Send an answer as ``rows`` batches of about ``ROWS_BUDGET`` bytes, then
        ``rows-end``; a page is read only when the previous one is sent (memory: one page and
        one batch, however long the answer).  A refusal raised before the first row, or a
        failure part-way, goes out as the ``error`` that ends the stream."""
        packer, n = protocol.RowPacker(), 0
        async with aclosing(pages):
            async for page in pages:
                for row in page:
                    batch = packer.add(row)
                    if batch is not None:
                        await self._send_rows(chan, op, batch)
                    n += 1
        last = packer.flush()
        if last is not None:
            await self._send_rows(chan, op, last)
        await chan.send(protocol.RowsEnd({"rows": n}))

    async def _send_rows(self, chan: net.Channel, op: str, batch: protocol.Rows) -> None:
        try:
            await chan.send(batch)
        except LocalProtocolError as exc:  # one row larger than a frame: say so, keep serving
            raise RequestRefused(ErrorCode.REFUSED, (
                f"a row of the {op} answer is too large to send ({exc.reason})"
            )) from None

    async def _target(self, args: dict[str, Any], *, active_only: bool = True) -> Target:
        node, path = target_args(args)
        t = await self.catalog.call(lambda c: c.find_target(node, path, active_only=active_only))
        if t is None:
            raise RequestRefused(ErrorCode.NOT_FOUND, "is not registered", node=node, path=path)
        return t

    # -- operations --------------------------------------------------------------------------

    async def register(self, args: dict[str, Any]) -> dict[str, Any]:
        node, path = target_args(args)
        every_s = parse_every(_arg(args, "every", (str, int)))
        bwlimit = _arg(args, "bwlimit", int, required=False)
        if bwlimit is not None and not 0 < bwlimit <= net.MAX_RATE:
            raise RequestRefused(ErrorCode.INVALID, f"bwlimit must be a number of bytes per "
                                 f"second from 1 to {net.MAX_RATE}, got {bwlimit}")
        warning = await self._check_agent(node, path)
        now = self.clock()
        # The catalog is the one place that refuses a target registered twice (``exists``).
        target = await self.catalog.call(
            lambda c: c.register(node, path, every_s, now, bwlimit=bwlimit)
        )
        if _leased(target, now):
            # Registered again while an execution of its previous life runs: that run's end
            # rewrites the schedule, so queue the first backup of this one explicitly.
            await self.scheduler.request_now(target.id)
        self.scheduler.wake()
        log.info("registered %s every %d s", target.name, every_s)
        out: dict[str, Any] = {
            "node": node, "path": path, "every_seconds": every_s, "next_due": iso(target.next_due),
            "bwlimit": bwlimit,
        }
        if warning:
            out["warning"] = warning
        return out

    async def _check_agent(self, node: str, path: str) -> str | None:
        """Ask the agent (if it answers) whether it will serve ``path``; refuse if it won't."""
        pinged = await ping(node, self.config.key, timeout=REGISTER_PING_S, path=path)
        if pinged.error is not None:
            return (f"agent {node} did not answer ({pinged.error.reason}); registered anyway, "
                    "backups start when it does")
        # The agent resolves the path itself (symlinks, ``..``): only it can say what it serves.
        refusal = pinged.path_refusal()
        if refusal is None:
            return None
        if refusal.code == ErrorCode.NOT_FOUND:
            return f"{refusal.reason}; registered anyway, backups start when it exists"
        raise RequestRefused(ErrorCode.REFUSED, f"the agent refused: {refusal.reason}")

    async def unregister(self, args: dict[str, Any]) -> dict[str, Any]:
        node, path = target_args(args)
        target = await self.catalog.call(lambda c: c.unregister(node, path))
        log.info("unregistered %s", target.name)
        return {"node": node, "path": path}

    async def list_pages(self, args: dict[str, Any]) -> AsyncGenerator[list[dict[str, Any]], None]:
        """``list``, streamed: every archive of one target, newest first, in keyset pages."""
        tid = (await self._target(args, active_only=False)).id
        before: int | None = None
        while True:
            page = await self.catalog.call(_archive_page(tid, PAGE_ROWS, before))
            if not page:
                return
            yield [a.to_wire() for a in page]
            before = page[-1].seq

    async def targets(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        """Registered targets; with ``all``, also unregistered ones that still have retained
        archives (state "unregistered": list, fetch and restore still work on them)."""
        every = bool(_arg(args, "all", bool, required=False))
        rows = await self.catalog.call(lambda c: [
            (t, c.count_retained(t.id), c.newest_skipped(t.id))
            for t in c.targets(active_only=not every)
        ])
        now = self.clock()
        # What the newest archive lacks (sockets, unreadable files): a count and the first few.
        return [
            {**t.to_wire(n), "state": t.shown_state(now),
             "skipped_count": len(skipped), "skipped": [list(s) for s in skipped[:DETAIL_MAX]]}
            for t, n, skipped in rows
            if t.active or n
        ]

    async def log_pages(self, args: dict[str, Any]) -> AsyncGenerator[list[dict[str, Any]], None]:
        """``log``, streamed: the newest ``limit`` rows (default 50; 0: all), optionally of
        one target, since a time, with one outcome — read in keyset pages, newest first."""
        limit = _arg(args, "limit", int, required=False)
        limit = LOG_DEFAULT_LIMIT if limit is None else limit
        if limit < 0:
            raise RequestRefused(ErrorCode.INVALID, f"limit must be 0 (all) or more, got {limit}")
        since = args.get("since")
        since_t = None if since is None else from_iso(since, "since")
        outcome = _arg(args, "outcome", str, required=False)
        if outcome is not None and outcome not in OUTCOMES:
            raise RequestRefused(
                ErrorCode.INVALID, f"outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}"
            )
        tid = None
        if args.get("node") is not None or args.get("path") is not None:
            tid = (await self._target(args, active_only=False)).id
        before: int | None = None
        left = limit or None
        while left is None or left > 0:
            n = PAGE_ROWS if left is None else min(PAGE_ROWS, left)
            page = await self.catalog.call(_log_page(n, before, tid, since_t, outcome))
            if not page:
                return
            yield [r.to_wire() for r in page]
            before = page[-1].id
            if left is not None:
                left -= len(page)

    async def backup_now(self, args: dict[str, Any]) -> dict[str, Any]:
        target = await self._target(args)
        wait = _arg(args, "wait", bool, required=False) or False
        wait_timeout = _arg(args, "wait_timeout", (int, float), required=False)
        if wait_timeout is not None and not 0 < wait_timeout < float("inf"):
            raise RequestRefused(ErrorCode.INVALID, "wait_timeout must be a positive number")
        tid = target.id
        # The request's number travels with the claim to the run's row: the answer is a run
        # claimed after this very request, never one claimed (or running) before it.
        req = await self.scheduler.request_now(tid)
        # Who asked for a run, and when: also the mark from which a backup's latency counts.
        log.info("backup-now of %s queued%s", target.name, " (--wait)" if wait else "",
                 extra=net.log_context(node=target.node, path=target.path, event="backup-now"))
        queued = {"node": target.node, "path": target.path, "queued": True}
        if not wait:
            return queued
        if wait_timeout is None:  # an older client: it keeps its own deadline
            return await self._wait_for(tid, req)
        with trio.move_on_after(float(wait_timeout)):
            return await self._wait_for(tid, req)
        # The backup goes on (queued or running): the client says so with its own exit code.
        return {**queued, "timed_out": True, "waited": float(wait_timeout)}

    async def _wait_for(self, tid: int, req: int) -> dict[str, Any]:
        """The wire row of the first execution of ``tid`` that answers request ``req``."""
        # Whichever server claims it, its execution row lands in the shared catalog; when it
        # is this server, the executor wakes us as the row closes (no poll on the path).
        # A verification's row answers no request (its request_seq is NULL).
        executor = self.scheduler.executor
        while True:
            closing = executor.on_close()
            mine = executor.closed.get(tid)
            if mine is not None and mine.answers(req):
                return mine.to_wire()
            done = await self.catalog.call(lambda c: c.answer_to(tid, req))
            if done is not None:
                return done.to_wire()
            now_target = await self.catalog.call(lambda c: c.get_target(tid))
            if not now_target.active and not _leased(now_target, self.clock()):
                raise RequestRefused(ErrorCode.NOT_FOUND, "was unregistered before it ran")
            with trio.move_on_after(WAIT_POLL_S):
                await closing.wait()

    async def status(self, args: dict[str, Any]) -> dict[str, Any]:
        now, ttl = self.clock(), self.scheduler.lease_ttl
        targets = await self.catalog.call(lambda c: c.targets())
        servers = await self.catalog.call(lambda c: c.servers(now, ttl))
        running = await self.catalog.call(lambda c: c.running_executions())
        # An upkeep lease's owner is its own (``upkeep_owner``): shown as its server.
        owners = {(t.node, t.path): t.lease_owner and lease_server(t.lease_owner) for t in targets}
        return {
            "version": __version__,
            "server_id": self.scheduler.server_id,
            "uptime_s": round(now - self.started),
            "listen": self.address,
            "targets": len(targets),
            "retrying": sum(1 for t in targets if t.state == "retrying"),
            "failing": sum(1 for t in targets if t.shown_state(now) == "failing"),
            "running": self.scheduler.running,
            "servers": [
                {**s.to_wire(), "targets": [t.name for t in targets
                                            if owners[(t.node, t.path)] == s.id
                                            and _leased(t, now)]}
                for s in servers
            ],
            "data_dir": str(self.config.data_dir),
            "catalog": _describe_catalog(self.catalog.sync),
            "store": _describe_store(self.store),
            "max_concurrent": self.config.max_concurrent,
            "max_per_node": self.config.max_per_node,
            # Every server's running executions with their bytes so far (from the catalog,
            # at most ``scheduler.PROGRESS_S`` old).
            "executions": [_running(e, owners.get((e.node, e.path))) for e in running],
        }

    async def progress(self, args: dict[str, Any]) -> dict[str, Any]:
        """``progress {node, path}``: the target's running execution, if any, with its bytes
        on the wire so far (``backup-now --wait`` polls it to draw its progress bar)."""
        target = await self._target(args, active_only=False)
        tid = target.id
        running = await self.catalog.call(lambda c: c.running_executions(tid))
        out: dict[str, Any] = {"node": target.node, "path": target.path, "running": bool(running)}
        if running:
            owner = target.lease_owner
            out.update(_running(running[-1], owner and lease_server(owner)))
        return out

    async def fetch(self, chan: net.Channel, args: dict[str, Any]) -> None:
        """Stream one retained archive: Response(meta), DataChunk*, DataEnd."""
        target = await self._target(args, active_only=False)
        seq = _arg(args, "seq", int, required=False)
        tid = target.id
        archives = await self.catalog.call(lambda c: c.archives(tid))
        for attempt in range(FETCH_ATTEMPTS):
            chosen = self._choose(archives, seq)
            # Rebuilt (a reverse delta) or re-read, its blake3 checked, before the first byte.
            try:
                async with versions.opened(
                    self.store, tid, archives, chosen, limiter=self.files
                ) as buf:
                    await chan.send(protocol.Response({
                        "seq": chosen.seq, "size": chosen.size, "hash": chosen.hash.hex(),
                        "created": iso(chosen.created), "node": target.node,
                        "path": target.path,
                    }))
                    for at in range(0, len(buf), protocol.MAX_CHUNK):
                        await chan.send(protocol.DataChunk(bytes(buf[at:at + protocol.MAX_CHUNK])))
                await chan.send(protocol.DataEnd())
                return
            except versions.Corrupt as exc:
                # A fetch takes no lease: a conversion or a rotation of this very version may
                # have moved its bytes meanwhile.  Only if the catalog still says what we
                # read is the version corrupt.
                fresh = await self.catalog.call(lambda c: c.archives(tid))
                now_row = next((a for a in fresh if a.seq == chosen.seq), None)
                if now_row != chosen and attempt + 1 < FETCH_ATTEMPTS:
                    archives = fresh
                    continue
                seq_, reason, now = chosen.seq, exc.reason, self.clock()
                await self.catalog.call(lambda c: c.record_verify(tid, [(seq_, reason)], now))
                log.error("%s: fetch found version %d corrupt: %s", target.name, seq_, reason)
                raise RequestRefused(ErrorCode.REFUSED, _corrupt_refusal(
                    attrs.evolve(chosen, corrupt=reason))) from None

    def _choose(self, archives: list[ArchiveRecord], seq: int | None) -> ArchiveRecord:
        """The version a fetch asks for, if it may be served (else a clear refusal)."""
        if seq is None:
            # The newest retained: if it is corrupt, say so (never serve an older one silently).
            chosen = next((a for a in archives if a.retained and not a.missing), None)
            if chosen is None:
                raise RequestRefused(ErrorCode.NOT_FOUND, "has no stored archive")
        else:
            chosen = next((a for a in archives if a.seq == seq), None)
            if chosen is None:
                raise RequestRefused(ErrorCode.NOT_FOUND, f"has no archive {seq}")
            if not chosen.retained or chosen.missing:
                raise RequestRefused(
                    ErrorCode.NOT_FOUND,
                    f"archive {seq} was rotated out (keep newest {self.config.settings.keep}) "
                    "or is missing",
                )
        if chosen.corrupt is not None:
            raise RequestRefused(ErrorCode.REFUSED, _corrupt_refusal(chosen))
        return chosen

    async def verify(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        """Rebuild or re-read every retained version of one target (or of all, ``all``) and
        check its blake3; each target's verification is logged as an execution."""
        if _arg(args, "all", bool, required=False):
            counted = await self.catalog.call(lambda c: [
                (t, c.count_retained(t.id)) for t in c.targets(active_only=False)
            ])
            targets = [t for t, n in counted if n]
        else:
            targets = [await self._target(args, active_only=False)]
        wait = _arg(args, "wait", (int, float), required=False)
        verifier = Verifier(
            catalog=self.catalog, store=self.store, server_id=self.scheduler.server_id,
            lease_ttl=self.scheduler.lease_ttl, limiter=self.files, clock=self.clock,
        )
        out = []
        for t in targets:
            done = await verifier.verify(t, wait=float(wait) if wait else VERIFY_WAIT_S)
            if done is None:
                raise RequestRefused(ErrorCode.BUSY, (
                    f"{t.name}: still busy (a backup or a verification holds it) after "
                    f"{float(wait) if wait else VERIFY_WAIT_S:g} s; try again later"))
            out.append(done.to_wire())
        return out


def _running(e: ExecutionRecord, server: str | None) -> dict[str, Any]:
    """A running execution on the wire: a backup's size is known only at its end (the agent
    streams the archive as it builds it), so ``expected`` is None for now."""
    return {
        "execution": e.id, "node": e.node, "path": e.path, "trigger": e.trigger,
        "started": iso(e.started), "server": server, "bytes_sent": e.bytes_sent,
        "bytes_received": e.bytes_received, "transferred": e.transferred, "expected": None,
    }


def _corrupt_refusal(a: ArchiveRecord) -> str:
    return (f"archive {a.seq} is corrupt ({a.corrupt}); it cannot be restored — "
            "'list' shows the sound versions, 'restore --version N' picks one")


def _log_page(
    limit: int, before: int | None, tid: int | None, since: float | None, outcome: str | None
) -> Callable[[Catalog], list[ExecutionRecord]]:
    # A function of its arguments, not of the caller's loop variables (bound now).
    return lambda c: c.execution_page(
        limit=limit, before_id=before, target_id=tid, since=since, outcome=outcome
    )


def _archive_page(
    tid: int, limit: int, before: int | None
) -> Callable[[Catalog], list[ArchiveRecord]]:
    return lambda c: c.archive_page(tid, limit=limit, before_seq=before)


def _leased(t: Target, now: float) -> bool:
    """Some server holds a live lease on ``t``: it is running (or probing) right now."""
    return t.lease_until is not None and t.lease_until > now


def _describe_catalog(cat: object) -> str:
    """Where the catalog is, as a URL (a password never shown)."""
    if isinstance(cat, SqliteCatalog):
        return f"sqlite:///{cat.path.absolute()}"
    return str(getattr(cat, "where", type(cat).__name__))


def _describe_store(store: object) -> str:
    if isinstance(store, LocalStore):
        return f"file://{store.root.absolute()}"
    if isinstance(store, S3Store):
        return store.url
    return type(store).__name__
