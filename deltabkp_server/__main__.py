"""``deltabkp-server``: command line, logging, signals; the daemon itself is ``Server``.

Prints exactly one line on stdout, ``deltabkp-server listening on HOST:PORT``, once the port
is open (port 0 resolves to the real port, which tests and scripts parse); everything else
(one line per execution, warnings) goes to stderr.  SIGTERM and SIGINT shut down cleanly:
running executions are cancelled, logged as failed and their partial files removed.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from deltabkp import _config, net
from deltabkp._xdg import user_dir
from deltabkp.errors import CatalogError, RequestRefused, UsageError
from deltabkp.net import _http as net_http
from deltabkp_server.config import ExecutionSettings
from deltabkp_server.model import parse_every
from deltabkp_server.server import DataDirLock, Server


def default_data_dir() -> Path:
    """``./deltabkp-data`` if it exists (a demo in the current directory), else the XDG dir."""
    local = Path("deltabkp-data")
    if local.is_dir():
        return local
    base = user_dir("data")
    if base is None:
        raise UsageError("no home directory for the server's data: pass --data-dir")
    return base


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deltabkp-server",
        description=(
            "The deltabkp backup server: pulls delta backups from deltabkp-agent nodes on "
            "schedule, rebuilds and stores full tgz archives (newest 10 per target), keeps a "
            "catalog with the complete execution log, and serves 'deltabkp ctl' on the same "
            "port. Several servers share the work when they share one PostgreSQL catalog and "
            "one store (S3): each due target is leased to one of them."
        ),
    )
    listen = f"127.0.0.1:{net.DEFAULT_SERVER_PORT}"
    net.add_daemon_arguments(
        p, listen=listen, listen_help=f"address to listen on (default {listen}; port 0 picks a free port)",
    )
    p.add_argument(
        "--data-dir", metavar="DIR", default=None,
        help="catalog and archives (default: ./deltabkp-data if that directory exists, else "
        "$XDG_DATA_HOME/deltabkp, i.e. ~/.local/share/deltabkp)",
    )
    p.add_argument(
        "--catalog", metavar="URL", default="",
        help="the catalog: sqlite:///PATH (default: catalog.sqlite3 in the data dir; one server "
        "per SQLite catalog) or postgresql://USER@HOST:PORT/DB, shared by several servers",
    )
    p.add_argument(
        "--store", metavar="URL", default="",
        help="where archives live: file:///DIR (default: the data dir) or s3://BUCKET/PREFIX "
        "(credentials the AWS way: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or ~/.aws)",
    )
    p.add_argument(
        "--s3-endpoint", metavar="URL", default=None,
        help="S3 endpoint for an s3:// store (default: $AWS_ENDPOINT_URL, else AWS)",
    )
    p.add_argument("--lease-ttl", type=float, default=30.0, metavar="S",
                   help="seconds before a dead server's running targets move to another "
                   "server sharing the catalog (default 30)")
    p.add_argument("--max-concurrent", type=int, default=8, metavar="N",
                   help="executions running at once, overall (default 8)")
    p.add_argument("--max-per-node", type=int, default=2, metavar="N",
                   help="executions running at once against one node (default 2)")
    p.add_argument("--keep", type=int, default=10, metavar="N",
                   help="archives kept per target (default 10)")
    p.add_argument("--idle-timeout", type=float, default=300.0, metavar="S",
                   help="longest silence of an agent during a backup, seconds (default 300)")
    p.add_argument("--connect-timeout", type=float, default=10.0, metavar="S",
                   help="longest wait for an agent to connect and finish its TLS and key "
                   "handshake, seconds (default 10; raise it for nodes behind slow links)")
    p.add_argument("--scrub-every", default="1d", metavar="FREQ",
                   help="re-check every stored version's blake3 (rebuilding reverse deltas) "
                   "this often per target: minutes or 90s/5m/2h/1d, 0 or 'off' to disable "
                   "(default 1d); corrupt versions are marked, listed and logged")
    p.add_argument("--scrub-rate", type=float, default=16.0, metavar="MB",
                   help="bytes the scrub may read per second, in MiB (default 16)")
    p.add_argument("--max-archive-mb", type=int, default=64 * 1024, metavar="MB",
                   help="largest archive accepted from an agent, MiB (default 65536 = 64 GiB)")
    net_http.add_metrics_arguments(p)
    return p


def _scrub_every(text: str) -> float:
    if text.strip().lower() in ("0", "off", "never"):
        return 0.0
    try:
        return float(parse_every(text))
    except RequestRefused as exc:
        raise UsageError(f"--scrub-every: {exc.reason}") from None


def _scrub_rate(mib: float) -> float:
    if not mib > 0:
        raise UsageError("--scrub-rate must be a positive number of MiB per second")
    return mib * (1 << 20)


def _make_data_dir(data_dir: Path) -> Path | None:
    """Create ``data_dir`` if missing; the topmost directory this call created (None if it
    existed).  ``os.mkdir`` is atomic: of two starts racing, only one owns what it made."""
    top = data_dir.absolute()
    while not top.parent.exists():
        top = top.parent
    if top.exists():
        return None
    try:
        top.mkdir()
    except FileExistsError:
        return None
    except OSError:
        return None  # the server reports it, with the path, when it tries
    data_dir.mkdir(parents=True, exist_ok=True)
    return top


def _remove_fresh(top: Path, data_dir: Path) -> None:
    """A failed start removes the directory it created — unless a server holds its catalog
    (one that started on the same new directory at the same moment)."""
    try:
        lock = DataDirLock.take(data_dir / "catalog.sqlite3.lock")
    except CatalogError:
        return
    try:
        shutil.rmtree(top, ignore_errors=True)
    finally:
        lock.release()


def main(argv: Sequence[str] | None = None) -> int:
    # Flags, then $DELTABKP_*, then the [server] table of --config, then defaults.
    args = _config.parse_args(build_parser(), argv, "server")
    #: The directory this start created (removed again if the start fails), and whether the
    #: server came up.
    fresh: list[tuple[Path, Path]] = []
    up: list[bool] = []

    def build() -> tuple[net.Starter, Callable[[str], None]]:
        listen = net.Address.parse(args.listen, net.DEFAULT_SERVER_PORT)
        net.at_least_one(args, "max_concurrent", "max_per_node", "keep", "max_archive_mb")
        if not args.lease_ttl >= 3:
            raise UsageError("--lease-ttl must be at least 3 seconds")
        for flag in ("idle_timeout", "connect_timeout"):
            if not 0 < getattr(args, flag) < float("inf"):
                raise UsageError(f"--{flag.replace('_', '-')} must be a positive number of "
                                 "seconds")
        server = Server(
            data_dir=Path(args.data_dir) if args.data_dir else default_data_dir(),
            key=net.load_key(args.key_file), host=listen.host, port=listen.port,
            max_concurrent=args.max_concurrent, max_per_node=args.max_per_node,
            catalog_url=args.catalog, store_url=args.store, s3_endpoint=args.s3_endpoint,
            lease_ttl=args.lease_ttl, max_handshakes=args.max_handshakes,
            scrub_every=_scrub_every(args.scrub_every), scrub_rate=_scrub_rate(args.scrub_rate),
            metrics_listen=net_http.metrics_address(args),
            settings=ExecutionSettings(
                keep=args.keep, idle_timeout=args.idle_timeout,
                connect_timeout=args.connect_timeout, max_archive_size=args.max_archive_mb << 20,
            ),
        )
        if not (args.catalog and args.store):  # the data dir holds the catalog or the store
            top = _make_data_dir(server.data_dir)
            if top is not None:
                fresh.append((top, server.data_dir))

        def ready(_address: str) -> None:
            up.append(True)
            logging.getLogger("deltabkp_server").info(
                "server %s, data dir %s, max %d executions (%d per node)", server.server_id,
                server.data_dir, server.config.max_concurrent, server.config.max_per_node,
            )

        return server.run, ready

    code = net.daemon_main("deltabkp-server", args, build)
    if code != 0 and not up and fresh:  # e.g. the port is taken: leave no new empty data dir
        _remove_fresh(*fresh[0])
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
