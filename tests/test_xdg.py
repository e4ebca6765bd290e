"""``deltabkp._xdg.user_dir``: the XDG variables when absolute, the home directory's defaults
otherwise, None with neither (a relative ``$XDG_*_HOME`` is ignored, as the spec says)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deltabkp import net
from deltabkp._xdg import user_dir
from deltabkp.errors import UsageError


def test_absolute_variable_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    assert user_dir("cache") == tmp_path / "c" / "deltabkp"
    assert net.tls_cache_dir() == tmp_path / "c" / "deltabkp" / "tls"


def test_relative_variable_and_no_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/dir")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert user_dir("config") == tmp_path / ".config" / "deltabkp"
    assert user_dir("data") == tmp_path / ".local" / "share" / "deltabkp"
    # No usable home: Path.home() answers "~" (no $HOME, no passwd entry).
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: Path("~")))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert user_dir("config") is None and net.tls_cache_dir() is None
    with pytest.raises(UsageError, match="--key-file"):
        net.default_key_path()
