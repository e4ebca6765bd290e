"""The rolling signature of a stored version, made if missing: its one home.

Job: give every reader of a whole version's signature (the next backup's rolling fallback,
``Ingest.read_signature``; the reverse-delta conversion, ``versions.make_delta``; verify and
scrub, ``versions.verify_versions``) the same answer, whatever state a crash left the store in.
Invariants:
- the signature is derived data: the server makes it after the archive's catalog commit,
  off the backup's critical path (``sign``); a crash in between leaves a committed version
  without one, which is not a fault: the server's next start makes it in the background
  (``ingest.sign_unsigned``, through ``signature``), or the first reader before that makes
  it from the archive and stores it (``signature``);
- a stored signature is served only if it parses and names the version's size and blake3;
  anything else (missing, torn, another archive's) is made again from the archive, never
  trusted and never reported as the archive's fault;
- a made signature is checked against the catalog's blake3 (an archive that does not match
  raises ``StoreError``: the version itself is bad); storing it is best effort: a failed
  write is logged and the signature still served (the next reader makes it again);
- callers hold the target's lease (one writer per version); the write is atomic anyway
  (``Store.write_signature``); every function blocks (worker threads only).
"""

from __future__ import annotations

import contextlib
import logging

import deltabkp
from deltabkp.errors import DeltabkpError, MissingObject, StoreError, StoreUnavailable
from deltabkp_server.store._protocol import Store

__all__ = ["sign", "signature"]

log = logging.getLogger("deltabkp_server")


def _matches(data: bytes, size: int, digest: bytes) -> bool:
    try:
        sig = deltabkp.Signature.parse(data)
    except DeltabkpError:
        return False
    return sig.base_size == size and sig.base_hash == digest


def sign(
    store: Store, target_id: int, seq: int, *, size: int, digest: bytes,
    buf: memoryview | bytes | None = None,
) -> bytes:
    """Make the signature of version ``(target_id, seq)`` (``size`` bytes, blake3 ``digest``)
    from its archive — ``buf`` when the caller holds its checked bytes, else the store's copy
    — and store it; the signature.  ``StoreError`` if the archive does not match ``digest``."""
    with contextlib.ExitStack() as stack:
        if buf is None:
            buf = stack.enter_context(store.base(target_id, seq, size=size, digest=digest))
        # blake3 beside the block sums (``deltabkp.signature``): one pass, two cores.
        data = deltabkp.signature(buf)
    if not _matches(data, size, digest):
        raise StoreError(f"archive {seq} of target {target_id} does not match the catalog "
                         f"({size} bytes and its blake3): cannot sign it")
    try:
        store.write_signature(target_id, seq, data)
    except StoreError as exc:  # unreachable too: the signature is served all the same
        log.warning("cannot store the signature of archive %d of target %d (made again at its "
                    "next use): %s", seq, target_id, exc)
    return data


def signature(
    store: Store, target_id: int, seq: int, *, size: int, digest: bytes,
    buf: memoryview | bytes | None = None,
) -> bytes:
    """The signature of whole version ``(target_id, seq)``: the stored one if it is this
    archive's, else made now from the archive and stored (``sign``).  ``StoreUnavailable``
    when the store cannot be asked; ``StoreError`` when the archive itself is gone or bad."""
    try:
        data = store.read_signature(target_id, seq)
    except StoreUnavailable:
        raise
    except MissingObject:
        # A crash between the archive's commit and its signature's write: not a fault.
        log.info("archive %d of target %d has no signature yet: making it", seq, target_id)
        return sign(store, target_id, seq, size=size, digest=digest, buf=buf)
    except StoreError as exc:
        log.warning("cannot read the signature of archive %d of target %d (%s): making it "
                    "again", seq, target_id, exc)
        return sign(store, target_id, seq, size=size, digest=digest, buf=buf)
    if _matches(data, size, digest):
        return data
    log.warning("the stored signature of archive %d of target %d is damaged or another "
                "archive's: making it again", seq, target_id)
    return sign(store, target_id, seq, size=size, digest=digest, buf=buf)
