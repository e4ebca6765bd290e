"""The agent's on-disk cache: signatures by archive hash, fingerprints by (path, hash, excludes).

Real files in a temp dir; the cache must never give a wrong answer, whatever is on disk.
"""

from __future__ import annotations

import os
from pathlib import Path

import blake3
import pytest

import deltabkp
from deltabkp_agent.cache import AgentCache


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
