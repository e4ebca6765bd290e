"""Faithful, safe, transactional extraction of a tgz (ours or anyone's) into a destination.

Invariants:
- transactional: the destination must be missing or an empty directory; everything is
  extracted into a fresh private directory beside it (``.NAME.XXXX.restore``, same file
  system) which is renamed onto it only when the whole archive is in; on any error that
  directory is removed and the destination is exactly as it was (a kill -9 leaves only the
  ``.restore`` directory beside it, never a half-filled destination);
- nothing is ever created or modified outside the destination: member names that are
  absolute or contain ``..`` are refused; every create is relative to a directory fd whose
  every component was opened ``O_DIRECTORY | O_NOFOLLOW`` from the root (so a parent is a
  real directory of the tree, never a link), files with ``O_EXCL | O_NOFOLLOW``; an entry
  whose parent is a symlink of the archive is refused; a symlink may not replace a
  directory; symlinks are created after every other entry, so nothing is written through
  one even in between;
- a symlink's target is data: restored as is, whatever it points to (absolute, outside the
  tree, dangling);
- faithful: contents, permission bits (setuid/setgid/sticky too), mtimes to the nanosecond
  (PAX ``mtime`` records), owners and groups by number when running as root (``owners``),
  symlinks, hard links and FIFOs; directories get their metadata last, deepest first;
- a hard link must name a regular file extracted earlier from the same archive; devices
  are refused; an extended header (long name, PAX records) over ``MAX_EXTENDED_HEADER`` is
  refused before it is read; memory does not grow with the archive's data;
- every refusal is an ``UnsafeArchiveError`` naming the entry; a corrupt or truncated
  archive is an ``ArchiveError``; a destination that is not missing or empty a
  ``UsageError``.

A long module on purpose: the safety rules (directory fds, pending symlinks, what may
replace what) and the faithful metadata order share one extractor's state, and the
transaction around it is what makes a refusal leave nothing behind; they read best together.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import struct
import tarfile
import tempfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import BinaryIO

import attrs

from deltabkp.errors import ArchiveError, UnsafeArchiveError, UsageError

__all__ = ["ExtractReport", "check_destination", "extract_archive"]

_COPY = 1024 * 1024
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_WRITE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
# Opening our own new FIFO to set its metadata by fd: non-blocking, so no writer is needed.
_O_FIFO = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | _CLOEXEC
#: Directory fds kept open (archive order is depth first, so this covers the current path).
_FD_CACHE = 64
_PAX_TIME = re.compile(r"(-?)([0-9]{1,20})(?:\.([0-9]{1,30}))?")
#: Largest extended header (GNU long name / long link, PAX records) accepted: ``tarfile``
#: reads one whole into memory, so a hostile size would be an allocation of any size.
MAX_EXTENDED_HEADER = 1024 * 1024
_EXTENDED = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
             tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)


@attrs.frozen
class ExtractReport:
    """What ``extract_archive`` created: counts and the file bytes written."""

    files: int
    dirs: int
    symlinks: int
    hardlinks: int
    bytes: int
    fifos: int = 0

    @property
    def links(self) -> int:
        return self.symlinks + self.hardlinks


@attrs.frozen
class _Meta:
    """Metadata to apply to one entry; ``mtime_ns``/``uid`` None: not known (keep ours)."""

    mode: int
    mtime_ns: int | None = None
    uid: int | None = None
    gid: int | None = None


class _LimitedTarInfo(tarfile.TarInfo):
    """``TarInfo`` refusing an extended header larger than ``MAX_EXTENDED_HEADER`` before
    ``tarfile`` reads it (the chain of headers of one entry is parsed by this class too)."""

    def _proc_member(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _EXTENDED and self.size > MAX_EXTENDED_HEADER:
            raise tarfile.HeaderError(
                f"extended header of {self.size} bytes (the limit is {MAX_EXTENDED_HEADER})"
            )
        result: tarfile.TarInfo = super()._proc_member(tf)  # type: ignore[misc]
        return result


def _mtime_ns(ti: tarfile.TarInfo) -> int:
    """The entry's mtime in ns: exact from a PAX record (tarfile's own float loses the last
    digits), else the header's whole seconds."""
    text = ti.pax_headers.get("mtime")
    if text is None:
        return int(ti.mtime) * 1_000_000_000
    m = _PAX_TIME.fullmatch(text)
    if m is None:
        raise ArchiveError(f"entry {ti.name!r}: bad PAX mtime {text[:40]!r}")
    sign, sec, frac = m.groups()
    ns = int(sec) * 1_000_000_000 + int((frac or "")[:9].ljust(9, "0"))
    return -ns if sign else ns


def _meta(ti: tarfile.TarInfo) -> _Meta:
    return _Meta(stat.S_IMODE(ti.mode), _mtime_ns(ti), ti.uid, ti.gid)


def _default_dir_mode() -> int:
    """What ``mkdir`` would give a new directory: 0777 less the umask (read without setting
    it: ``os.umask`` is process-wide and would race other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o777 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o755


class _Extractor:
    """Extracts members into the directory open as ``root_fd`` (our fresh temp dir)."""

    def __init__(self, root_fd: int, owners: bool) -> None:
        self.root_fd = root_fd
        self.owners = owners
        self.fds: OrderedDict[str, int] = OrderedDict()
        self.root_meta: _Meta | None = None
        self.default_mode = _default_dir_mode()
        self.dirs: dict[str, _Meta] = {}  # rel -> metadata, applied at the end
        self.files: set[str] = set()  # paths holding a regular file extracted from the archive
        self.symlinks: dict[str, tuple[str, str, _Meta]] = {}  # rel -> (member, target, meta)
        self.nfiles = self.nlinks = self.nfifos = 0
        self.nbytes = 0

    def close(self) -> None:
        while self.fds:
            os.close(self.fds.popitem()[1])

    @staticmethod
    def clean(member: str, name: str, what: str = "path") -> str:
        if not name:
            raise UnsafeArchiveError(f"entry {member!r}: empty {what}")
        if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
            raise UnsafeArchiveError(f"entry {member!r}: absolute {what} {name!r} refused")
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise UnsafeArchiveError(f"entry {member!r}: {what} {name!r} contains '..', refused")
        if any("\0" in p for p in parts):
            raise UnsafeArchiveError(f"entry {member!r}: NUL byte in {what}")
        return "/".join(parts)

    def dirfd(self, member: str, rel: str) -> int:
        """An fd of directory ``rel`` of the tree, made (mode 0700 until the end) if missing.

        Every component is opened ``O_NOFOLLOW`` from the nearest directory already open,
        so the fd is a real directory of the tree.  Valid until the next ``dirfd`` call
        (the cache closes the least recently used).
        """
        if not rel:
            return self.root_fd
        parts = rel.split("/")
        i = len(parts)
        while i and "/".join(parts[:i]) not in self.fds:
            i -= 1
        fd = self.root_fd
        if i:
            fd = self.fds[key := "/".join(parts[:i])]
            self.fds.move_to_end(key)
        for j in range(i, len(parts)):
            sub, name = "/".join(parts[: j + 1]), parts[j]
            if sub in self.symlinks:
                raise UnsafeArchiveError(
                    f"entry {member!r}: its parent {sub!r} is a symlink in this archive; "
                    "refusing to write through it"
                )
            try:
                nxt = os.open(name, _O_DIR, dir_fd=fd)
            except FileNotFoundError:
                os.mkdir(name, 0o700, dir_fd=fd)
                self.dirs.setdefault(sub, _Meta(self.default_mode))
                nxt = os.open(name, _O_DIR, dir_fd=fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:  # cannot happen in our fresh tree: defence in depth
                    raise UnsafeArchiveError(
                        f"entry {member!r}: its parent {sub!r} is a symlink; refusing to write through it"
                    ) from None
                if exc.errno == errno.ENOTDIR:
                    raise ArchiveError(
                        f"entry {member!r}: its parent {sub!r} exists and is not a directory"
                    ) from None
                raise
            self.fds[sub] = fd = nxt
            # The parent was moved to the end just before: only older fds are evicted.
            if len(self.fds) > _FD_CACHE:
                os.close(self.fds.popitem(last=False)[1])
        return fd

    def clear(self, member: str, rel: str, pfd: int, name: str) -> None:
        """Remove a non-directory already at ``rel`` (later entries win, as in tar)."""
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            raise ArchiveError(f"entry {member!r}: a directory already exists at {rel!r}")
        os.unlink(name, dir_fd=pfd)
        self.files.discard(rel)

    def apply(self, fd: int, meta: _Meta) -> None:
        """Owner (first: chown clears setuid/setgid), mode, then mtime, all by fd."""
        if self.owners and meta.uid is not None and meta.gid is not None:
            os.fchown(fd, meta.uid, meta.gid)
        os.fchmod(fd, meta.mode)
        if meta.mtime_ns is not None:
            os.utime(fd, ns=(meta.mtime_ns, meta.mtime_ns))

    def member(self, tar: tarfile.TarFile, ti: tarfile.TarInfo) -> None:
        member = ti.name
        rel = self.clean(member, member)
        if not rel:
            if not ti.isdir():
                raise UnsafeArchiveError(f"entry {member!r}: a non-directory cannot replace the destination")
            self.root_meta = _meta(ti)  # "./": the destination itself
            return
        head, _, name = rel.rpartition("/")
        if not ti.issym():
            self.symlinks.pop(rel, None)  # a later entry of the same name wins, as in tar
        if ti.isdir():
            pfd = self.dirfd(member, head)
            try:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                os.mkdir(name, 0o700, dir_fd=pfd)
            else:
                if not stat.S_ISDIR(st.st_mode):
                    os.unlink(name, dir_fd=pfd)
                    self.files.discard(rel)
                    os.mkdir(name, 0o700, dir_fd=pfd)
            self.dirs[rel] = _meta(ti)
        elif ti.isreg():
            meta = _meta(ti)
            src = tar.extractfile(ti)
            if src is None:  # pragma: no cover - isreg() members always have a file object
                raise ArchiveError(f"entry {member!r}: no data")
            pfd = self.dirfd(member, head)
            self.clear(member, rel, pfd, name)
            fd = os.open(name, _O_WRITE, 0o600, dir_fd=pfd)
            try:
                while b := src.read(_COPY):
                    _write_all(fd, b)
                    self.nbytes += len(b)
                self.apply(fd, meta)
            finally:
                os.close(fd)
            self.files.add(rel)
            self.nfiles += 1
        elif ti.issym():
            target = ti.linkname
            if not target:
                raise ArchiveError(f"entry {member!r}: symlink with an empty target")
            if "\0" in target:
                raise ArchiveError(f"entry {member!r}: NUL byte in the symlink target")
            pfd = self.dirfd(member, head)
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISDIR(os.stat(name, dir_fd=pfd, follow_symlinks=False).st_mode):
                    raise UnsafeArchiveError(
                        f"entry {member!r}: a directory already exists at {rel!r}; refusing "
                        "to replace it with a symlink"
                    )
            # Created in ``finish``, after every other entry: nothing can go through it.
            self.files.discard(rel)
            self.symlinks.pop(rel, None)  # re-inserted last: links are made in archive order
            self.symlinks[rel] = (member, target, _meta(ti))
        elif ti.islnk():
            target = self.clean(member, ti.linkname, "hard link target")
            if target not in self.files:
                raise UnsafeArchiveError(
                    f"entry {member!r}: hard link to {ti.linkname!r}, which is not a file extracted "
                    "from this archive; refused"
                )
            if target == rel:
                return
            thead, _, tname = target.rpartition("/")
            tfd = os.dup(self.dirfd(member, thead))  # a dup: the next dirfd may evict it
            try:
                pfd = self.dirfd(member, head)
                self.clear(member, rel, pfd, name)
                os.link(tname, name, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
            finally:
                os.close(tfd)
            self.files.add(rel)
            self.nlinks += 1
        elif ti.isfifo():
            meta = _meta(ti)
            pfd = self.dirfd(member, head)
            self.clear(member, rel, pfd, name)
            os.mkfifo(name, 0o600, dir_fd=pfd)
            fd = os.open(name, _O_FIFO, dir_fd=pfd)
            try:
                if not stat.S_ISFIFO(os.fstat(fd).st_mode):  # pragma: no cover - our private dir
                    raise ArchiveError(f"entry {member!r}: the FIFO was replaced while restored")
                self.apply(fd, meta)
            finally:
                os.close(fd)
            self.nfifos += 1
        else:
            raise UnsafeArchiveError(
                f"entry {member!r}: {_kind(ti)} entries are not restored "
                "(only files, directories, links and FIFOs)"
            )

    def finish(self) -> ExtractReport:
        for rel, (member, target, meta) in self.symlinks.items():
            head, _, name = rel.rpartition("/")
            pfd = self.dirfd(member, head)
            self.clear(member, rel, pfd, name)
            os.symlink(target, name, dir_fd=pfd)
            if self.owners and meta.uid is not None and meta.gid is not None:
                os.chown(name, meta.uid, meta.gid, dir_fd=pfd, follow_symlinks=False)
            if meta.mtime_ns is not None:
                ns = meta.mtime_ns
                os.utime(name, ns=(ns, ns), dir_fd=pfd, follow_symlinks=False)
        # Last, deepest first: creating entries changes a directory's mtime, and a read-only
        # directory must still take its children.
        for rel in sorted(self.dirs, key=lambda r: r.count("/"), reverse=True):
            self.apply(self.dirfd(rel, rel), self.dirs[rel])
        return ExtractReport(
            files=self.nfiles,
            dirs=len(self.dirs),
            symlinks=len(self.symlinks),
            hardlinks=self.nlinks,
            bytes=self.nbytes,
            fifos=self.nfifos,
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


#: Bytes of tar read past the last member to reach the gzip stream's end (the end-of-archive
#: blocks and the record padding: 10 KiB for GNU tar's default record); more is refused.
_MAX_TAIL = 1 << 20


def _check_gzip_end(tar: tarfile.TarFile, label: str) -> None:
    """``tarfile`` ends quietly when the stream stops inside a header block, and its "r|gz"
    never looks for the gzip trailer: an archive cut at (or just after) a member boundary
    would restore as if whole.  So read on to the end of the deflate stream and require it
    (``_Stream.cmp``: its inflater; present for "gz" since the stream mode exists)."""
    stream = tar.fileobj
    cmp = getattr(stream, "cmp", None)
    if stream is None or cmp is None:
        return
    tail = 0
    while not cmp.eof:
        got = stream.read(1 << 16)
        if not got:
            raise ArchiveError(f"{label}: truncated (its gzip stream does not end)")
        tail += len(got)
        if tail > _MAX_TAIL:
            raise ArchiveError(f"{label}: more than {_MAX_TAIL} bytes after its last entry")


def check_destination(dest: str | os.PathLike[str]) -> os.stat_result | None:
    """``dest``'s stat if it is an empty directory, None if it is missing (with an existing
    parent directory); a ``UsageError`` otherwise.  Symlinks on the path are followed."""
    path = os.path.realpath(os.fsdecode(dest))
    shown = os.fsdecode(dest)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            raise UsageError(f"the parent of the destination {shown}, {parent}, is not a directory") from None
        return None
    except OSError as exc:
        raise UsageError(f"destination {shown}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"destination {shown} exists and is not a directory")
    try:
        empty = not os.listdir(path)
    except OSError as exc:
        raise UsageError(f"destination {shown} cannot be listed: {exc.strerror or exc}") from None
    if not empty:
        raise UsageError(f"destination {shown} is not empty")
    return st


def _remove_tree(path: str) -> None:
    """Remove our temp tree whatever its modes (a read-only directory blocks a non-root
    rmtree); ``shutil.rmtree`` never follows the symlinks in it."""
    def writable(_func: object, p: str, _exc: object) -> None:
        parent = os.path.dirname(p)
        with contextlib.suppress(OSError):
            if not os.path.islink(parent):
                os.chmod(parent, 0o700)
        with contextlib.suppress(OSError):
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
                shutil.rmtree(p, onerror=lambda *_: None)
            else:
                os.unlink(p)

    with contextlib.suppress(OSError):
        shutil.rmtree(path, onerror=writable)


def extract_archive(
    archive: str | os.PathLike[str] | BinaryIO, dest: str | os.PathLike[str],
    *, owners: bool | None = None,
) -> ExtractReport:
    """Extract the tgz ``archive`` (a path or a readable binary stream) into ``dest``, all or
    nothing.

    ``dest`` must be missing or an empty directory (``check_destination``); the archive is
    extracted beside it and renamed onto it at the end, so on any error ``dest`` is exactly
    as it was.  Contents, permission bits, mtimes to the nanosecond, symlinks (whatever they
    point to), hard links and FIFOs are restored; owners and groups by number when
    ``owners`` (default: when running as root).  Raises ``UnsafeArchiveError`` naming the
    first entry that would write outside ``dest`` or through a link.
    """
    dest_s = os.path.abspath(os.fsdecode(dest))
    before = check_destination(dest_s)
    if owners is None:
        owners = os.geteuid() == 0
    real = os.path.realpath(dest_s)
    parent, base = os.path.split(real)
    try:
        tmp = tempfile.mkdtemp(prefix=f".{base[:180]}.", suffix=".restore", dir=parent)
    except OSError as exc:
        raise ArchiveError(
            f"{dest_s}: cannot create a temporary directory beside it: {exc.strerror or exc}"
        ) from None
    label = os.fsdecode(archive) if isinstance(archive, (str, os.PathLike)) else "archive stream"
    try:
        report = _extract_into(archive, tmp, label, dest_s, owners, before)
        try:
            # Atomic: onto a missing name, or onto an empty directory (rename(2) replaces
            # one); anything put at DEST meanwhile makes it fail and DEST is left alone.
            os.rename(tmp, real)
        except OSError as exc:
            raise ArchiveError(
                f"{dest_s}: cannot move the restored tree into place ({exc.strerror or exc}; "
                "was the destination changed meanwhile?); nothing was restored"
            ) from None
    except BaseException:
        _remove_tree(tmp)
        raise
    with contextlib.suppress(OSError):  # durable rename where the file system allows it
        dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return report


def _extract_into(
    archive: str | os.PathLike[str] | BinaryIO, tmp: str, label: str, dest_s: str,
    owners: bool, before: os.stat_result | None,
) -> ExtractReport:
    root_fd = os.open(tmp, _O_DIR)
    ex = _Extractor(root_fd, owners)
    current = ""
    try:
        if isinstance(archive, (str, os.PathLike)):
            f: BinaryIO = open(archive, "rb")  # noqa: SIM115 - closed below (not a stream's)
        else:
            f = archive
        try:
            with _parsing(label, lambda: current):
                tar = tarfile.open(fileobj=f, mode="r|gz", tarinfo=_LimitedTarInfo)
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
                current = ""
                with _parsing(label, lambda: current):
                    _check_gzip_end(tar, label)
        finally:
            if f is not archive:
                f.close()
        current = ""
        report = ex.finish()
        # The destination itself: the archive's "./" entry, else what it was, else mkdir's.
        meta = ex.root_meta
        if meta is None:
            meta = (
                _Meta(stat.S_IMODE(before.st_mode), None, before.st_uid, before.st_gid)
                if before is not None else _Meta(ex.default_mode)
            )
        ex.apply(root_fd, meta)
        return report
    except ArchiveError:
        raise
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        where = f" after entry {current!r}" if current else ""
        raise ArchiveError(f"{label}: not a valid tgz{where}: {exc}") from None
    except (OSError, OverflowError) as exc:
        what = f"entry {current!r}" if current else label
        text = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
        raise ArchiveError(f"{label}: extracting {what} into {dest_s} failed: {text}") from None
    finally:
        ex.close()
        os.close(root_fd)
