"""The agent's on-disk cache: signatures by archive hash, tree fingerprints by (path, hash).

Job: let the agent answer a backup request without the server sending a signature (it keeps
the signature of every archive it produced, keyed by the archive's blake3), and without
reading a single file when nothing changed (it keeps, for each path, the tree fingerprint
taken just before it built each archive).

Layout (version 1) under the cache dir::

    sigs/<archive hash hex>.sig      a signature, format v1 (docs/formats.md)
    paths/<blake3(path)[:16] hex>.json
        {"version": 1, "path": P, "entries": [{"hash": hex, "fingerprint": hex | null,
          "exclude": [..], "at": unix time}, ...]}   newest first, at most ``keep``

Invariants:
- it is only a cache: whatever is missing, torn or corrupt reads as a miss (never an
  error, never a wrong answer): a signature is used only if it parses and its base hash
  is the hash it is filed under; a fingerprint is used only for the exact (path, archive
  hash, exclude list) it was recorded for, and never when it was racy;
- writes go to a temp file and are renamed into place, so a reader sees old or new;
- each path keeps its ``keep`` newest entries; a signature file no entry refers to is
  deleted when the entries change.
- every method blocks (file I/O): call them from a worker thread.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import attrs
import blake3

from deltabkp import Signature
from deltabkp._atomic import write_bytes_atomic
from deltabkp.errors import FormatError, UsageError

__all__ = ["AgentCache", "CacheEntry", "default_cache_dir"]

log = logging.getLogger("deltabkp_agent")
CACHE_VERSION = 1


def default_cache_dir(port: int) -> Path:
    """``$XDG_CACHE_HOME/deltabkp/agent-<port>`` (``~/.cache/deltabkp/agent-<port>``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "deltabkp" / f"agent-{port}"


@attrs.frozen
class CacheEntry:
    """What the agent remembers about one archive it produced (or was told about) for a path."""

    hash: bytes
    fingerprint: bytes | None
    exclude: tuple[str, ...]
    at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "hash": self.hash.hex(),
            "fingerprint": self.fingerprint.hex() if self.fingerprint is not None else None,
            "exclude": list(self.exclude),
            "at": self.at,
        }

    @classmethod
    def from_json(cls, obj: Any) -> CacheEntry:
        if not isinstance(obj, dict):
            raise ValueError("entry is not an object")
        fp = obj.get("fingerprint")
        exclude = obj.get("exclude", [])
        if not isinstance(exclude, list) or not all(isinstance(e, str) for e in exclude):
            raise ValueError("bad exclude list")
        return cls(
            hash=bytes.fromhex(str(obj["hash"])),
            fingerprint=bytes.fromhex(fp) if isinstance(fp, str) else None,
            exclude=tuple(exclude),
            at=float(obj.get("at", 0.0)),
        )


class AgentCache:
    """The cache directory; thread-safe only per path (the agent serialises each path)."""

    def __init__(self, root: str | os.PathLike[str], *, keep: int = 3) -> None:
        if keep < 1:
            raise UsageError("the agent cache must keep at least one entry per path")
        self.root = Path(root)
        self.keep = keep
        self._sigs = self.root / "sigs"
        self._paths = self.root / "paths"
        try:
            self._sigs.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._paths.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise UsageError(f"cannot create cache dir {self.root}: {exc.strerror}") from None

    # -- reading -----------------------------------------------------------------------------

    def entries(self, path: str) -> list[CacheEntry]:
        try:
            with open(self._path_file(path), "rb") as f:
                obj = json.loads(f.read())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.warning("cache: ignoring unreadable entry file for %s: %s", path, exc)
            return []
        try:
            if obj.get("version") != CACHE_VERSION or obj.get("path") != path:
                return []
            return [CacheEntry.from_json(e) for e in obj.get("entries", [])]
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            log.warning("cache: ignoring malformed entry file for %s: %s", path, exc)
            return []

    def fingerprint(self, path: str, archive_hash: bytes, exclude: tuple[str, ...]) -> bytes | None:
        """The (non-racy) fingerprint recorded when ``archive_hash`` was built from ``path``."""
        for e in self.entries(path):
            if e.hash == archive_hash and e.exclude == exclude:
                return e.fingerprint
        return None

    def signature(self, archive_hash: bytes) -> bytes | None:
        """The cached signature of the archive ``archive_hash``, verified, or None."""
        p = self._sig_file(archive_hash)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cache: cannot read %s: %s", p, exc)
            return None
        try:
            sig = Signature.parse(data)
        except FormatError as exc:
            log.warning("cache: dropping corrupt signature %s: %s", p, exc)
            p.unlink(missing_ok=True)
            return None
        if sig.base_hash != archive_hash:
            log.warning("cache: dropping %s: it is the signature of another archive", p)
            p.unlink(missing_ok=True)
            return None
        return data

    # -- writing -----------------------------------------------------------------------------

    def record(
        self,
        path: str,
        archive_hash: bytes,
        *,
        fingerprint: bytes | None,
        exclude: tuple[str, ...],
        signature: bytes | None,
    ) -> None:
        """Remember ``archive_hash`` as the newest archive of ``path``.

        ``signature`` (if given) is filed under the hash; ``fingerprint`` None records the
        archive without a usable quick check (a racy tree, or a signature received from the
        server).  An existing entry for the same hash keeps its fingerprint unless a new one
        is given.
        """
        if signature is not None:
            self._write_atomic(self._sig_file(archive_hash), signature)
        old = self.entries(path)
        previous = next((e for e in old if e.hash == archive_hash and e.exclude == exclude), None)
        if fingerprint is None and previous is not None:
            fingerprint = previous.fingerprint
        entry = CacheEntry(archive_hash, fingerprint, exclude, time.time())
        rest = [e for e in old if not (e.hash == archive_hash and e.exclude == exclude)]
        entries = [entry, *rest][: self.keep]
        doc = {"version": CACHE_VERSION, "path": path, "entries": [e.to_json() for e in entries]}
        self._write_atomic(self._path_file(path), json.dumps(doc, indent=1).encode())
        dropped = {e.hash for e in old} - {e.hash for e in entries}
        if dropped:
            self._collect(dropped)

    def _collect(self, candidates: set[bytes]) -> None:
        """Delete the signatures of ``candidates`` that no path refers to any more."""
        in_use: set[bytes] = set()
        for f in self._paths.glob("*.json"):
            try:
                obj = json.loads(f.read_bytes())
                in_use.update(bytes.fromhex(e["hash"]) for e in obj.get("entries", []))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
        for h in candidates - in_use:
            self._sig_file(h).unlink(missing_ok=True)

    def _write_atomic(self, target: Path, data: bytes) -> None:
        write_bytes_atomic(target, data, mode=0o600)

    def _sig_file(self, archive_hash: bytes) -> Path:
        return self._sigs / f"{archive_hash.hex()}.sig"

    def _path_file(self, path: str) -> Path:
        return self._paths / f"{blake3.blake3(path.encode('utf-8', 'surrogateescape')).hexdigest()[:32]}.json"
