"""Hot backups: archives built while a real writer process appends to, truncates, rewrites,
replaces, deletes and creates files.  Every archive must be a valid tar whose every stored
file is a state the file really had, unless the report says it changed while read.

This module is also the writer: ``python tests/test_archive_hot.py ROOT STOPFILE SEED``.
Each change the writer makes is ONE system call (a write of whole lines, a truncate at a line
boundary, a rename), so every state a file passes through is "valid" (see ``valid``) except
while a single write is being copied in; a stored file that is not valid is a torn read.
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import pytest

from deltabkp.archive import TgzBuilder
from deltabkp.archive._build import _READ, _read_small

HERE = Path(__file__).resolve()
#: Hard stop for the writer, whatever happens to the test (it also stops on STOPFILE).
WRITER_MAX_S = 120
BUILDS = 16


def line(gen: int, i: int, rng: random.Random) -> bytes:
    body = b"%d:%d:%s" % (gen, i, rng.randbytes(rng.randrange(10, 400)).hex().encode())
    return body + b":%08x\n" % zlib.crc32(body)


def content(gen: int, n: int, rng: random.Random) -> bytes:
    return b"gen=%d\n" % gen + b"".join(line(gen, i, rng) for i in range(n))


def valid(data: bytes) -> bool:
    """Empty, or a header and whole lines of its generation, numbered from 0, CRCs right."""
    if not data:
        return True
    if not data.endswith(b"\n"):
        return False
    lines = data.split(b"\n")[:-1]
    if not lines[0].startswith(b"gen="):
        return False
    gen = lines[0][4:]
    for i, ln in enumerate(lines[1:]):
        body, _, crc = ln.rpartition(b":")
        parts = body.split(b":")
        if len(parts) != 3 or parts[0] != gen or parts[1] != b"%d" % i:
            return False
        if crc != b"%08x" % zlib.crc32(body):
            return False
    return True


def writer(root: Path, stop: Path, seed: int) -> None:
    rng = random.Random(seed)
    gens: dict[Path, int] = {}
    counts: dict[Path, int] = {}
    deadline = time.monotonic() + WRITER_MAX_S
    ops = 0
    while not stop.exists() and time.monotonic() < deadline:
        d = root / f"d{rng.randrange(4)}"
        p = d / f"f{rng.randrange(12)}.log"
        op = rng.choice(("append", "append", "append", "truncate", "rewrite", "replace",
                         "delete", "rmdir", "symlink", "big"))
        try:
            d.mkdir(exist_ok=True)
            if p not in gens and p.exists():
                # a file the test made: learn its generation and line count
                data = p.read_bytes()
                gens[p] = int(data.split(b"\n", 1)[0][4:])
                counts[p] = data.count(b"\n") - 1
            if op == "append" and p.exists():
                n = counts.get(p, 0)
                k = rng.randrange(1, 20)
                data = b"".join(line(gens.get(p, 0), n + j, rng) for j in range(k))
                fd = os.open(p, os.O_WRONLY | os.O_APPEND)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
                counts[p] = n + k
            elif op == "truncate" and p.exists():
                data = p.read_bytes()
                keep = rng.randrange(counts.get(p, 0) + 1)
                os.truncate(p, _boundary(data, keep))
                counts[p] = keep
            elif op in ("rewrite", "append") :
                # in place, one pwrite at 0 of at least the old length (so no tail survives)
                gen = gens.get(p, 0) + 1
                old = p.stat().st_size if p.exists() else 0
                n = rng.randrange(1, 200)
                data = content(gen, n, rng)
                while len(data) < old:
                    n += 50
                    data = content(gen, n, rng)
                fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
                try:
                    os.pwrite(fd, data, 0)
                finally:
                    os.close(fd)
                gens[p], counts[p] = gen, n
            elif op == "replace":
                gen = gens.get(p, 0) + 1
                n = rng.randrange(1, 300)
                tmp = d / f".tmp-{rng.randrange(1 << 30)}"
                tmp.write_bytes(content(gen, n, rng))
                os.replace(tmp, p)
                gens[p], counts[p] = gen, n
            elif op == "delete":
                p.unlink(missing_ok=True)
                gens.pop(p, None)
                counts.pop(p, None)
            elif op == "rmdir":
                sub = d / "sub"
                if sub.exists():
                    for q in sub.iterdir():
                        q.unlink()
                    sub.rmdir()
                else:
                    sub.mkdir()
                    (sub / "x.log").write_bytes(content(0, 5, rng))
            elif op == "symlink":
                link = d / "link"
                tmp = d / f".lnk-{rng.randrange(1 << 30)}"
                os.symlink(p.name, tmp)
                os.replace(tmp, link)
            elif op == "big":
                # a file past the builder's in-memory limit: streamed, not re-read
                b = root / "big.log"
                if not b.exists() or b.stat().st_size > 3 << 20:
                    b.write_bytes(content(0, 0, rng))
                    counts[b] = 0
                n = counts.get(b, 0)
                data = b"".join(line(0, n + j, rng) for j in range(200))
                with open(b, "ab") as f:
                    f.write(data)
                counts[b] = n + 200
            ops += 1
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, OSError):
            continue
    print(ops, flush=True)


def _boundary(data: bytes, keep: int) -> int:
    """Offset just after the header and ``keep`` lines (a valid state to truncate to)."""
    at = 0
    for _ in range(keep + 1):
        nl = data.find(b"\n", at)
        if nl < 0:
            return at
        at = nl + 1
    return at


def test_archives_built_while_a_process_writes(tmp_path: Path) -> None:
    root = tmp_path / "live"
    root.mkdir()
    rng = random.Random(1)
    for i in range(4):
        (root / f"d{i}").mkdir()
        for j in range(12):
            (root / f"d{i}" / f"f{j}.log").write_bytes(content(0, rng.randrange(1, 300), rng))
    stop = tmp_path / "stop"
    proc = subprocess.Popen(
        [sys.executable, str(HERE), str(root), str(stop), "7"], stdout=subprocess.PIPE
    )
    try:
        torn = []
        stats = {"changed": 0, "skipped": 0, "files": 0}
        archives = set()
        for k in range(BUILDS):
            # Vary the limits so that big.log is read into memory, spooled, or streamed.
            builder = TgzBuilder(root, mem_limit=(1 << 20) if k % 2 else (8 << 20),
                                 spool_limit=0 if k % 4 == 3 else 1 << 30, threads=k % 3)
            data = b"".join(builder)  # must never raise
            report = builder.report
            archives.add(data)
            changed = {i.path for i in report.changed}
            stats["changed"] += len(report.changed)
            stats["skipped"] += len(report.skipped)
            assert all(i.what for i in report.changed + report.skipped)
            # A valid gzip and a valid tar: every header's size is followed by its data.
            raw = zlib.decompress(data[10:-8], -15)
            assert len(raw) == report.bytes_in and len(raw) % 512 == 0
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tf:
                files = 0
                for m in tf:
                    if not m.isfile():
                        continue
                    files += 1
                    f = tf.extractfile(m)
                    assert f is not None
                    body = f.read()
                    assert len(body) == m.size
                    if m.name not in changed and not valid(body):
                        torn.append((k, m.name, len(body)))
                assert files == report.files
            stats["files"] += report.files
            subprocess.run(["tar", "tzf", "-"], input=data, check=True, capture_output=True)
        assert not torn, f"torn copies not reported: {torn}"
    finally:
        stop.touch()
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    ops = int(out.decode().strip() or 0)
    # The writer really ran during the builds, and the tree did change between them.
    assert ops > 0 and len(archives) > 1
    print(f"writer ops: {ops}; over {BUILDS} builds: {stats}")


def test_the_torn_copy_detector_detects() -> None:
    """The check above can fail: torn copies of the writer's files are not ``valid``."""
    rng = random.Random(5)
    old, new = content(1, 50, rng), content(2, 60, rng)
    assert valid(old) and valid(new) and valid(b"")
    assert not valid(new[: len(new) // 2])  # a read racing an append or a rewrite
    assert not valid(new[:3000] + old[3000:])  # half rewritten in place
    assert not valid(old + line(2, 50, rng))  # a line of another generation
    assert not valid(old[:-1] + b"X\n")  # a corrupted byte


@pytest.mark.parametrize("n", [0, 1, 5000, _READ - 1, _READ, 3 * _READ + 7])
def test_a_small_read_tells_grown_shrunk_and_whole(tmp_path: Path, n: int) -> None:
    """``_read_small`` (one read of size + 1 for files under 1 MiB): the bytes up to the size
    stat announced, and whether more followed; a file shorter than announced is what is
    there.  Sizes around the one-call limit and past it (the loop)."""
    p = tmp_path / "f"
    data = random.Random(n).randbytes(n + 3)
    p.write_bytes(data)
    fd = os.open(p, os.O_RDONLY)
    try:
        for announced, want, more in ((n, data[:n], True), (n + 3, data, False), (n + 9, data, False)):
            os.lseek(fd, 0, os.SEEK_SET)
            assert _read_small(fd, announced) == (want, more), announced
    finally:
        os.close(fd)


def test_big_file_shrinking_mid_stream_is_padded_and_reported(tmp_path: Path) -> None:
    """Deterministic: the consumer truncates a streamed file between two chunks."""
    root = tmp_path / "t"
    root.mkdir()
    big = root / "big.bin"
    big.write_bytes(random.Random(2).randbytes(6 << 20))
    # spool_limit=0: past mem_limit, files are streamed (not spooled and re-read)
    builder = TgzBuilder(root, mem_limit=1 << 20, spool_limit=0, threads=0)
    it = iter(builder)
    chunks = [next(it)]  # the builder is now part-way through big.bin
    os.truncate(big, 1 << 20)
    chunks += list(it)
    [issue] = builder.report.changed
    assert issue.path == "big.bin" and "shrank while read" in issue.what
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as tf:
        m = tf.getmember("big.bin")
        assert m.size == 6 << 20
        f = tf.extractfile(m)
        assert f is not None and f.read()[-(1 << 20):] == bytes(1 << 20)


def test_big_file_growing_mid_stream_keeps_the_announced_size(tmp_path: Path) -> None:
    root = tmp_path / "t"
    root.mkdir()
    big = root / "big.bin"
    first = random.Random(3).randbytes(4 << 20)
    big.write_bytes(first)
    builder = TgzBuilder(root, mem_limit=1 << 20, spool_limit=0, threads=0)
    it = iter(builder)
    chunks = [next(it)]
    with open(big, "ab") as f:
        f.write(b"more" * 1000)
    chunks += list(it)
    [issue] = builder.report.changed
    assert issue.path == "big.bin" and "grew while read" in issue.what
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as tf:
        f = tf.extractfile("big.bin")
        assert f is not None and f.read() == first


def test_big_file_is_spooled_then_emitted_consistently(tmp_path: Path) -> None:
    """Past mem_limit a file is copied to a spool before its header: a change after the
    copy does not reach the archive, which holds one consistent version."""
    root = tmp_path / "t"
    root.mkdir()
    big = root / "big.bin"
    first = random.Random(6).randbytes(6 << 20)
    big.write_bytes(first)
    spools = tmp_path / "spool"
    spools.mkdir()
    builder = TgzBuilder(root, mem_limit=1 << 20, threads=0, spool_dir=str(spools))
    it = iter(builder)
    chunks = [next(it)]  # big.bin is captured in the spool and being emitted from it
    os.truncate(big, 1 << 20)
    chunks += list(it)
    assert builder.report.changed == () and builder.report.content_bytes == 6 << 20
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as tf:
        f = tf.extractfile("big.bin")
        assert f is not None and f.read() == first
    assert os.listdir(spools) == []  # the spool is unlinked from the start


SPOOL_FULL = r"""
import json, resource, signal, sys
import deltabkp
# Files this process writes may not pass 1 MiB: the spool's "disk" fills up (EFBIG).
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
b = deltabkp.TgzBuilder(sys.argv[1], mem_limit=1 << 20, threads=0)
data = b"".join(b)
sys.stdout.buffer.write(data)
sys.stderr.write(json.dumps([[i.path, i.what] for i in b.report.changed]))
"""


def test_spool_failure_falls_back_to_streaming(tmp_path: Path) -> None:
    root = tmp_path / "t"
    root.mkdir()
    content_ = random.Random(7).randbytes(3 << 20)
    (root / "big.bin").write_bytes(content_)
    r = subprocess.run([sys.executable, "-c", SPOOL_FULL, str(root)], capture_output=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    changed = json.loads(r.stderr)
    assert len(changed) == 1 and changed[0][0] == "big.bin"
    assert "spool failed" in changed[0][1] and "streamed instead" in changed[0][1]
    with tarfile.open(fileobj=io.BytesIO(r.stdout)) as tf:
        f = tf.extractfile("big.bin")
        assert f is not None and f.read() == content_


def test_vanished_between_listing_and_reading_is_skipped(tmp_path: Path) -> None:
    """Deterministic: files deleted after the walk listed their directory."""
    root = tmp_path / "t"
    (root / "a").mkdir(parents=True)
    (root / "a" / "pad.bin").write_bytes(random.Random(4).randbytes(2 << 20))
    for i in range(5):
        (root / "a" / f"z{i}").write_bytes(b"x")
    builder = TgzBuilder(root, threads=0)
    it = iter(builder)
    chunks = [next(it)]  # 'a' is listed (the walk is inside it), z* not yet read
    for i in range(5):
        (root / "a" / f"z{i}").unlink()
    chunks += list(it)
    assert sorted(i.path for i in builder.report.skipped) == [f"a/z{i}" for i in range(5)]
    assert all("vanished" in i.what for i in builder.report.skipped)
    names = tarfile.open(fileobj=io.BytesIO(b"".join(chunks))).getnames()
    assert names == ["a", "a/pad.bin"]


if __name__ == "__main__":
    writer(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))


def test_a_hot_file_open_for_writing_is_reported_until_its_writer_closes(tmp_path: Path) -> None:
    """A writer paused inside one write() has already set mtime and leaves stat still, so two
    identical reads prove nothing while it may be there: only a read lease's probe between
    them (no writable descriptor of the file anywhere) does."""
    root = tmp_path / "t"
    root.mkdir()
    log = root / "app.log"
    log.write_bytes(b"line 1\n")
    quiet = root / "quiet.txt"
    quiet.write_bytes(b"written just now, closed\n")
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)  # an application holding its log open
    try:
        os.write(fd, b"line 2\n")
        builder = TgzBuilder(root)
        data = b"".join(builder)
        reported = {i.path: i.what for i in builder.report.changed}
        assert set(reported) == {"app.log"}, reported
        assert reported["app.log"].startswith("open for writing while read")
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tf:
            member = tf.extractfile("app.log")
            assert member is not None and member.read() == b"line 1\nline 2\n"
    finally:
        os.close(fd)
    builder = TgzBuilder(root)  # still hot (written within HOT_NS), but nobody writes now
    b"".join(builder)
    assert not builder.report.changed
