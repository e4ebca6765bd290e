"""The agent daemon: listener, authentication, dispatch, and announcements to servers.

Job: accept connections from deltabkp servers on one TCP port, authenticate each before
reading its request, answer ``ping`` and serve ``backup`` requests for allow-listed paths,
and announce itself to the servers it was told about so that their pending retries run now.
Invariants:
- every connection is TLS 1.3 with a certificate from the cluster CA on both sides, then the
  protocol handshake inside it; nothing but the handshakes is read from a peer that has not
  passed both: such a peer gets a TLS alert or one ``error`` frame and the connection is
  closed (``net.accept``);
- a path is served only through ``Allowlist.resolve`` (real path under an allowed root);
- one backup at a time per real path (a per-path lock, waited on under a deadline, then
  ``busy``; entries are dropped when unused), any number of paths at once, at most
  ``max_builds`` archive builds in worker threads at once; the event loop itself never does
  CPU-heavy or blocking work (path checks run in threads too), so ``ping`` is answered
  while backups run;
- unauthenticated handshakes and authenticated sessions have separate budgets: at most
  ``max_handshakes`` handshakes pending (``net.HandshakeGate``: a new one evicts the oldest,
  so silent sockets cannot lock a real server out) each under a short deadline, and at most
  ``max_connections`` sessions; running out of descriptors is backed off, not a traceback,
  and refusals are logged rate-limited per address (``net.serve``);
- no connection handler can bring the daemon down: errors are logged and the connection
  closed; every network wait has a deadline (idle connections are dropped).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import attrs
import trio

from deltabkp import __version__, net, protocol
from deltabkp.archive import layout_capabilities
from deltabkp.errors import (
    AuthError,
    DeltabkpError,
    ErrorCode,
    PeerUnavailable,
    ProtocolError,
    RequestRefused,
)
from deltabkp.net import _http as net_http
from deltabkp_agent.allowlist import Allowlist
from deltabkp_agent.backup import (
    BackupContext,
    ServerStopped,
    describe_failure,
    serve_backup,
)
from deltabkp_agent.cache import AgentCache, default_cache_dir
from deltabkp_agent.metrics import AgentMetrics

__all__ = ["Agent", "AgentConfig", "configure_logging"]

log = logging.getLogger("deltabkp_agent")

#: How long an authenticated connection may stay silent between requests.
IDLE_TIMEOUT = 60.0
#: How long a backup request waits for a running backup of the same path (then ``busy``).
PATH_LOCK_TIMEOUT = 30.0
#: Announce retry backoff: first delay and cap, seconds.
ANNOUNCE_FIRST_S = 0.5
ANNOUNCE_CAP_S = 30.0


@attrs.frozen
class AgentConfig:
    """Everything the agent is told on its command line (already validated)."""

    key: bytes = attrs.field(repr=False)
    allow: Allowlist
    host: str = "127.0.0.1"
    port: int = 0
    cache_dir: Path | None = None  # None: default_cache_dir(actual port)
    servers: tuple[net.Address, ...] = ()
    exclude: tuple[str, ...] = ()
    max_builds: int = 2
    max_signature: int = 128 * 1024 * 1024
    keep: int = 3
    #: Keep the last archive built per path (and its index) so the next build is
    #: incremental; False: every build is a full one, no archive on disk.
    keep_archives: bool = True
    handshake_timeout: float = net.HANDSHAKE_TIMEOUT
    #: Authenticated sessions served at once; more are told ``busy`` and closed.
    max_connections: int = 256
    #: Handshakes pending at once; a new connection beyond this evicts the oldest pending one.
    max_handshakes: int = net.MAX_PENDING_HANDSHAKES
    path_lock_timeout: float = PATH_LOCK_TIMEOUT
    #: A server that reads nothing for this long is gone (its build slot and path lock freed).
    send_timeout: float = net.DEFAULT_SEND_TIMEOUT
    #: Where ``/metrics`` is served (``--metrics-listen``); None: off.
    metrics_listen: net.Address | None = None
    #: Bytes per second all sessions together may send (``--bwlimit``); None: no cap.
    bwlimit: int | None = None


@attrs.define
class _PathLock:
    lock: trio.Lock = attrs.Factory(trio.Lock)
    users: int = 0  # tasks holding or waiting for ``lock``; the entry goes at 0


class Agent:
    """One agent daemon; ``run`` until cancelled."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.address = ""
        self.cache: AgentCache | None = None
        self.builds = trio.CapacityLimiter(config.max_builds)
        self.active = 0
        self.served = 0
        self._locks: dict[str, _PathLock] = {}
        self.sessions = 0
        self.gate = net.HandshakeGate(
            log, max_pending=config.max_handshakes, timeout=config.handshake_timeout
        )
        self.announced: set[str] = set()
        self._auth_log = net.RateLimitedLog(log)
        self.metrics = AgentMetrics(running=lambda: self.active)
        #: Where ``/metrics`` is served (port 0 resolved), or "".
        self.metrics_address = ""
        #: One bucket for the whole agent: the cap is on what this node puts on the network.
        self.bandwidth = net.TokenBucket(config.bwlimit) if config.bwlimit else None

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        net.prepare_tls(cfg.key, "agent")  # mint our certificate now, not at the first peer
        listeners, bound = await net.listen(net.Address(cfg.host, cfg.port))
        port = bound.port
        self.address = str(bound)
        cache_dir = cfg.cache_dir if cfg.cache_dir is not None else default_cache_dir(port)
        self.cache = await trio.to_thread.run_sync(
            lambda: AgentCache(cache_dir, keep=cfg.keep, keep_archives=cfg.keep_archives)
        )
        log.info(
            "serving %s on %s; cache %s", ", ".join(cfg.allow.roots), self.address, cache_dir
        )
        if cfg.bwlimit:
            log.info("bandwidth cap: %d bytes/s sent, all backups together (--bwlimit)",
                     cfg.bwlimit)
        async with trio.open_nursery() as nursery:
            await nursery.start(net.serve, self._handle, listeners, self.gate)
            if cfg.metrics_listen is not None:
                bound = await nursery.start(
                    net_http.serve_http, self.metrics.routes(), cfg.metrics_listen, log)
                self.metrics_address = str(bound)
            for server in cfg.servers:
                nursery.start_soon(self._announce, server)
            task_status.started(self.address)

    # -- announcements -----------------------------------------------------------------------

    async def _announce(self, server: net.Address) -> None:
        """Tell ``server`` we are up; retry quietly (capped backoff + jitter) until it hears."""
        name = str(server)
        delay = ANNOUNCE_FIRST_S
        me = net.Address.parse(self.address)
        failures = 0
        while True:
            try:
                chan = await net.connect(server, key=self.config.key, role="agent")
                async with chan:
                    await chan.send(protocol.Announce(me.host, me.port))
                    await chan.receive_a(protocol.Ack)
            except AuthError as exc:
                # Not a passing outage: one of the two holds another cluster's key.  Loud,
                # but at most once a minute.
                self._auth_log(name, "announce to server %s: authentication failed (%s); "
                               "retrying in the background", name, exc,
                               extra=net.log_context(peer=name, event="auth-failed"))
            except DeltabkpError as exc:
                failures += 1
                # Loud once, then quiet: a server that is down is normal, not news.
                (log.warning if failures == 1 else log.debug)(
                    "announce to server %s failed (%s); retrying in the background", name, exc,
                    extra=net.log_context(peer=name, event="server-unreachable"),
                )
            else:
                log.info("announced %s to server %s", self.address, name)
                self.announced.add(name)
                return
            await trio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, ANNOUNCE_CAP_S)

    # -- connections -------------------------------------------------------------------------

    def _pong_info(self) -> dict[str, object]:
        return {
            "name": "deltabkp-agent",
            "version": __version__,
            "node": self.address,
            "roots": self.config.allow.advertised,
            "active": self.active,
            "served": self.served,
        }

    async def _resolve(self, path: str) -> str:
        """``Allowlist.resolve`` (realpath, stat: blocking) in a worker thread."""
        return await trio.to_thread.run_sync(self.config.allow.resolve, path, self.address)

    async def _path_check(self, path: str) -> dict[str, object]:
        """The allowlist's verdict on ``path``, resolved here where the path lives."""
        try:
            await self._resolve(path)
        except RequestRefused as exc:
            return {"ok": False, "code": str(exc.code), "message": exc.reason, "path": path}
        return {"ok": True}

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            async with stream:
                chan = await self._handshake(stream)
                if chan is None:
                    return
                if self.sessions >= self.config.max_connections:
                    log.warning(
                        "too many sessions (%d): closing the one from %s",
                        self.config.max_connections, chan.peer,
                    )
                    await chan.send_error(ErrorCode.BUSY, "too many connections, try again later")
                    return
                self.sessions += 1
                live = self.metrics.wire.add(lambda: (chan.bytes_sent, chan.bytes_received))
                try:
                    await self._serve(chan)
                finally:
                    self.sessions -= 1
                    self.metrics.wire.done(live)
        except DeltabkpError as exc:
            log.warning("connection ended: %s", exc)
        except Exception:  # a bug: log it, never let one connection take the daemon down
            log.exception("internal error while serving a connection")

    async def _handshake(self, stream: trio.SocketStream) -> net.Channel | None:
        """The authenticated channel, or None (refused, timed out or evicted; logged)."""
        chan = await self.gate.admit(
            stream, key=self.config.key, role="agent", roles=("server",),
            info={"name": "deltabkp-agent", "version": __version__, "node": self.address,
                  "deltas": list(layout_capabilities())},
        )
        if chan is not None:
            chan.send_timeout = self.config.send_timeout
            if self.bandwidth is not None:
                chan.limits = (self.bandwidth,)
        return chan

    async def _serve(self, chan: net.Channel) -> None:
        while True:
            msg = await chan.next_request(IDLE_TIMEOUT)
            if msg is None:
                return  # hang-up, silence or out of turn: the server is done with us
            if isinstance(msg, protocol.Ping):
                info = self._pong_info()
                if msg.path is not None:
                    info["path_check"] = await self._path_check(msg.path)
                await chan.send(protocol.Pong(info))
                self.metrics.request("ping", "ok")
            elif isinstance(msg, protocol.BackupRequest):
                if not await self._backup(chan, msg):
                    return
            else:  # cancel or error: the conversation is closed
                return

    async def _backup(self, chan: net.Channel, req: protocol.BackupRequest) -> bool:
        """Serve one request; False when the connection is unusable afterwards."""
        node, path = self.address, req.path
        about = net.log_context(node=node, path=path)
        assert self.cache is not None
        try:
            root = await self._resolve(path)
        except RequestRefused as exc:
            log.warning("refused backup of %s: %s", path, exc,
                        extra={**about, "event": "backup-refused"})
            self.metrics.request("backup", "refused")
            await chan.send(protocol.Error(str(exc.code), exc.reason))
            return True
        exclude = tuple(dict.fromkeys((*self.config.exclude, *req.exclude)))
        ctx = BackupContext(node, self.cache, self.builds, self.config.max_signature)
        entry = self._locks.setdefault(root, _PathLock())
        entry.users += 1
        try:
            acquired = False
            with trio.move_on_after(self.config.path_lock_timeout):
                await entry.lock.acquire()
                acquired = True
            if not acquired:
                log.warning("refused backup of %s: another backup of it is still running", path,
                            extra={**about, "event": "backup-busy"})
                self.metrics.request("backup", "busy")
                await chan.send(
                    protocol.Error(str(ErrorCode.BUSY), "a backup of this path is already running")
                )
                return True
            try:
                return await self._run_backup(ctx, chan, req, root, exclude)
            finally:
                entry.lock.release()
        except PeerUnavailable as exc:  # sending "busy" failed
            log.warning("backup of %s abandoned: %s", path, exc,
                        extra={**about, "event": "backup-abandoned"})
            return False
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._locks[root]

    async def _run_backup(
        self,
        ctx: BackupContext,
        chan: net.Channel,
        req: protocol.BackupRequest,
        root: str,
        exclude: tuple[str, ...],
    ) -> bool:
        path = req.path
        about = net.log_context(node=ctx.node, path=path)
        self.active += 1
        began = trio.current_time()
        agent_limits = chan.limits
        if req.bwlimit is not None:
            # The target's own cap, on top of the agent's: the lower of the two wins.
            chan.limits = (*agent_limits, net.TokenBucket(req.bwlimit))
            log.info("backup of %s: at most %d bytes/s (the target's --bwlimit)", path,
                     req.bwlimit, extra=about)
        try:
            out = await serve_backup(ctx, chan, req, root, exclude)
        except ServerStopped as exc:
            log.info("backup of %s stopped: %s", path, exc, extra=about)
            self.metrics.failed("stopped", trio.current_time() - began)
            return False
        except (PeerUnavailable, ProtocolError) as exc:
            log.warning("backup of %s abandoned: %s", path, exc,
                        extra={**about, "event": "backup-abandoned"})
            self.metrics.failed("abandoned", trio.current_time() - began)
            if isinstance(exc, ProtocolError):
                await chan.send_error(ErrorCode.PROTOCOL, exc.reason)
            return False
        except Exception as exc:
            code, message = describe_failure(exc)
            if code == ErrorCode.INTERNAL:
                log.exception("backup of %s failed", path,
                              extra={**about, "event": "backup-failed"})
            else:
                log.warning("backup of %s failed: %s", path, message,
                            extra={**about, "event": "backup-failed"})
            self.metrics.failed("failed", trio.current_time() - began)
            await chan.send_error(code, message)
            return False  # the conversation may be mid-way: start afresh on a new connection
        finally:
            self.active -= 1
            chan.limits = agent_limits
        self.served += 1
        self.metrics.backup(out, trio.current_time() - began)
        if out.outcome == "unchanged":
            log.info("backup of %s: unchanged (%s), base %s; phases %s", path, out.reason,
                     out.archive_hash.hex()[:16], out.phases,
                     extra={**about, "event": "backup-served"})
        else:
            log.info(
                "backup of %s: archive %s, %d bytes, %d files, delta %d bytes (%.1f%%), "
                "signature from %s, %d changed while read; phases %s",
                path, out.archive_hash.hex()[:16], out.archive_size, out.files, out.delta_bytes,
                100.0 * out.delta_bytes / out.archive_size if out.archive_size else 0.0,
                out.signature_from, out.changed, out.phases,
                extra={**about, "event": "backup-served"},
            )
        return out.reusable


def configure_logging(level: int = logging.INFO) -> None:
    net.configure_logging("deltabkp-agent", level)
