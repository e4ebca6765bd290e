"""The server: opens catalog and store, reconciles them, then listens and schedules.

Job: own the pieces (catalog, store, executor, scheduler, control API) and the one listening
port, which serves ``ctl`` clients (control API) and ``agent`` announcements; the role proved
in the handshake decides the service.
Invariants:
- start-up reconciliation runs before anything is served: executions a crash left open are
  closed as failed, ``.part`` files and files with no committed catalog row are deleted,
  committed rows whose files are gone are marked missing (never offered as a base);
- a connection that fails authentication gets one error frame and is closed, nothing else;
  no connection handler can bring the daemon down (their errors are logged);
- cancelling ``run`` (SIGTERM/SIGINT) cancels executions, whose ``.part`` files are removed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import trio

from deltabkp import net
from deltabkp.errors import DeltabkpError, StoreError
from deltabkp_server.agents import SERVER_INFO, serve_announcements
from deltabkp_server.catalog import AsyncCatalog, Catalog, SqliteCatalog
from deltabkp_server.config import ExecutionSettings, ServerConfig
from deltabkp_server.control import ControlAPI
from deltabkp_server.execution import Executor
from deltabkp_server.scheduler import Scheduler
from deltabkp_server.store import LocalStore

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
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = ServerConfig(
            data_dir=Path(data_dir), key=key, host=host, port=port,
            max_concurrent=max_concurrent, max_per_node=max_per_node, settings=settings,
        )
        self.clock = clock
        self.started = clock()
        self.address = ""
        self.files_limiter = trio.CapacityLimiter(max(2, max_concurrent))
        self.catalog: AsyncCatalog
        self.store: LocalStore
        self.scheduler: Scheduler
        self.control: ControlAPI

    @property
    def data_dir(self) -> Path:
        return self.config.data_dir

    async def _open(self) -> None:
        def open_all() -> tuple[SqliteCatalog, LocalStore]:
            try:
                self.data_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create data dir {self.data_dir}: {exc.strerror}") from None
            return SqliteCatalog(self.data_dir / "catalog.sqlite3"), LocalStore(self.data_dir)

        cat, self.store = await trio.to_thread.run_sync(open_all)
        self.catalog = AsyncCatalog(cat)
        await self.reconcile()
        cfg = self.config
        executor = Executor(
            key=cfg.key, catalog=self.catalog, store=self.store,
            files_limiter=self.files_limiter, settings=cfg.settings, clock=self.clock,
        )
        self.scheduler = Scheduler(
            executor=executor, catalog=self.catalog, key=cfg.key,
            max_concurrent=cfg.max_concurrent, max_per_node=cfg.max_per_node, clock=self.clock,
        )
        for t in await self.catalog.call(lambda c: c.targets()):
            self.scheduler.add(t)

    async def reconcile(self) -> None:
        now = self.clock()
        n = await self.catalog.call(
            lambda c: c.fail_unfinished(now, "the server stopped during this execution (crash or kill)")
        )
        committed = await self.catalog.call(lambda c: c.retained_keys())
        report = await trio.to_thread.run_sync(self.store.reconcile, committed)
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
            log.error("start-up: archive %d of target %d is in the catalog but not on disk; marked missing", seq, tid)
        if n:
            log.warning("start-up: %d execution(s) left open by a previous run marked failed", n)

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        await self._open()
        cfg = self.config
        listeners, bound = await net.listen(net.Address(cfg.host, cfg.port))
        self.address = str(bound)
        self.control = ControlAPI(
            config=cfg, catalog=self.catalog, scheduler=self.scheduler, store=self.store,
            files_limiter=self.files_limiter, address=self.address, started=self.started,
            clock=self.clock,
        )
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.scheduler.run)
                await nursery.start(trio.serve_listeners, self._handle, listeners)
                task_status.started(self.address)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.catalog.sync.close)

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            async with stream:
                try:
                    chan = await net.accept(
                        stream, key=self.config.key, role="server", roles=("ctl", "agent"),
                        info=SERVER_INFO,
                    )
                except DeltabkpError as exc:
                    log.warning("refused connection: %s", exc)
                    return
                if chan.peer_role == "ctl":
                    await self.control.serve(chan)
                else:
                    await serve_announcements(
                        chan, lambda h, p, ph: len(self.scheduler.announce(h, p, ph))
                    )
        except DeltabkpError as exc:
            log.warning("connection ended: %s", exc)
        except Exception:  # a bug: log it, never let one connection take the daemon down
            log.exception("internal error while serving a connection")


def configure_logging(level: int = logging.INFO) -> None:
    net.configure_logging("deltabkp-server", level)
