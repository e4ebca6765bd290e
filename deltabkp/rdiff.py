"""librsync-compatible (``rdiff``) signatures and deltas, sans-I/O, beside deltabkp's own.

The same shape as the engine's API (``signature`` / ``delta`` / ``patch`` one-shot functions,
``SignatureBuilder`` / ``DeltaEncoder`` / ``Patcher`` streaming classes, a ``Signature``
value), but reading and writing librsync's formats, so that ``rdiff``, duplicity,
rdiff-backup and other librsync users can exchange files with deltabkp.  Signatures of all
four kinds (``SignatureKind``: RabinKarp or rollsum weak sums, BLAKE2b or MD4 strong sums)
are read and written; defaults match ``rdiff signature`` byte for byte.  rdiff deltas carry
no checksum, so ``patch`` cannot verify its result as the engine's does.  Signatures and
deltas hash their blocks on the calling thread and ``threads`` helpers (``default_threads()``:
one per further core, at most 3); the bytes never depend on it.  The byte layout is
in docs/formats.md (section rdiff); the implementation lives in ``deltabkp.engine._rdiff*``.
"""

from __future__ import annotations

from deltabkp.engine._rdiff_delta import RdiffDeltaEncoder as DeltaEncoder
from deltabkp.engine._rdiff_delta import delta
from deltabkp.engine._rdiff_patch import RdiffPatcher as Patcher
from deltabkp.engine._rdiff_patch import patch
from deltabkp.engine._rdiff_sig import (
    DEFAULT_KIND,
    DELTA_MAGIC,
    MAX_BLOCK_SIZE,
    SignatureKind,
    default_block_size,
    is_delta,
    is_signature,
    signature,
)
from deltabkp.engine._rdiff_sig import RdiffSignature as Signature
from deltabkp.engine._rdiff_sig import RdiffSignatureBuilder as SignatureBuilder
from deltabkp.engine._rdiff_sums import default_threads

__all__ = [
    "DEFAULT_KIND",
    "DELTA_MAGIC",
    "MAX_BLOCK_SIZE",
    "DeltaEncoder",
    "Patcher",
    "Signature",
    "SignatureBuilder",
    "SignatureKind",
    "default_block_size",
    "default_threads",
    "delta",
    "is_delta",
    "is_signature",
    "patch",
    "signature",
]
