"""The layout delta between real daemons: a change goes as a layout delta (no signature, a
fraction of the rolling delta), and when the agent lost its kept build the rolling delta
takes over; each stored archive is a fresh build of the tree, byte for byte.  (Going back
to the layout delta after that is the first case again: a kept build, whatever made it.)"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from helpers_proc import Cluster, cluster, wait_for  # noqa: F401

from deltabkp.archive import TgzBuilder

STDLIB = Path(shutil.__file__).parent


def _tree(root: Path) -> Path:
    app = root / "src"
    for d in ("json", "http", "email"):
        shutil.copytree(STDLIB / d, app / d, ignore=shutil.ignore_patterns("__pycache__", "test*"))
    return app


def _edit(app: Path, n: int) -> None:
    for i, p in enumerate(sorted(app.rglob("*.py"))[n::17][:3]):
        text = p.read_text()
        cut = text.find("\n", len(text) // 2) + 1 or len(text)
        p.write_text(text[:cut] + f"# layout e2e edit {n}.{i}\n" + text[cut:])


def _served(c: Cluster) -> list[str]:
    return [line for p in sorted(c.root.glob("*-agent.log"))
            for line in p.read_text().splitlines() if "signature from" in line]


def _nth_served(c: Cluster, n: int) -> str:
    """The agent's line for its n-th backup (1-based).  The server answers ``--wait`` at its
    commit; the agent logs its line after its own after-phase, which may come later."""
    wait_for(lambda: len(_served(c)) >= n, what=f"the agent's line for backup {n}")
    return _served(c)[n - 1]


def test_change_goes_as_layout_delta_then_rolling_when_the_cache_is_lost(
    cluster: Cluster, tmp_path: Path  # noqa: F811 (the fixture)
) -> None:
    c = cluster
    app = _tree(tmp_path)
    c.start_server()
    agent = c.start_agent(tmp_path)
    c.ctl("register", agent.address, str(app), "--every", "1h")
    # Registering makes the first backup due at once (a ctl call costs seconds here: wait
    # for the server's log line instead of asking).
    wait_for(lambda: "stored archive 1," in "".join(
        p.read_text() for p in c.root.glob("*-server.log")), timeout=120, what="first backup")

    _edit(app, 1)
    rec = c.ctl("backup-now", agent.address, str(app), "--wait")
    assert rec["outcome"] == "stored", rec
    # Version 3: streamed while the agent built, answered before it compressed (both
    # daemons offer it first).
    assert "signature from layout-3" in _nth_served(c, 2), _served(c)
    # Three edited spots: the rolling delta pays ~10 KB each; the layout delta far less.
    # (transferred counts the TLS handshake and frames too, ~3-4 KB.)
    assert rec["transferred"] < 12_000, rec
    _same_as_fresh_build(c, app)
    # Both daemons log where the backup's time went (``deltabkp._phases``).
    assert re.search(r"; phases index \d+/\d+, .*build .*layout ", _nth_served(c, 2)), _served(c)
    wait_for(lambda: re.search(
        r"phases connect \d+/\d+, agent .*apply .*store-commit .*catalog-commit \d+/\d+",
        "".join(p.read_text() for p in c.root.glob("*-server.log"))), what="server's phases")

    # The agent's own archive, compressed after it answered, is the server's: the next
    # backup is a layout delta against it again.
    _edit(app, 3)
    rec = c.ctl("backup-now", agent.address, str(app), "--wait")
    assert rec["outcome"] == "stored", rec
    assert "signature from layout-3" in _nth_served(c, 3), _served(c)
    _same_as_fresh_build(c, app)

    # The agent's kept build is gone: the rolling delta (cached signature) does the work.
    home = tmp_path / "home" / ".cache" / "deltabkp"
    builds = list(home.rglob("builds"))
    assert builds, list(home.rglob("*"))
    for b in builds:
        shutil.rmtree(b)
        b.mkdir()
    _edit(app, 2)
    rec = c.ctl("backup-now", agent.address, str(app), "--wait")
    assert rec["outcome"] == "stored", rec
    assert "signature from layout" not in _nth_served(c, 4), _served(c)
    _same_as_fresh_build(c, app)


def _same_as_fresh_build(c: Cluster, app: Path) -> None:
    """The newest stored archive is a fresh build of the tree, byte for byte."""
    newest = max((c.data_dir / "archives").rglob("*.tgz"), key=lambda p: int(p.stem))
    assert newest.read_bytes() == b"".join(TgzBuilder(app))
