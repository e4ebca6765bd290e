"""The control API: ``Request(op, args)`` from ``deltabkp ctl`` → ``Response(data)`` or ``Error``.

Job: validate each request completely before changing anything, then answer with a JSON-able
value (ops and shapes in docs/formats.md, "Conversations … control operations").
Invariants: a refused request changes nothing; every error carries a code ("invalid",
"exists", "not-found", "refused", "internal") and a message naming the node and path.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from deltabkp import __version__, transport, wire
from deltabkp.errors import DeltabkpError, RequestRefused
from deltabkp_server.model import Target, iso, parse_every

if TYPE_CHECKING:
    from deltabkp_server.server import Server

__all__ = ["ControlAPI", "normalise_node", "normalise_path"]

log = logging.getLogger("deltabkp_server")

#: How long a ctl connection may stay silent between requests.
CTL_IDLE_S = 600.0
REGISTER_PING_S = 3.0


def _arg(args: dict[str, Any], name: str, kind: type, *, required: bool = True) -> Any:
    if name not in args or args[name] is None:
        if required:
            raise RequestRefused("invalid", f"missing argument {name!r}")
        return None
    value = args[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RequestRefused("invalid", f"argument {name!r} must be a {kind.__name__}, got {value!r}")
    return value


def normalise_node(text: object) -> str:
    """``HOST:PORT`` with a real port, in one canonical spelling."""
    if not isinstance(text, str):
        raise RequestRefused("invalid", f"node must be a string HOST:PORT, got {text!r}")
    try:
        host, port = transport.parse_hostport(text)
    except DeltabkpError as exc:
        raise RequestRefused("invalid", f"bad node {text!r}: {exc}") from None
    if not 1 <= port <= 65535:
        raise RequestRefused("invalid", f"bad node {text!r}: port must be 1-65535")
    host = host.lower()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def normalise_path(text: object, node: str = "") -> str:
    if not isinstance(text, str) or not text.strip():
        raise RequestRefused("invalid", f"{node} path must be a non-empty string, got {text!r}")
    if not text.startswith("/"):
        raise RequestRefused("invalid", f"{node} path {text!r} must be absolute")
    if "\x00" in text:
        raise RequestRefused("invalid", f"{node} path {text!r} contains a NUL byte")
    return posixpath.normpath(text)


class ControlAPI:
    """Serves one authenticated ``ctl`` channel at a time (one instance per server)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self._ops: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "register": self.register,
            "unregister": self.unregister,
            "list": self.list_archives,
            "targets": self.targets,
            "log": self.log,
            "backup-now": self.backup_now,
            "status": self.status,
        }

    async def serve(self, chan: transport.Channel) -> None:
        while True:
            try:
                req = await chan.receive(timeout=CTL_IDLE_S)
            except DeltabkpError:
                return  # hang-up or silence: the client is done
            if not isinstance(req, wire.Request):
                await chan.send_error("protocol", f"expected a request, got {req.TYPE}")
                return
            try:
                if req.op == "fetch":
                    await self.fetch(chan, req.args)
                    continue
                op = self._ops.get(req.op)
                if op is None:
                    raise RequestRefused(
                        "invalid", f"unknown operation {req.op!r} (known: {', '.join(sorted([*self._ops, 'fetch']))})"
                    )
                data = await op(req.args)
            except RequestRefused as exc:
                message = _name_target(exc.message, req.args)
                log.info("ctl %s %s refused (%s): %s", chan.peer, req.op, exc.code, message)
                await chan.send(wire.Error(exc.code, message))
                continue
            except DeltabkpError as exc:
                log.error("ctl %s %s failed: %s", chan.peer, req.op, exc)
                await chan.send(wire.Error("internal", f"{req.op} failed: {exc}"))
                continue
            await chan.send(wire.Response(data))

    # -- helpers -----------------------------------------------------------------------------

    def _node_path(self, args: dict[str, Any]) -> tuple[str, str]:
        node = normalise_node(_arg(args, "node", str))
        return node, normalise_path(_arg(args, "path", str), node)

    async def _target(self, args: dict[str, Any], *, active_only: bool = True) -> Target:
        node, path = self._node_path(args)
        t = await self.server.catalog.call(lambda c: c.find_target(node, path, active_only=active_only))
        if t is None:
            raise RequestRefused("not-found", f"{node} {path} is not registered")
        return t

    # -- operations --------------------------------------------------------------------------

    async def register(self, args: dict[str, Any]) -> dict[str, Any]:
        node, path = self._node_path(args)
        every_s = parse_every(_arg(args, "every", (str, int)))  # type: ignore[arg-type]
        existing = await self.server.catalog.call(lambda c: c.find_target(node, path))
        if existing is not None:
            raise RequestRefused("exists", f"{node} {path} is already registered")
        warning = await self._check_agent(node, path)
        now = self.server.clock()
        target = await self.server.catalog.call(lambda c: c.register(node, path, every_s, now))
        self.server.scheduler.add(target)
        log.info("registered %s %s every %d s", node, path, every_s)
        out: dict[str, Any] = {
            "node": node, "path": path, "every_seconds": every_s, "next_due": iso(target.next_due),
        }
        if warning:
            out["warning"] = warning
        return out

    async def _check_agent(self, node: str, path: str) -> str | None:
        """Ask the agent (if it answers) whether it will serve ``path``; refuse if it won't."""
        host, port = transport.parse_hostport(node)
        try:
            with trio.fail_after(REGISTER_PING_S):
                chan = await transport.connect(
                    host, port, key=self.server.key, role="server", timeout=REGISTER_PING_S
                )
                async with chan:
                    await chan.send(wire.Ping(path))
                    pong = await chan.receive_a(wire.Pong, timeout=REGISTER_PING_S)
        except (DeltabkpError, trio.TooSlowError) as exc:
            return f"agent {node} did not answer ({exc}); registered anyway, backups start when it does"
        # The agent resolves the path itself (symlinks, ``..``): only it can say what it serves.
        check = pong.info.get("path_check")
        if isinstance(check, dict) and not check.get("ok", True):
            message = str(check.get("message") or f"agent {node} will not serve {path}")
            if check.get("code") == "not-found":
                return f"{message}; registered anyway, backups start when it exists"
            raise RequestRefused("refused", message)
        return None

    async def unregister(self, args: dict[str, Any]) -> dict[str, Any]:
        node, path = self._node_path(args)
        target = await self.server.catalog.call(lambda c: c.unregister(node, path))
        self.server.scheduler.remove(target.id)
        log.info("unregistered %s %s", node, path)
        return {"node": node, "path": path}

    async def list_archives(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        target = await self._target(args, active_only=False)
        rows = await self.server.catalog.call(lambda c: c.archives(target.id))
        return [a.to_wire() for a in rows]

    async def targets(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        rows = await self.server.catalog.call(lambda c: [
            (t, c.count_retained(t.id)) for t in c.targets()
        ])
        return [t.to_wire(n, self.server.scheduler.is_running(t.id)) for t, n in rows]

    async def log(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        limit = _arg(args, "limit", int, required=False)
        if limit is not None and limit < 1:
            raise RequestRefused("invalid", f"limit must be at least 1, got {limit}")
        tid = None
        if args.get("node") is not None or args.get("path") is not None:
            tid = (await self._target(args, active_only=False)).id
        rows = await self.server.catalog.call(lambda c: c.executions(tid, limit=limit))
        return [r.to_wire() for r in rows]

    async def backup_now(self, args: dict[str, Any]) -> dict[str, Any]:
        target = await self._target(args)
        wait = _arg(args, "wait", bool, required=False) or False
        waiter = self.server.scheduler.request_now(target.id)
        if not wait:
            return {"node": target.node, "path": target.path, "queued": True}
        record = await waiter.wait()
        return record.to_wire()

    async def status(self, args: dict[str, Any]) -> dict[str, Any]:
        targets = await self.server.catalog.call(lambda c: c.targets())
        return {
            "version": __version__,
            "uptime_s": round(self.server.clock() - self.server.started, 3),
            "listen": self.server.address,
            "targets": len(targets),
            "retrying": sum(1 for t in targets if t.state == "retrying"),
            "running": self.server.scheduler.running,
            "data_dir": str(self.server.data_dir),
            "max_concurrent": self.server.max_concurrent,
            "max_per_node": self.server.max_per_node,
        }

    async def fetch(self, chan: transport.Channel, args: dict[str, Any]) -> None:
        """Stream one retained archive: Response(meta), DataChunk*, DataEnd."""
        target = await self._target(args, active_only=False)
        seq = _arg(args, "seq", int, required=False)
        archives = await self.server.catalog.call(lambda c: c.archives(target.id))
        if seq is None:
            chosen = next((a for a in archives if a.retained and not a.missing), None)
            if chosen is None:
                raise RequestRefused("not-found", f"{target.node} {target.path} has no stored archive")
        else:
            chosen = next((a for a in archives if a.seq == seq), None)
            if chosen is None:
                raise RequestRefused("not-found", f"{target.node} {target.path} has no archive {seq}")
            if not chosen.retained or chosen.missing:
                raise RequestRefused(
                    "not-found",
                    f"{target.node} {target.path}: archive {seq} was rotated out (keep newest "
                    f"{self.server.settings.keep}) or is missing",
                )
        await chan.send(wire.Response({
            "seq": chosen.seq, "size": chosen.size, "hash": chosen.hash.hex(),
            "created": iso(chosen.created), "node": target.node, "path": target.path,
        }))
        store = self.server.store
        it = store.read_chunks(target.id, chosen.seq, wire.MAX_CHUNK)
        limiter = self.server.files_limiter
        while True:
            block = await trio.to_thread.run_sync(next, it, None, limiter=limiter)
            if block is None:
                break
            await chan.send(wire.DataChunk(block))
        await chan.send(wire.DataEnd())


def _name_target(message: str, args: dict[str, Any]) -> str:
    """Every refusal names the node and path it is about (when the request had them)."""
    node, path = args.get("node"), args.get("path")
    parts = [str(x) for x in (node, path) if isinstance(x, str) and x and str(x) not in message]
    return f"{' '.join(parts)}: {message}" if parts else message
