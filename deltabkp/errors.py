"""The one exception tree of deltabkp.

Every error the library, the daemons or the CLI raise on purpose is a ``DeltabkpError``;
anything else escaping is a bug.  Errors blame a side (as h11 does): ``Local*`` means our
own caller broke a rule, ``Remote*`` means the peer or the input did.  ``exit_code`` is what
the CLI returns for the error (borg-style: distinct codes per family).

Errors are data: ``reason`` is the bare sentence written where the error is raised, and the
node and path it is about are fields that each layer fills in as it learns them
(``with_context``), never by editing text; ``str()`` renders ``NODE PATH: reason``.  Codes on
the wire are ``ErrorCode`` members, shared by agent, server and ctl.
"""

from __future__ import annotations

import enum
from typing import Self

__all__ = [
    "ErrorCode",
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
    "DeflateError",
    "StoreError",
    "MissingObject",
    "StoreUnavailable",
    "CatalogError",
]


class ErrorCode(enum.StrEnum):
    """The code of a wire ``Error``: what kind of "no" it is (docs/formats.md, errors)."""

    INVALID = "invalid"  #: malformed request (bad node, path, frequency, argument)
    EXISTS = "exists"  #: already registered
    NOT_FOUND = "not-found"  #: no such target, archive or directory
    REFUSED = "refused"  #: understood, and declined (limits, the agent's verdict relayed)
    PATH_NOT_ALLOWED = "path-not-allowed"  #: outside the agent's allowed roots
    BUSY = "busy"  #: try again later (a backup of the path runs, too many sessions)
    FAILED = "failed"  #: the agent tried and the backup failed (archive error, ...)
    INTERNAL = "internal"  #: a bug or a failing catalog/store on the answering side
    PROTOCOL = "protocol"  #: the conversation broke its rules
    AUTH = "auth"  #: the cluster keys differ
    VERSION = "version"  #: another protocol version

    @property
    def permanent(self) -> bool:
        """Whether an agent answering this will answer it again for the same path (then
        retrying before the next period is pointless)."""
        return self in _PERMANENT

    @classmethod
    def parse(cls, text: str) -> ErrorCode | str:
        """The member for ``text``; an unknown code (a newer peer) stays a plain string."""
        try:
            return cls(text)
        except ValueError:
            return text


_PERMANENT = frozenset(
    {ErrorCode.PATH_NOT_ALLOWED, ErrorCode.NOT_FOUND, ErrorCode.INVALID, ErrorCode.REFUSED}
)


class DeltabkpError(Exception):
    """Root of every error deltabkp raises on purpose.

    ``reason`` says what went wrong.  Context, filled in by whichever layer knows it:
    ``node`` and ``path`` (the target it is about), ``peer`` and ``peer_role`` (the other end
    of the connection that failed, when that is not the node itself) and ``hint`` (what the
    user can do about it).
    """

    exit_code = 1
    #: A stable machine name of the error's family (``ctl --json`` prints it as ``code``).
    kind: str = "error"

    def __init__(
        self, reason: str = "", *, node: str | None = None, path: str | None = None,
        peer: str | None = None, peer_role: str | None = None, hint: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.node, self.path = node, path
        self.peer, self.peer_role, self.hint = peer, peer_role, hint

    def with_context(
        self, *, node: str | None = None, path: str | None = None, peer: str | None = None,
        peer_role: str | None = None, hint: str | None = None,
    ) -> Self:
        """Fill in what this error is about, where not known yet; returns ``self``."""
        self.node = self.node or node
        self.path = self.path or path
        self.peer = self.peer or peer
        self.peer_role = self.peer_role or peer_role
        self.hint = self.hint or hint
        return self

    @property
    def context(self) -> str:
        """``NODE PATH`` as known so far (either may be missing), or ``""``."""
        return " ".join(x for x in (self.node, self.path) if x)

    #: Appended to the rendered sentence (before the hint).
    _suffix = ""

    @property
    def message(self) -> str:
        """The whole sentence a user sees (the same as ``str()``)."""
        return str(self)

    def __str__(self) -> str:
        text = self.reason
        if self.peer and self.peer != self.node:
            text = f"{self.peer_role + ' ' if self.peer_role else ''}{self.peer}: {text}"
        ctx = self.context
        if ctx:
            text = f"{ctx}: {text}"
        text += self._suffix
        if self.hint:
            text = f"{text}; {self.hint}"
        return text


class UsageError(DeltabkpError):
    """The caller asked for something malformed (bad flag, bad frequency, bad address)."""

    exit_code = 2
    kind = "usage"


class FormatError(DeltabkpError):
    """Bytes that claim to be a deltabkp format are corrupt, truncated or foreign."""

    exit_code = 5
    kind = "format"


class LimitExceeded(FormatError):
    """An input would need more memory than the parser allows (a size limit was hit)."""


class UnsupportedVersion(FormatError):
    """The magic is ours but the version is not one this build understands."""


class IntegrityError(DeltabkpError):
    """Data decoded fine but its hash does not match (wrong base, corruption, collision)."""

    exit_code = 6
    kind = "integrity"


class ProtocolError(DeltabkpError):
    """The wire conversation broke its rules."""

    exit_code = 4
    kind = "protocol"


class LocalProtocolError(ProtocolError):
    """We were about to break the protocol (a bug or misuse on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol (malformed frame, unexpected message, oversize)."""


class AuthError(ProtocolError):
    """The peer could not prove it holds the cluster key, or we could not."""

    kind = "auth"


class PeerUnavailable(DeltabkpError):
    """Could not reach the peer (refused, timed out, reset)."""

    exit_code = 4
    kind = "unavailable"


class RequestRefused(DeltabkpError):
    """The peer understood the request and refused it; carries the error code."""

    exit_code = 3

    def __init__(self, code: ErrorCode | str, reason: str, **context: str | None) -> None:
        super().__init__(reason, **context)
        self.code = ErrorCode.parse(str(code))
        self.kind = str(self.code)  # the wire code: "exists", "not-found", ...

    @property
    def _suffix(self) -> str:  # type: ignore[override]
        return f" [{self.code}]"


class ArchiveError(DeltabkpError):
    """Building or reading a tgz archive failed."""

    exit_code = 5
    kind = "archive"


class UnsafeArchiveError(ArchiveError):
    """An archive entry would escape the destination on extraction (absolute, .., link)."""


class DeflateError(ArchiveError):
    """libz failed, or does not give the archive format's deflate bytes (another zlib
    build, zlib-ng's compat library): no archive bytes made with it."""


class StoreError(DeltabkpError):
    """The archive store failed (disk full, permissions, missing object)."""

    kind = "store"


class MissingObject(StoreError):
    """The store answered, and the object is not there (unlike an unreachable store)."""


class StoreUnavailable(StoreError):
    """The store could not be asked (unreachable, refused our credentials, a broken stream):
    nothing is known about the object."""


class CatalogError(DeltabkpError):
    """The catalog database failed or is inconsistent."""

    kind = "catalog"
