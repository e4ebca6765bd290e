"""The status page (``/`` on ``--metrics-listen``), rendered by a real headless Chromium.

A real server and agent: one target with a few stored versions, one on a node nobody answers
on whose path is full of HTML.  Chromium's DOM (``--dump-dom``) must show the failing target
first, the good one's plot with one circle per retained version (counted in the catalog
itself), the hostile path as text (escaped, no element made of it); ``--screenshot`` writes a
PNG of the window size.  The log pages (``?before=ID``) are checked over plain HTTP.
One Chromium run in all: it is slow to start.
"""

from __future__ import annotations

import re
import shutil
import socket
import sqlite3
import struct
import subprocess
import urllib.request
from pathlib import Path

import pytest
from helpers_proc import Cluster, cluster, wait_for  # noqa: F401

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HOSTILE = '/srv/<b>bad</b> & "q"'
ROW = re.compile(r'<tr class="(target[^"]*)" data-target="(\d+)" data-versions="(\d+)">(.*?)</tr>', re.DOTALL)


def chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--hide-scrollbars", f"--user-data-dir={tmp / 'chromium-profile'}",
           "--window-size=1200,900", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_page_in_a_real_browser(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    app = tmp_path / "app"
    app.mkdir()
    server = c.start_server("--metrics-listen", "127.0.0.1:0")
    m = re.search(r"metrics on (http://\S+)/metrics", server.log_text())
    assert m, server.log_text()
    base = m.group(1)
    agent = c.start_agent(tmp_path)
    node, path = agent.address, str(app)
    c.ctl("register", node, path, "--every", "1h")
    # The run that registering queued stores the empty tree first: were it still to come,
    # it could capture the first change below and leave that backup-now nothing to store.
    wait_for(lambda: len(c.ctl("list", node, path)) == 1, what="the registration's run")
    for i in range(2):  # three versions
        (app / "data.txt").write_text("".join(f"version {i} line {j}\n" for j in range(400 * (i + 1))))
        assert c.ctl("backup-now", node, path, "--wait")["outcome"] == "stored"
    with socket.socket() as dead:  # bound, not listening: connections are refused
        dead.bind(("127.0.0.1", 0))
        dead_node = f"127.0.0.1:{dead.getsockname()[1]}"
        c.ctl("register", dead_node, HOSTILE, "--every", "1h")

        db = sqlite3.connect(f"file:{c.data_dir / 'catalog.sqlite3'}?mode=ro", uri=True)
        try:
            def failed() -> bool:
                row = db.execute("SELECT last_outcome FROM targets WHERE node = ?", (dead_node,)).fetchone()
                return bool(row and row[0] == "failed")

            wait_for(failed, what="the dead node's first execution to fail")
            [(good_id, versions)] = db.execute(
                "SELECT t.id, COUNT(a.seq) FROM targets t JOIN archives a ON a.target_id = t.id "
                "WHERE t.node = ? AND a.retained GROUP BY t.id", (node,)).fetchall()
            ids = [r[0] for r in db.execute("SELECT id FROM executions ORDER BY id DESC")]
        finally:
            db.close()
        # The page caches its targets for a few seconds: wait until it shows the failure.
        wait_for(lambda: b'class="target failing"' in urllib.request.urlopen(base + "/", timeout=10).read(),
                 what="the page to show the failing target")

        shot = tmp_path / "status-page.png"
        # One browser run (it is slow to start) for both the DOM and the screenshot.
        dom = chromium(tmp_path, "--virtual-time-budget=2000", "--dump-dom",
                       f"--screenshot={shot}", base + "/").stdout

    rows = ROW.findall(dom)
    assert len(rows) == 2, dom[:3000]
    (first_cls, _, first_n, first_html), (good_cls, good_tid, good_n, good_html) = rows
    # Failures first, whatever the names' order.
    assert "failing" in first_cls and dead_node in first_html
    assert "failing" not in good_cls and int(good_tid) == good_id
    # One point per version: the catalog's count of retained versions, circles in the SVG.
    assert versions >= 2
    assert good_html.count("<circle") == versions == int(good_n)
    assert good_html.count('class="transferred"') == versions
    assert first_html.count("<circle") == 0 and int(first_n) == 0
    # The hostile path is text, not markup.
    assert "&lt;b&gt;bad&lt;/b&gt; &amp; \"q\"" in first_html and "<b>" not in dom
    assert "<script" not in dom
    # The log: every execution so far (fewer than a page), newest first.
    logged = [int(x) for x in re.findall(r'<tr class="execution" data-id="(\d+)"', dom)]
    assert logged == ids

    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (1200, 900)

    # Keyset paging: ?before=ID shows only older rows; a bad value is a 400.
    page = urllib.request.urlopen(f"{base}/?before={ids[1]}", timeout=10).read().decode()
    assert [int(x) for x in re.findall(r'data-id="(\d+)"', page)] == ids[2:]
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.urlopen(f"{base}/?before=x", timeout=10)
    assert bad.value.code == 400
