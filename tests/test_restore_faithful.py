"""End to end with real daemons: a tree of everyday odd entries (absolute and escaping
symlinks, a dangling one, a FIFO, sub-second mtimes, other owners, setuid, a hard link, a
read-only directory) backs up with ``ctl backup-now --wait`` and comes back from ``ctl
restore`` identical: ``diff -r --no-dereference`` and an lstat comparison (type, mode, uid,
gid, mtime_ns, link count, content or target) of every entry.  The extraction rules are
tested in detail in ``test_archive_extract.py``; this is the issue's done-when, for real.
"""

from __future__ import annotations

import json
from pathlib import Path

from helpers_proc import Cluster, cluster  # noqa: F401
from test_archive_extract import diff_r, odd_tree, snapshot


def test_ctl_restore_gives_back_the_odd_tree_exactly(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    app = odd_tree(tmp_path / "app")
    c.start_server()
    agent = c.start_agent(tmp_path)
    c.ctl("register", agent.address, str(app), "--every", "1h")
    rec = c.ctl("backup-now", agent.address, str(app), "--wait")
    assert rec["outcome"] in ("stored", "unchanged"), rec
    dest = tmp_path / "restored"
    res = c.ctl_run("--json", "restore", agent.address, str(app), str(dest))
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["extracted"]["fifos"] == 1 and out["extracted"]["symlinks"] == 4, out
    assert diff_r(app, dest) == []
    assert snapshot(dest) == snapshot(app)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith((".part", ".restore"))]
