"""The catalog: targets, leases, servers, archives and the execution log, behind one protocol.

Job: be the server's point of truth, on SQLite (embedded default, one server) or PostgreSQL
(shared by many servers), chosen by URL.  An archive exists when, and only when, its catalog
row is committed; the store's files follow the catalog, never the other way round.

- ``Catalog``: the protocol (``_protocol``); ``AsyncCatalog`` runs one from Trio in threads;
- ``SqliteCatalog`` / ``PostgresCatalog``: the two engines over one SQL implementation
  (``_sql``), with one versioned list of migrations for both (``_schema``);
- ``open_catalog(url, default_dir=…)``: the backend for a ``--catalog`` URL.

Every backend passes ``tests/test_catalog.py``, the contract suite, on a real engine.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path

from deltabkp.errors import CatalogError
from deltabkp_server.catalog._postgres import PostgresCatalog, redact
from deltabkp_server.catalog._protocol import (
    UNSET,
    AsyncCatalog,
    Catalog,
    lease_running_out,
    lease_server,
    upkeep_owner,
)
from deltabkp_server.catalog._schema import SCHEMA_VERSION
from deltabkp_server.catalog._sqlite import SqliteCatalog
from deltabkp_server.model import ServerRecord

__all__ = [
    "Catalog",
    "AsyncCatalog",
    "SqliteCatalog",
    "PostgresCatalog",
    "ServerRecord",
    "SCHEMA_VERSION",
    "UNSET",
    "lease_running_out",
    "lease_server",
    "upkeep_owner",
    "open_catalog",
    "redact",
    "DEFAULT_SQLITE_NAME",
]

#: The catalog file in the data directory when no URL is given.
DEFAULT_SQLITE_NAME = "catalog.sqlite3"


def open_catalog(url: str, *, default_dir: Path) -> Catalog:
    """The catalog for ``url``; ``CatalogError`` (password redacted) if it cannot be opened.

    - ``""`` or ``sqlite:``: ``DEFAULT_SQLITE_NAME`` in ``default_dir`` (the data directory);
    - ``sqlite:///ABS/PATH``: that file; ``sqlite:REL/PATH``: relative to ``default_dir``
      (percent-escapes are decoded);
    - ``postgresql://USER[:PASSWORD]@HOST:PORT/DB[?PARAM=…]`` (or ``postgres://``): a libpq
      URL; the password may come from the URL or the standard ``PG*`` variables/``.pgpass``.
    """
    text = url.strip()
    scheme, colon, rest = text.partition(":")
    scheme = scheme.lower()
    if not text or (scheme == "sqlite" and rest in ("", "//")):
        return SqliteCatalog(default_dir / DEFAULT_SQLITE_NAME)
    if colon and scheme == "sqlite":
        if rest.startswith("//"):
            host, _slash, tail = rest[2:].partition("/")
            if host:
                raise CatalogError(
                    f"bad catalog URL {text}: a SQLite URL has no host "
                    "(sqlite:///ABSOLUTE/PATH or sqlite:RELATIVE/PATH)"
                )
            path = Path("/" + urllib.parse.unquote(tail).lstrip("/"))
        else:
            path = Path(urllib.parse.unquote(rest))
            if not path.is_absolute():
                path = default_dir / path
        if text.endswith("/"):
            raise CatalogError(f"bad catalog URL {text}: it names a directory, not a file")
        return SqliteCatalog(path)
    if colon and scheme in ("postgresql", "postgres"):
        return PostgresCatalog(text)
    raise CatalogError(
        f"unsupported catalog URL {redact(text)}: use sqlite:///PATH or "
        "postgresql://USER@HOST:PORT/DB"
    )
