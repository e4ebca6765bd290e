"""A dummy "echo" application: the live workload whose data directory the cluster backs up.

Job: a line-oriented TCP echo server (Trio) that answers every line with the same line and
appends every message it receives to files under its data directory, the way the original
system's dummy applications did, so that the files keep changing while hot backups run:

    DIR/messages.log              every message: "<UTC time> <peer> <line>", appended
    DIR/messages-<n>.log          rotated logs: messages.log is renamed once it passes
                                  --rotate-bytes; only the newest --keep-rotated are kept
    DIR/stats.json                message count and the last message, replaced atomically

Invariants: a line is echoed only after it has been appended and flushed (so whatever a client
saw echoed is in the files a backup reads next); lines are bounded (--max-line, longer lines
close the connection); rotation renames and deletes files while backups may be reading them,
which is the point. Prints exactly ``echo-app listening on HOST:PORT`` on stdout once the port
is open (port 0 resolves to the real port); SIGTERM/SIGINT stop it cleanly.

    python examples/echo/echo_app.py --listen 127.0.0.1:0 --data-dir ./echo-data
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from deltabkp.errors import UsageError
from deltabkp.net import Address

READY_PREFIX = "echo-app listening on"


def parse_hostport(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[v6]:PORT``) → (host, port); ``SystemExit`` with a clear message."""
    try:
        addr = Address.parse(text)
    except UsageError as exc:
        raise SystemExit(f"echo-app: {exc}") from None
    return addr.host, addr.port


class MessageLog:
    """The app's files. Blocking writes are tiny appends to the page cache, so they run inline."""

    def __init__(self, data_dir: Path, rotate_bytes: int, keep_rotated: int) -> None:
        self.dir = data_dir
        self.rotate_bytes = rotate_bytes
        self.keep_rotated = keep_rotated
        self.dir.mkdir(parents=True, exist_ok=True)
        self.current = self.dir / "messages.log"
        self.stats_path = self.dir / "stats.json"
        self.count = self._load_count()
        self.rotations = max(self._rotated_numbers(), default=0)
        self._file = open(self.current, "a", encoding="utf-8")

    def _load_count(self) -> int:
        try:
            return int(json.loads(self.stats_path.read_text(encoding="utf-8"))["messages"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def _rotated_numbers(self) -> list[int]:
        out = []
        for p in self.dir.glob("messages-*.log"):
            stem = p.stem.removeprefix("messages-")
            if stem.isdigit():
                out.append(int(stem))
        return sorted(out)

    def append(self, peer: str, line: str) -> None:
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
        self._file.write(f"{now} {peer} {line}\n")
        # Flush before echoing: the client's view and the files a backup reads agree.
        self._file.flush()
        self.count += 1
        self._write_stats(now, peer, line)
        if self._file.tell() >= self.rotate_bytes:
            self._rotate()

    def _write_stats(self, now: str, peer: str, line: str) -> None:
        tmp = self.stats_path.with_suffix(".json.tmp")
        tmp.write_text(
            json.dumps({"messages": self.count, "rotations": self.rotations, "last": {
                "time": now, "peer": peer, "line": line[:200]}}) + "\n",
            encoding="utf-8",
        )
        os.replace(tmp, self.stats_path)

    def _rotate(self) -> None:
        self._file.close()
        self.rotations += 1
        os.replace(self.current, self.dir / f"messages-{self.rotations}.log")
        for n in self._rotated_numbers()[: -self.keep_rotated]:
            (self.dir / f"messages-{n}.log").unlink(missing_ok=True)
        self._file = open(self.current, "a", encoding="utf-8")

    def close(self) -> None:
        self._file.close()


async def serve_client(stream: trio.SocketStream, log: MessageLog, max_line: int) -> None:
    try:
        host, port = stream.socket.getpeername()[:2]
        peer = str(Address(host, port))
    except OSError:
        peer = "?"
    buf = bytearray()
    async with stream:
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
                while (nl := buf.find(b"\n")) >= 0:
                    raw = bytes(buf[:nl])
                    del buf[: nl + 1]
                    line = raw.decode("utf-8", "replace").rstrip("\r")
                    log.append(peer, line)
                    await stream.send_all(raw + b"\n")
                if len(buf) > max_line:
                    await stream.send_all(b"error: line too long\n")
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


async def run(args: argparse.Namespace) -> None:
    host, port = parse_hostport(args.listen)
    log = MessageLog(Path(args.data_dir), args.rotate_bytes, args.keep_rotated)
    try:
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                listeners = await trio.open_tcp_listeners(port, host=host)
                sockname = listeners[0].socket.getsockname()
                shown = f"[{sockname[0]}]" if ":" in sockname[0] else sockname[0]
                nursery.start_soon(
                    trio.serve_listeners,
                    lambda s: serve_client(s, log, args.max_line),
                    listeners,
                )
                print(f"{READY_PREFIX} {shown}:{sockname[1]}", flush=True)
                print(f"echo-app: data dir {log.dir}", file=sys.stderr, flush=True)
                async for signum in signals:
                    print(f"echo-app: {signal.Signals(signum).name}, stopping after "
                          f"{log.count} messages", file=sys.stderr, flush=True)
                    nursery.cancel_scope.cancel()
                    break
    finally:
        log.close()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="echo-app", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", default="127.0.0.1:7000", metavar="HOST:PORT",
                    help="address to listen on (default %(default)s; port 0 picks a free port)")
    ap.add_argument("--data-dir", required=True, metavar="DIR", help="where the messages go")
    ap.add_argument("--rotate-bytes", type=int, default=256 * 1024, metavar="N",
                    help="rotate messages.log once it reaches N bytes (default %(default)s)")
    ap.add_argument("--keep-rotated", type=int, default=5, metavar="N",
                    help="rotated logs kept (default %(default)s)")
    ap.add_argument("--max-line", type=int, default=64 * 1024, metavar="N",
                    help="longest accepted line in bytes (default %(default)s)")
    args = ap.parse_args(argv)
    if args.rotate_bytes < 1 or args.keep_rotated < 1 or args.max_line < 1:
        ap.error("--rotate-bytes, --keep-rotated and --max-line must be at least 1")
    try:
        trio.run(run, args)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
