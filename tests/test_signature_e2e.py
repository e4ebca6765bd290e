"""A version left without its signature, between real daemons.

The server makes an archive's rolling signature after the catalog commit (``ingest.sign``),
so a crash in between leaves a committed version without one.  Simulated deterministically:
the signature file removed, then the server killed (-9) and restarted.  Start-up only notes
it; the next backup, with the agent's cache lost (rolling fallback: the agent asks for the
base's signature), still patches against that base (no full transfer, nothing marked
missing) and stores a fresh build of the tree; the base is signed again and converted, the
new archive signed; ``ctl verify`` signs a whole version whose signature is gone.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from helpers_proc import Cluster, cluster, wait_for  # noqa: F401

import deltabkp
from deltabkp.archive import TgzBuilder

STDLIB = Path(shutil.__file__).parent


def _server_log(c: Cluster) -> str:
    return "".join(p.read_text() for p in sorted(c.root.glob("*-server.log")))


def _sig(c: Cluster, seq: int) -> Path:
    return c.data_dir / "archives" / "1" / f"{seq}.sig"


def _signed(c: Cluster, seq: int) -> deltabkp.Signature | None:
    p = _sig(c, seq)
    return deltabkp.Signature.parse(p.read_bytes()) if p.exists() else None


def test_a_version_left_unsigned_is_signed_by_its_readers(
    cluster: Cluster, tmp_path: Path  # noqa: F811 (the fixture)
) -> None:
    c = cluster
    app = tmp_path / "src"
    shutil.copytree(STDLIB / "json", app / "json", ignore=shutil.ignore_patterns("__pycache__"))
    server = c.start_server()
    agent = c.start_agent(tmp_path)
    c.ctl("register", agent.address, str(app), "--every", "1h")
    wait_for(lambda: "stored archive 1," in _server_log(c), timeout=120, what="first backup")
    wait_for(lambda: _signed(c, 1) is not None, what="archive 1's signature")

    # The crash: archive 1 committed, its signature never written.
    _sig(c, 1).unlink()
    server.kill()
    c.start_server(port=server.port)
    assert "1 archive(s) have no signature yet" in _server_log(c)
    assert [(a["seq"], a["missing"]) for a in c.ctl("list", agent.address, str(app))] == [(1, False)]

    # The agent's kept build and its signatures are gone: it needs the server's.
    home = tmp_path / "home" / ".cache" / "deltabkp"
    dropped = [*home.rglob("builds"), *home.rglob("sigs")]
    assert len(dropped) == 2, list(home.rglob("*"))
    for d in dropped:
        shutil.rmtree(d)
        d.mkdir()
    target = app / "json" / "encoder.py"
    target.write_text(target.read_text() + "\n# an edit after the crash\n")
    rec = c.ctl("backup-now", agent.address, str(app), "--wait")
    assert rec["outcome"] == "stored" and rec["note"] is None, rec  # no full transfer
    # A delta against archive 1, made with the signature the server made again (the agent
    # logs its line after its after-phase, which may end after --wait's answer).
    wait_for(lambda: "signature from server" in "".join(
        p.read_text() for p in sorted(c.root.glob("*-agent.log"))), what="the agent's line")
    assert "archive 1 of target 1 has no signature yet: making it" in _server_log(c)
    newest = c.data_dir / "archives" / "1" / "2.tgz"
    assert newest.read_bytes() == b"".join(TgzBuilder(app))
    listed = c.ctl("list", agent.address, str(app))
    assert [(a["seq"], a["missing"], a["retained"]) for a in listed] == [
        (2, False, True), (1, False, True)]
    # 2 signed after its commit; 1 (signed again for the agent) converted against 2.
    sig2 = wait_for(lambda: _signed(c, 2), what="archive 2's signature")
    assert sig2.base_size == rec["archive_size"] and sig2.base_hash.hex() == listed[0]["hash"]
    wait_for(lambda: sorted(p.name for p in c.archive_files()) == ["1.rdelta", "2.sig", "2.tgz"],
             what="version 1 to become a reverse delta")

    # verify on a whole version without its signature: sound, and signed again.
    _sig(c, 2).unlink()
    [verdict] = c.ctl("verify", agent.address, str(app))
    assert verdict["ok"] and [v["ok"] for v in verdict["versions"]] == [True, True], verdict
    assert _sig(c, 2).read_bytes() == deltabkp.signature(newest.read_bytes())
