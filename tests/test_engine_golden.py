"""Golden files of the engine formats (signature v1, delta v1): the bytes must never change.

The inputs are generated from a fixed seed; the outputs are pinned in tests/golden/engine/.
Regenerate (only ever for a NEW format version) with DELTABKP_REGEN_GOLDEN=1.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import blake3
import pytest

import deltabkp
from deltabkp import FormatError, Signature, UnsupportedVersion

GOLDEN = Path(__file__).parent / "golden" / "engine"


def _inputs() -> tuple[bytes, bytes]:
    rng = random.Random(2026)
    base = rng.randbytes(1000)  # 15 whole blocks of 64 and a 40-byte tail
    new = base[:200] + b"golden insert" + base[300:900] + rng.randbytes(70) + base[960:]
    return base, new


def _golden(name: str, data: bytes) -> bytes:
    path = GOLDEN / name
    if os.environ.get("DELTABKP_REGEN_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return path.read_bytes()


def test_signature_v1_golden() -> None:
    base, _new = _inputs()
    sig = deltabkp.signature(base, 64)
    assert sig == _golden("v1-signature.bin", sig)
    parsed = Signature.parse(sig)
    assert (parsed.block_size, parsed.base_size, parsed.strong_len) == (64, 1000, 8)
    assert parsed.block_count == 16
    assert parsed.base_hash == blake3.blake3(base).digest()
    assert parsed.to_bytes() == sig
    assert sig[:5] == b"DBKS\x01"
    assert len(sig) == 52 + 16 * (4 + 8)


def test_delta_v1_golden() -> None:
    base, new = _inputs()
    sig = _golden("v1-signature.bin", deltabkp.signature(base, 64))
    dlt = deltabkp.delta(sig, new)
    assert dlt == _golden("v1-delta.bin", dlt)
    assert dlt[:5] == b"DBKD\x01"
    assert bytes(deltabkp.patch(base, _golden("v1-delta.bin", dlt))) == new
    # The END record carries the new file's length and blake3.
    assert dlt[-41:] == b"E" + len(new).to_bytes(8, "big") + blake3.blake3(new).digest()


@pytest.mark.parametrize("version", [0, 2, 255])
def test_unknown_versions_are_rejected_first(version: int) -> None:
    sig = (GOLDEN / "v1-signature.bin").read_bytes()
    dlt = (GOLDEN / "v1-delta.bin").read_bytes()
    # Even with the rest of the header destroyed, the version is what gets reported.
    with pytest.raises(UnsupportedVersion):
        Signature.parse(sig[:4] + bytes([version]) + b"\xff" * 10)
    with pytest.raises(UnsupportedVersion):
        deltabkp.patch(_inputs()[0], dlt[:4] + bytes([version]) + b"\xff" * 10)
    with pytest.raises(FormatError, match="magic"):
        Signature.parse(b"RS\x01\x37" + sig[4:])
