"""``LayoutPatcher(threads=N)``: RUN records rebuilt in worker threads (old tar read in turn,
then compressed side by side) give exactly what the one-by-one path gives — the same pieces, the same
``copies``, the same error after the same pieces on a damaged delta — and leave no thread
behind once the delta ended or failed, a ``pieces`` generator was closed early, or the
patcher was closed or dropped mid-delta.
"""

from __future__ import annotations

import gc
import random
import struct
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_layout_delta import EDITS, _build, _edited_pair, _make_tree, _settle

from deltabkp.archive import LayoutPatcher, _layout, encode_layout
from deltabkp.archive._gzip import compress_segments
from deltabkp.errors import DeltabkpError, FormatError

Pair = tuple[bytes, bytes, bytes, bytes]  # old archive, its blake3, delta, new archive


def _records(delta: bytes) -> list[tuple[int, int]]:
    """(type, offset of the record) of each record of a well-formed delta."""
    at = 82 + delta[81]
    out = []
    while at < len(delta):
        kind, n = struct.unpack_from("<BI", delta, at)
        out.append((kind, at))
        at += 5 + n
    return out


def _pair(w: Path, seed: int = 5) -> Pair:
    """An archive pair whose delta alternates COPY and RUN records (five runs)."""
    rng = random.Random(seed)
    root = w / "tree"
    _make_tree(root, rng, 80)
    _settle(root)
    a = _build(root, w / "a.tgz", None, None)
    for i in range(0, 80, 17):
        p = next(root.rglob(f"f{i:03}.py"))
        p.write_bytes(b"# changed\n" + p.read_bytes())
    _settle(root)
    b = _build(root, w / "b.tgz", a, w / "a.tgz")
    old, new = (w / "a.tgz").read_bytes(), (w / "b.tgz").read_bytes()
    return old, a.index.archive_hash, b"".join(encode_layout(a.index, old, b.index, new)), new


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    with tempfile.TemporaryDirectory() as d:
        yield _pair(Path(d))


_before: set[threading.Thread] = set()


@pytest.fixture(autouse=True)
def _threads_before() -> None:
    """Threads of patchers another test of this process left behind are not this test's."""
    _before.clear()
    _before.update(threading.enumerate())


def _layout_threads() -> list[threading.Thread]:
    """The patcher threads started since this test began and still running."""
    return [t for t in threading.enumerate()
            if t.name.startswith("deltabkp-layout") and t not in _before]


def _run(old: bytes, h: bytes, delta: bytes, threads: int, step: int | None = None,
         ) -> tuple[list[bytes], str | None, list[tuple[int, int, int]]]:
    """Pieces handed out (in order), the error (type and message) if any, ``copies``."""
    p = LayoutPatcher(old, base_hash=h, max_size=1 << 30, threads=threads)
    got: list[bytes] = []
    try:
        for at in range(0, len(delta), step or len(delta) or 1):
            for piece in p.pieces(delta[at : at + (step or len(delta))]):
                got.append(bytes(piece))
        p.finish()
    except DeltabkpError as exc:
        return got, f"{type(exc).__name__}: {exc}", p.copies
    return got, None, p.copies


def test_the_pair_has_runs_between_copies(pair: Pair) -> None:
    kinds = [k for k, _at in _records(pair[2])]
    assert kinds.count(_layout.T_RUN) >= 4 and kinds.count(_layout.T_COPY) >= 4


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), edits=EDITS, threads=st.integers(2, 4),
       step=st.sampled_from((None, 1, 333, 4096)))
def test_threads_give_the_serial_pieces_on_random_edits(
    seed: int, edits: list[tuple[str, int]], threads: int, step: int | None
) -> None:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as d:
        a, b, old, new = _edited_pair(Path(d), rng, 40, edits)
        delta = b"".join(encode_layout(a.index, old, b.index, new))
    serial = _run(old, a.index.archive_hash, delta, 1, step)
    assert serial[1] is None and b"".join(serial[0]) == new
    assert _run(old, a.index.archive_hash, delta, threads, step) == serial
    assert not _layout_threads()


def test_runs_still_compressing_come_out_at_the_next_call(pair: Pair) -> None:
    """Fed in chunks (as the agent streams it), each call hands out what is ready and the
    rest comes at the next calls: all of it, in order, by the call that reads END."""
    old, h, delta, new = pair
    p = LayoutPatcher(old, base_hash=h, threads=2)
    out = b"".join(b"".join(p.feed(delta[at : at + 300])) for at in range(0, len(delta), 300))
    p.finish()
    assert out == new and not _layout_threads()


def test_a_patcher_given_up_mid_delta_ends_its_threads(pair: Pair) -> None:
    """``close`` ends the workers of a patcher left before END; so does dropping it (its
    threads hold nothing of the base: the caller may close the base's mmap)."""
    old, h, delta, _new = pair
    cut = [at for k, at in _records(delta) if k == _layout.T_RUN][-1]
    for give_up in ("close", "drop"):
        p = LayoutPatcher(old, base_hash=h, threads=2)
        p.feed(delta[:cut])
        threads = _layout_threads()
        assert threads  # the pool outlives the call: the delta goes on
        if give_up == "close":
            p.close()
            assert not _layout_threads()
        else:
            del p
            gc.collect()
            for t in threads:
                t.join(60)  # a safety net, not a timing: they end once the pool is gone
            assert not _layout_threads()


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_a_damaged_delta_fails_the_same_way_with_threads(pair: Pair, data: st.DataObject) -> None:
    """Same pieces before the error, same error (type and message), same ``copies``."""
    old, h, delta, _new = pair
    buf = bytearray(delta)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(82, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        buf = buf[: data.draw(st.integers(0, len(buf)))]
    step = data.draw(st.sampled_from((None, 97)))
    serial = _run(old, h, bytes(buf), 1, step)
    threaded = _run(old, h, bytes(buf), data.draw(st.integers(2, 3)), step)
    if serial[1] is not None and "no END record" in serial[1]:
        # Truncated: runs still compressing wait for a next call that never comes.
        assert threaded[1] == serial[1] and threaded[0] == serial[0][: len(threaded[0])]
    else:
        assert threaded == serial
    assert not _layout_threads()


def test_a_bad_record_after_runs_in_flight(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last RUN's literals corrupt while the four runs before it still compress (they
    wait until the calling thread has found the bad record): the pieces before it, then the
    serial path's error, the same ``copies``; no thread left."""
    old, h, delta, _new = pair
    runs = [at for k, at in _records(delta) if k == _layout.T_RUN]
    assert len(runs) == 5
    bad = bytearray(delta)
    at = runs[-1] + 5 + _layout._RUN.size + 20
    bad[at:] = b"\xff" * (len(bad) - at)
    serial = _run(old, h, bytes(bad), 1)
    assert serial[1] is not None and serial[1].startswith("FormatError")
    assert len(serial[0]) == 9  # the five COPY and four RUN records before the bad one

    found = threading.Event()
    real_run = LayoutPatcher._parse_run

    def run(self: LayoutPatcher, body: bytes) -> object:
        try:
            return real_run(self, body)
        except DeltabkpError:
            found.set()
            raise

    def compress(*args: object) -> bytes:
        assert found.wait(60), "the calling thread never reached the bad record"
        return compress_segments(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(LayoutPatcher, "_parse_run", run)
    monkeypatch.setattr(_layout, "compress_segments", compress)
    assert _run(old, h, bytes(bad), 4) == serial
    assert not _layout_threads()


def test_closed_early_with_runs_in_flight_leaves_no_thread(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first RUN finishes only once the second has started, which waits for the test:
    when the first run's piece is handed out, the second is still compressing.  Closing the
    generator then waits for it (it is let go just before) and ends every thread."""
    old, h, delta, _new = pair
    started: list[int] = []
    finished: list[int] = []
    second, release = threading.Event(), threading.Event()
    lock = threading.Lock()

    def gated(*args: object, **kw: object) -> bytes:
        with lock:
            n = len(started)
            started.append(n)
        if n == 0:
            second.wait()
        else:
            second.set()
            release.wait()
        try:
            return compress_segments(*args, **kw)  # type: ignore[arg-type]
        finally:
            finished.append(n)

    monkeypatch.setattr(_layout, "compress_segments", gated)
    assert _records(delta)[0][0] == _layout.T_COPY
    p = LayoutPatcher(old, base_hash=h, threads=2)
    it = p.pieces(delta)
    pieces = [bytes(next(it))]  # the COPY before the first run
    while len(finished) < 1:
        pieces.append(bytes(next(it)))
    assert len(started) >= 2 and 1 not in finished  # the second run is in flight
    release.set()
    it.close()
    assert sorted(finished) == sorted(started)
    assert not _layout_threads()
    with pytest.raises(FormatError, match="no END record"):
        p.finish()


@pytest.mark.parametrize("truncated", [True, False])
def test_an_old_tar_read_failing_in_a_worker_fails_the_call_that_read_it(
    pair: Pair, truncated: bool
) -> None:
    """Workers rebuild a run's tar (its old tar reads, in turn): a read that fails (here a
    reference past the base's tar) is the serial path's error after the same pieces, in
    the call that read the record — also when the delta ends right after it, where a run
    merely compressing would wait for a next call."""
    old, h, delta, _new = pair
    at = [at for k, at in _records(delta) if k == _layout.T_RUN][1]
    n_cuts = struct.unpack_from("<I", delta, at + 5 + 5)[0]
    part = at + 5 + _layout._RUN.size + 4 * n_cuts
    assert delta[part] == 0  # the run's window: an old tar reference
    bad = bytearray(delta)
    struct.pack_into("<Q", bad, part + 1, 1 << 40)
    if truncated:
        bad = bad[: at + 5 + struct.unpack_from("<I", delta, at + 1)[0]]
    serial = _run(old, h, bytes(bad), 1)
    assert serial[1] is not None and serial[1].startswith("IntegrityError")
    for threads in (2, 3):
        assert _run(old, h, bytes(bad), threads) == serial
        assert not _layout_threads()
