"""The control API: ``Request(op, args)`` from ``deltabkp ctl`` → ``Response(data)`` or ``Error``.

Job: validate each request completely before changing anything, then answer with a JSON-able
value (ops and shapes in docs/formats.md, "Conversations … control operations").
Invariants: a refused request changes nothing; every error carries an ``ErrorCode``; its
reason travels on the wire bare, and the client knows (and renders) the node and path it
asked about.  The API sees only its collaborators (catalog, scheduler, store, configuration),
never the server object.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
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
from deltabkp_server.catalog import AsyncCatalog, SqliteCatalog
from deltabkp_server.config import ServerConfig
from deltabkp_server.model import Target, iso, parse_every
from deltabkp_server.scheduler import Scheduler
from deltabkp_server.store import LocalStore, S3Store, Store

__all__ = ["ControlAPI", "target_args"]

log = logging.getLogger("deltabkp_server")

#: How long a ctl connection may stay silent between requests.
CTL_IDLE_S = 600.0
REGISTER_PING_S = 3.0
#: How often ``backup-now --wait`` looks for the execution it asked for.
WAIT_POLL_S = 0.2


def _arg(args: dict[str, Any], name: str, kind: type, *, required: bool = True) -> Any:
    if name not in args or args[name] is None:
        if required:
            raise RequestRefused(ErrorCode.INVALID, f"missing argument {name!r}")
        return None
    value = args[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RequestRefused(
            ErrorCode.INVALID, f"argument {name!r} must be a {kind.__name__}, got {value!r}"
        )
    return value


def target_args(args: dict[str, Any]) -> tuple[str, str]:
    """The canonical (node, path) a request names; ``invalid`` if either is malformed."""
    try:
        node = str(net.Address.parse_node(args.get("node")))
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

    def __attrs_post_init__(self) -> None:
        self._ops = {
            "register": self.register,
            "unregister": self.unregister,
            "list": self.list_archives,
            "targets": self.targets,
            "log": self.log,
            "backup-now": self.backup_now,
            "status": self.status,
        }

    async def serve(self, chan: net.Channel) -> None:
        while (req := await chan.next_request(CTL_IDLE_S)) is not None:
            assert isinstance(req, protocol.Request)  # the only thing a client may send now
            try:
                if req.op == "fetch":
                    await self.fetch(chan, req.args)
                    continue
                op = self._ops.get(req.op)
                if op is None:
                    known = ", ".join(sorted([*self._ops, "fetch"]))
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
                    f"the answer to {req.op} is too large for one message ({exc.reason}); "
                    "ask for less (e.g. log --limit N)"
                )))

    async def _target(self, args: dict[str, Any], *, active_only: bool = True) -> Target:
        node, path = target_args(args)
        t = await self.catalog.call(lambda c: c.find_target(node, path, active_only=active_only))
        if t is None:
            raise RequestRefused(ErrorCode.NOT_FOUND, "is not registered", node=node, path=path)
        return t

    # -- operations --------------------------------------------------------------------------

    async def register(self, args: dict[str, Any]) -> dict[str, Any]:
        node, path = target_args(args)
        every_s = parse_every(_arg(args, "every", (str, int)))  # type: ignore[arg-type]
        warning = await self._check_agent(node, path)
        now = self.clock()
        # The catalog is the one place that refuses a target registered twice (``exists``).
        target = await self.catalog.call(lambda c: c.register(node, path, every_s, now))
        if _leased(target, now):
            # Registered again while an execution of its previous life runs: that run's end
            # rewrites the schedule, so queue the first backup of this one explicitly.
            await self.scheduler.request_now(target.id)
        self.scheduler.wake()
        log.info("registered %s every %d s", target.name, every_s)
        out: dict[str, Any] = {
            "node": node, "path": path, "every_seconds": every_s, "next_due": iso(target.next_due),
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

    async def list_archives(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        target = await self._target(args, active_only=False)
        rows = await self.catalog.call(lambda c: c.archives(target.id))
        return [a.to_wire() for a in rows]

    async def targets(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        rows = await self.catalog.call(lambda c: [
            (t, c.count_retained(t.id)) for t in c.targets()
        ])
        now = self.clock()
        return [t.to_wire(n, _leased(t, now)) for t, n in rows]

    async def log(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        limit = _arg(args, "limit", int, required=False)
        if limit is not None and limit < 1:
            raise RequestRefused(ErrorCode.INVALID, f"limit must be at least 1, got {limit}")
        tid = None
        if args.get("node") is not None or args.get("path") is not None:
            tid = (await self._target(args, active_only=False)).id
        rows = await self.catalog.call(lambda c: c.executions(tid, limit=limit))
        return [r.to_wire() for r in rows]

    async def backup_now(self, args: dict[str, Any]) -> dict[str, Any]:
        target = await self._target(args)
        wait = _arg(args, "wait", bool, required=False) or False
        tid = target.id
        after = await self.catalog.call(lambda c: c.last_execution_id())
        await self.scheduler.request_now(tid)
        if not wait:
            return {"node": target.node, "path": target.path, "queued": True}
        # Whichever server claims it, its execution row lands in the shared catalog.
        while True:
            done = [e for e in await self.catalog.call(lambda c: c.executions_since(tid, after))
                    if e.outcome is not None]
            if done:
                return done[0].to_wire()
            now_target = await self.catalog.call(lambda c: c.get_target(tid))
            if not now_target.active and not _leased(now_target, self.clock()):
                raise RequestRefused(ErrorCode.NOT_FOUND, "was unregistered before it ran")
            await trio.sleep(WAIT_POLL_S)

    async def status(self, args: dict[str, Any]) -> dict[str, Any]:
        now, ttl = self.clock(), self.scheduler.lease_ttl
        targets = await self.catalog.call(lambda c: c.targets())
        servers = await self.catalog.call(lambda c: c.servers(now, ttl))
        return {
            "version": __version__,
            "server_id": self.scheduler.server_id,
            "uptime_s": round(now - self.started),
            "listen": self.address,
            "targets": len(targets),
            "retrying": sum(1 for t in targets if t.state == "retrying"),
            "running": self.scheduler.running,
            "servers": [
                {**s.to_wire(), "targets": [t.name for t in targets
                                            if t.lease_owner == s.id and _leased(t, now)]}
                for s in servers
            ],
            "data_dir": str(self.config.data_dir),
            "catalog": _describe_catalog(self.catalog.sync),
            "store": _describe_store(self.store),
            "max_concurrent": self.config.max_concurrent,
            "max_per_node": self.config.max_per_node,
        }

    async def fetch(self, chan: net.Channel, args: dict[str, Any]) -> None:
        """Stream one retained archive: Response(meta), DataChunk*, DataEnd."""
        target = await self._target(args, active_only=False)
        seq = _arg(args, "seq", int, required=False)
        archives = await self.catalog.call(lambda c: c.archives(target.id))
        if seq is None:
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
        await chan.send(protocol.Response({
            "seq": chosen.seq, "size": chosen.size, "hash": chosen.hash.hex(),
            "created": iso(chosen.created), "node": target.node, "path": target.path,
        }))
        it = self.store.read_chunks(target.id, chosen.seq, protocol.MAX_CHUNK)
        while True:
            block = await trio.to_thread.run_sync(next, it, None, limiter=self.files)
            if block is None:
                break
            await chan.send(protocol.DataChunk(block))
        await chan.send(protocol.DataEnd())


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
