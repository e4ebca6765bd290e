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
    # --- engine (issue 2) ---
    # --- archive (issue 3) ---
]
