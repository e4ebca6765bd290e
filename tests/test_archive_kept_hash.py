"""The agent's kept archive is hashed once per process, not before every incremental build:
``AgentCache`` remembers the ``stat`` of the archive it wrote (``KeptBuild.hashed``) and
``IncrementalBuilder(previous_hashed=...)`` trusts that very file without reading it through
blake3 again; any other file (replaced, rewritten in place: its ctime moved) is hashed and,
if it is not the indexed archive, refused.  Also the batched reuse of a run in sync
(``_Reused``): its entries are the ones a per-entry pass would have made."""

from __future__ import annotations

import random
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest

from deltabkp.archive import IncrementalBuilder, TgzBuilder, _incremental
from deltabkp.archive._incremental import EntryTable, IndexEntry, _Item, _Reused
from deltabkp_agent.cache import AgentCache

RACY_NS = 20_000_000


def make_tree(root: Path, n: int = 40) -> Path:
    rng = random.Random(n)
    root.mkdir()
    for i in range(n):
        (root / f"f{i:02d}").write_bytes(b"".join(b"%d line %d of file %d\n" % (rng.randrange(99), j, i)
                                                  for j in range(1500)))
    time.sleep(RACY_NS / 1e9 + 0.03)  # not racy for the builds below
    return root


class HashSpy:
    """``blake3.blake3`` that counts the bytes it hashes."""

    total = 0

    def __init__(self, *a: Any, **kw: Any) -> None:
        self.h = REAL(*a, **kw)
        if a:
            HashSpy.total += len(a[0])

    def update(self, data: Any) -> HashSpy:
        HashSpy.total += len(data)
        self.h.update(data)
        return self

    def digest(self, *a: Any, **kw: Any) -> bytes:
        return bytes(self.h.digest(*a, **kw))


REAL = blake3.blake3


def build_kept(c: AgentCache, root: Path) -> tuple[bytes, IncrementalBuilder, int]:
    """The agent's build (``backup._build``): from the kept one, keeping this one; and the
    bytes blake3 went over."""
    out = bytearray()
    HashSpy.total = 0
    with c.kept_build(str(root)) as kept:
        b = IncrementalBuilder(root, previous=kept.index, previous_archive=kept.archive,
                               previous_hashed=kept.hashed, racy_ns=RACY_NS)
        for chunk in b:
            kept.write(chunk)
            out += chunk
        kept.done(b.index)
    return bytes(out), b, HashSpy.total


def test_kept_archive_hashed_once_per_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The builder's blake3 only (the cache hashes its own records).
    monkeypatch.setattr(_incremental, "blake3", types.SimpleNamespace(blake3=HashSpy))
    root = make_tree(tmp_path / "t")
    c = AgentCache(tmp_path / "c")
    first, b1, _ = build_kept(c, root)
    assert b1.stats.previous == "none"
    (root / "f05").write_bytes(b"changed\n")
    time.sleep(RACY_NS / 1e9 + 0.03)
    # This process wrote the kept archive: not hashed again (only the new one is).
    second, b2, hashed = build_kept(c, root)
    assert b2.stats.previous == "" and b2.stats.entries_reused >= 35
    assert second == b"".join(TgzBuilder(root))
    assert hashed < len(second) + len(first) // 2
    # A restarted agent does not know that file: hashed before use.
    c2 = AgentCache(tmp_path / "c")
    third, b3, hashed = build_kept(c2, root)
    assert third == second and b3.stats.previous == ""
    assert hashed >= 2 * len(second)


def test_kept_archive_changed_behind_the_cache_is_refused(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t")
    c = AgentCache(tmp_path / "c")
    build_kept(c, root)
    kept = c.kept_archive(str(root))
    assert kept is not None
    # Same size, one byte flipped in place: the ctime moves, so the file is hashed again.
    data = bytearray(kept.read_bytes())
    data[len(data) // 2] ^= 1
    time.sleep(0.01)
    with open(kept, "r+b") as f:
        f.write(bytes(data))
    (root / "f07").write_bytes(b"changed too\n")
    time.sleep(RACY_NS / 1e9 + 0.03)
    out, b, _ = build_kept(c, root)
    assert "not the one its index describes" in b.stats.previous
    assert b.stats.entries_reused == 0
    assert out == b"".join(TgzBuilder(root))


def test_reused_batches_cover_runs_in_sync(tmp_path: Path) -> None:
    """The fast path is taken (most files in batches) and its records are the old ones
    moved, as ``append_moved`` one by one would make them."""
    root = make_tree(tmp_path / "t", n=80)
    c = AgentCache(tmp_path / "c")
    build_kept(c, root)
    for i in (3, 40):
        (root / f"f{i:02d}").write_bytes(b"edited %d\n" % i)
    time.sleep(RACY_NS / 1e9 + 0.03)
    batched: list[str] = []

    class Spy(IncrementalBuilder):
        def _items(self, *a: Any, **kw: Any) -> Iterator[_Item | _Reused]:
            for item in super()._items(*a, **kw):
                if isinstance(item, _Reused):
                    batched.extend(item.rels)
                yield item

    with c.kept_build(str(root)) as kept:
        assert kept.index is not None
        b = Spy(root, previous=kept.index, previous_archive=kept.archive, racy_ns=RACY_NS)
        out = b"".join(b)
        old = kept.index
    assert out == b"".join(TgzBuilder(root))
    assert len(batched) >= 60 and "f03" not in batched and "f40" not in batched
    new = b.index.entries
    for i in range(len(new)):
        e = new[i]
        if e.path in batched:
            o = next(x for x in old.entries if x.path == e.path)
            assert e == o.placed(e.tar_start, e.tar_end)
            assert e.tar_end - e.tar_start == o.tar_end - o.tar_start


def test_append_reused_equals_append_moved() -> None:
    src = EntryTable(bytearray())
    at = 0
    for i in range(7):
        size = 100 * i + 3
        src.append(IndexEntry(f"d/file-{'x' * i}", 1, True, 0o100644, 1, 2, 1, 3, 40 + i, size,
                              10**18 + i, 10**18 + 2 * i, at, at + 512 + size, bytes(16)))
        at += 1024 + size
    one, bulk = EntryTable(bytearray()), EntryTable(bytearray())
    for t in (one, bulk):
        t.append(src[0])
    for i in range(2, 6):
        s, e = src[i].tar_start, src[i].tar_end
        one.append_moved(src, i, s - 700, e - 700)
    bulk.append_reused(src, 2, 5, 700)
    assert one == bulk and list(one) == list(bulk)
