"""deltabkp: rsync-style delta sync of archives, as a sans-I/O library.

The public API is ``__all__``; every other module is private.
"""

from __future__ import annotations

from deltabkp.errors import (
    ArchiveError,
    AuthError,
    CatalogError,
    DeltabkpError,
    FormatError,
    IntegrityError,
    LimitExceeded,
    LocalProtocolError,
    PeerUnavailable,
    ProtocolError,
    RemoteProtocolError,
    RequestRefused,
    StoreError,
    UnsafeArchiveError,
    UnsupportedVersion,
    UsageError,
)

from deltabkp.engine import (
    DeltaEncoder,
    Patcher,
    Signature,
    SignatureBuilder,
    default_block_size,
    delta,
    patch,
    signature,
)
from deltabkp.archive import (
    ArchiveReport,
    ExtractReport,
    FileIssue,
    Fingerprint,
    TgzBuilder,
    build_archive,
    extract_archive,
    tree_fingerprint,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # errors
    "ArchiveError",
    "AuthError",
    "CatalogError",
    "DeltabkpError",
    "FormatError",
    "IntegrityError",
    "LimitExceeded",
    "LocalProtocolError",
    "PeerUnavailable",
    "ProtocolError",
    "RemoteProtocolError",
    "RequestRefused",
    "StoreError",
    "UnsafeArchiveError",
    "UnsupportedVersion",
    "UsageError",
    # engine
    "DeltaEncoder",
    "Patcher",
    "Signature",
    "SignatureBuilder",
    "default_block_size",
    "delta",
    "patch",
    "signature",
    # archive
    "ArchiveReport",
    "ExtractReport",
    "FileIssue",
    "Fingerprint",
    "TgzBuilder",
    "build_archive",
    "extract_archive",
    "tree_fingerprint",
]
