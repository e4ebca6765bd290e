"""Safe extraction of a tgz (ours or anyone's) into a destination directory.

Invariants:
- nothing is ever created or modified outside ``dest``: member names that are absolute or
  contain ``..`` are refused; every parent directory is checked (``lstat``) to be a real
  directory inside ``dest`` and never a symlink, so no write goes through a link; files are
  created with ``O_EXCL | O_NOFOLLOW``;
- a symlink is refused when its target is absolute or leaves ``dest``; symlinks are created
  last (so nothing is written through one) and then each is resolved again with
  ``realpath`` against the final tree, which catches chains that only escape together;
- a hard link must name a regular file extracted earlier from the same archive;
- devices and FIFOs are refused (the builder never writes them);
- every refusal is an ``UnsafeArchiveError`` naming the entry; a corrupt or truncated
  archive is an ``ArchiveError``.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import stat
import struct
import tarfile
import zlib
from collections.abc import Callable, Iterator
from typing import BinaryIO

import attrs

from deltabkp.errors import ArchiveError, UnsafeArchiveError

__all__ = ["ExtractReport", "extract_archive"]

_COPY = 1024 * 1024
_O_WRITE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


@attrs.frozen
class ExtractReport:
    """What ``extract_archive`` created: counts and the file bytes written."""

    files: int
    dirs: int
    symlinks: int
    hardlinks: int
    bytes: int

    @property
    def links(self) -> int:
        return self.symlinks + self.hardlinks


def _mtime_ns(m: float) -> int:
    return int(m) * 1_000_000_000 if float(m).is_integer() else round(m * 1e9)


class _Extractor:
    def __init__(self, dest: str) -> None:
        self.dest = dest
        self.known_dirs: set[str] = {""}
        self.dirs: dict[str, tuple[int, int]] = {}  # rel -> (mode, mtime_ns), set at the end
        self.files: set[str] = set()
        self.symlinks: dict[str, tuple[str, str, int]] = {}  # rel -> (member, target, mtime_ns)
        self.nfiles = self.nlinks = 0
        self.nbytes = 0

    def abs(self, rel: str) -> str:
        return os.path.join(self.dest, rel) if rel else self.dest

    @staticmethod
    def clean(member: str, name: str, what: str = "path") -> str:
        if not name:
            raise UnsafeArchiveError(f"entry {member!r}: empty {what}")
        if name.startswith("/") or name.startswith("\\") or (len(name) > 1 and name[1] == ":"):
            raise UnsafeArchiveError(f"entry {member!r}: absolute {what} {name!r} refused")
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise UnsafeArchiveError(f"entry {member!r}: {what} {name!r} contains '..', refused")
        if any("\0" in p for p in parts):
            raise UnsafeArchiveError(f"entry {member!r}: NUL byte in {what}")
        return "/".join(parts)

    def parent(self, member: str, rel: str) -> None:
        """Make sure every parent of ``rel`` is a real directory inside dest (creating them)."""
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub in self.symlinks:
                raise UnsafeArchiveError(
                    f"entry {member!r}: its parent {sub!r} is a symlink in this archive; "
                    "refusing to write through it"
                )
            if sub in self.known_dirs:
                continue
            path = self.abs(sub)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                os.mkdir(path, 0o700)
                self.dirs.setdefault(sub, (0o755, -1))
            else:
                if stat.S_ISLNK(st.st_mode):
                    raise UnsafeArchiveError(
                        f"entry {member!r}: its parent {sub!r} is a symlink; refusing to write through it"
                    )
                if not stat.S_ISDIR(st.st_mode):
                    raise ArchiveError(f"entry {member!r}: its parent {sub!r} exists and is not a directory")
            self.known_dirs.add(sub)

    def clear(self, member: str, rel: str) -> None:
        """Remove a non-directory already at ``rel`` (later entries win, as in tar)."""
        path = self.abs(rel)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            raise ArchiveError(f"entry {member!r}: a directory already exists at {rel!r}")
        os.unlink(path)
        self.files.discard(rel)

    def member(self, tar: tarfile.TarFile, ti: tarfile.TarInfo) -> None:
        name = ti.name
        rel = self.clean(name, name)
        if ti.isdir():
            if not rel:
                return  # "./": the destination itself
            self.parent(name, rel)
            path = self.abs(rel)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                os.mkdir(path, 0o700)
            else:
                if not stat.S_ISDIR(st.st_mode):
                    os.unlink(path)
                    os.mkdir(path, 0o700)
            self.symlinks.pop(rel, None)
            self.known_dirs.add(rel)
            self.dirs[rel] = (stat.S_IMODE(ti.mode), _mtime_ns(ti.mtime))
            return
        if not rel:
            raise UnsafeArchiveError(f"entry {name!r}: a non-directory cannot replace the destination")
        if not ti.issym():
            self.symlinks.pop(rel, None)  # a later entry of the same name wins, as in tar
        if ti.isreg():
            self.parent(name, rel)
            self.clear(name, rel)
            src = tar.extractfile(ti)
            if src is None:  # pragma: no cover - isreg() members always have a file object
                raise ArchiveError(f"entry {name!r}: no data")
            fd = os.open(self.abs(rel), _O_WRITE, 0o600)
            try:
                while True:
                    b = src.read(_COPY)
                    if not b:
                        break
                    _write_all(fd, b)
                    self.nbytes += len(b)
                os.fchmod(fd, stat.S_IMODE(ti.mode))
                ns = _mtime_ns(ti.mtime)
                os.utime(fd, ns=(ns, ns))
            finally:
                os.close(fd)
            self.files.add(rel)
            self.nfiles += 1
        elif ti.issym():
            target = ti.linkname
            if not target:
                raise UnsafeArchiveError(f"entry {name!r}: symlink with an empty target")
            if target.startswith("/"):
                raise UnsafeArchiveError(
                    f"entry {name!r}: symlink to the absolute path {target!r} would escape the destination"
                )
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
            if resolved == ".." or resolved.startswith("../"):
                raise UnsafeArchiveError(
                    f"entry {name!r}: symlink to {target!r} would escape the destination"
                )
            self.symlinks[rel] = (name, target, _mtime_ns(ti.mtime))
        elif ti.islnk():
            target = self.clean(name, ti.linkname, "hard link target")
            if target not in self.files:
                raise UnsafeArchiveError(
                    f"entry {name!r}: hard link to {ti.linkname!r}, which is not a file extracted "
                    "from this archive; refused"
                )
            self.parent(name, rel)
            if target == rel:
                return
            self.clear(name, rel)
            os.link(self.abs(target), self.abs(rel), follow_symlinks=False)
            self.files.add(rel)
            self.nlinks += 1
        else:
            raise UnsafeArchiveError(
                f"entry {name!r}: {_kind(ti)} entries are not restored (only files, directories and links)"
            )

    def finish(self) -> ExtractReport:
        real_dest = os.path.realpath(self.dest)
        made: list[tuple[str, str]] = []
        for rel, (name, target, ns) in self.symlinks.items():
            self.parent(name, rel)
            self.clear(name, rel)
            path = self.abs(rel)
            os.symlink(target, path)
            os.utime(path, ns=(ns, ns), follow_symlinks=False)
            made.append((name, rel))
        # Each target was lexically inside dest, but links can combine ("a -> ." then
        # "b -> a/.."): resolve every one against the final tree.
        for name, rel in made:
            real = os.path.realpath(self.abs(rel))
            if real != real_dest and not real.startswith(real_dest + os.sep):
                for _n, r in made:
                    try:
                        if os.path.islink(self.abs(r)):
                            os.unlink(self.abs(r))
                    except OSError:
                        pass
                raise UnsafeArchiveError(
                    f"entry {name!r}: symlink to {self.symlinks[rel][1]!r} resolves outside the "
                    "destination (through other links); no symlink was restored"
                )
        for rel in sorted(self.dirs, key=lambda r: r.count("/"), reverse=True):
            mode, ns = self.dirs[rel]
            path = self.abs(rel)
            os.chmod(path, mode)
            if ns >= 0:
                os.utime(path, ns=(ns, ns))
        return ExtractReport(
            files=self.nfiles,
            dirs=len(self.dirs),
            symlinks=len(made),
            hardlinks=self.nlinks,
            bytes=self.nbytes,
        )


def _write_all(fd: int, b: bytes) -> None:
    view = memoryview(b)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _kind(ti: tarfile.TarInfo) -> str:
    if ti.ischr():
        return "character device"
    if ti.isblk():
        return "block device"
    if ti.isfifo():
        return "FIFO"
    return f"type {ti.type!r}"


@contextlib.contextmanager
def _parsing(label: str, current: Callable[[], str]) -> Iterator[None]:
    """Around ``tarfile``'s header parsing only: on malformed input it can also raise
    TypeError, ValueError, IndexError or struct.error (found by fuzzing); all mean "not a
    valid tgz".  Our own code is outside this block, so its bugs are not hidden."""
    try:
        yield
    except (tarfile.TarError, EOFError, zlib.error, TypeError, ValueError, IndexError,
            struct.error) as exc:
        where = f" after entry {current()!r}" if current() else ""
        raise ArchiveError(f"{label}: not a valid tgz{where}: {exc or type(exc).__name__}") from None


def extract_archive(
    archive: str | os.PathLike[str] | BinaryIO, dest: str | os.PathLike[str]
) -> ExtractReport:
    """Extract the tgz ``archive`` (a path or a readable binary stream) into ``dest``.

    ``dest`` is created if missing.  Contents, permission bits (setuid/setgid/sticky too),
    mtimes, symlinks and hard links are restored; owners are not (the extracting user owns
    everything).  Raises ``UnsafeArchiveError`` naming the first entry that would escape
    ``dest`` (entries before it are already extracted, inside ``dest``).
    """
    dest_s = os.path.abspath(os.fsdecode(dest))
    try:
        os.makedirs(dest_s, exist_ok=True)
    except OSError as exc:
        raise ArchiveError(f"{dest_s}: cannot create the destination: {exc.strerror}") from None
    ex = _Extractor(dest_s)
    label = os.fsdecode(archive) if isinstance(archive, (str, os.PathLike)) else "archive stream"
    current = ""
    try:
        if isinstance(archive, (str, os.PathLike)):
            f: BinaryIO = open(archive, "rb")
        else:
            f = archive
        try:
            with _parsing(label, lambda: current):
                tar = tarfile.open(fileobj=f, mode="r|gz")
            with tar:
                members = iter(tar)
                while True:
                    with _parsing(label, lambda: current):
                        ti = next(members, None)
                    if ti is None:
                        break
                    current = ti.name
                    ex.member(tar, ti)
                    # Streaming mode keeps every member otherwise: memory must not grow.
                    tar.members.clear()  # type: ignore[attr-defined]
        finally:
            if f is not archive:
                f.close()
        return ex.finish()
    except ArchiveError:
        raise
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        where = f" after entry {current!r}" if current else ""
        raise ArchiveError(f"{label}: not a valid tgz{where}: {exc}") from None
    except OSError as exc:
        what = f"entry {current!r}" if current else label
        raise ArchiveError(f"{label}: extracting {what} into {dest_s} failed: {exc.strerror or exc}") from None
