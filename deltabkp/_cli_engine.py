"""The rdiff-style engine commands: ``deltabkp signature | delta | patch``.

Files stream through the sans-I/O classes in 1 MiB chunks, so memory stays bounded by the
signature (and, for ``patch``, a memory map of the base).  ``-`` means stdin or stdout; a base
read from stdin is held in memory (patching needs random access, and an unknown size needs a
``--block-size`` to stream a signature).  Outputs to a path are written through
``deltabkp._atomic.atomic_write`` (a temp file beside PATH, renamed only once complete and,
for ``patch``, verified), so a failed run never leaves a plausible-looking output behind.
Every error names the file it concerns (as its ``path`` field).

librsync's formats (``deltabkp.rdiff``) ride on the same commands: ``signature --format
rdiff`` writes an rdiff signature, and ``delta`` / ``patch`` recognise an rdiff signature or
delta by its magic, so files made by ``rdiff`` work as they are.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import stat
import sys
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, BinaryIO

from deltabkp._atomic import atomic_write
from deltabkp._mmap import mapped
from deltabkp.errors import DeltabkpError, UsageError

# The engine (numpy) is imported by the command that runs, not to build the parser: every
# ``deltabkp`` command line, ``ctl`` included, builds all of it.
if TYPE_CHECKING:
    from deltabkp.engine._delta import DeltaEncoder
    from deltabkp.engine._rdiff_delta import RdiffDeltaEncoder
    from deltabkp.engine._rdiff_sig import RdiffSignatureBuilder
    from deltabkp.engine._signature import SignatureBuilder

CHUNK = 1 << 20
#: ``engine._signature.DEFAULT_STRONG_LEN``, for the help text (tests/test_package.py checks
#: they agree).
_DEFAULT_STRONG_LEN = 8


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``signature``, ``delta`` and ``patch`` to the ``deltabkp`` parser."""
    p = sub.add_parser(
        "signature",
        help="write the block signature of BASE to SIG (like rdiff signature)",
        description="Write the block signature of BASE to SIG ('-' for stdin/stdout).",
    )
    p.add_argument("-b", "--block-size", type=int, default=None, metavar="N",
                   help="block size in bytes (default: derived from BASE's size)")
    p.add_argument("-S", "--strong-len", type=int, default=None, metavar="N",
                   help=f"bytes of strong sum kept per block: 4..16 (default "
                   f"{_DEFAULT_STRONG_LEN}); rdiff format 1..32 for BLAKE2, 1..16 for MD4 "
                   f"(default: all of it, as rdiff)")
    p.add_argument("--format", choices=("deltabkp", "rdiff"), default="deltabkp",
                   help="signature format: deltabkp's own (default) or librsync's, which "
                   "rdiff delta reads")
    p.add_argument("-H", "--hash", choices=("blake2", "md4"), default=None,
                   help="rdiff format: strong sum (default blake2, as rdiff)")
    p.add_argument("-R", "--rollsum", choices=("rabinkarp", "rollsum"), default=None,
                   help="rdiff format: weak sum (default rabinkarp, as rdiff)")
    p.add_argument("base", metavar="BASE")
    p.add_argument("sig", metavar="SIG")
    p.set_defaults(func=_cmd_signature)

    p = sub.add_parser(
        "delta",
        help="write the delta turning SIG's base into NEW to DELTA (like rdiff delta)",
        description="Write the delta from the base described by SIG to NEW ('-' for stdin/stdout). "
        "An rdiff signature (recognised by its magic) gives an rdiff delta.",
    )
    p.add_argument("sig", metavar="SIG")
    p.add_argument("new", metavar="NEW")
    p.add_argument("delta", metavar="DELTA")
    p.set_defaults(func=_cmd_delta)

    p = sub.add_parser(
        "patch",
        help="apply DELTA to BASE and write the verified result to OUT (like rdiff patch)",
        description="Apply DELTA to BASE, verify length and blake3, write OUT ('-' for stdin/stdout). "
        "An rdiff delta (recognised by its magic) is applied as rdiff patch does (it carries "
        "no checksum to verify).",
    )
    p.add_argument("base", metavar="BASE")
    p.add_argument("delta", metavar="DELTA")
    p.add_argument("out", metavar="OUT")
    p.set_defaults(func=_cmd_patch)


def _check_stdin_once(*names: str) -> None:
    if sum(1 for n in names if n == "-") > 1:
        raise UsageError("only one input can be '-' (stdin)")


@contextlib.contextmanager
def _blame(name: str) -> Iterator[None]:
    """Name the file errors concern (the innermost name wins); turn OS errors into typed ones."""
    label = "<stdin>" if name == "-" else name
    try:
        yield
    except DeltabkpError as exc:
        raise exc.with_context(path=label)
    except OSError as exc:
        raise DeltabkpError(exc.strerror or str(exc), path=label) from None


@contextlib.contextmanager
def _open_in(name: str) -> Iterator[BinaryIO]:
    if name == "-":
        yield sys.stdin.buffer
        return
    with _blame(name):
        f = open(name, "rb")  # noqa: SIM115 - closed below, errors blamed on the file
    with f:
        yield f


def _chunks(f: IO[bytes], name: str) -> Iterator[bytes]:
    while True:
        with _blame(name):
            data = f.read(CHUNK)
        if not data:
            return
        yield data


@contextlib.contextmanager
def _open_out(name: str) -> Iterator[BinaryIO]:
    """Yield a writable file; a path appears only when the command succeeds."""
    if name == "-":
        yield sys.stdout.buffer
        with _blame("<stdout>"):
            sys.stdout.buffer.flush()
        return
    try:
        # A CLI output is rewritten by a rerun: no fsync (durable=False) is needed.
        with atomic_write(name, durable=False) as f:
            yield f
    except OSError as exc:  # the body's own are blamed already: these are the temp file's
        raise DeltabkpError(exc.strerror or str(exc), path=name) from None


def _write(out: BinaryIO, name: str, data: bytes | memoryview) -> None:
    if data:
        with _blame("<stdout>" if name == "-" else name):
            out.write(data)


def _write_all(out: BinaryIO, name: str, pieces: list[bytes | memoryview]) -> None:
    # The pieces are views into the base's map: they die with this frame, before unmapping.
    for piece in pieces:
        _write(out, name, piece)


def _signature_builder(
    args: argparse.Namespace, block_size: int | None, size: int | None
) -> SignatureBuilder | RdiffSignatureBuilder:
    from deltabkp.engine._rdiff_sig import RdiffSignatureBuilder, SignatureKind
    from deltabkp.engine._signature import DEFAULT_STRONG_LEN, SignatureBuilder

    if args.format == "rdiff":
        rk = (args.rollsum or "rabinkarp") == "rabinkarp"
        md4 = args.hash == "md4"
        kind = SignatureKind[("RK_" if rk else "") + ("MD4" if md4 else "BLAKE2")]
        return RdiffSignatureBuilder(
            block_size, base_size=size, strong_len=args.strong_len, kind=kind
        )
    if args.hash is not None or args.rollsum is not None:
        raise UsageError("--hash and --rollsum choose rdiff sums: use them with --format rdiff")
    strong_len = DEFAULT_STRONG_LEN if args.strong_len is None else args.strong_len
    return SignatureBuilder(block_size, base_size=size, strong_len=strong_len)


def _cmd_signature(args: argparse.Namespace) -> int:
    block_size: int | None = args.block_size
    with _open_in(args.base) as f:
        size: int | None = None
        with _blame(args.base):
            st = os.fstat(f.fileno())
            # stdin redirected from a file has a size too (rdiff uses it the same way).
            if stat.S_ISREG(st.st_mode):
                size = st.st_size - os.lseek(f.fileno(), 0, os.SEEK_CUR)
        chunks = _chunks(f, args.base)
        pending: list[bytes] = []
        if block_size is None and size is None and args.format == "deltabkp":
            pending = list(chunks)  # stdin of unknown size: hold it to size the blocks
            size = sum(len(c) for c in pending)
        builder = _signature_builder(args, block_size, size)
        for data in pending:
            builder.feed(data)
        pending = []
        for data in chunks:
            builder.feed(data)
    sig = builder.finish()
    with _open_out(args.sig) as out:
        _write(out, args.sig, sig)
    return 0


def _read_all(name: str, limit: int | None = None) -> bytes:
    with _open_in(name) as f:
        parts: list[bytes] = []
        total = 0
        for data in _chunks(f, name):
            parts.append(data)
            total += len(data)
            if limit is not None and total > limit:
                break
        return b"".join(parts)


def _cmd_delta(args: argparse.Namespace) -> int:
    _check_stdin_once(args.sig, args.new)
    from deltabkp.engine._delta import DeltaEncoder
    from deltabkp.engine._rdiff_delta import RdiffDeltaEncoder
    from deltabkp.engine._rdiff_sig import RdiffSignature, is_signature
    from deltabkp.engine._signature import MAX_SIGNATURE_SIZE, Signature

    raw = _read_all(args.sig, MAX_SIGNATURE_SIZE)
    encoder: DeltaEncoder | RdiffDeltaEncoder
    with _blame(args.sig):
        if is_signature(raw):
            encoder = RdiffDeltaEncoder(RdiffSignature.parse(raw))
        else:
            encoder = DeltaEncoder(Signature.parse(raw))
    del raw
    with _open_in(args.new) as f, _open_out(args.delta) as out:
        for data in _chunks(f, args.new):
            _write(out, args.delta, encoder.feed(data))
        _write(out, args.delta, encoder.finish())
    return 0


@contextlib.contextmanager
def _map_base(name: str) -> Iterator[bytes | memoryview]:
    if name == "-":
        yield _read_all(name)
        return
    with _open_in(name) as f, contextlib.ExitStack() as stack:
        with _blame(name):
            base = stack.enter_context(mapped(f))
        yield base


def _cmd_patch(args: argparse.Namespace) -> int:
    from deltabkp.engine._patch import Patcher
    from deltabkp.engine._rdiff_patch import RdiffPatcher
    from deltabkp.engine._rdiff_sig import is_delta

    _check_stdin_once(args.base, args.delta)
    with _map_base(args.base) as base, _open_in(args.delta) as f:
        chunks = _chunks(f, args.delta)
        first = next(chunks, b"")
        patcher = RdiffPatcher(base) if is_delta(first) else Patcher(base)
        with _open_out(args.out) as out:
            for data in itertools.chain((first,), chunks):
                with _blame(args.delta):
                    _write_all(out, args.out, patcher.feed(data))
            with _blame(args.delta):
                patcher.finish()
    return 0
