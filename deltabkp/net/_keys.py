"""The cluster key file: where it is, how it is read, and its creation on first use.

Anyone holding the key is a member of the cluster (docs/formats.md, "Handshake").
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from deltabkp._atomic import write_bytes_atomic
from deltabkp._xdg import user_dir
from deltabkp.errors import UsageError

__all__ = ["default_key_path", "load_key"]

_MIN_KEY = 16
_MAX_KEY_FILE = 4096


def default_key_path() -> Path:
    """``$XDG_CONFIG_HOME/deltabkp/cluster.key`` (``~/.config/deltabkp/cluster.key``)."""
    base = user_dir("config")
    if base is None:
        raise UsageError("no home directory to keep the cluster key in: pass --key-file "
                         "(or set $DELTABKP_KEY_FILE)")
    return base / "cluster.key"


def load_key(path: str | os.PathLike[str] | None = None) -> bytes:
    """The cluster key: ``path``, else ``$DELTABKP_KEY_FILE``, else the per-user default.

    Only the per-user default is created when missing (mode 0600), so a one-machine demo needs
    no flags while a mistyped explicit path is an error rather than a silent new key.
    """
    explicit = path if path is not None else os.environ.get("DELTABKP_KEY_FILE") or None
    if explicit is not None:
        p = Path(explicit)
        if not p.exists():
            raise UsageError(f"key file {p} does not exist")
    else:
        p = default_key_path()
        _create_key_file(p)
    try:
        with open(p, "rb") as f:
            data = f.read(_MAX_KEY_FILE + 1)
    except OSError as exc:
        raise UsageError(f"cannot read key file {p}: {exc.strerror}") from None
    if len(data) > _MAX_KEY_FILE:
        raise UsageError(f"key file {p} is larger than {_MAX_KEY_FILE} bytes")
    key = data.strip()
    if len(key) < _MIN_KEY:
        raise UsageError(f"key file {p} holds fewer than {_MIN_KEY} bytes of key")
    return key


def _create_key_file(p: Path) -> None:
    if p.exists():
        return
    try:
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Exclusive: a process starting at the same instant sees either no key file or a
        # whole one, never an empty one, and the first one written is the key.
        write_bytes_atomic(p, secrets.token_hex(32).encode() + b"\n", exclusive=True, mode=0o600)
    except OSError as exc:
        raise UsageError(f"cannot create key file {p}: {exc.strerror or exc}") from None
