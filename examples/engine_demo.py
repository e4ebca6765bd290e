"""Sync a changed file with the deltabkp engine and print the bytes saved.

    python examples/engine_demo.py [DIRECTORY]

Builds a tar of a real directory (default: a few packages of the Python standard library), changes a few files (an edit, an append, a new file), tars it again, then
plays both sides of a backup with the streaming API, in 64 KiB chunks as over a network:
the *server* sends the signature of its old copy, the *agent* answers with a delta, the
*server* patches its old copy and verifies the result.  Everything runs in one process on
temporary files; nothing is left behind.
"""

from __future__ import annotations

import io
import shutil
import sys
import sysconfig
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import deltabkp

CHUNK = 64 * 1024


def make_tar(root: Path) -> bytes:
    """A deterministic tar of ``root`` (sorted names, fixed owner and mtime)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(root)))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            with path.open("rb") as f:
                tar.addfile(info, f)
    return buf.getvalue()


def chunks(data: bytes) -> Iterator[bytes]:
    for i in range(0, len(data), CHUNK):
        yield data[i : i + CHUNK]


def sync(old: bytes, new: bytes) -> tuple[bytes, bytes, bytes]:
    """Return (signature, delta, rebuilt) for one server/agent exchange."""
    # server: signature of its last copy
    builder = deltabkp.SignatureBuilder(base_size=len(old))
    for piece in chunks(old):
        builder.feed(piece)
    sig = builder.finish()
    # agent: delta of the new archive against that signature, as it streams
    encoder = deltabkp.DeltaEncoder(sig)
    delta = b"".join([encoder.feed(piece) for piece in chunks(new)]) + encoder.finish()
    # server: patch the old copy, verifying length and blake3 at the end
    patcher = deltabkp.Patcher(old)
    rebuilt = io.BytesIO()
    for piece in chunks(delta):
        for out in patcher.feed(piece):
            rebuilt.write(out)
    patcher.finish()
    assert patcher.new_hash == encoder.new_hash
    return sig, delta, rebuilt.getvalue()


def main(argv: list[str]) -> int:
    if argv:
        sources = [Path(argv[0])]
    else:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        sources = [stdlib / name for name in ("asyncio", "email", "http", "json", "xml")]
    with tempfile.TemporaryDirectory(prefix="deltabkp-demo-") as tmp:
        tree = Path(tmp) / "app"
        for src in sources:
            shutil.copytree(src, tree / src.name, ignore=shutil.ignore_patterns("__pycache__"))
        old = make_tar(tree)
        files = sorted(p for p in tree.rglob("*") if p.is_file())
        edited, appended = files[len(files) // 3], files[2 * len(files) // 3]
        text = edited.read_bytes()
        edited.write_bytes(text[: len(text) // 2] + b"\n# edited by the demo\n" + text[len(text) // 2 :])
        with appended.open("ab") as f:
            f.write(b"\n# appended by the demo\n" * 20)
        (files[0].parent / "demo_new_file.txt").write_text("a brand new file\n" * 100)
        new = make_tar(tree)

    sig, delta, rebuilt = sync(old, new)
    assert rebuilt == new, "patched archive differs from the new one"
    sent = len(sig) + len(delta)
    saved = len(new) - sent
    print(f"old archive      {len(old):>10,} bytes  ({len(files)} files)")
    print(f"new archive      {len(new):>10,} bytes  (1 file edited, 1 appended to, 1 added)")
    print(f"signature        {len(sig):>10,} bytes  server -> agent")
    print(f"delta            {len(delta):>10,} bytes  agent -> server")
    print(f"rebuilt archive  {len(rebuilt):>10,} bytes  blake3 verified, identical to the new one")
    print(f"bytes on the wire: {sent:,} instead of {len(new):,}: "
          f"saved {saved:,} bytes ({100 * saved / len(new):.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
