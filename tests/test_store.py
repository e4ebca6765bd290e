"""Contract suite for ``Store`` backends (parametrised over every backend; local dir today).

A new backend (S3) joins by adding a factory to ``BACKENDS``.  Local-directory specifics
follow: the on-disk layout, and a writer process killed with -9 mid-write leaving only
garbage that ``reconcile`` removes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from deltabkp.errors import StoreError
from deltabkp_server.store import LocalStore, Store

BACKENDS: dict[str, Callable[[Path], Store]] = {"local": LocalStore}


@pytest.fixture(params=sorted(BACKENDS))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return BACKENDS[request.param](tmp_path / "data")


def _put(store: Store, tid: int, seq: int, data: bytes, sig: bytes = b"SIG") -> None:
    w = store.begin(tid, seq)
    for i in range(0, len(data), 7):
        w.write(data[i : i + 7])
    assert w.size == len(data)
    w.commit(sig)


def test_write_commit_read(store: Store) -> None:
    data = os.urandom(10_000)
    _put(store, 1, 1, data, b"signature bytes")
    assert store.exists(1, 1)
    assert store.keys() == {(1, 1)}
    assert store.read_signature(1, 1) == b"signature bytes"
    assert b"".join(store.read_chunks(1, 1, 4096)) == data
    with store.base(1, 1) as buf:
        assert bytes(buf) == data


def test_empty_archive_is_a_valid_base(store: Store) -> None:
    _put(store, 1, 1, b"")
    with store.base(1, 1) as buf:
        assert bytes(buf) == b""


def test_uncommitted_writes_are_invisible_and_abort_leaves_nothing(store: Store) -> None:
    w = store.begin(2, 1)
    w.write(b"half an archive")
    assert not store.exists(2, 1) and store.keys() == set()
    w.abort()
    assert store.keys() == set()
    assert store.reconcile(set()).removed_parts == ()  # nothing was left to clean


def test_delete_is_idempotent(store: Store) -> None:
    _put(store, 1, 1, b"x")
    store.delete(1, 1)
    store.delete(1, 1)
    assert not store.exists(1, 1) and store.keys() == set()


def test_a_committed_seq_cannot_be_overwritten(store: Store) -> None:
    _put(store, 1, 1, b"first")
    with pytest.raises(StoreError):
        store.begin(1, 1)
    assert b"".join(store.read_chunks(1, 1, 100)) == b"first"


def test_missing_objects_raise_store_errors(store: Store) -> None:
    with pytest.raises(StoreError):
        store.read_signature(9, 9)
    with pytest.raises(StoreError):
        list(store.read_chunks(9, 9, 10))
    with pytest.raises(StoreError):
        with store.base(9, 9):
            pass


def test_reconcile_removes_orphans_and_reports_missing(store: Store) -> None:
    _put(store, 1, 1, b"kept")
    _put(store, 1, 2, b"orphan: its catalog commit never happened")
    _put(store, 2, 5, b"kept too")
    w = store.begin(1, 3)
    w.write(b"partial")  # a crash in the middle of a transfer
    report = store.reconcile({(1, 1), (2, 5), (3, 1)})
    assert len(report.removed_parts) == 1
    assert len(report.removed_orphans) == 2  # 2.tgz and 2.sig
    assert report.missing == ((3, 1),)
    assert store.keys() == {(1, 1), (2, 5)}
    assert store.reconcile({(1, 1), (2, 5)}) == type(report)()


# -- local-directory specifics ---------------------------------------------------------------


def test_local_layout(tmp_path: Path) -> None:
    s = LocalStore(tmp_path)
    _put(s, 4, 7, b"tgz bytes", b"sig bytes")
    assert (tmp_path / "archives" / "4" / "7.tgz").read_bytes() == b"tgz bytes"
    assert (tmp_path / "archives" / "4" / "7.sig").read_bytes() == b"sig bytes"
    assert sorted(p.name for p in (tmp_path / "archives" / "4").iterdir()) == ["7.sig", "7.tgz"]


def test_local_lone_signature_from_a_crash_between_renames_is_an_orphan(tmp_path: Path) -> None:
    s = LocalStore(tmp_path)
    d = tmp_path / "archives" / "1"
    d.mkdir(parents=True)
    (d / "1.sig").write_bytes(b"sig")  # renamed; the .tgz rename never happened
    (d / "1.tgz.part").write_bytes(b"data")
    assert s.keys() == set()
    report = s.reconcile(set())
    assert len(report.removed_parts) == 1 and len(report.removed_orphans) == 1
    assert list(d.iterdir()) == []


_WRITER = textwrap.dedent(
    """
    import os, sys
    from deltabkp_server.store import LocalStore
    s = LocalStore(sys.argv[1])
    seq = 0
    while True:
        seq += 1
        w = s.begin(1, seq)
        for _ in range(64):
            w.write(os.urandom(4096))
        if seq == 3:
            print("ready", flush=True)
        w.commit(b"sig")
    """
)


def test_local_kill_9_mid_write_leaves_only_reconcilable_garbage(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"ready"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    s = LocalStore(tmp_path)
    complete = s.keys()
    assert {(1, 1), (1, 2)} <= complete
    # Pretend the catalog committed only the first two: everything else must go.
    report = s.reconcile({(1, 1), (1, 2)})
    assert report.missing == ()
    assert s.keys() == {(1, 1), (1, 2)}
    names = sorted(p.name for p in (tmp_path / "archives" / "1").iterdir())
    assert names == ["1.sig", "1.tgz", "2.sig", "2.tgz"]
    assert all(os.path.getsize(tmp_path / "archives" / "1" / n) > 0 for n in names)
