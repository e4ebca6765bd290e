"""The delta engine: rolling-checksum signatures, deltas and patches, sans-I/O.

Bytes in, bytes (or zero-copy views) out; no files, sockets, threads of its own or clocks
(the patcher's hashing helper thread is an implementation detail of ``patch``).  Formats are
versioned and documented in docs/formats.md; ``deltabkp`` re-exports the public names.
"""

from __future__ import annotations

from deltabkp.engine._delta import DeltaEncoder, delta
from deltabkp.engine._patch import Patcher, patch
from deltabkp.engine._signature import Signature, SignatureBuilder, default_block_size, signature

__all__ = [
    "DeltaEncoder",
    "Patcher",
    "Signature",
    "SignatureBuilder",
    "default_block_size",
    "delta",
    "patch",
    "signature",
]
