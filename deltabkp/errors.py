"""The one exception tree of deltabkp.

Every error the library, the daemons or the CLI raise on purpose is a ``DeltabkpError``;
anything else escaping is a bug.  Errors blame a side (as h11 does): ``Local*`` means our
own caller broke a rule, ``Remote*`` means the peer or the input did.  ``exit_code`` is what
the CLI returns for the error (borg-style: distinct codes per family).
"""

from __future__ import annotations

__all__ = [
    "DeltabkpError",
    "UsageError",
    "FormatError",
    "LimitExceeded",
    "UnsupportedVersion",
    "IntegrityError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "AuthError",
    "PeerUnavailable",
    "RequestRefused",
    "ArchiveError",
    "UnsafeArchiveError",
    "StoreError",
    "CatalogError",
]


class DeltabkpError(Exception):
    """Root of every error deltabkp raises on purpose."""

    exit_code = 1


class UsageError(DeltabkpError):
    """The caller asked for something malformed (bad flag, bad frequency, bad address)."""

    exit_code = 2


class FormatError(DeltabkpError):
    """Bytes that claim to be a deltabkp format are corrupt, truncated or foreign."""

    exit_code = 5


class LimitExceeded(FormatError):
    """An input would need more memory than the parser allows (a size limit was hit)."""


class UnsupportedVersion(FormatError):
    """The magic is ours but the version is not one this build understands."""


class IntegrityError(DeltabkpError):
    """Data decoded fine but its hash does not match (wrong base, corruption, collision)."""

    exit_code = 6


class ProtocolError(DeltabkpError):
    """The wire conversation broke its rules."""

    exit_code = 4


class LocalProtocolError(ProtocolError):
    """We were about to break the protocol (a bug or misuse on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol (malformed frame, unexpected message, oversize)."""


class AuthError(ProtocolError):
    """The peer could not prove it holds the cluster key, or we could not."""


class PeerUnavailable(DeltabkpError):
    """Could not reach the peer (refused, timed out, reset)."""

    exit_code = 4


class RequestRefused(DeltabkpError):
    """The peer understood the request and refused it; carries the peer's error code."""

    exit_code = 3

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ArchiveError(DeltabkpError):
    """Building or reading a tgz archive failed."""

    exit_code = 5


class UnsafeArchiveError(ArchiveError):
    """An archive entry would escape the destination on extraction (absolute, .., link)."""


class StoreError(DeltabkpError):
    """The archive store failed (disk full, permissions, missing object)."""


class CatalogError(DeltabkpError):
    """The catalog database failed or is inconsistent."""
