"""The server: opens catalog and store, reconciles them, then listens and schedules.

Job: own the pieces (catalog, store, executor, scheduler, control API) and the one listening
port, which serves ``ctl`` clients (control API) and ``agent`` announcements; the role proved
in the handshake decides the service.
Invariants:
- start-up reconciliation runs before anything is served: executions a crash left open are
  closed as failed, ``.part`` files and files with no committed catalog row are deleted,
  committed rows whose files are gone are marked missing (never offered as a base), a
  whole one whose signature a crash left unmade is signed in the background once serving
  (``ingest.sign_unsigned``: one at a time, under its target's lease, never fatal), so no
  backup makes a large base's signature while its agent waits;
  the store learns from the catalog which versions are reverse deltas (``delta_keys``);
- the scrub (``--scrub-every``) re-checks stored versions in the background, one target at
  a time under its lease, within ``--scrub-rate`` (``scrub``);
- a connection that fails authentication gets one error frame and is closed, nothing else;
  no connection handler can bring the daemon down (their errors are logged);
- every connection is TLS 1.3, mutually authenticated, before the key handshake; pending
  handshakes are bounded (``net.HandshakeGate``, oldest evicted, short deadline), running
  out of descriptors is backed off without a traceback and refusals are logged rate-limited
  per address (``net.serve``);
- cancelling ``run`` (SIGTERM/SIGINT) cancels executions, whose ``.part`` files are removed.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path

import trio

from deltabkp import net
from deltabkp.errors import CatalogError, DeltabkpError, StoreError
from deltabkp.net import _http as net_http
from deltabkp_server.agents import SERVER_INFO, serve_announcements
from deltabkp_server.catalog import AsyncCatalog, Catalog, SqliteCatalog, open_catalog
from deltabkp_server.config import SCRUB_EVERY_S, SCRUB_RATE, ExecutionSettings, ServerConfig
from deltabkp_server.control import ControlAPI
from deltabkp_server.execution import Executor
from deltabkp_server.ingest import sign_unsigned
from deltabkp_server.metrics import ServerMetrics
from deltabkp_server.scheduler import LEASE_TTL_S, Scheduler
from deltabkp_server.scrub import Verifier, run_scrub
from deltabkp_server.seeks import SeekCache
from deltabkp_server.store import Store, open_store
from deltabkp_server.web import StatusPage, routes

__all__ = ["Server", "configure_logging"]

log = logging.getLogger("deltabkp_server")


class Server:
    """One server daemon; ``run`` until cancelled."""

    def __init__(
        self,
        *,
        data_dir: str | Path,
        key: bytes,
        host: str = "127.0.0.1",
        port: int = net.DEFAULT_SERVER_PORT,
        max_concurrent: int = 8,
        max_per_node: int = 2,
        settings: ExecutionSettings = ExecutionSettings(),
        catalog_url: str = "",
        store_url: str = "",
        s3_endpoint: str | None = None,
        lease_ttl: float = LEASE_TTL_S,
        scrub_every: float = SCRUB_EVERY_S,
        scrub_rate: float = SCRUB_RATE,
        max_handshakes: int = net.MAX_PENDING_HANDSHAKES,
        clock: Callable[[], float] = time.time,
        metrics_listen: net.Address | None = None,
    ) -> None:
        self.config = ServerConfig(
            data_dir=Path(data_dir), key=key, host=host, port=port,
            max_concurrent=max_concurrent, max_per_node=max_per_node, settings=settings,
            catalog_url=catalog_url, store_url=store_url, s3_endpoint=s3_endpoint,
            lease_ttl=lease_ttl, max_handshakes=max_handshakes,
            scrub_every=scrub_every, scrub_rate=scrub_rate, metrics_listen=metrics_listen,
        )
        self.clock = clock
        #: This process's counters (``/metrics``), fed by the executor and the scheduler.
        self.metrics = ServerMetrics()
        #: Where ``/metrics`` and the status page are served (port 0 resolved), or "".
        self.metrics_address = ""
        self.started = clock()
        #: Unique among the servers sharing a catalog (host name and process, plus a nonce).
        self.server_id = f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(2)}"
        self.address = ""
        self.files_limiter = trio.CapacityLimiter(max(2, max_concurrent))
        self.catalog: AsyncCatalog
        self.store: Store
        self.scheduler: Scheduler
        self.control: ControlAPI
        self._lock: DataDirLock | None = None
        #: Whole versions start-up found unsigned (``reconcile``), signed once serving.
        self._unsigned: tuple[tuple[int, int], ...] = ()
        #: Pre-authentication budget: pending handshakes bounded, the oldest evicted.
        self.gate = net.HandshakeGate(log, max_pending=max_handshakes)

    @property
    def data_dir(self) -> Path:
        return self.config.data_dir

    async def _open(self) -> None:
        cfg = self.config

        def open_all() -> tuple[Catalog, Store]:
            if not (cfg.catalog_url and cfg.store_url):
                try:
                    self.data_dir.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise StoreError(
                        f"cannot create data dir {self.data_dir}: {exc.strerror}"
                    ) from None
            cat = open_catalog(cfg.catalog_url, default_dir=self.data_dir)
            try:
                if isinstance(cat, SqliteCatalog):
                    # One server per SQLite catalog: the kernel drops the lock with the process.
                    self._lock = DataDirLock.take(cat.path.with_name(cat.path.name + ".lock"))
                store = open_store(
                    cfg.store_url, default_dir=self.data_dir, s3_endpoint=cfg.s3_endpoint
                )
            except BaseException:
                cat.close()
                raise
            return cat, store

        cat, self.store = await trio.to_thread.run_sync(open_all)
        self.catalog = AsyncCatalog(cat)
        await self.reconcile()
        # Server-local, whatever the store: the newest archive's seek points per target.
        seeks = await trio.to_thread.run_sync(SeekCache, cfg.data_dir / "seek")
        executor = Executor(
            key=cfg.key, catalog=self.catalog, store=self.store,
            files_limiter=self.files_limiter, settings=cfg.settings, clock=self.clock,
            metrics=self.metrics, seeks=seeks,
        )
        self.scheduler = Scheduler(
            executor=executor, catalog=self.catalog, key=cfg.key, server_id=self.server_id,
            max_concurrent=cfg.max_concurrent, max_per_node=cfg.max_per_node,
            lease_ttl=cfg.lease_ttl, clock=self.clock,
        )

    async def reconcile(self) -> None:
        """Close what a crash left open and clean the store — unless other servers are alive
        on this catalog: then their executions are open and their parts in flight, and each
        claim closes the dead rows of its own target instead."""
        now, ttl = self.clock(), self.config.lease_ttl
        others = [s for s in await self.catalog.call(lambda c: c.servers(now, ttl))
                  if s.id != self.server_id]
        if isinstance(self.catalog.sync, SqliteCatalog):
            # One server per SQLite catalog (we hold its lock): any other row is a dead one,
            # whose leases would only keep its targets waiting for the TTL.
            dead = [o.id for o in others]
            await self.catalog.call(lambda c: [c.drop_leases(sid) for sid in dead])
        elif others:
            log.info("start-up: %d other server(s) alive on this catalog; store left as is",
                     len(others))
            return
        n = await self.catalog.call(
            lambda c: c.fail_unfinished(now, "the server stopped during this execution (crash or kill)")
        )
        committed = await self.catalog.call(lambda c: c.retained_keys())
        deltas = await self.catalog.call(lambda c: c.delta_keys())
        report = await trio.to_thread.run_sync(self.store.reconcile, committed, deltas)
        if report.missing:
            def mark(c: Catalog) -> None:
                for t, s in report.missing:
                    c.mark_missing(t, s)

            await self.catalog.call(mark)
        for p in report.removed_parts:
            log.warning("start-up: removed partial archive %s", p)
        for p in report.removed_orphans:
            log.warning("start-up: removed %s (no committed catalog row)", p)
        for tid, seq in report.missing:
            log.error("start-up: archive %d of target %d is in the catalog but not in the "
                      "store; marked missing", seq, tid)
        if report.unsigned:
            # A crash between an archive's commit and its signature's: not a fault.
            log.info("start-up: %d archive(s) have no signature yet: signing them in the "
                     "background", len(report.unsigned))
        self._unsigned = report.unsigned
        if n:
            log.warning("start-up: %d execution(s) left open by a previous run marked failed", n)

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        try:
            await self._open()
            net.prepare_tls(cfg.key, "server")  # mint our certificate now, not per connection
            listeners, bound = await net.listen(net.Address(cfg.host, cfg.port))
            self.address = str(bound)
            self.control = ControlAPI(
                config=cfg, catalog=self.catalog, scheduler=self.scheduler, store=self.store,
                files_limiter=self.files_limiter, address=self.address, started=self.started,
                clock=self.clock,
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(self._heartbeat)
                await nursery.start(self.scheduler.run)
                if self._unsigned:
                    nursery.start_soon(functools.partial(
                        sign_unsigned, self.catalog, self.store, self._unsigned,
                        server_id=self.server_id, lease_ttl=cfg.lease_ttl,
                        limiter=self.files_limiter, clock=self.clock))
                if cfg.scrub_every > 0:
                    # Its own limiter: a throttled scrub never holds the backups' file slots.
                    verifier = Verifier(
                        catalog=self.catalog, store=self.store, server_id=self.server_id,
                        lease_ttl=cfg.lease_ttl, limiter=trio.CapacityLimiter(1),
                        clock=self.clock,
                    )
                    await nursery.start(functools.partial(
                        run_scrub, verifier, every=cfg.scrub_every, rate=cfg.scrub_rate))
                await nursery.start(net.serve, self._handle, listeners, self.gate)
                if cfg.metrics_listen is not None:
                    page = StatusPage(catalog=self.catalog, server_id=self.server_id,
                                      address=lambda: self.address, clock=self.clock)
                    bound = await nursery.start(
                        net_http.serve_http, routes(self.catalog, self.metrics, page),
                        cfg.metrics_listen, log)
                    self.metrics_address = str(bound)
                log.info("server %s on catalog %s, store %s", self.server_id,
                         cfg.catalog_url or "sqlite (data dir)", cfg.store_url or "data dir")
                task_status.started(self.address)
        finally:
            with trio.CancelScope(shield=True):
                if hasattr(self, "catalog"):
                    await trio.to_thread.run_sync(self.catalog.sync.close)
                if self._lock is not None:
                    self._lock.release()

    async def _heartbeat(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Tell the catalog this server is alive (``ctl status`` lists the live ones)."""
        sid = self.server_id
        while True:
            now, addr, running = self.clock(), self.address, self.scheduler.running
            try:
                await self.catalog.call(lambda c: c.heartbeat(sid, addr, now, running))
            except DeltabkpError as exc:
                log.error("heartbeat: %s", exc)
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
            await trio.sleep(self.config.lease_ttl / 3)

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            async with stream:
                # TLS + key handshake under the gate's budget and deadline (refusals logged
                # there, rate-limited per address).
                chan = await self.gate.admit(
                    stream, key=self.config.key, role="server", roles=("ctl", "agent"),
                    info=SERVER_INFO,
                )
                if chan is None:
                    return
                if chan.peer_role == "ctl":
                    await self.control.serve(chan)
                else:
                    await serve_announcements(chan, self.scheduler.announce)
        except DeltabkpError as exc:
            log.warning("connection ended: %s", exc)
        except Exception:  # a bug: log it, never let one connection take the daemon down
            log.exception("internal error while serving a connection")


class DataDirLock:
    """An exclusive OS lock on a file, held for the process's life (one server per SQLite)."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd, self.path = fd, path

    @classmethod
    def take(cls, path: Path) -> DataDirLock:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise CatalogError(f"cannot open lock file {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise CatalogError(
                f"another deltabkp-server already uses the SQLite catalog next to {path} "
                "(one server per data dir; for several servers use --catalog postgresql://…)"
            ) from None
        return cls(fd, path)

    def release(self) -> None:
        os.close(self._fd)  # closing drops the lock


def configure_logging(level: int = logging.INFO) -> None:
    net.configure_logging("deltabkp-server", level)
