"""Contract suite for ``Store`` backends, run on every backend: a local directory and S3
(a real SeaweedFS started for the session, see ``fixtures_s3.py``).

A new backend joins by adding a factory to ``BACKENDS``.  Specifics follow: the local
on-disk layout and a writer killed with -9 mid-write; S3 multipart uploads, abort,
reconciliation beside another server's writes in flight, the bounded base cache, errors;
``open_store``'s URLs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import pytest
from fixtures_s3 import BUCKET, new_s3_store, s3_env, seaweedfs  # noqa: F401

import deltabkp
from deltabkp.errors import MissingObject, StoreError
from deltabkp_server.store import LocalStore, S3Store, Store, _spool, open_store, signature


def _local(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return LocalStore(tmp_path / "data")


def _s3(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    request.getfixturevalue("s3_env")
    # No grace period: the suite plays a lone server that just restarted, as for LocalStore.
    return new_s3_store(tmp_path, grace_s=0)


BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], Store]] = {
    "local": _local, "s3": _s3,
}


@pytest.fixture(params=sorted(BACKENDS))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return BACKENDS[request.param](request, tmp_path)


def _put(store: Store, tid: int, seq: int, data: bytes, sig: bytes | None = b"SIG") -> None:
    """Commit an archive, then (as the server does after its catalog commit) its signature;
    ``sig`` None: a crash came in between."""
    w = store.begin(tid, seq)
    for i in range(0, len(data), 7):
        w.write(data[i : i + 7])
    assert w.size == len(data)
    w.commit()
    if sig is not None:
        store.write_signature(tid, seq, sig)


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


def test_read_back_and_abort_after_commit(store: Store) -> None:
    data = os.urandom(50_000)
    w = store.begin(1, 1)
    w.write(data[:20_000])
    w.write(memoryview(data)[20_000:])
    assert b"".join(w.read_back(4096)) == data
    w.commit()
    w.abort()  # what an ingest does when the catalog commit fails after the store's
    assert store.exists(1, 1) and b"".join(store.read_chunks(1, 1, 999)) == data
    with pytest.raises(StoreError):
        w.commit()


def test_base_checks_the_catalog_size(store: Store) -> None:
    data = os.urandom(3000)
    _put(store, 1, 1, data)
    with store.base(1, 1, size=3000, digest=blake3.blake3(data).digest()) as buf:
        assert bytes(buf) == data
    with pytest.raises(StoreError, match="3000"):
        with store.base(1, 1, size=2999):
            pass


def test_a_whole_version_without_its_signature_is_a_version_noted_by_reconcile(
    store: Store,
) -> None:
    """A crash between the archive's (catalog) commit and its signature's write: the version
    is there, nothing is garbage, nothing is missing; reconcile only notes it."""
    _put(store, 1, 1, b"committed, never signed", sig=None)
    _put(store, 1, 2, b"signed")
    assert store.exists(1, 1) and store.keys() == {(1, 1), (1, 2)}
    with pytest.raises(MissingObject):
        store.read_signature(1, 1)
    report = store.reconcile({(1, 1), (1, 2)})
    assert report == type(report)(unsigned=((1, 1),))
    assert store.exists(1, 1) and b"".join(store.read_chunks(1, 1, 100)) == b"committed, never signed"


def test_the_signature_of_a_version_is_made_if_missing_or_wrong(store: Store) -> None:
    """``store.signature``, the one home: a missing, damaged or another archive's signature
    is made again from the archive and stored; a good one is served as stored."""
    data = os.urandom(300_000)
    size, digest = len(data), blake3.blake3(data).digest()
    want = deltabkp.signature(data)
    _put(store, 1, 1, data, sig=None)
    assert signature(store, 1, 1, size=size, digest=digest) == want
    assert store.read_signature(1, 1) == want  # stored: the next reader reads it
    for wrong in (b"torn", want[:-1], deltabkp.signature(data[:-1])):
        store.write_signature(1, 1, wrong)
        assert signature(store, 1, 1, size=size, digest=digest) == want
        assert store.read_signature(1, 1) == want
    # From the caller's checked bytes (the conversion holds them): the same signature.
    store.write_signature(1, 1, b"torn")
    assert signature(store, 1, 1, size=size, digest=digest, buf=data) == want
    # An archive that does not match the catalog is the archive's fault: an error, not a
    # signature of the wrong bytes.
    store.write_signature(1, 1, b"torn")
    with pytest.raises(StoreError, match="does not match"):
        signature(store, 1, 1, size=size, digest=bytes(32))
    assert store.read_signature(1, 1) == b"torn"


def test_a_signature_that_cannot_be_stored_is_still_served(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(50_000)
    _put(store, 1, 1, data, sig=None)

    def refuse(tid: int, seq: int, sig: bytes) -> None:
        raise StoreError(f"cannot write signature {tid}/{seq}: no space left on device")

    monkeypatch.setattr(store, "write_signature", refuse)
    got = signature(store, 1, 1, size=len(data), digest=blake3.blake3(data).digest())
    assert got == deltabkp.signature(data)
    with pytest.raises(MissingObject):
        store.read_signature(1, 1)  # made again by the next reader


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


def test_local_signature_temp_left_by_a_crash_is_removed(tmp_path: Path) -> None:
    s = LocalStore(tmp_path)
    _put(s, 1, 1, b"archive", sig=None)
    d = tmp_path / "archives" / "1"
    # What ``atomic_write`` leaves when killed before its rename.
    (d / ".1.sig.k2j_9x.part").write_bytes(b"half a sig")
    report = s.reconcile({(1, 1)})
    assert report.removed_parts == (str(d / ".1.sig.k2j_9x.part"),)
    assert report.unsigned == ((1, 1),) and [p.name for p in d.iterdir()] == ["1.tgz"]


def test_local_part_is_handed_to_writeback_as_it_grows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A part file asks the kernel to start writing each WRITEBACK_STEP out as it is written
    (the commit's fsync then has little left to wait for), in order and without gaps; the
    archive is the same bytes.  The call itself is real on Linux (it is looked up in libc)."""
    assert _spool._sync_file_range() is not None  # Linux/glibc: the hint is not a silent no-op
    hints: list[tuple[int, int]] = []
    real = _spool.start_writeback

    def spy(fd: int, offset: int, length: int) -> None:
        hints.append((offset, length))
        real(fd, offset, length)

    monkeypatch.setattr(_spool, "start_writeback", spy)
    step = _spool.WRITEBACK_STEP
    data = os.urandom(step // 3) * 8  # ~2.7 steps, in writes that do not fall on a step
    w = LocalStore(tmp_path).begin(1, 1)
    for i in range(0, len(data), 1 << 20):
        w.write(memoryview(data)[i : i + (1 << 20)])
    w.commit()
    assert [o for o, _n in hints] == [0] + [o + n for o, n in hints[:-1]]  # contiguous
    assert len(hints) == len(data) // step and hints[-1][0] + hints[-1][1] > len(data) - step
    assert (tmp_path / "archives" / "1" / "1.tgz").read_bytes() == data


_WRITER = textwrap.dedent(
    """
    import os, sys
    from deltabkp_server.store import LocalStore, S3Store
    if len(sys.argv) == 2:
        s = LocalStore(sys.argv[1])
    else:  # bucket, prefix, cache dir
        s = S3Store(sys.argv[1], sys.argv[2], cache_dir=sys.argv[3])
    seq = 0
    while True:
        seq += 1
        w = s.begin(1, seq)
        for _ in range(64):
            w.write(os.urandom(4096))
        if seq == 3:
            print("ready", flush=True)
        w.commit()
        s.write_signature(1, seq, b"sig")  # after the catalog commit, in the server
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
    assert report.missing == () and report.unsigned == ()
    assert s.keys() == {(1, 1), (1, 2)}
    names = sorted(p.name for p in (tmp_path / "archives" / "1").iterdir())
    assert names == ["1.sig", "1.tgz", "2.sig", "2.tgz"]
    assert all(os.path.getsize(tmp_path / "archives" / "1" / n) > 0 for n in names)


# -- S3 specifics (a real SeaweedFS; see fixtures_s3.py) ----------------------------------------

PART = 8 << 20


def _objects(st: S3Store) -> list[str]:
    r = st.client.list_objects_v2(Bucket=BUCKET, Prefix=f"{st.prefix}/")
    return sorted(str(o["Key"])[len(st.prefix) + 1 :] for o in r.get("Contents", ()))


def _uploads(st: S3Store) -> list[str]:
    r = st.client.list_multipart_uploads(Bucket=BUCKET, Prefix=f"{st.prefix}/")
    return sorted(str(u["Key"])[len(st.prefix) + 1 :] for u in r.get("Uploads", ()))


def _gets(st: S3Store) -> list[dict[str, Any]]:
    """Every GetObject the store's client sends from now on (botocore's own event hook)."""
    calls: list[dict[str, Any]] = []
    st.client.meta.events.register(
        "provide-client-params.s3.GetObject", lambda params, **_kw: calls.append(dict(params))
    )
    return calls


def _cached(st: S3Store) -> set[tuple[int, int]]:
    return {(int(n.split("-")[0]), int(n.split("-")[1])) for n in os.listdir(st.cache.bases)}


def test_s3_an_archive_of_several_parts_streams_with_one_part_in_memory(
    s3_env: Any, tmp_path: Path
) -> None:
    st = new_s3_store(tmp_path)
    data = os.urandom(2 * PART + 12_345)
    w = st.begin(1, 1)
    w.write(data[: PART + 100])  # one write bigger than a part
    w.write(data[PART + 100 : 2 * PART + 5])
    assert not _objects(st) and _uploads(st) == ["archives/1/1.tgz"]
    parts = st.client.list_parts(Bucket=BUCKET, Key=w.key, UploadId=w.upload_id)["Parts"]
    assert [p["Size"] for p in parts] == [PART, PART]  # shipped as written, not at the end
    w.write(data[2 * PART + 5 :])
    assert b"".join(w.read_back(1 << 20)) == data
    w.commit()
    # The signature comes after the catalog commit, not with the archive.
    assert _objects(st) == ["archives/1/1.tgz"] and not _uploads(st)
    head = st.client.head_object(Bucket=BUCKET, Key=w.key)
    assert head["ContentLength"] == len(data) and head["ETag"].strip('"').endswith("-3")
    assert b"".join(st.read_chunks(1, 1, 1 << 20)) == data
    gets = _gets(st)
    with st.base(1, 1, size=len(data), digest=blake3.blake3(data).digest()) as buf:
        assert bytes(buf) == data
    assert gets == []  # the written spool became the cached base: no download


def test_s3_abort_leaves_no_object_no_upload_no_spool(s3_env: Any, tmp_path: Path) -> None:
    st = new_s3_store(tmp_path)
    w = st.begin(3, 1)
    w.write(os.urandom(PART + 1))
    assert _uploads(st) == ["archives/3/1.tgz"]
    w.abort()
    assert _objects(st) == [] and _uploads(st) == []
    assert os.listdir(st.cache.tmp) == []
    assert st.reconcile(set()) == type(st.reconcile(set()))()


def test_s3_of_two_writers_of_one_key_the_first_commit_wins(s3_env: Any, tmp_path: Path) -> None:
    first = new_s3_store(tmp_path, prefix="race")
    second = new_s3_store(tmp_path, prefix="race")
    w1, w2 = first.begin(1, 1), second.begin(1, 1)
    w1.write(b"first archive")
    w2.write(b"second archive")
    w1.commit()
    with pytest.raises(StoreError, match="another writer"):
        w2.commit()
    assert b"".join(second.read_chunks(1, 1, 100)) == b"first archive"  # the loser touched nothing
    assert _uploads(first) == [] and _objects(first) == ["archives/1/1.tgz"]


def test_s3_reconcile_spares_another_servers_fresh_writes(s3_env: Any, tmp_path: Path) -> None:
    mine = new_s3_store(tmp_path, prefix="shared")  # default grace period: 1 h
    other = new_s3_store(tmp_path, prefix="shared")  # another server on the same bucket
    w = other.begin(1, 2)
    w.write(os.urandom(PART + 10))  # in flight, one part up
    _put(other, 1, 3, b"stored; its catalog commit is not visible yet")
    report = mine.reconcile(set())
    assert report.removed_parts == () and report.removed_orphans == ()
    w.commit()
    assert mine.keys() == {(1, 2), (1, 3)}
    # The same things, older than the grace period, are garbage.
    stale = other.begin(1, 4)
    stale.write(b"x")
    report = mine.reconcile({(1, 2)}, grace_s=0)
    assert len(report.removed_parts) == 1 and "1/4.tgz" in report.removed_parts[0]
    assert len(report.removed_orphans) == 2
    assert mine.keys() == {(1, 2)} and _uploads(mine) == []


def test_s3_an_old_upload_that_still_adds_parts_is_alive(s3_env: Any, tmp_path: Path) -> None:
    st = new_s3_store(tmp_path)
    busy, _idle = st.begin(1, 1), st.begin(1, 2)
    time.sleep(3.2)  # both started more than 3 s ago (the store's clock counts seconds)
    busy.write(os.urandom(PART))  # ...but this one just shipped a part
    report = st.reconcile(set(), grace_s=3)
    assert len(report.removed_parts) == 1 and "1/2.tgz" in report.removed_parts[0]
    busy.commit()
    assert st.keys() == {(1, 1)}


def test_s3_base_cache_is_bounded_and_checked(s3_env: Any, tmp_path: Path) -> None:
    st = new_s3_store(tmp_path, cache_bytes=250_000)
    data = {k: os.urandom(100_000) for k in [(1, 1), (1, 2), (2, 1), (3, 1)]}
    for (tid, seq), d in data.items():
        _put(st, tid, seq, d)
    # One base per target (1/1 went when 1/2 came), then least recently used out.
    assert _cached(st) == {(2, 1), (3, 1)} and st.cache.total_bytes() <= 250_000
    gets = _gets(st)
    with st.base(1, 2) as buf:
        assert bytes(buf) == data[1, 2]
    assert len(gets) == 1 and _cached(st) == {(3, 1), (1, 2)}
    # A damaged copy of the same size is caught by the catalog's blake3, and fetched again.
    (entry,) = st.cache.bases.glob("3-1-*.tgz")
    damaged = bytearray(entry.read_bytes())
    damaged[50_000] ^= 0xFF
    entry.write_bytes(damaged)
    with st.base(3, 1, digest=blake3.blake3(data[3, 1]).digest()) as buf:
        assert bytes(buf) == data[3, 1]
    assert len(gets) == 2 and entry.read_bytes() == data[3, 1]
    # A truncated copy is caught by its size, even without a digest.
    (entry,) = st.cache.bases.glob("1-2-*.tgz")
    entry.write_bytes(data[1, 2][:1000])
    with st.base(1, 2) as buf:
        assert bytes(buf) == data[1, 2]
    assert len(gets) == 3
    # Bigger than the whole cache: served, never kept.
    big = os.urandom(300_000)
    _put(st, 4, 1, big)
    with st.base(4, 1) as buf:
        assert bytes(buf) == big
    assert (4, 1) not in _cached(st) and st.cache.total_bytes() <= 250_000
    # An object that does not match the catalog is an error, not a base.
    with pytest.raises(StoreError, match="blake3"):
        with st.base(3, 1, digest=bytes(32)):
            pass


def test_s3_ranged_reads_are_stitched_in_order(s3_env: Any, tmp_path: Path) -> None:
    st = new_s3_store(tmp_path)
    data = os.urandom(300_000)
    _put(st, 1, 1, data)
    size, etag = st.bucket.size_and_etag(st.key(1, 1, "tgz"), "test")
    gets = _gets(st)
    chunks = list(st.bucket.stream(st.key(1, 1, "tgz"), size=size, etag=etag,
                                   chunk_size=7000, window=65_536))
    assert b"".join(chunks) == data and max(map(len, chunks)) <= 7000
    assert [g["Range"] for g in gets][:2] == ["bytes=0-65535", "bytes=65536-131071"]
    assert len(gets) == 5


def test_s3_wrong_credentials_are_a_clear_store_error(
    s3_env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StoreError) as err:
        new_s3_store(tmp_path, prefix="p")
    text = str(err.value)
    assert f"s3://{BUCKET}/p" in text and "access denied" in text and "credentials" in text
    assert err.value.__cause__ is None and err.value.__suppress_context__
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StoreError, match="no usable AWS credentials"):
        new_s3_store(tmp_path)


def test_s3_an_unreachable_endpoint_is_a_store_error(s3_env: Any, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"cannot reach the S3 endpoint http://127\.0\.0\.1:9/"):
        new_s3_store(tmp_path, endpoint="http://127.0.0.1:9/", connect_timeout=1, max_attempts=1)


def test_s3_the_bucket_is_created_if_missing(s3_env: Any, tmp_path: Path) -> None:
    name = f"fresh-{os.urandom(4).hex()}"
    st = S3Store(name, cache_dir=tmp_path / "c1")
    assert st.keys() == set() and st.url == f"s3://{name}"
    _put(st, 1, 1, b"x")
    again = S3Store(name, cache_dir=tmp_path / "c2")  # already there: fine
    assert again.keys() == {(1, 1)}


def test_s3_kill_9_mid_write_leaves_only_reconcilable_garbage(
    s3_env: Any, tmp_path: Path
) -> None:
    prefix = f"kill-{os.urandom(4).hex()}"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, BUCKET, prefix, str(tmp_path / "writer-cache")],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"ready"
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    st = new_s3_store(tmp_path, prefix=prefix)
    complete = st.keys()
    assert {(1, 1), (1, 2)} <= complete
    fresh = st.reconcile({(1, 1), (1, 2)})  # the grace period: too young to be garbage
    assert fresh.removed_parts == fresh.removed_orphans == () and st.keys() == complete
    # Pretend the catalog committed only the first two and the grace period is over.
    assert st.reconcile({(1, 1), (1, 2)}, grace_s=0).missing == ()
    assert st.keys() == {(1, 1), (1, 2)} and _uploads(st) == []
    assert _objects(st) == ["archives/1/1.sig", "archives/1/1.tgz",
                            "archives/1/2.sig", "archives/1/2.tgz"]


# -- open_store ----------------------------------------------------------------------------------


def test_open_store_by_url(tmp_path: Path) -> None:
    default = open_store("", default_dir=tmp_path)
    assert isinstance(default, LocalStore) and default.root == tmp_path
    named = open_store(f"file://{tmp_path}/other%20dir", default_dir=tmp_path)
    assert isinstance(named, LocalStore) and named.root == tmp_path / "other dir"
    for bad in ("file://relative/dir", "file:relative", "ftp://host/x", "s3://", "s3:///x",
                "/plain/path"):
        with pytest.raises(StoreError, match="file:///"):
            open_store(bad, default_dir=tmp_path)


def test_open_store_s3(s3_env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st = open_store(f"s3://{BUCKET}/by/url/", default_dir=tmp_path, s3_endpoint=s3_env.endpoint)
    assert isinstance(st, S3Store) and st.prefix == "by/url" and st.url == f"s3://{BUCKET}/by/url"
    assert st.cache.dir.parent == tmp_path / "s3-cache"
    _put(st, 1, 1, b"via open_store")
    # No --s3-endpoint: boto3 takes AWS_ENDPOINT_URL, as every AWS tool does.
    again = open_store(f"s3://{BUCKET}/by/url", default_dir=tmp_path)
    assert isinstance(again, S3Store) and again.endpoint.rstrip("/") == s3_env.endpoint
    assert again.keys() == {(1, 1)}


# -- reverse deltas (the ``.rdelta`` object), on every backend ------------------------------------


def _put_delta(store: Store, tid: int, seq: int, data: bytes) -> None:
    w = store.begin_delta(tid, seq)
    for i in range(0, len(data), 1000):
        w.write(data[i:i + 1000])
    assert w.size == len(data) and b"".join(w.read_back(333)) == data
    assert not store.delta_exists(tid, seq)  # invisible until committed
    w.commit()
    w.abort()  # harmless after commit


def test_delta_objects_write_read_and_replace_the_whole_copy(store: Store) -> None:
    data = os.urandom(5000)
    _put(store, 1, 1, b"the whole archive of version 1")
    _put_delta(store, 1, 1, data)
    assert store.delta_exists(1, 1) and b"".join(store.read_delta_chunks(1, 1, 700)) == data
    store.delete_whole(1, 1)
    assert not store.exists(1, 1) and store.delta_exists(1, 1)
    assert store.keys() == {(1, 1)}  # present, as a delta
    assert store.stored_size(1, 1) == len(data)
    w = store.begin_delta(1, 2)
    w.write(b"never committed")
    w.abort()
    assert not store.delta_exists(1, 2) and store.keys() == {(1, 1)}
    store.delete(1, 1)  # every form
    assert not store.delta_exists(1, 1) and store.keys() == set()
    with pytest.raises(StoreError):
        list(store.read_delta_chunks(1, 1, 100))


def test_reconcile_keeps_the_form_the_catalog_names(store: Store) -> None:
    # 1: converted (delta recorded) but its whole copy not yet deleted: the copy goes.
    _put(store, 1, 1, b"old whole copy")
    _put_delta(store, 1, 1, b"delta of 1")
    # 2: the delta was written but never recorded: the delta goes, the whole copy stays.
    _put(store, 1, 2, b"whole 2")
    _put_delta(store, 1, 2, b"unrecorded delta of 2")
    # 3: the newest, whole; 4: a delta the catalog names but the store lost.
    _put(store, 1, 3, b"whole 3")
    w = store.begin_delta(1, 5)
    w.write(b"in flight")  # a crash mid-write
    report = store.reconcile({(1, 1), (1, 2), (1, 3), (1, 4)}, {(1, 1), (1, 4)})
    assert len(report.removed_orphans) == 3  # 1.tgz, 1.sig, 2.rdelta
    assert report.missing == ((1, 4),)
    assert store.delta_exists(1, 1) and not store.exists(1, 1)
    assert store.exists(1, 2) and not store.delta_exists(1, 2)
    assert store.exists(1, 3) and not store.delta_exists(1, 5)
    again = store.reconcile({(1, 1), (1, 2), (1, 3)}, {(1, 1)})
    assert again.removed_orphans == () and again.missing == ()
