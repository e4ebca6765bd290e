"""The agent's on-disk cache: signatures by archive hash, fingerprints by (path, hash, excludes),
the last archive built per path (what makes the next build incremental).

Real files in a temp dir; the cache must never give a wrong answer, whatever is on disk.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest
import trio

import deltabkp
from deltabkp import net, protocol
from deltabkp.archive import IncrementalBuilder, TgzBuilder
from deltabkp.archive._walk import RACY_NS as RACY_NS_AGENT
from deltabkp.testing import backup_exchange
from deltabkp_agent import Agent, AgentConfig, Allowlist
from deltabkp_agent.cache import AgentCache, KeptBuild


def archive(n: int) -> tuple[bytes, bytes]:
    """(hash, signature) of a made-up archive number ``n``."""
    data = f"archive {n}\n".encode() * 500 + os.urandom(100)
    return blake3.blake3(data).digest(), deltabkp.signature(data)


def test_record_then_find(tmp_path: Path) -> None:
    c = AgentCache(tmp_path / "c")
    h, sig = archive(1)
    assert c.signature(h) is None and c.fingerprint("/srv/a", h, ()) is None
    c.record("/srv/a", h, fingerprint=b"F" * 32, exclude=(), signature=sig)
    assert c.signature(h) == sig
    assert c.fingerprint("/srv/a", h, ()) == b"F" * 32
    # Only for that path and that exclude list.
    assert c.fingerprint("/srv/b", h, ()) is None
    assert c.fingerprint("/srv/a", h, ("*.log",)) is None
    # A reopened cache (agent restart) knows the same.
    c2 = AgentCache(tmp_path / "c")
    assert c2.signature(h) == sig and c2.fingerprint("/srv/a", h, ()) == b"F" * 32


def test_keeps_the_newest_entries_and_deletes_unreferenced_signatures(tmp_path: Path) -> None:
    c = AgentCache(tmp_path / "c", keep=2)
    hs = []
    for n in range(4):
        h, sig = archive(n)
        hs.append(h)
        c.record("/srv/a", h, fingerprint=None, exclude=(), signature=sig)
    assert [e.hash for e in c.entries("/srv/a")] == [hs[3], hs[2]]
    assert c.signature(hs[0]) is None and c.signature(hs[1]) is None
    assert c.signature(hs[2]) is not None and c.signature(hs[3]) is not None
    assert len(list((tmp_path / "c" / "sigs").iterdir())) == 2


def test_a_signature_shared_by_two_paths_survives_one_of_them(tmp_path: Path) -> None:
    c = AgentCache(tmp_path / "c", keep=1)
    h, sig = archive(0)
    c.record("/srv/a", h, fingerprint=None, exclude=(), signature=sig)
    c.record("/srv/b", h, fingerprint=None, exclude=(), signature=sig)
    h2, sig2 = archive(1)
    c.record("/srv/a", h2, fingerprint=None, exclude=(), signature=sig2)
    assert c.signature(h) == sig  # still the newest of /srv/b


def test_a_racy_record_keeps_an_earlier_fingerprint_of_the_same_archive(tmp_path: Path) -> None:
    c = AgentCache(tmp_path / "c")
    h, sig = archive(0)
    c.record("/srv/a", h, fingerprint=b"F" * 32, exclude=(), signature=sig)
    c.record("/srv/a", h, fingerprint=None, exclude=(), signature=None)
    assert c.fingerprint("/srv/a", h, ()) == b"F" * 32
    assert len(c.entries("/srv/a")) == 1


@pytest.mark.parametrize("damage", ["truncate", "garbage", "other-archive"])
def test_damaged_signature_files_read_as_a_miss(tmp_path: Path, damage: str) -> None:
    c = AgentCache(tmp_path / "c")
    h, sig = archive(0)
    c.record("/srv/a", h, fingerprint=None, exclude=(), signature=sig)
    f = tmp_path / "c" / "sigs" / f"{h.hex()}.sig"
    if damage == "truncate":
        f.write_bytes(sig[: len(sig) // 2])
    elif damage == "garbage":
        f.write_bytes(os.urandom(len(sig)))
    else:
        f.write_bytes(archive(1)[1])  # a valid signature, of another archive
    assert c.signature(h) is None
    assert not f.exists()  # dropped, so the next backup stores a good one


@pytest.mark.parametrize("content", [b"", b"{not json", b"[]", b'{"version": 99}',
                                     b'{"version": 1, "path": "/srv/a", "entries": [{"hash": "zz"}]}'])
def test_damaged_entry_files_read_as_empty(tmp_path: Path, content: bytes) -> None:
    c = AgentCache(tmp_path / "c")
    h, sig = archive(0)
    c.record("/srv/a", h, fingerprint=b"F" * 32, exclude=(), signature=sig)
    [f] = list((tmp_path / "c" / "paths").iterdir())
    f.write_bytes(content)
    assert c.entries("/srv/a") == [] and c.fingerprint("/srv/a", h, ()) is None
    # And recording again repairs it.
    c.record("/srv/a", h, fingerprint=b"G" * 32, exclude=(), signature=sig)
    assert c.fingerprint("/srv/a", h, ()) == b"G" * 32


# -- the last build kept per path (incremental builds) ----------------------------------------


def make_tree(root: Path, n: int = 30) -> Path:
    root.mkdir()
    for i in range(n):
        (root / f"f{i:02d}").write_bytes(b"".join(b"line %d of file %d\n" % (j, i) for j in range(1500)))
    os.utime(root / "f00", ns=(0, 1_600_000_000 * 10**9))
    time.sleep(0.05)  # past RACY_NS below: the files may be reused by the next build
    return root


def build_kept(c: AgentCache, root: Path, *, stop: bool = False) -> tuple[bytes, IncrementalBuilder]:
    """What the agent's build does with the cache: build from the kept one, keep this one."""
    out = bytearray()
    with c.kept_build(str(root)) as kept:
        b = IncrementalBuilder(root, previous=kept.index, previous_archive=kept.archive,
                               racy_ns=RACY_NS)
        for chunk in b:
            kept.write(chunk)
            out += chunk
            if stop:
                raise RuntimeError("stopped mid-build")
        kept.done(b.index)
    return bytes(out), b


RACY_NS = 20_000_000


def test_kept_build_makes_the_next_build_incremental(tmp_path: Path) -> None:
    c = AgentCache(tmp_path / "c")
    root = make_tree(tmp_path / "t")
    _, b1 = build_kept(c, root)
    assert b1.stats.previous == "none"
    with open(root / "f15", "ab") as f:
        f.write(b"appended\n")
    time.sleep(0.05)
    second, b2 = build_kept(c, root)
    assert b2.stats.previous == "" and b2.stats.entries_reused > 20
    assert second == b"".join(TgzBuilder(root))
    # The kept copy is now the second archive, and a restarted agent finds it.
    c2 = AgentCache(tmp_path / "c")
    with c2.kept_build(str(root)) as kept:
        assert kept.archive is not None and kept.archive.read_bytes() == second
        assert kept.index is not None and kept.index.archive_hash == blake3.blake3(second).digest()
    # (that block did not call done: what was kept stays)
    with c2.kept_build(str(root)) as kept:
        assert kept.archive is not None and kept.archive.read_bytes() == second
    assert not list((tmp_path / "c" / "builds").glob(".*"))


def test_the_replaced_archive_is_let_go_after_the_answer(tmp_path: Path) -> None:
    """The kept archive a build replaces is held open across the rename (its last reference
    going there freed ~30 MB inside ``os.replace``, before ``backup-done``) and closed by
    ``make_seek``, after the answer, or by the next build: never more than one per path."""
    c = AgentCache(tmp_path / "c")
    root = make_tree(tmp_path / "t")
    fds = Path("/proc/self/fd")

    def open_now() -> int:
        return len(list(fds.iterdir()))

    first, _ = build_kept(c, root)  # nothing replaced
    base = open_now()
    for _ in range(2):  # each replaces the last: one held, the one before let go
        (root / "f03").write_bytes(os.urandom(64))
        time.sleep(0.05)
        build_kept(c, root)
        assert open_now() == base + 1
        held, aside = next(iter(c._retired.values()))
        assert aside.exists() and os.fstat(held).st_ino == aside.stat().st_ino
    assert os.pread(held, len(first), 0) != b"" and c.make_seek(str(root))
    assert open_now() == base and not c._retired and not aside.exists()
    assert not list((tmp_path / "c" / "builds").glob(".*"))


def test_a_stopped_or_failed_build_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = AgentCache(tmp_path / "c")
    root = make_tree(tmp_path / "t")
    first, _ = build_kept(c, root)
    (root / "f03").write_bytes(b"new content\n")
    with pytest.raises(RuntimeError, match="stopped"):
        build_kept(c, root, stop=True)
    with c.kept_build(str(root)) as kept:
        assert kept.archive is not None and kept.archive.read_bytes() == first
    assert not list((tmp_path / "c" / "builds").glob(".*"))
    # A full disk while keeping the copy: the build goes on, the old copy stays.
    real = KeptBuild.write

    def full_disk(self: KeptBuild, chunk: bytes) -> None:
        if self._out is not None:
            monkeypatch.setattr(self._out, "write", _raise_enospc)
        real(self, chunk)

    monkeypatch.setattr(KeptBuild, "write", full_disk)
    with agent_log() as messages:
        data, _ = build_kept(c, root)
    assert data == b"".join(TgzBuilder(root))
    assert any("could not keep the archive" in m and "No space left" in m for m in messages)
    monkeypatch.undo()
    with c.kept_build(str(root)) as kept:
        assert kept.archive is not None and kept.archive.read_bytes() == first
    assert not list((tmp_path / "c" / "builds").glob(".*"))


def _raise_enospc(_data: bytes) -> int:
    raise OSError(28, "No space left on device")


def test_damaged_kept_build_means_a_full_build(tmp_path: Path) -> None:
    c = AgentCache(tmp_path / "c")
    root = make_tree(tmp_path / "t")
    build_kept(c, root)
    tgz, idx = sorted((tmp_path / "c" / "builds").iterdir())[::-1]
    assert tgz.suffix == ".tgz" and idx.suffix == ".idx"
    # A damaged archive: the builder sees its blake3 differ from the index's.
    data = bytearray(tgz.read_bytes())
    data[100] ^= 1
    tgz.write_bytes(bytes(data))
    again, b = build_kept(c, root)
    assert "not the one its index describes" in b.stats.previous
    assert again == b"".join(TgzBuilder(root))
    # A damaged index reads as none (and is dropped).
    idx.write_bytes(idx.read_bytes()[:-1])
    _, b = build_kept(c, root)
    assert b.stats.previous == "none"


def test_archive_cache_turned_off(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t")
    build_kept(AgentCache(tmp_path / "c"), root)
    assert list((tmp_path / "c" / "builds").iterdir())
    c = AgentCache(tmp_path / "c", keep_archives=False)
    assert not list((tmp_path / "c" / "builds").iterdir())  # what was kept is dropped
    for _ in range(2):
        data, b = build_kept(c, root)
        assert b.stats.previous == "none"
        assert data == b"".join(TgzBuilder(root))
    assert not list((tmp_path / "c" / "builds").iterdir())


KEY = b"k" * 32


async def _start_agent(nursery: trio.Nursery, tmp_path: Path, **config: Any) -> Agent:
    """A real agent serving ``tmp_path`` with its cache under it (key ``KEY``), started."""
    cfg = AgentConfig(key=KEY, allow=Allowlist.from_args([str(tmp_path)]), host="127.0.0.1",
                      port=0, cache_dir=tmp_path / "cache", **config)
    agent = Agent(cfg)
    await nursery.start(agent.run)
    return agent


async def test_agent_backs_up_a_racy_tree_incrementally(nursery: trio.Nursery, tmp_path: Path) -> None:
    """A real agent, a file appended before every backup (so the tree is always racy and
    never answered from its fingerprint): each backup is an incremental build that reads
    the appended file and a few neighbours, and its archive is a fresh build's; once the
    appends stop, the next check is a quick one at once (the racy file read again)."""
    app = tmp_path / "app"
    make_tree(app, 40)
    await trio.sleep(RACY_NS_AGENT / 1e9 + 0.1)  # the agent's racy window: files reusable
    key = KEY
    agent = await _start_agent(nursery, tmp_path)
    base: bytes | None = None
    for n in range(4):
        await trio.to_thread.run_sync(_append, app / "f20", b"log line %d\n" % n)
        with agent_log() as messages:
            r = await backup_exchange(net.Address.parse(agent.address), key, str(app), base)
        assert r.kind == "delta" and r.done is not None
        base = bytes(deltabkp.patch(base or b"", r.delta))
        assert base == b"".join(TgzBuilder(app))
        built = [m for m in messages if m.startswith("archive of")]
        assert len(built) == 1
        if n == 0:
            assert "full build" in built[0]
        else:
            m = re.search(r"(\d+) of (\d+) entries reused, (\d+) files read \(incremental\)", built[0])
            assert m is not None, built[0]
            assert int(m[1]) >= 30 and int(m[3]) <= 12, built[0]
    # Right after a build that found f20 racy, the unchanged tree is still a quick check:
    # the kept index vouches for every file but f20, which is read again and compared.
    with agent_log() as messages:
        r = await backup_exchange(net.Address.parse(agent.address), key, str(app), base)
    assert (r.kind, r.reason) == ("unchanged", "fingerprint")
    assert not [m for m in messages if m.startswith("archive of")]
    await trio.to_thread.run_sync(_append, app / "f20", b"one more\n")
    r = await backup_exchange(net.Address.parse(agent.address), key, str(app), base)
    assert r.kind == "delta"



@contextlib.contextmanager
def agent_log() -> Iterator[list[str]]:
    """The agent's log messages meanwhile (its logger may not propagate to caplog: the
    daemon's logging setup owns it)."""
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("deltabkp_agent")
    handler, level = Keep(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _append(p: Path, data: bytes) -> None:
    with open(p, "ab") as f:
        f.write(data)


async def test_agent_without_archive_cache_keeps_signatures(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """``--no-archive-cache``: no kept archive to make a signature from later, so the build
    makes it as it goes and files it; the next backup's rolling delta uses it (no
    NeedSignature)."""
    app = make_tree(tmp_path / "app")
    key = KEY
    agent = await _start_agent(nursery, tmp_path, keep_archives=False)
    where = net.Address.parse(agent.address)
    r1 = await backup_exchange(where, key, str(app), None)
    assert r1.kind == "delta" and r1.done is not None
    sig = tmp_path / "cache" / "sigs" / f"{r1.done.archive_hash.hex()}.sig"
    with trio.fail_after(10):  # filed just after backup-done was sent
        while not sig.exists():
            await trio.sleep(0.02)
    base = bytes(deltabkp.patch(b"", r1.delta))
    await trio.to_thread.run_sync(_append, app / "f20", b"one more line\n")
    r2 = await backup_exchange(where, key, str(app), base)
    assert r2.kind == "delta" and not r2.asked_signature
    assert deltabkp.patch(base, r2.delta) == b"".join(TgzBuilder(app))


async def _counted_agent(
    nursery: trio.Nursery, tmp_path: Path, app: Path, monkeypatch: pytest.MonkeyPatch, *,
    kept_index: bool = False,
) -> tuple[list[str], Callable[[bytes | None], Awaitable[tuple[bytes, str]]]]:
    """A real agent (cache under ``tmp_path``) whose quick-check steps are counted: the
    names of ``_fingerprint`` and ``_unchanged_since`` (and, with ``kept_index``, of
    ``AgentCache.kept_index``) as they are called; and ``request(base)``, one backup of
    ``app`` against the archive ``base``: (the archive now, "delta" or the unchanged
    reason), the calls of that request only."""
    import deltabkp_agent.backup as agent_backup

    calls: list[str] = []

    def counted(name: str, real: Callable[..., object]) -> Callable[..., object]:
        def call(*args: object) -> object:
            calls.append(name)
            return real(*args)
        return call

    for name in ("_fingerprint", "_unchanged_since"):
        monkeypatch.setattr(agent_backup, name, counted(name, getattr(agent_backup, name)))
    if kept_index:
        monkeypatch.setattr(AgentCache, "kept_index",
                            counted("kept_index", AgentCache.kept_index))
    key = KEY
    agent = await _start_agent(nursery, tmp_path)
    where = net.Address.parse(agent.address)

    done = [0]

    async def request(base: bytes | None) -> tuple[bytes, str]:
        # The previous backup's work after its answer (seek points, settling the kept
        # index) reads the kept index too: counted as its own, not this request's.
        with trio.fail_after(30):  # a deadline, not a timing assertion
            while agent.served < done[0]:
                await trio.sleep(0.01)
        calls.clear()
        done[0] += 1
        r = await backup_exchange(where, key, str(app), base)
        if r.kind == "unchanged":
            assert base is not None
            return base, r.reason
        return bytes(deltabkp.patch(base or b"", r.delta)), r.kind

    return calls, request


async def test_after_a_racy_build_the_index_is_the_quick_check(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build that found the tree racy records no fingerprint: the next request checks the
    tree against the kept index with no fingerprint walk (a changed tree costs only the
    build's walk); once the tree is unchanged and settled, a fingerprint is recorded after
    the index vouched for it, and the check after that is a fingerprint alone."""
    app = tmp_path / "app"
    app.mkdir()
    for i in range(5):
        (app / f"f{i}").write_bytes(b"racy when built %d\n" % i * 200)
    calls, request = await _counted_agent(nursery, tmp_path, app, monkeypatch)

    a1, _ = await request(None)  # racy: nothing recorded
    await trio.to_thread.run_sync(_append, app / "f1", b"changed\n")
    a2, how = await request(a1)
    assert how == "delta" and calls == ["_unchanged_since"], calls  # no fingerprint walk
    assert a2 == b"".join(TgzBuilder(app))
    await trio.sleep(RACY_NS_AGENT / 1e9 + 0.2)  # settled: the next fingerprint is trusted
    assert await request(a2) == (a2, "fingerprint")
    with trio.fail_after(10):  # the fingerprint is taken after the answer went out
        while len(calls) < 3:
            await trio.sleep(0.02)
    assert calls == ["_unchanged_since", "_fingerprint", "_unchanged_since"], calls
    cache = AgentCache(tmp_path / "cache")
    with trio.fail_after(10):  # recorded (the agent's last step before it frees the path)
        while cache.fingerprint(os.path.realpath(app), blake3.blake3(a2).digest(), ()) is None:
            await trio.sleep(0.02)
    assert await request(a2) == (a2, "fingerprint")
    assert calls == ["_fingerprint"], calls


async def test_after_a_racy_build_its_racy_files_are_settled_in_the_kept_index(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the answer, the agent reads again the files its build found racy and keeps
    those settled and equal as reusable in the kept index (``_settle_kept``): the next
    backup's check and build do not read them again.  Held here until the racy window
    of what the build read has passed (a build of a big tree takes that long)."""
    import deltabkp_agent.backup as agent_backup

    app = tmp_path / "app"
    app.mkdir()
    for i in range(5):
        (app / f"f{i}").write_bytes(b"racy when built %d\n" % i * 200)
    real = agent_backup._settle_kept

    def later(cache: AgentCache, root: str, exclude: tuple[str, ...]) -> None:
        time.sleep(RACY_NS_AGENT / 1e9 + 0.2)
        real(cache, root, exclude)

    monkeypatch.setattr(agent_backup, "_settle_kept", later)
    _calls, request = await _counted_agent(nursery, tmp_path, app, monkeypatch)
    a1, _ = await request(None)
    cache = AgentCache(tmp_path / "cache")
    root = os.path.realpath(app)
    first = cache.kept_index(root)
    assert first is not None and not any(e.reusable for e in first.entries if e.kind)
    idx = first
    with trio.fail_after(10):
        while not all(e.reusable for e in idx.entries):
            await trio.sleep(0.05)
            idx = cache.kept_index(root) or first
    assert idx.archive_hash == first.archive_hash == blake3.blake3(a1).digest()
    await trio.to_thread.run_sync(_append, app / "f3", b"changed\n")
    a2, how = await request(a1)
    assert how == "delta" and a2 == b"".join(TgzBuilder(app))


async def test_after_a_settled_build_the_fingerprint_alone_is_the_quick_check(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build of a settled tree records its fingerprint: the next check of the unchanged
    tree is that fingerprint alone (no index check, and the kept index not even read);
    a changed tree — here a same-size edit with the mtime put back — is seen (the
    fingerprint differs: no index check), and only then is the kept index read, once, for
    the build."""
    app = make_tree(tmp_path / "app")
    await trio.sleep(RACY_NS_AGENT / 1e9 + 0.2)  # settled: the first build's fingerprint counts
    calls, request = await _counted_agent(nursery, tmp_path, app, monkeypatch, kept_index=True)
    cache = AgentCache(tmp_path / "cache")

    a1, _ = await request(None)
    with trio.fail_after(10):  # recorded after the answer
        while cache.fingerprint(os.path.realpath(app), blake3.blake3(a1).digest(), ()) is None:
            await trio.sleep(0.02)
    assert await request(a1) == (a1, "fingerprint")
    assert calls == ["_fingerprint"], calls  # one walk; no index read, no index check
    f = app / "f07"
    st = f.stat()
    data = f.read_bytes()
    f.write_bytes(bytes(b ^ 1 for b in data[:8]) + data[8:])  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime: only the ctime tells
    a2, how = await request(a1)
    assert how == "delta" and a2 != a1 and a2 == b"".join(TgzBuilder(app))
    # Its fingerprint is racy (the edit's ctime is new) and differs from the recorded one:
    # changed, with no index check; the index read once, for the build.
    assert calls == ["_fingerprint", "kept_index"], calls


@pytest.mark.parametrize("version", [1, 2, 3], ids=["layout-1", "layout-2", "layout-3"])
async def test_a_kept_build_of_an_older_archive_format_means_a_full_build_and_a_rolling_delta(
    nursery: trio.Nursery, tmp_path: Path, version: int
) -> None:
    """After an upgrade across an archive format (format 2's index kept, format 3's deflate
    now): the build does not reuse it (a full build), the layout delta is given up for the
    rolling one, and the archive is a fresh build's; the backup after that is a layout
    delta again.  Offered version 2 or 3, the build making it stops as soon as it finds
    the kept archive unusable (one build, not two)."""
    import attrs

    from deltabkp.archive import LAYOUT_MAGIC, ArchiveIndex, LayoutPatcher, layout_capability

    app = tmp_path / "app"
    make_tree(app, 40)
    await trio.sleep(RACY_NS_AGENT / 1e9 + 0.1)
    key = KEY
    agent = await _start_agent(nursery, tmp_path)
    address = net.Address.parse(agent.address)
    base = b""
    for n, older_index in enumerate((False, False, True, False)):
        if older_index:
            (idx,) = (tmp_path / "cache").rglob("builds/*.idx")
            kept = ArchiveIndex.parse(idx.read_bytes())
            idx.write_bytes(attrs.evolve(kept, archive_version=2, deflater="1.2.13").encode())
        if n:
            await trio.to_thread.run_sync(_append, app / f"f{10 * n:02d}", b"edit %d\n" % n)
            await trio.sleep(RACY_NS_AGENT / 1e9 + 0.1)
        with agent_log() as messages:
            r = await backup_exchange(address, key, str(app), base or None,
                                      accepts=(layout_capability(version),))
            # (Version 3 answers before its archive is compressed: logged once it is.)
            with trio.fail_after(30):
                while not any(m.startswith("archive of") for m in messages):
                    await trio.sleep(0.01)
        assert r.kind == "delta" and r.done is not None
        layout = r.delta.startswith(LAYOUT_MAGIC)
        if layout:
            assert r.delta[len(LAYOUT_MAGIC)] == version
        if layout:
            p = LayoutPatcher(base, base_hash=blake3.blake3(base).digest())
            out = p.feed(r.delta)
            p.finish()
            base = b"".join(out)
        else:
            base = bytes(deltabkp.patch(base, r.delta))
        assert base == b"".join(TgzBuilder(app))
        built = [m for m in messages if m.startswith("archive of")]
        assert len(built) == 1, messages
        assert layout == (n in (1, 3)), (n, messages)
        if older_index:
            assert "full build" in built[0] and "format 2" in built[0], built[0]
            assert any("layout delta given up" in m for m in messages), messages


@pytest.mark.parametrize("version", [2, 3])
async def test_streamed_layout_delta_holds_back_an_unchanged_archive(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: int
) -> None:
    """Versions 2 and 3 are sent while the archive is built, but held back while it may
    still be the base: a file whose ctime alone changed (read and compressed again, to the
    same bytes) is answered "unchanged (hash)", nothing sent; an edit is a delta that
    rebuilds the archive.  With a keep-alive due at every chunk the hold is given up (as the
    rolling delta's): delta chunks, some empty, then ``backup-done`` naming the base itself
    (version 3: naming nothing, sent before the archive is compressed) — never "unchanged"
    after delta chunks, which the conversation forbids (found by review)."""
    import deltabkp_agent.backup as backup_mod
    from deltabkp.archive import LAYOUT_MAGIC, LayoutPatcher, layout_capability

    def layout_capabilities() -> tuple[str, ...]:
        return (layout_capability(version),)

    app = tmp_path / "app"
    make_tree(app, 60)
    await trio.sleep(RACY_NS_AGENT / 1e9 + 0.1)
    agent = await _start_agent(nursery, tmp_path)
    address = net.Address.parse(agent.address)

    async def backup(base: bytes | None) -> Any:
        return await backup_exchange(address, KEY, str(app), base,
                                     accepts=layout_capabilities())

    first = await backup(None)
    base = bytes(deltabkp.patch(b"", first.delta))
    f = app / "f10"
    f.chmod(f.stat().st_mode)  # its ctime only
    await trio.sleep(RACY_NS_AGENT / 1e9 + 0.1)
    r = await backup(base)
    assert (r.kind, r.reason) == ("unchanged", "hash"), r
    await trio.to_thread.run_sync(_append, f, b"edited\n")
    await trio.sleep(RACY_NS_AGENT / 1e9 + 0.1)
    r = await backup(base)
    assert r.kind == "delta" and r.delta.startswith(LAYOUT_MAGIC + bytes([version]))
    p = LayoutPatcher(base, base_hash=blake3.blake3(base).digest())
    new = b"".join(p.feed(r.delta))
    p.finish()
    assert new == b"".join(TgzBuilder(app))
    # Unchanged again, but every chunk a keep-alive: the hold is given up.
    monkeypatch.setattr(backup_mod, "KEEPALIVE_S", -1.0)
    chunks: list[bytes] = []
    f.chmod(f.stat().st_mode)  # the quick check misses; the build reads it again
    with trio.fail_after(60), agent_log() as messages:
        async with await net.connect(address, key=KEY, role="server") as chan:
            await chan.send(protocol.BackupRequest(
                str(app), blake3.blake3(new).digest(), (), accepts=layout_capabilities()))
            msg = await chan.receive()
            while isinstance(msg, protocol.DeltaChunk):
                chunks.append(msg.data)
                msg = await chan.receive()
            # Nothing after the answer, though version 3's build goes on after it with a
            # keep-alive due at every chunk: the agent hangs up once it kept its build.
            with pytest.raises(deltabkp.DeltabkpError):
                extra = await chan.receive()
                raise AssertionError(f"{extra} after backup-done")
        while not any(m.startswith("backup of") for m in messages):
            await trio.sleep(0.01)
    # (A keep-alive after the answer was no move of the conversation: the backup failed on
    # the agent's side and its build was lost — found by review.)
    assert not any("failed" in m for m in messages), messages
    assert isinstance(msg, protocol.BackupDone), msg
    assert msg.archive_hash == (blake3.blake3(new).digest() if version == 2 else b"")
    assert b"" in chunks or len(chunks) > 1
    p = LayoutPatcher(new, base_hash=blake3.blake3(new).digest())
    assert b"".join(p.feed(b"".join(chunks))) == new
    p.finish()


async def _request(chan: net.Channel, app: Path, base: bytes, accepts: tuple[str, ...]
                   ) -> tuple[list[bytes], protocol.Message]:
    """A backup of ``app`` against ``base`` asked as a server does: its delta chunks, and
    the message after them."""
    await chan.send(protocol.BackupRequest(str(app), blake3.blake3(base).digest(), (),
                                           accepts=accepts))
    chunks: list[bytes] = []
    msg = await chan.receive()
    while isinstance(msg, protocol.DeltaChunk):
        chunks.append(msg.data)
        msg = await chan.receive()
    return chunks, msg


async def test_version_3_answers_then_compresses_once_the_server_hung_up(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 3: ``backup-done`` (no archive hash) comes before the agent compressed its
    own copy, which then waits for the server to hang up (the cores go to the server's
    last records first; at most ``AFTER_ANSWER_WAIT_S``); the kept build is then the
    server's archive: the next backup is a layout delta against it."""
    import deltabkp_agent.backup as backup_mod
    from deltabkp.archive import LAYOUT_MAGIC, LayoutPatcher, layout_capability

    monkeypatch.setattr(backup_mod, "AFTER_ANSWER_WAIT_S", 60.0)
    accepts = (layout_capability(3),)
    app = tmp_path / "app"
    make_tree(app, 60)
    await trio.sleep(RACY_NS_AGENT / 1e9 + 0.1)
    agent = await _start_agent(nursery, tmp_path)
    address = net.Address.parse(agent.address)
    base = bytes(deltabkp.patch(b"", (await backup_exchange(address, KEY, str(app), None)).delta))
    for n in range(2):
        await trio.to_thread.run_sync(_append, app / f"f{10 + n}", b"edited\n")
        await trio.sleep(RACY_NS_AGENT / 1e9 + 0.1)
        with trio.fail_after(60), agent_log() as messages:
            async with await net.connect(address, key=KEY, role="server") as chan:
                chunks, msg = await _request(chan, app, base, accepts)
                assert isinstance(msg, protocol.BackupDone), msg
                assert (msg.archive_hash, msg.archive_size) == (b"", 0)
                await trio.sleep(0.5)
                # Still waiting for us to hang up: not compressed, not logged.
                assert not any(m.startswith("archive of") for m in messages), messages
            while not any(m.startswith("backup of") for m in messages):
                await trio.sleep(0.01)
        assert not any("failed" in m for m in messages), messages
        delta = b"".join(chunks)
        assert delta.startswith(LAYOUT_MAGIC + b"\x03")
        p = LayoutPatcher(base, base_hash=blake3.blake3(base).digest())
        base = b"".join(p.feed(delta))
        p.finish()
        assert base == b"".join(TgzBuilder(app))
        # The agent's own copy is this archive: its log names its blake3.
        assert any(blake3.blake3(base).hexdigest()[:16] in m for m in messages
                   if m.startswith("backup of")), messages
    # The server refuses what it got (its check or its commit failed: it says ``cancel``
    # after the answer): the agent caches nothing for it and logs no backup served.
    await trio.to_thread.run_sync(_append, app / "f13", b"edited\n")
    await trio.sleep(RACY_NS_AGENT / 1e9 + 0.1)
    with trio.fail_after(60), agent_log() as messages:
        async with await net.connect(address, key=KEY, role="server") as chan:
            _, msg = await _request(chan, app, base, accepts)
            assert isinstance(msg, protocol.BackupDone), msg
            await chan.send(protocol.Cancel())
            with pytest.raises(deltabkp.DeltabkpError):
                await chan.receive()  # the agent hangs up
        while not any(m.startswith("backup of") for m in messages):
            await trio.sleep(0.01)
    assert any("stopped" in m for m in messages), messages
    assert not any(m.startswith("backup of") and "archive" in m for m in messages), messages


async def test_a_layout_delta_given_up_after_keep_alives_never_asks_for_a_signature(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 1 given up after its build sent keep-alives (empty ``delta-chunk``s: a build
    over ``KEEPALIVE_S``), with no signature of the base cached: asking the server for it
    now is no move of the conversation, so the backup fails with a plain error instead of a
    ``need-sig`` after delta chunks (found reading the version 2 review)."""
    import deltabkp_agent.backup as backup_mod
    from deltabkp.archive import layout_capability
    from deltabkp.errors import RequestRefused

    app = tmp_path / "app"
    make_tree(app, 40)
    await trio.sleep(RACY_NS_AGENT / 1e9 + 0.1)
    agent = await _start_agent(nursery, tmp_path)
    address = net.Address.parse(agent.address)
    first = await backup_exchange(address, KEY, str(app), None)
    base = bytes(deltabkp.patch(b"", first.delta))
    await trio.to_thread.run_sync(_append, app / "f10", b"edited\n")

    def give_up(*_a: Any, **_k: Any) -> int:
        raise backup_mod._NoLayout("made to fail here")

    monkeypatch.setattr(backup_mod, "KEEPALIVE_S", -1.0)
    monkeypatch.setattr(backup_mod, "_stream_layout", give_up)
    monkeypatch.setattr(backup_mod, "_cached_signature", lambda *_a: None)
    with pytest.raises(RequestRefused, match="after keep-alive chunks went out"):
        await backup_exchange(address, KEY, str(app), base, accepts=(layout_capability(),))
