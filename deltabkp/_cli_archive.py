"""``deltabkp archive`` and ``deltabkp extract``: the archive library on the command line.

``archive`` writes OUT atomically (``deltabkp._atomic.atomic_write``: a temp file beside OUT,
renamed at the end) or to stdout for ``-``; an OUT inside SRC_DIR is not archived, nor is its
temp file; files that changed while read or were skipped are listed but do not fail the command
(a hot backup expects them).  ``extract`` is all or nothing (``extract_archive``: into a temp
directory beside DEST_DIR, renamed onto it at the end): DEST_DIR must be missing or empty
(exit code 2 otherwise) and is left as it was when the archive is unsafe (exit code 5, naming
the entry) or corrupt.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from deltabkp._atomic import atomic_write
from deltabkp.errors import ArchiveError

# The archive library (numpy, zlib workers) is imported by the command that runs, not to
# build the parser: every ``deltabkp`` command line, ``ctl`` included, builds all of it.
if TYPE_CHECKING:
    from deltabkp.archive import ArchiveReport, ExtractReport


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this family's subcommands to the ``deltabkp`` parser."""
    p = sub.add_parser(
        "archive",
        help="write a deterministic, rsyncable tgz of a directory",
        description=(
            "Write a deterministic, rsyncable tgz of SRC_DIR (readable by tar xzf). Prints "
            "files, bytes in (tar), bytes out (tgz) and the files that changed while read."
        ),
    )
    p.add_argument("src", metavar="SRC_DIR")
    p.add_argument("out", metavar="OUT.tgz", help="output file, or - for stdout")
    p.add_argument(
        "--exclude", action="append", default=[], metavar="PATTERN",
        help="fnmatch pattern on relative paths and basenames (repeatable; 'dir/' = dirs only)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_archive)

    e = sub.add_parser(
        "extract",
        help="safely extract a tgz into a directory",
        description=(
            "Extract ARCHIVE into DEST_DIR, which must be missing or empty: all or nothing "
            "(extracted beside it, renamed into place at the end; on any error DEST_DIR is left "
            "as it was). Restores contents, modes, mtimes to the nanosecond, symlinks whatever "
            "they point to, hard links, FIFOs, and owners when run as root. Refuses absolute "
            "names, '..', writing through a symlink and devices."
        ),
    )
    e.add_argument("archive", metavar="ARCHIVE", help="tgz file, or - for stdin")
    e.add_argument("dest", metavar="DEST_DIR")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    e.set_defaults(func=_extract)


def _archive(args: argparse.Namespace) -> int:
    from deltabkp.archive import build_archive

    to_stdout = args.out == "-"
    if to_stdout:
        report = build_archive(args.src, sys.stdout.buffer, exclude=args.exclude)
        sys.stdout.buffer.flush()
    else:
        exclude = [*args.exclude, *_own_output(args.src, args.out)]
        try:
            with atomic_write(args.out, durable=False) as f:  # a rerun rewrites it: no fsync
                report = build_archive(args.src, f, exclude=exclude)
        except OSError as exc:  # the temp file's: build_archive raises ArchiveError for its own
            raise ArchiveError(f"cannot write the archive: {exc.strerror or exc}",
                               path=args.out) from None
    _print(args, _archive_json(report), _archive_text(report), sys.stderr if to_stdout else sys.stdout)
    return 0


def _own_output(src: str, out: str) -> list[str]:
    """Exclude patterns for an OUT inside SRC: OUT itself and ``atomic_write``'s temp file
    (``.NAME.XXXX.part`` beside it), so the archive never holds itself, half written."""
    rel = os.path.relpath(os.path.abspath(out), os.path.abspath(src))
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return []
    head, name = os.path.split(rel)
    temp = glob.escape(f".{name}.") + "*" + glob.escape(".part")
    return [glob.escape(rel), os.path.join(glob.escape(head), temp) if head else temp]


def _extract(args: argparse.Namespace) -> int:
    from deltabkp.archive import check_destination, extract_archive

    check_destination(args.dest)  # before reading stdin or the archive: a usage error
    if args.archive == "-":
        report = extract_archive(sys.stdin.buffer, args.dest)
    elif not os.path.isfile(args.archive):
        raise ArchiveError("no such archive file", path=args.archive)
    else:
        report = extract_archive(args.archive, args.dest)
    _print(args, _extract_json(report), _extract_text(report, args.dest), sys.stdout)
    return 0


def _print(args: argparse.Namespace, data: dict[str, Any], text: str, stream: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else text, file=stream)


def _archive_json(r: ArchiveReport) -> dict[str, Any]:
    return {
        "files": r.files, "dirs": r.dirs, "symlinks": r.symlinks, "hardlinks": r.hardlinks,
        "fifos": r.fifos, "bytes_in": r.bytes_in, "bytes_out": r.bytes_out,
        "content_bytes": r.content_bytes,
        "changed": [{"path": i.path, "what": i.what} for i in r.changed],
        "skipped": [{"path": i.path, "what": i.what} for i in r.skipped],
    }


def _archive_text(r: ArchiveReport) -> str:
    ratio = f" ({r.bytes_out / r.bytes_in:.1%})" if r.bytes_in else ""
    lines = [
        (f"files: {r.files} (+ {r.dirs} dirs, {r.symlinks} symlinks, {r.hardlinks} hard links, "
         f"{r.fifos} FIFOs)"),
        f"bytes in: {r.bytes_in}",
        f"bytes out: {r.bytes_out}{ratio}",
        f"changed while read: {len(r.changed)}",
    ]
    lines += [f"  {i.path}: {i.what}" for i in r.changed]
    lines.append(f"skipped: {len(r.skipped)}")
    lines += [f"  {i.path}: {i.what}" for i in r.skipped]
    return "\n".join(lines)


def _extract_json(r: ExtractReport) -> dict[str, Any]:
    return {"files": r.files, "dirs": r.dirs, "symlinks": r.symlinks,
            "hardlinks": r.hardlinks, "fifos": r.fifos, "bytes": r.bytes}


def _extract_text(r: ExtractReport, dest: str) -> str:
    return (
        f"extracted into {dest}: {r.files} files ({r.bytes} bytes), {r.dirs} dirs, "
        f"{r.symlinks} symlinks, {r.hardlinks} hard links, {r.fifos} FIFOs"
    )
