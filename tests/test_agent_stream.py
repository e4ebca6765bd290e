"""The agent's layout delta goes out while it is being made (``backup._stream_layout``: a
push every ``STREAM_S`` or ``FLUSH_AT`` bytes), so the server rebuilds the archive as the
agent encodes; the pieces, fed to the server's patcher as they come, give a fresh build's
bytes.  And ``Phases``, the one home of the per-phase timeline both daemons log."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from deltabkp._phases import Phases
from deltabkp.archive import IncrementalBuilder, LayoutPatcher, TgzBuilder
from deltabkp_agent import backup
from deltabkp_agent.cache import AgentCache


def _tree(root: Path, rng: random.Random) -> None:
    for d in range(6):
        (root / f"d{d}").mkdir(parents=True)
        for f in range(8):
            words = [b"%x" % rng.randrange(1 << 20) for _ in range(rng.randrange(500, 4000))]
            (root / f"d{d}" / f"f{f}.txt").write_bytes(b" ".join(words))


def _edit(root: Path, rng: random.Random) -> None:
    for p in sorted(root.rglob("*.txt"))[::11]:
        data = p.read_bytes()
        at = rng.randrange(len(data))
        p.write_bytes(data[:at] + b"edited %d" % rng.randrange(1 << 30) + data[at:])


def _build(cache: AgentCache, root: str, then: object = None) -> None:
    with cache.kept_build(root) as kept:
        builder = IncrementalBuilder(root, previous=kept.index, previous_archive=kept.archive)
        for chunk in builder:
            kept.write(chunk)
        kept.done(builder.index)
        if callable(then):
            then(kept, builder.index)


@pytest.mark.parametrize("stream_s", [0.0, 1e9])
def test_layout_delta_is_pushed_as_it_is_made_and_patches_to_a_fresh_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stream_s: float
) -> None:
    rng = random.Random(7)
    root = tmp_path / "app"
    _tree(root, rng)
    cache = AgentCache(tmp_path / "cache")
    _build(cache, str(root))
    old_index = cache.kept_index(str(root))
    assert old_index is not None
    old = (cache.kept_archive(str(root)) or Path("/nonexistent")).read_bytes()
    _edit(root, rng)
    monkeypatch.setattr(backup, "STREAM_S", stream_s)
    pushes: list[bytes] = []

    def stream(kept: object, new_index: object) -> None:
        backup._stream_layout(kept, old_index, new_index, pushes.append, cache,  # type: ignore[arg-type]
                              str(root))

    _build(cache, str(root), stream)
    # STREAM_S 0: every record goes at once; else the header and the first record at once
    # (the server starts on them while the plan is made), the rest in one push at the end.
    assert (len(pushes) > 3) if stream_s == 0.0 else (len(pushes) == 3)
    assert pushes[0].startswith(b"DBKPLD") and len(pushes[0]) < 200  # the header alone
    patcher = LayoutPatcher(old, base_hash=old_index.archive_hash, max_size=1 << 30)
    out = bytearray()
    for chunk in pushes:
        for piece in patcher.pieces(chunk):
            out += piece
    patcher.finish()
    assert bytes(out) == b"".join(TgzBuilder(root))


def test_phases_are_laps_in_order_and_add_up() -> None:
    ph = Phases()
    ph.lap("walk")
    sum(range(200_000))  # some CPU in the next phase
    ph.lap("build")
    ph.add("build", 0.5, 0.25)  # a phase timed elsewhere adds to the same row
    ph.lap("send")
    assert list(ph.rows) == ["walk", "build", "send"]
    assert ph.rows["build"][0] >= 0.5 and ph.rows["build"][1] >= 0.25
    wall, cpu = ph.total
    assert wall == pytest.approx(sum(r[0] for r in ph.rows.values()))
    text = ph.render()
    assert text.startswith("walk ") and ", build " in text and ", send " in text
    assert text.endswith(f"(ms wall/cpu; total {wall * 1e3:.0f}/{cpu * 1e3:.0f})")
