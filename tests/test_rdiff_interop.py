"""deltabkp.rdiff against the real ``rdiff`` (librsync), in all four directions.

rdiff signature -> our delta -> rdiff patch; our signature -> rdiff delta -> our patch; and
each tool's delta applied by the other, over random files, block sizes, strong-sum lengths
and all four signature kinds (property-tested), plus empty, tiny and unrelated files.  Our
signatures must also be byte-identical to rdiff's for the same options.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltabkp import rdiff
from deltabkp.cli import main
from deltabkp.engine import _rdiff_sums as rdiff_sums
from deltabkp.rdiff import SignatureKind

RDIFF = shutil.which("rdiff")
# .ci/run installs rdiff; a machine without it must say so, not pass quietly.
pytestmark = pytest.mark.skipif(RDIFF is None, reason="rdiff not installed (apt-get install rdiff)")

_OPTS = {
    SignatureKind.RK_BLAKE2: ("-R", "rabinkarp", "-H", "blake2"),
    SignatureKind.RK_MD4: ("-R", "rabinkarp", "-H", "md4"),
    SignatureKind.BLAKE2: ("-R", "rollsum", "-H", "blake2"),
    SignatureKind.MD4: ("-R", "rollsum", "-H", "md4"),
}


def _rdiff(*args: str | Path) -> None:
    assert RDIFF is not None
    cmd = [RDIFF, "-f", *map(str, args)]
    r = subprocess.run(cmd, check=False, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode(errors="replace")


def _four_directions(
    d: Path, base: bytes, new: bytes, kind: SignatureKind, block: int | None, strong: int | None
) -> None:
    (d / "base").write_bytes(base)
    (d / "new").write_bytes(new)
    opts: list[str] = [*_OPTS[kind]]
    if block is not None:
        opts += ["-b", str(block)]
    if strong is not None:
        opts += ["-S", str(strong)]
    _rdiff(*opts, "signature", d / "base", d / "r.sig")
    rsig = (d / "r.sig").read_bytes()
    ours = rdiff.signature(base, block, strong_len=strong, kind=kind)
    assert ours == rsig, "signature differs from rdiff's"
    # rdiff signature -> our delta -> rdiff patch (and our patch)
    delta = rdiff.delta(rsig, new)
    (d / "o.delta").write_bytes(delta)
    _rdiff("patch", d / "base", d / "o.delta", d / "o.out")
    assert (d / "o.out").read_bytes() == new
    assert rdiff.patch(base, delta) == new
    # our signature -> rdiff delta -> our patch
    (d / "o.sig").write_bytes(ours)
    _rdiff("delta", d / "o.sig", d / "new", d / "r.delta")
    assert rdiff.patch(base, (d / "r.delta").read_bytes()) == new


@st.composite
def _pairs(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A base and a new file made from it by a few edits (or, sometimes, unrelated)."""
    rng = random.Random(draw(st.integers(0, 2**32)))
    size = draw(st.sampled_from([0, 1, 5, 255, 256, 257, 1000, 4096, 20000]))
    # Low-entropy bases too: repeated blocks exercise duplicate weak and strong sums.
    base = rng.randbytes(size) if draw(st.booleans()) else bytes(rng.choice(b"ab") for _ in range(size))
    if draw(st.integers(0, 9)) == 0:
        return base, rng.randbytes(rng.randrange(0, 3000))
    new = bytearray(base)
    for _ in range(draw(st.integers(0, 4))):
        at = rng.randrange(0, len(new) + 1)
        op = rng.randrange(3)
        if op == 0:
            new[at:at] = rng.randbytes(rng.randrange(1, 300))
        elif op == 1:
            del new[at : at + rng.randrange(1, 300)]
        else:
            new[at : at + 8] = rng.randbytes(8)
    return base, bytes(new)


@settings(max_examples=30)
@given(
    pair=_pairs(),
    kind=st.sampled_from(list(SignatureKind)),
    block=st.one_of(st.none(), st.integers(1, 40), st.sampled_from([64, 256, 300, 1024])),
    strong=st.data(),
)
def test_four_directions_property(
    pair: tuple[bytes, bytes],
    kind: SignatureKind,
    block: int | None,
    strong: st.DataObject,
) -> None:
    strong_len = strong.draw(st.one_of(st.none(), st.integers(1, kind.max_strong_len)))
    with tempfile.TemporaryDirectory(prefix="rdiff-interop-") as tmp:
        _four_directions(Path(tmp), *pair, kind, block, strong_len)


_RNG = random.Random(14)
_BIG = _RNG.randbytes(300_000)


@pytest.mark.parametrize(
    ("base", "new"),
    [
        (b"", b""),
        (b"", b"new data"),
        (b"old data", b""),
        (b"x", b"x"),
        (b"x", b"y"),
        (_BIG, _BIG),
        (_BIG, _BIG[:1000] + b"insert" + _BIG[1000:150_000] + _BIG[150_100:] + b"tail"),
        (_BIG, _RNG.randbytes(200_000)),  # unrelated
        (_BIG[:2048 * 10], _BIG[:2048 * 10]),  # a whole number of blocks
    ],
    ids=["empty-empty", "empty-new", "old-empty", "tiny-same", "tiny-diff", "big-same",
         "big-edited", "unrelated", "whole-blocks"],
)
@pytest.mark.parametrize("kind", [SignatureKind.RK_BLAKE2, SignatureKind.MD4])
def test_four_directions_files(
    tmp_path: Path, base: bytes, new: bytes, kind: SignatureKind
) -> None:
    _four_directions(tmp_path, base, new, kind, None, None)


@pytest.mark.parametrize("block", [2048, 5376])
@pytest.mark.parametrize(
    "kind", [SignatureKind.RK_BLAKE2, SignatureKind.BLAKE2], ids=lambda k: str(k.name)
)
def test_four_directions_threaded(tmp_path: Path, kind: SignatureKind, block: int) -> None:
    """Blocks of 2 KiB and more: sums hashed in tasks on helper threads, still rdiff's bytes."""
    base = _BIG * 3
    new = base[:200_000] + b"edit" + base[200_000:700_000] + base[720_000:]
    assert len(rdiff_sums._cuts(len(base) // block, block, 1)) > 2
    _four_directions(tmp_path, base, new, kind, block, None)


def test_cli_matches_rdiff(tmp_path: Path) -> None:
    """``deltabkp signature --format rdiff`` / ``delta`` / ``patch`` on rdiff's own files,
    and errors on the wrong kind of file."""
    base, new = _BIG, _BIG[:5000] + b"cli edit" + _BIG[5000:]
    (tmp_path / "base").write_bytes(base)
    (tmp_path / "new").write_bytes(new)

    def deltabkp(*args: str | Path) -> None:
        # In-process: test_engine_cli runs the same entry point as real processes.
        assert main([*map(str, args)]) == 0

    t = tmp_path
    opts = ("-H", "md4", "-R", "rollsum", "-b", "700")
    deltabkp("signature", "--format", "rdiff", *opts, t / "base", t / "o.sig")
    _rdiff(*opts, "signature", t / "base", t / "r.sig")
    assert (t / "o.sig").read_bytes() == (t / "r.sig").read_bytes()
    deltabkp("delta", t / "r.sig", t / "new", t / "o.delta")
    _rdiff("patch", t / "base", t / "o.delta", t / "o.out")
    assert (t / "o.out").read_bytes() == new
    _rdiff("delta", t / "o.sig", t / "new", t / "r.delta")
    deltabkp("patch", t / "base", t / "r.delta", t / "o.out2")
    assert (t / "o.out2").read_bytes() == new
    assert main(["delta", str(t / "r.delta"), str(t / "new"), str(t / "x")]) == 5  # format
    assert main(["signature", "-H", "md4", str(t / "base"), str(t / "x")]) == 2  # usage
    assert not (t / "x").exists()
