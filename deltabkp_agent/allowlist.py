"""The agent's path allowlist: which directories a server may ask it to back up.

Invariant: a requested path is served only if its real path (``os.path.realpath``: every
symlink resolved, every ``..`` collapsed) is an allowed root or lies under one, roots being
resolved the same way.  The backup then reads from that real path, never from the spelling
the server sent, so a ``..`` or a symlink cannot lead the agent outside its roots.
"""

from __future__ import annotations

import os

import attrs

from deltabkp.errors import ErrorCode, RequestRefused, UsageError
from deltabkp.net import normalise_path

__all__ = ["Allowlist", "resolve_roots"]


def resolve_roots(roots: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Absolute, symlink-free roots; each must be an existing directory (else ``UsageError``)."""
    out: list[str] = []
    for r in roots:
        if not r:
            raise UsageError("--allow needs a directory, got an empty string")
        real = os.path.realpath(os.path.abspath(r))
        if not os.path.isdir(real):
            raise UsageError(f"--allow {r}: not an existing directory")
        if real not in out:
            out.append(real)
    return tuple(out)


def _is_under(path: str, root: str) -> bool:
    if root == os.sep:
        return True
    return path == root or path.startswith(root + os.sep)


@attrs.frozen
class Allowlist:
    """Allowed roots as given (``spelled``, absolute) and as resolved (``roots``)."""

    roots: tuple[str, ...]
    spelled: tuple[str, ...] = ()

    @classmethod
    def from_args(cls, roots: list[str] | tuple[str, ...]) -> Allowlist:
        spelled = tuple(dict.fromkeys(os.path.normpath(os.path.abspath(r)) for r in roots if r))
        return cls(resolve_roots(roots), spelled)

    @property
    def advertised(self) -> list[str]:
        """Every spelling of every root (as given and resolved): what ``Pong`` tells a server."""
        return list(dict.fromkeys([*self.spelled, *self.roots]))

    def resolve(self, path: str, node: str) -> str:
        """The real path to read for ``path``, or ``RequestRefused`` naming node and path.

        Codes: ``invalid`` (not absolute, NUL), ``path-not-allowed`` (outside every root,
        also via ``..`` or a symlink; the message never reveals the real path), ``not-found``
        (inside a root but missing or not a directory).  Blocking (``realpath``, ``stat``):
        call it from a worker thread.
        """
        try:
            normalise_path(path)
        except UsageError as exc:
            raise RequestRefused(ErrorCode.INVALID, exc.reason, node=node, path=path) from None
        real = os.path.realpath(path)
        if not any(_is_under(real, r) for r in self.roots):
            # Never say where it resolves to: that would let a server read any symlink's
            # target on this node (Ping("/proc/1/cwd")).  The roots are no secret (Pong).
            raise RequestRefused(
                ErrorCode.PATH_NOT_ALLOWED,
                f"resolves outside the agent's allowed roots ({', '.join(self.roots) or 'none'})",
                node=node, path=path,
            )
        if not os.path.isdir(real):
            what = "does not exist" if not os.path.lexists(real) else "is not a directory"
            raise RequestRefused(ErrorCode.NOT_FOUND, f"{what} on the agent", node=node, path=path)
        return real
