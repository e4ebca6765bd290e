"""The daemons' HTTP side door (``--metrics-listen``): Prometheus metrics, a health check, and
the server's status page, served from Trio by hypercorn with a minimal ASGI app.

Job: everything both daemons share about it — the flags and the loopback rule, one small
router (``Request`` → ``Response``) turned into an ASGI app, serving it on an address under
the caller's nursery, the Prometheus exposition of a daemon's own registry, and byte counters
that move while a transfer is still running (``LiveBytes``).
Invariants:
- off unless ``--metrics-listen`` is given; a non-loopback address is refused unless
  ``--metrics-allow-remote`` says so: the endpoint is unauthenticated (it shows counts and,
  on the server, node names and paths), so exposing it is an explicit decision;
- read-only: GET and HEAD only (405 otherwise); request bodies are never read; a request
  head is bounded by h11's limit (``MAX_HEAD``), the query string by ``MAX_QUERY`` (414);
- every daemon has its own ``CollectorRegistry`` (never prometheus_client's global one), so
  several daemons can live in one process, as tests do;
- cancelling the caller's scope stops the server (structured, hypercorn's Trio worker);
  a handler's bug is a 500 and one logged traceback, never the daemon's end;
- a port that cannot be bound is a ``DeltabkpError`` naming the address, at start-up.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import socket
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import attrs
import trio

from deltabkp.errors import DeltabkpError, UsageError
from deltabkp.net._address import Address, is_loopback

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

__all__ = [
    "MAX_QUERY",
    "Handler",
    "LiveBytes",
    "Request",
    "Response",
    "add_metrics_arguments",
    "asgi_app",
    "is_loopback",
    "metrics_address",
    "metrics_handler",
    "serve_http",
]

#: Longest query string accepted (the page's parameters are two small numbers).
MAX_QUERY = 1024
#: Longest request head h11 buffers before answering 400.
MAX_HEAD = 16 * 1024

_ALLOW_REMOTE = "--metrics-allow-remote"


@attrs.frozen
class Request:
    path: str
    #: The last value of each query parameter.
    query: Mapping[str, str]


@attrs.frozen
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"

    @classmethod
    def text(cls, status: int, text: str) -> Response:
        return cls(status, text.encode())


Handler = Callable[[Request], Awaitable[Response]]


def add_metrics_arguments(p: argparse.ArgumentParser) -> None:
    """``--metrics-listen`` and ``--metrics-allow-remote``, the same on both daemons."""
    p.add_argument(
        "--metrics-listen", metavar="HOST:PORT", default=None,
        help="serve Prometheus metrics on /metrics (the server: also a status page on /) at "
        "this address; off by default. Unauthenticated and read-only: loopback addresses "
        f"only unless {_ALLOW_REMOTE}",
    )
    p.add_argument(
        _ALLOW_REMOTE, action="store_true",
        help="allow --metrics-listen on a non-loopback address (anyone who can reach it sees "
        "the metrics, and on the server the targets and the execution log)",
    )


def metrics_address(args: argparse.Namespace) -> Address | None:
    """The checked ``--metrics-listen`` address, or None when it is off."""
    text = getattr(args, "metrics_listen", None)
    if not text:
        return None
    addr = Address.parse(text)
    if not (is_loopback(addr.host) or getattr(args, "metrics_allow_remote", False)):
        raise UsageError(
            f"--metrics-listen {text}: not a loopback address; the metrics endpoint is "
            f"unauthenticated, so add {_ALLOW_REMOTE} to serve it there"
        )
    return addr


class LiveBytes:
    """A ``{direction="sent"|"received"}`` byte counter fed by channels: the bytes of finished
    transfers plus, at scrape time, those of the ones still running — so it moves during a
    long backup and never goes back (a transfer's bytes move from live to done at once, on
    the one Trio thread that also scrapes)."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self.name, self.documentation = name, documentation
        self._sent = self._received = 0
        self._live: dict[int, Callable[[], tuple[int, int]]] = {}
        self._next = 0
        registry.register(self)

    @property
    def sent(self) -> int:
        return self._sent + sum(read()[0] for read in self._live.values())

    @property
    def received(self) -> int:
        return self._received + sum(read()[1] for read in self._live.values())

    def add(self, read: Callable[[], tuple[int, int]]) -> int:
        """Count ``read()`` (sent, received so far) live from now on; ``done`` with the token
        it returns once the transfer is over."""
        token = self._next
        self._next += 1
        self._live[token] = read
        return token

    def done(self, token: int) -> None:
        read = self._live.pop(token, None)
        if read is not None:
            sent, received = read()
            self._sent += sent
            self._received += received

    @contextlib.contextmanager
    def track(self, read: Callable[[], tuple[int, int]]) -> Iterator[None]:
        """``add`` for the duration of the block."""
        token = self.add(read)
        try:
            yield
        finally:
            self.done(token)

    def describe(self) -> list[Metric]:
        return self._families(0, 0)

    def collect(self) -> list[Metric]:
        return self._families(self.sent, self.received)

    def _families(self, sent: int, received: int) -> list[Metric]:
        from prometheus_client.core import CounterMetricFamily

        fam = CounterMetricFamily(self.name, self.documentation, labels=["direction"])
        fam.add_metric(["sent"], sent)
        fam.add_metric(["received"], received)
        return [fam]


def metrics_handler(
    registry: CollectorRegistry, refresh: Callable[[], Awaitable[None]] | None = None
) -> Handler:
    """``/metrics``: the registry in Prometheus text format (``refresh`` first: gauges that
    are read from elsewhere, such as the catalog, update their cache before the scrape)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    async def handle(_req: Request) -> Response:
        if refresh is not None:
            await refresh()
        return Response(200, generate_latest(registry), CONTENT_TYPE_LATEST)

    return handle


async def _health(_req: Request) -> Response:
    return Response.text(200, "ok\n")


def asgi_app(routes: Mapping[str, Handler], log: logging.Logger) -> Any:
    """A read-only ASGI app over ``routes`` (exact paths; ``/healthz`` is always there)."""
    table: dict[str, Handler] = {"/healthz": _health, **routes}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return  # websocket and the like: not served (hypercorn closes it)
        method = scope["method"]
        qs: bytes = scope.get("query_string", b"")
        if method not in ("GET", "HEAD"):
            resp = Response.text(405, "read-only: GET and HEAD only\n")
        elif len(qs) > MAX_QUERY:
            resp = Response.text(414, "query string too long\n")
        elif (handler := table.get(scope["path"])) is None:
            resp = Response.text(404, "not found\n")
        else:
            query = dict(urllib.parse.parse_qsl(qs.decode("latin-1"), max_num_fields=32))
            try:
                resp = await handler(Request(scope["path"], query))
            except Exception:  # a bug in a page: one 500, never the daemon
                log.exception("internal error serving %s", scope["path"])
                resp = Response.text(500, "internal error\n")
        headers = [
            (b"content-type", resp.content_type.encode()),
            (b"content-length", str(len(resp.body)).encode()),
            (b"cache-control", b"no-store"),
            (b"x-content-type-options", b"nosniff"),
        ]
        await send({"type": "http.response.start", "status": resp.status, "headers": headers})
        await send({"type": "http.response.body",
                    "body": b"" if method == "HEAD" else resp.body})

    return app


def _bind(address: Address) -> socket.socket:
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
        family, kind, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise DeltabkpError(f"cannot listen on {address} for metrics: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise DeltabkpError(f"cannot listen on {address} for metrics: {exc.strerror}") from None
    return sock


async def serve_http(
    routes: Mapping[str, Handler],
    address: Address,
    log: logging.Logger,
    *,
    task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``routes`` on ``address`` until cancelled; ``started`` with the bound address
    (port 0 resolved), after logging it."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    # Bound here, so a taken port is our one-line error and port 0 tells us its number.
    sock = _bind(address)
    host, port = sock.getsockname()[:2]
    bound = Address(address.host if address.host == "localhost" else host, port)
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn wraps and owns the descriptor
    config.accesslog = None
    quiet = log.getChild("http")
    quiet.setLevel(logging.WARNING)  # hypercorn's "Running on …" is ours below
    config.errorlog = quiet
    config.h11_max_incomplete_size = MAX_HEAD
    config.keep_alive_timeout = 5.0
    config.graceful_timeout = 1.0
    config.include_server_header = False

    async def started(
        *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await serve(asgi_app(routes, log), config, task_status=task_status)

    async with trio.open_nursery() as nursery:
        await nursery.start(started)
        log.info("metrics on http://%s/metrics (unauthenticated, read-only)", bound)
        task_status.started(bound)
