"""Per-user base directories (the XDG base-directory spec): one home for where deltabkp keeps
the cluster key, the agent's and ctl's caches and a server's default data dir.

A relative ``$XDG_*_HOME`` is ignored, as the spec says (it would land under whatever the
current directory is); so is a home that is not absolute (Python's ``Path.home()`` answers
``~`` when ``$HOME`` is unset and the user has no passwd entry): then ``None``, and each
caller decides (a cache is skipped, a key or data dir is an error the user can fix with a
flag)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

__all__ = ["user_dir"]

_DIRS = {
    "cache": ("XDG_CACHE_HOME", (".cache",)),
    "config": ("XDG_CONFIG_HOME", (".config",)),
    "data": ("XDG_DATA_HOME", (".local", "share")),
}


def user_dir(kind: Literal["cache", "config", "data"]) -> Path | None:
    """``$XDG_<KIND>_HOME/deltabkp`` (e.g. ``~/.cache/deltabkp``), or None if neither it nor
    the home directory is an absolute path."""
    var, default = _DIRS[kind]
    base = os.environ.get(var, "")
    if os.path.isabs(base):
        return Path(base) / "deltabkp"
    home = Path.home()
    if not home.is_absolute():
        return None
    return home.joinpath(*default, "deltabkp")
