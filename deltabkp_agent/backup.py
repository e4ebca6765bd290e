"""Serve one ``BackupRequest``: quick check, base signature, then archive → delta as a stream.

The conversation (docs/formats.md, "Messages after the handshake"), agent side::

    ← backup(path, base_hash)
    → unchanged(base_hash, "fingerprint")          tree metadata is what it was for base_hash
                                                   (racy files: read again, same bytes)
    | → need-sig  ← sig-chunk* sig-end             no cached signature of base_hash
      → delta-chunk* backup-done(...)              the new archive against that signature
      | → unchanged(base_hash, "hash")             rebuilt, byte-identical to the base
    | → delta-chunk* backup-done(...)              a layout delta: the server offered it
                                                   (``accepts``) and the kept build is the base

Invariants:
- the tree fingerprint is taken *before* the archive build starts, so a change during the
  build makes the next quick check miss; it is recorded only if it was not racy;
- when no fingerprint is recorded for the base (its build found the tree racy) and the
  kept build is the base, the quick check is the tree against the kept index, with no
  fingerprint walk first: a changed tree costs one metadata walk (the build's), not
  three; an unchanged one is then fingerprinted, and the fingerprint recorded only if a
  second check against the index, after it was taken, still vouches for the tree (so the
  next checks cost one walk again);
- when a fingerprint is recorded for the base, it is the whole quick check: the kept
  build's index is not read unless it misses (an unchanged tree, the agent's usual check,
  costs one walk), and a miss is a change, with no index check after it (a fingerprint
  racy now differs from a trusted one: some entry's times are newer);
- the kept build's index is read (parsed, blake3 checked) at most once per request and
  handed to every step that needs it;
- the archive is built incrementally (``archive.IncrementalBuilder``) from the last build
  of the path that the cache kept: byte-identical to a full build, it reads and compresses
  only what changed, so a racy tree (never answered from its fingerprint) costs its racy
  files plus a metadata walk; the new archive is kept for the next build only if the build
  ran to its end;
- archive building, delta encoding and the new archive's signature all run in one worker
  thread (behind the agent's build limiter; the kept archive's writes, with the archive's
  blake3, in the builder's own worker thread beside it, joined before the build returns
  or stops); it hands delta bytes to the event loop through
  a bounded memory channel (``_Handover``: no round trip per chunk, it waits only for a
  free slot), so a slow server slows the build and memory stays bounded
  (channel slots + at most ``HOLD_LIMIT`` held back + the encoder's own buffer);
- the layout delta (docs/formats.md) needs no signature and no rolling search: used when
  the server offers it and the kept build's index names the base.  Versions 3 and 2
  (``archive.LayoutStreamer``, offered first) are made and sent as the build goes
  (``_Streaming``: held back while the archive might still be the base), version 2's END
  once built; version 3's END and ``backup-done`` (no archive hash: the server's rebuild
  has it) as soon as the builder told the streamer everything, before it compresses
  (``stream_first``): the build then goes on to compress and keep the agent's own copy
  once a server on this host hung up (it stored its archive; ``AFTER_ANSWER_WAIT_S`` at
  most).  A ``cancel``/``error`` from the server after the answer (it did not store it)
  is ``ServerStopped``, nothing cached; the connection then serves no other request (what
  the server says after the answer is read while the build goes on).  A failure of the
  build's own after the answer drops the kept build, logged; the server's archive stands.
  With no change seen by then, the build ends first, as version 2's (``unchanged (hash)``
  if it is the base).  Version 1 (``archive.encode_layout``, for a server that offers only it) is
  made once the build ran to its end, from both archives, checked as it is made (equal
  COPY bytes, RUNs that compress back to the new archive) and streamed as it is made (a
  chunk at least every ``STREAM_S``, the header and the first record at once: the server
  rebuilds the archive while the agent encodes, where one chunk at the end left it idle
  until then); if it cannot be made
  before its first byte the rolling delta follows, as if it had not been offered (only
  empty keep-alive chunks were sent), after it the backup fails and the kept build is
  dropped (the next one is a full build and a rolling delta);
- each request logs its per-phase timeline (``deltabkp._phases``; ``BackupOutcome.phases``,
  on the agent's ``backup-served`` line);
- delta output is held back (up to ``HOLD_LIMIT``) while a base exists, so an archive that
  turns out byte-identical to the base is answered ``unchanged (hash)`` with no delta sent;
- a server that hangs up, stops reading (the transport's send deadline) or sends anything
  during the stream stops the build at its next chunk (the thread checks for
  cancellation), and nothing is cached; a server's own ``cancel``/``error`` ends the backup
  quietly (``ServerStopped``: nothing is sent back);
- the cache's signatures and fingerprints are written only after ``backup-done`` (or
  ``unchanged``) was sent; the kept build (archive and index) as soon as the build ran to
  its end, whatever the server does next: it is only a base for the next build, which is
  byte-identical to a full one whatever base it had;
- after the answer (with the kept build's seek points), the files the build found racy
  are read again and those equal and settled are recorded as reusable in the kept index
  (``_settle_kept``; the same archive): the next backup does not read each of them again
  in its quick check and its build, on the server's wait;
- the new archive's own signature is not made by its build when the archive is kept
  (only a rolling delta against it needs one, and the layout delta is the usual case):
  ``_cached_signature`` makes it from the kept archive the first time a backup needs it,
  and files it.  Under ``--no-archive-cache`` there is nothing to make it from later, so
  the build makes it as it goes, as before.

Measured (``benchmarks/bench_agent.py``: a ``serve_backup`` after the ~1 % change of the
107 MB stdlib tree, layout delta accepted, the encoder stubbed out — the work up to handing
both archives to it; 2 cores shared with 4 other engineers, load 2-5; medians of 5-7
rounds, side by side with the code before this round): first build on a settled tree,
0.78 s CPU / 0.76 s wall before, 0.58 s / 0.57 s after; first build right after the copy
(``--racy-first``, as ``bench_system.sh``: ~1,000 files racy when read), 2.03 s / 1.70 s
before (23 MB of tar recompressed), 0.67 s / 0.72 s after (2.1 MB: racy files are read
again and hashed, not recompressed).

A long module on purpose: the request's steps (quick checks, signature, build and stream)
share one set of invariants about what is sent and cached when, which read best together.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn

import attrs
import trio

import deltabkp
from deltabkp import Signature, net, protocol
from deltabkp._mmap import mapped
from deltabkp._phases import Phases
from deltabkp.archive import (
    LAYOUT_EARLY_VERSION,
    LAYOUT_STREAM_VERSION,
    LAYOUT_VERSION,
    ArchiveIndex,
    BuildHandover,
    LayoutStreamer,
    layout_capability,
)
from deltabkp.errors import (
    ArchiveError,
    DeltabkpError,
    ErrorCode,
    FormatError,
    PeerUnavailable,
    RemoteProtocolError,
    RequestRefused,
)
from deltabkp_agent.cache import _UNREAD, AgentCache, KeptBuild, _Unread

__all__ = ["HOLD_LIMIT", "BackupContext", "BackupOutcome", "ServerStopped", "serve_backup"]

log = logging.getLogger("deltabkp_agent")

#: Delta bytes held back while the archive might still turn out identical to the base.
HOLD_LIMIT = 1 << 20
#: Delta bytes gathered before a push to the network (fewer, fuller frames).
FLUSH_AT = protocol.MAX_CHUNK
#: Longest the layout delta's records wait on the agent before going out, while its encoder
#: works: the server rebuilds the new archive from them as they come, so its apply overlaps
#: the encode instead of following it (a ~1 % change makes ~30 KB in ~70 records over
#: ~0.5 s: a dozen or two frames, where one at the end left the server idle until then).
STREAM_S = 0.02
#: Slots of the thread → event loop channel (each ≤ MAX_CHUNK bytes).
CHANNEL_SLOTS = 4
#: Longest the server may hear nothing during a build: after this, held delta bytes (or an
#: empty delta-chunk) go out, so its idle timeout (300 s by default) never fires on a build
#: that is merely slow; the "unchanged (hash)" shortcut is then given up for that build.
KEEPALIVE_S = 30.0
#: Longest a build answered early (layout delta version 3) waits, before it compresses its
#: own copy of the archive, for a server on this host (loopback) to hang up (it does once it
#: stored the archive): the cores go to the server's last records first.  A server
#: elsewhere is not waited for.
AFTER_ANSWER_WAIT_S = 2.0
#: Longest wait for the next signature chunk from the server.
SIG_CHUNK_TIMEOUT = 60.0


@attrs.frozen
class BackupContext:
    """What serving a backup needs from the agent."""

    node: str
    cache: AgentCache
    limiter: trio.CapacityLimiter
    max_signature: int


@attrs.frozen
class BackupOutcome:
    """How one request ended, for the agent's log line."""

    outcome: str  # "unchanged" | "sent"
    reason: str = ""
    archive_hash: bytes = b""
    archive_size: int = 0
    delta_bytes: int = 0
    files: int = 0
    changed: int = 0
    signature_from: str = ""  # "cache" | "server" | "none" | "layout" (no signature needed)
    #: Where the request's time went (``Phases.render``), for the agent's log line.
    phases: str = ""
    #: The connection may serve another request (False after an early answer: what the
    #: server said after it was read while the build went on).
    reusable: bool = True


@attrs.frozen
class _Built:
    archive_hash: bytes
    archive_size: int
    files: int
    changed: tuple[tuple[str, str], ...]
    skipped: tuple[tuple[str, str], ...]
    #: The new archive's signature for the cache; None when the archive itself is kept.
    signature: bytes | None
    #: True when every delta byte is still held back (nothing pushed yet).
    held: bool
    delta_bytes: int
    #: ``backup-done`` went already, before the archive was compressed (a layout delta's
    #: version 3, ``_Streaming.answer_early``); this is then the kept build (or, with an
    #: empty ``archive_hash``, that answer: the kept build was lost after it).
    answered: bool = False


class _Stopped(Exception):
    """The event loop side went away (cancelled or hung up): stop building."""


class _Handover:
    """Delta chunks from the build's worker thread to the event loop, without a round trip.

    ``trio.from_thread.run(send.send, …)`` made the thread wait for the event loop at every
    chunk (the loop has to get the GIL back from the encoding thread first): ~14 % of the
    layout encode's samples.  Here the thread takes a slot (``CHANNEL_SLOTS``, freed when the
    event loop takes the chunk off the channel), queues the chunk with
    ``TrioToken.run_sync_soon`` and goes on; it waits only while every slot is taken, so
    memory stays bounded (slots x ``MAX_CHUNK``) and a slow server still paces the build.
    The token's queue is first in, first out, and the thread's own result is reported
    through it after its chunks: every chunk is in the channel before ``produce`` closes it.
    A stopped stream (receiver gone, run over, the request cancelled) is ``_Stopped`` at
    the thread's next ``put``."""

    def __init__(self, send: trio.MemorySendChannel[bytes | _Built]) -> None:
        self._send = send
        self._token = trio.lowlevel.current_trio_token()
        self._slots = threading.Semaphore(CHANNEL_SLOTS)
        self.closed = False
        #: Set by the event loop once the server is done with an early answer.
        self.server_done = threading.Event()
        #: The server runs on this host (loopback): its end is waited for after an early
        #: answer (``wait_server``).
        self.local = False

    def put(self, chunk: bytes | _Built) -> None:
        """Worker thread: hand ``chunk`` (or the answer) over (waits for a free slot)."""
        # A timeout, so a cancelled request is seen even if no slot is ever freed.
        while not self._slots.acquire(timeout=0.1):
            self._check()
        self._check()
        try:
            self._token.run_sync_soon(self._deliver, chunk)
        except trio.RunFinishedError:
            raise _Stopped from None

    def wait_server(self, timeout: float) -> None:
        """Worker thread, after an early answer: until the server is done with it (at most
        ``timeout``); ``_Stopped`` if the stream was stopped meanwhile."""
        deadline = time.monotonic() + timeout
        while not self.server_done.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
            self._check()
            if time.monotonic() >= deadline:
                return

    def _check(self) -> None:
        if self.closed:
            raise _Stopped
        try:
            trio.from_thread.check_cancelled()
        except trio.Cancelled:
            raise _Stopped from None

    def _deliver(self, chunk: bytes | _Built) -> None:
        # In the event loop, as a system callback: must not raise.  A slot per chunk in
        # the channel, and as many slots as the channel's buffer: never WouldBlock.
        try:
            self._send.send_nowait(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
            self.close()

    def taken(self) -> None:
        """Event loop: a chunk was taken off the channel; its slot is free."""
        self._slots.release()

    def close(self) -> None:
        """Event loop: nothing more is taken; a waiting thread stops."""
        self.closed = True
        self._slots.release()


class _NoLayout(Exception):
    """The layout delta cannot be made (archive not kept, kept build not the base, failed
    its own check before its first byte): nothing but keep-alives was sent, so the rolling
    delta takes over.  ``after_chunks``: keep-alives (empty ``delta-chunk``s) did go out —
    the server is then past the point where the agent may ask for its signature."""

    after_chunks = False


class ServerStopped(PeerUnavailable):
    """The server ended the backup itself (``cancel`` or its own ``error``): stop, and send
    nothing back (echoing its error to it would only make noise)."""


async def serve_backup(
    ctx: BackupContext,
    chan: net.Channel,
    req: protocol.BackupRequest,
    root: str,
    exclude: tuple[str, ...],
) -> BackupOutcome:
    """Answer ``req`` for the real directory ``root`` (already allow-listed) on ``chan``."""
    ph = Phases()
    out = await _serve(ctx, chan, req, root, exclude, ph)
    ph.lap("after")  # after the answer and the cache: the kept build's seek points
    return attrs.evolve(out, phases=ph.render())


async def _serve(
    ctx: BackupContext,
    chan: net.Channel,
    req: protocol.BackupRequest,
    root: str,
    exclude: tuple[str, ...],
    ph: Phases,
) -> BackupOutcome:
    node, path = ctx.node, req.path

    async def thread(fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=ctx.limiter)

    # 1. Quick checks, before anything is read (a change from then on is a miss later).
    # The kept build's index is read (parsed, its blake3 checked) once for the whole request:
    # the path lock is held.
    base = req.base_hash
    recorded = await thread(ctx.cache.fingerprint, root, base, exclude) if base else None
    # With a fingerprint recorded, the tree is fingerprinted first and the index read only
    # if that does not answer: an unchanged tree (an agent's every check) reads no index.
    kept = (await thread(ctx.cache.kept_index, root)
            if base is not None and recorded is None else None)
    kept_is_base = base is not None and kept is not None and kept.archive_hash == base
    fingerprint: bytes | None = None
    ph.lap("index")
    if base is not None and kept is not None and kept_is_base and recorded is None:
        # No fingerprint recorded for the base (its build found the tree racy): the tree
        # against the kept build's index, from metadata too, except the files that were
        # racy then, read again one by one.  No fingerprint walk before it: a changed tree
        # (the usual reason to be here) then costs one metadata walk, the build's.
        unchanged = await thread(_unchanged_since, kept, root, exclude)
        ph.lap("quick-check")
        if unchanged:
            await chan.send(protocol.Unchanged(base, "fingerprint"))
            # A fingerprint for the next check (one walk, no index): taken now, and trusted
            # only if the index still vouches for the tree after it was taken.
            fp = await thread(_fingerprint, root, exclude)
            if not fp.racy and await thread(_unchanged_since, kept, root, exclude):
                await thread(_cache_quietly, ctx.cache.record, root, base,
                             {"fingerprint": bytes(fp.digest), "exclude": exclude,
                              "signature": None})
            return BackupOutcome("unchanged", "fingerprint", base)
    else:
        fp = await thread(_fingerprint, root, exclude)
        ph.lap("fingerprint")
        if base is not None and not fp.racy and recorded is not None and recorded == fp.digest:
            await chan.send(protocol.Unchanged(base, "fingerprint"))
            return BackupOutcome("unchanged", "fingerprint", base)
        fingerprint = None if fp.racy else bytes(fp.digest)
        # No index check here, even for a racy tree: with a fingerprint recorded for the
        # base (trusted: not racy then), a racy one now has another digest (some entry's
        # times are newer), so the tree changed since; without one, the kept build is not
        # the base (else the branch above) and there is no index to check against.  (It
        # used to be checked against the kept index all the same: 10-24 ms that always
        # answered "changed", before the build's own walk.)
        if base is not None and recorded is not None:  # not read above: the build needs it
            kept = await thread(ctx.cache.kept_index, root)
            ph.lap("index")

    given_up: _NoLayout | None = None
    # 2. The layout delta, when the server takes it and the kept build is its base: no
    # signature, no rolling search (docs/formats.md "Layout delta").
    # The streamed forms (version 3: answered before the archive is compressed; 2: once
    # built) if offered, else version 1 (made once it is built).  None where no deflate
    # here makes the bytes.
    form = next((v for v in (LAYOUT_EARLY_VERSION, LAYOUT_STREAM_VERSION, LAYOUT_VERSION)
                 if (c := layout_capability(v)) and c in req.accepts), 0)
    if (req.base_hash is not None and form and kept is not None
            and kept.archive_hash == req.base_hash):
        try:
            built = await _stream_delta(
                ctx, chan, path, root, exclude, None, kept.archive_size, True, kept,
                layout=kept, streamed=form if form != LAYOUT_VERSION else 0, phases=ph,
            )
        except _NoLayout as exc:
            log.info("backup of %s: layout delta given up (%s); rolling delta", path, exc)
            given_up = exc
        else:
            return await _finish(ctx, chan, req, root, exclude, fingerprint, built,
                                 f"layout-{form}" if form != LAYOUT_VERSION else "layout", ph)

    # 3. The signature of the base: cached, or asked from the server, or empty (first backup).
    sig_from = "none"
    if req.base_hash is None:
        base_sig = Signature.parse(deltabkp.SignatureBuilder(base_size=0).finish())
    else:
        cached = await thread(_cached_signature, ctx.cache, root, req.base_hash, kept)
        if cached is not None:
            sig_from = "cache"
            base_sig = Signature.parse(cached)
        else:
            sig_from = "server"
            if given_up is not None and given_up.after_chunks:
                # ``need-sig`` after ``delta-chunk``s is no move of the conversation: fail
                # this backup plainly (the next one starts with the rolling delta's request).
                raise ArchiveError(f"the layout delta was given up ({given_up}) after keep-alive "
                                   "chunks went out, and no signature of the base is cached")
            await chan.send(protocol.NeedSignature())
            raw = await _receive_signature(chan, ctx, path)
            base_sig = await thread(_parse_server_signature, raw, req.base_hash, node, path)
            # It is the server's own signature of that archive: worth keeping.
            await thread(_cache_quietly, ctx.cache.record, root, req.base_hash,
                         {"fingerprint": None, "exclude": exclude, "signature": raw})
    ph.lap("signature")

    # 4. Build archive → delta in a worker thread; stream it.
    if req.base_hash is not None:
        estimate = base_sig.base_size
    else:
        estimate = await thread(_estimate_archive_size, root)
    built = await _stream_delta(
        ctx, chan, path, root, exclude, base_sig, estimate, req.base_hash is not None,
        kept if req.base_hash is not None else _UNREAD, phases=ph,
    )
    return await _finish(ctx, chan, req, root, exclude, fingerprint, built, sig_from, ph)


async def _finish(
    ctx: BackupContext, chan: net.Channel, req: protocol.BackupRequest, root: str,
    exclude: tuple[str, ...], fingerprint: bytes | None, built: _Built, sig_from: str,
    ph: Phases,
) -> BackupOutcome:
    """``unchanged (hash)`` or ``backup-done``, then the cache."""

    async def thread(fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=ctx.limiter)

    if req.base_hash is not None and built.held and built.archive_hash == req.base_hash:
        await chan.send(protocol.Unchanged(req.base_hash, "hash"))
        ph.lap("send")
        await thread(_cache_quietly, ctx.cache.record, root, req.base_hash,
                     {"fingerprint": fingerprint, "exclude": exclude, "signature": None})
        ph.lap("cache")
        # The same archive kept again: its seek file (if any) still names it; this also lets
        # go of the replaced build's index (held for ``make_seek``).
        await thread(ctx.cache.make_seek, root)
        await thread(_settle_kept, ctx.cache, root, exclude)
        return BackupOutcome("unchanged", "hash", req.base_hash, built.archive_size,
                             signature_from=sig_from)
    if not built.answered:
        await chan.send(protocol.BackupDone(
            built.archive_hash, built.archive_size, built.files, built.changed, built.skipped
        ))
        ph.lap("send")
    if built.archive_hash:  # (empty: answered, then the kept build was lost)
        await thread(_cache_quietly, ctx.cache.record, root, built.archive_hash,
                     {"fingerprint": fingerprint, "exclude": exclude,
                      "signature": built.signature})
        ph.lap("cache")
    # The kept build's seek points, for the next layout delta: after the answer went (off
    # the backup's critical path), still under the path's lock (never raises).
    await thread(ctx.cache.make_seek, root)
    await thread(_settle_kept, ctx.cache, root, exclude)
    return BackupOutcome(
        "sent", "", built.archive_hash, built.archive_size, built.delta_bytes, built.files,
        len(built.changed), sig_from, reusable=not built.answered,
    )


# -- pieces running in worker threads ---------------------------------------------------------


def _fingerprint(root: str, exclude: tuple[str, ...]) -> Any:
    from deltabkp.archive import tree_fingerprint

    # ``root`` is the checked realpath: no component may have become a symlink since.
    return tree_fingerprint(root, exclude=exclude, no_links=True)


def _unchanged_since(index: ArchiveIndex, root: str, exclude: tuple[str, ...]) -> bool:
    """Would a build now give the archive whose build the cache kept (``index``)?"""
    from deltabkp.archive import IncrementalBuilder

    return IncrementalBuilder(root, exclude=exclude, no_links=True).unchanged(index)


def _settle_kept(cache: AgentCache, root: str, exclude: tuple[str, ...]) -> None:
    """After a build that found files racy: read them again now, while nothing waits on
    this path, and keep those found equal (and settled) as reusable in the kept index, so
    the next backup's build and quick check do not read each of them again on its path
    (``IncrementalBuilder.settled``; nothing is read when none was racy).  Never raises:
    the kept index stays right as it was."""
    from deltabkp.archive import IncrementalBuilder

    def settled(index: ArchiveIndex) -> ArchiveIndex | None:
        return IncrementalBuilder(root, exclude=exclude, no_links=True).settled(index)

    try:
        cache.settle_kept(root, settled)
    except (DeltabkpError, OSError) as exc:  # the answer went: nothing may fail it now
        log.debug("backup of %s: kept index not settled: %s", root, exc)


def _cached_signature(
    cache: AgentCache, root: str, base_hash: bytes, kept: ArchiveIndex | None
) -> bytes | None:
    """The agent's own signature of ``base_hash``: from the cache, or made now from the
    kept archive when that is the base (then filed: an older base asked again finds it).

    Made here, when a rolling delta needs it, rather than during the build that made the
    archive: the layout delta needs none, so most builds would make one for nothing
    (~0.07 s of CPU for a 30 MB archive at 256-byte blocks, and a 2 MB file written)."""
    if (raw := cache.signature(base_hash)) is not None:
        return raw
    archive = cache.kept_archive(root)
    if kept is None or kept.archive_hash != base_hash or archive is None:
        return None
    b = deltabkp.SignatureBuilder(agent_block_size(kept.archive_size))
    try:
        with open(archive, "rb") as f:
            while chunk := f.read(1 << 20):
                b.feed(chunk)
    except OSError:
        return None
    raw = b.finish()
    # The index was checked; the file beside it may be another (a crash between renames).
    if Signature.parse(raw).base_hash != base_hash:
        return None
    try:
        cache.keep_signature(base_hash, raw)
    except OSError as exc:  # only a cache: this backup has its signature anyway
        log.warning("cache: could not keep the signature of %s: %s", base_hash.hex()[:16], exc)
    return raw


def _estimate_archive_size(root: str) -> int:
    """A cheap guess of the first archive's size (to pick its signature's block size)."""
    total = 0
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                for e in it:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(e.path)
                        elif e.is_file(follow_symlinks=False):
                            total += e.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue
        except OSError:
            continue
    # Source trees and logs compress about 3:1; the guess only has to be the right magnitude.
    return total // 3


def agent_block_size(archive_size: int) -> int:
    """Block size of the signatures the agent makes of its own archives (kept in its cache).

    A quarter of the engine's default (at least 256 B): these signatures never cross the
    network, so finer blocks cost only agent memory and disk (~5% of the archive at 256 B,
    ~0.3% at 4 KiB for archives of a GiB and up), while each change costs less literal
    around it.  Measured on the e2e real-tree ~1% change (635 KB archive): the delta is
    5.17% of the archive at 1 KiB blocks, 4.38% at 256 B.
    """
    return max(256, deltabkp.default_block_size(archive_size) // 4)


def _parse_server_signature(raw: bytes, base_hash: bytes, node: str, path: str) -> Signature:
    try:
        sig = Signature.parse(raw)
    except FormatError as exc:
        raise RemoteProtocolError(f"the signature sent is invalid: {exc}", node=node, path=path) from None
    if sig.base_hash != base_hash:
        raise RemoteProtocolError(
            f"the signature sent is of archive {sig.base_hash.hex()[:16]}, "
            f"not of the base {base_hash.hex()[:16]}", node=node, path=path,
        )
    return sig


def _cache_quietly(fn: Callable[..., None], root: str, h: bytes, kw: dict[str, Any]) -> None:
    # The cache only saves work later: a full disk must not fail a backup that was sent.
    try:
        fn(root, h, **kw)
    except OSError as exc:
        log.warning("cache: could not record archive %s of %s: %s", h.hex()[:16], root, exc)


def _build(
    root: str,
    exclude: tuple[str, ...],
    base_sig: Signature | None,
    estimate: int,
    hold: bool,
    send: _Handover,
    cache: AgentCache,
    layout: ArchiveIndex | None = None,
    kept_index: ArchiveIndex | None | _Unread = _UNREAD,
    phases: Phases | None = None,
    streamed: int = 0,
) -> _Built | None:
    """Worker thread: tgz → delta encoder → channel. None if stopped.

    The tgz is built incrementally from the last build of ``root`` the cache kept (the
    same bytes as a full build, reading only what changed), and kept for the next one.
    With ``layout`` (the kept build's index, which is the server's base) there is no
    rolling encoder: once built, the layout delta is made from both archives, checked by
    decoding it, and sent whole (``_NoLayout`` when it cannot be); ``streamed``: the
    layout delta's version 2 or 3 instead, made and sent as the build goes
    (``_Streaming``; version 3: answered before the archive is compressed, the answer
    handed over after the records).
    ``kept_index``: that
    index as already read for this request (not parsed again).  The new archive's own
    signature is made here only when the archive is not being kept (else
    ``_cached_signature`` makes it from the kept archive if a later backup needs it).
    ``phases``: laps from this thread while the event loop awaits it."""
    from deltabkp.archive import IncrementalBuilder

    ph = phases if phases is not None else Phases()

    last_push = time.monotonic()

    def push(data: bytes) -> None:
        nonlocal last_push
        # An empty chunk is a keep-alive: the server's patcher accepts it as no-op.
        for i in range(0, max(len(data), 1), protocol.MAX_CHUNK):
            # Waits only while every slot is taken: the network paces the build.
            send.put(data[i : i + protocol.MAX_CHUNK])
        last_push = time.monotonic()

    encoder = deltabkp.DeltaEncoder(base_sig) if base_sig is not None else None
    new_sig: deltabkp.SignatureBuilder | None = None
    pending = bytearray()
    delta_bytes = 0
    try:
        # A stopped build leaves the block by _Stopped: the kept archive stays the old one.
        with cache.kept_build(root, kept_index) as kept, contextlib.ExitStack() as stack:
            streaming = None
            if layout is not None and streamed:
                streaming = _Streaming.open(stack, kept, layout, cache, root, hold, push,
                                            streamed)
            answered: _Built | None = None
            if not kept.keeping:
                new_sig = deltabkp.SignatureBuilder(agent_block_size(max(estimate, 0)))
            # The kept archive is written by the builder's worker thread, beside its blake3
            # (off this thread: ~30 MB a build after a small change, mostly copied deflate).
            builder = IncrementalBuilder(
                root, exclude=exclude, no_links=True, previous=kept.index,
                previous_archive=kept.archive, previous_hashed=kept.hashed,
                sink=kept.write if kept.keeping else None,
                stream=streaming.streamer if streaming is not None else None,
                stream_first=streamed == LAYOUT_EARLY_VERSION,
            )
            # Closed on a stop too: its worker thread (the kept archive's writes) ends here,
            # before the kept build's temp file goes.
            with contextlib.closing(iter(builder)) as chunks:
                for chunk in chunks:
                    try:
                        trio.from_thread.check_cancelled()
                    except trio.Cancelled:
                        raise _Stopped from None
                    if new_sig is not None:
                        new_sig.feed(chunk)
                    if streaming is not None:
                        if answered is not None:
                            # Nothing more goes to the server (no keep-alive after the
                            # answer); a build that stopped reusing the base stops here.
                            if streaming.streamer.failed:
                                break
                            continue
                        streaming.pump()
                        if streaming.answer_early():
                            # The server gets ``backup-done`` now: the rest of this build
                            # (compressing, keeping) is the agent's alone.
                            answered = _walked(builder, streaming.sent)
                            send.put(answered)
                            if send.local:
                                send.wait_server(AFTER_ANSWER_WAIT_S)
                        continue
                    if encoder is None:
                        if time.monotonic() - last_push > KEEPALIVE_S:
                            hold = False
                            push(b"")
                        continue
                    pending += encoder.feed(chunk)
                    if hold and len(pending) > HOLD_LIMIT:
                        hold = False
                    if not hold and len(pending) >= FLUSH_AT:
                        cut = len(pending) - len(pending) % FLUSH_AT
                        out = bytes(pending[:cut])
                        del pending[:cut]
                        delta_bytes += len(out)
                        push(out)
                    elif time.monotonic() - last_push > KEEPALIVE_S:
                        hold = False
                        out, pending = bytes(pending), bytearray()
                        delta_bytes += len(out)
                        push(out)
            ph.lap("build" if encoder is None else "build+delta")
            if answered is not None and (streaming is None or streaming.streamer.failed
                                         or builder.stats.previous):
                # After the answer: the server's archive stands (its END checked it); this
                # one may be another (built afresh), so it is no base for the next build.
                assert streaming is not None
                cache.drop_kept(root)
                raise ArchiveError("the archive build failed after the answer: "
                                   f"{streaming.streamer.failed or builder.stats.previous}")
            kept.done(builder.index)
            ph.lap("keep")
            if streaming is not None:
                _log_build(root, builder)
                held = answered is None and streaming.end(builder)
                ph.lap("layout")
                return attrs.evolve(_built(builder, new_sig, held, streaming.sent),
                                    answered=answered is not None)
            if layout is not None:
                # The kept archive must be the base: its index names it, and the builder
                # checked the file's blake3 against that index before using it ("" = used).
                if (kept.index is None or kept.index.archive_hash != layout.archive_hash
                        or builder.stats.previous != ""):
                    raise _NoLayout(f"the kept build is not the base ({builder.stats.previous})")
                new = builder.index
                held = hold and new.archive_hash == layout.archive_hash
                _log_build(root, builder)
                if not held:
                    delta_bytes += _stream_layout(kept, kept.index, new, push, cache, root,
                                                  builder.handover)
                    ph.lap("layout")
                return _built(builder, new_sig, held, delta_bytes)
        assert encoder is not None and base_sig is not None
        pending += encoder.finish()
        held = hold
        if not (held and encoder.new_hash == base_sig.base_hash):
            if pending:
                delta_bytes += len(pending)
                push(bytes(pending))
            held = False
    except _Stopped:
        return None
    report = builder.report
    _log_build(root, builder)
    return _Built(
        archive_hash=encoder.new_hash,
        archive_size=encoder.new_size,
        files=int(report.files),
        changed=tuple((str(i.path), str(i.what)) for i in report.changed),
        skipped=tuple((str(i.path), str(i.what)) for i in report.skipped),
        signature=new_sig.finish() if new_sig is not None else None,
        held=held,
        delta_bytes=delta_bytes,
    )


def _walked(builder: Any, delta_bytes: int) -> _Built:
    """The answer of a build whose layout delta went before its archive was compressed:
    what its walk saw, no archive size nor blake3 (the server's rebuild has them)."""
    report = builder.walked
    return _Built(
        archive_hash=b"", archive_size=0, files=int(report.files),
        changed=tuple((str(i.path), str(i.what)) for i in report.changed),
        skipped=tuple((str(i.path), str(i.what)) for i in report.skipped),
        signature=None, held=False, delta_bytes=delta_bytes, answered=True,
    )


def _built(builder: Any, new_sig: deltabkp.SignatureBuilder | None, held: bool,
           delta_bytes: int) -> _Built:
    """What a build that made a layout delta (or held it back) tells the answer."""
    new, report = builder.index, builder.report
    return _Built(
        archive_hash=new.archive_hash, archive_size=new.archive_size, files=int(report.files),
        changed=tuple((str(i.path), str(i.what)) for i in report.changed),
        skipped=tuple((str(i.path), str(i.what)) for i in report.skipped),
        signature=new_sig.finish() if new_sig is not None else None, held=held,
        delta_bytes=delta_bytes,
    )


class _Streaming:
    """The layout delta's version 2 (``archive.LayoutStreamer``) as the build goes: records
    pushed as they are made (``FLUSH_AT`` bytes or ``STREAM_S`` seconds, whichever first),
    held back while the new archive might still be the base (``hold``: until the streamer
    sees a change — a RUN of other than the old tar at its own place —, ``HOLD_LIMIT``
    bytes, or a keep-alive due: as the rolling delta, a keep-alive gives the hold up), so
    an unchanged build is answered ``unchanged (hash)``; an empty keep-alive every
    ``KEEPALIVE_S`` while nothing else goes.  The build stops as soon as the streamer
    fails (the previous archive not reused, or given up midway): before anything went
    out, ``_NoLayout`` (the rolling delta follows, as if the form had not been offered);
    after, the backup fails and the kept build is dropped (the next backup is a full
    build and a rolling delta, not the same failure again)."""

    def __init__(self, streamer: LayoutStreamer, hold: bool, push: Callable[[bytes], None],
                 cache: AgentCache, root: str) -> None:
        self.streamer = streamer
        self.base_hash = streamer.oi.archive_hash
        self.hold = hold
        self._push = push
        self._cache, self._root = cache, root
        self.sent = 0
        self._chunks = 0  # delta-chunks pushed, keep-alives included
        self._pending = [streamer.header()]
        self._size = len(self._pending[0])
        self._due = time.monotonic() + STREAM_S
        self._alive = time.monotonic()

    @classmethod
    def open(cls, stack: contextlib.ExitStack, kept: KeptBuild, layout: ArchiveIndex,
             cache: AgentCache, root: str, hold: bool, push: Callable[[bytes], None],
             version: int = LAYOUT_STREAM_VERSION) -> _Streaming:
        """Map the kept archive (the server's base: its index names it) for the build."""
        if kept.index is None or kept.archive is None or \
                kept.index.archive_hash != layout.archive_hash:
            raise _NoLayout("the kept build is not the base")
        try:
            old = stack.enter_context(mapped(stack.enter_context(open(kept.archive, "rb"))))
            streamer = LayoutStreamer(kept.index, old, seek=cache.kept_seek(root, kept.index),
                                      version=version)
        except (OSError, ValueError, DeltabkpError) as exc:
            raise _NoLayout(str(exc)) from None
        # Its views of the mapping go before the mapping closes (the stack's last exit).
        stack.callback(streamer.close)
        return cls(streamer, hold, push, cache, root)

    def pump(self) -> None:
        """After a chunk of the build: push what is ready."""
        try:
            got = self.streamer.take()
        except (ValueError, DeltabkpError) as exc:
            self._failed(str(exc))
        if self.streamer.failed:
            self._failed(self.streamer.failed)
        for r in got:
            self._pending.append(r)
            self._size += len(r)
        if self.hold and (self.streamer.changed or self._size > HOLD_LIMIT):
            self.hold = False
        now = time.monotonic()
        if now - self._alive > KEEPALIVE_S:
            self.hold = False  # the server hears from us now, so "unchanged" is out
            self._flush()
        elif not self.hold and self._pending and (self._size >= FLUSH_AT or now >= self._due):
            self._flush()

    def answer_early(self) -> bool:
        """Version 3: once the build told the streamer everything, and a change was seen
        (else the archive may still be the base: ``end`` decides, once built), push the
        last records and END; True when the answer may go."""
        st = self.streamer
        if st.version != LAYOUT_EARLY_VERSION or not st.told_all or self.hold or st.failed:
            return False
        try:
            self._pending += st.end()
        except (ValueError, DeltabkpError) as exc:
            self._failed(str(exc))
        self._flush()
        return True

    def end(self, builder: Any) -> bool:
        """Once built: the last records; whether the archive is the base and nothing went."""
        st = self.streamer
        why = st.failed or builder.stats.previous
        if why:
            self._failed(why)
        new = builder.index
        try:
            tail = (st.end() if st.version == LAYOUT_EARLY_VERSION
                    else st.end(new.archive_size, new.archive_hash))
        except (ValueError, DeltabkpError) as exc:
            self._failed(str(exc))
        if self.hold and new.archive_hash == self.base_hash:
            return True
        self._pending += tail
        self._flush()
        return False

    def _failed(self, why: str) -> NoReturn:
        if not self._chunks:
            raise _NoLayout(why)
        self._cache.drop_kept(self._root)
        raise ArchiveError(f"the layout delta failed after {self.sent} bytes: {why}")

    def _flush(self) -> None:
        out = b"".join(self._pending)
        self._pending, self._size = [], 0
        self.sent += len(out)
        self._chunks += 1
        self._push(out)
        self._alive = time.monotonic()
        self._due = self._alive + STREAM_S


def _log_build(root: str, builder: Any) -> None:
    stats = builder.stats
    how = "incremental" if not stats.previous else f"full build; previous build: {stats.previous}"
    if stats.old_failed:  # the kept archive failed under a changed file: it may be going bad
        how += f"; a changed file compressed anew: {stats.old_failed}"
    log.info(
        "archive of %s: %d of %d entries reused, %d files read (%s); %.1f MB of tar "
        "compressed, %.1f MB of deflate copied", root, stats.entries_reused,
        len(builder.index.entries), stats.files_opened, how,
        stats.bytes_compressed / 1e6, stats.bytes_copied / 1e6,
    )


def _stream_layout(
    kept: KeptBuild, old: ArchiveIndex, new: ArchiveIndex, push: Callable[[bytes], None],
    cache: AgentCache, root: str, fresh: BuildHandover | None = None,
) -> int:
    """Send the layout delta from the kept archive (the server's base) to the one just
    built, as it is made (``FLUSH_AT`` bytes or ``STREAM_S`` seconds, whichever comes first),
    so the server decodes while the agent encodes; the bytes sent.

    The encoder checks what it makes (every COPY is of equal bytes, every RUN compresses
    back to the new archive's bytes).  A failure before the first byte is ``_NoLayout``
    (the rolling delta follows); after it, the backup fails and the kept build is dropped,
    so the next backup does not make the same delta (it is a rolling one, from a full build).
    """
    from deltabkp.archive import encode_layout

    if kept.archive is None or (new_file := kept.reopen()) is None:
        raise _NoLayout("this build's archive is not being kept")
    sent = 0
    pending: list[bytes] = []
    size = 0
    due = time.monotonic() + STREAM_S
    try:
        with open(kept.archive, "rb") as old_file, new_file, \
                mapped(old_file) as old_buf, mapped(new_file) as new_buf:
            # The kept archive's seek points (if made, and its own): old tar bytes are
            # inflated around the change only; the same delta either way.
            # ``fresh``: what the build just did (the tar it compressed, each job's window,
            # the segments it copied), so the encoder inflates neither the new archive nor
            # the old one from a seek point far back, nor compares what was copied (the
            # same delta).
            records = encode_layout(old, old_buf, new, new_buf, seek=cache.kept_seek(root, old),
                                    fresh=fresh)
            try:
                # The header and the first record (usually the leading COPY, out before the
                # encoder's plan) go at once: the server opens its base and starts copying
                # while the plan is made, instead of waiting ``STREAM_S`` for them.
                for k, record in enumerate(records):
                    pending.append(record)
                    size += len(record)
                    if size >= FLUSH_AT or k < 2 or time.monotonic() >= due:
                        out = b"".join(pending)
                        pending, size = [], 0
                        sent += len(out)
                        push(out)
                        due = time.monotonic() + STREAM_S
            finally:
                records.close()  # it holds views of the mmaps, which must go first
                del records
        out = b"".join(pending)
        sent += len(out)
        push(out)
    except (OSError, ValueError, DeltabkpError) as exc:
        if not sent:
            raise _NoLayout(str(exc)) from None
        cache.drop_kept(root)
        raise ArchiveError(f"the layout delta failed after {sent} bytes: {exc}") from None
    return sent


# -- event loop side --------------------------------------------------------------------------


def _server_stopped(msg: protocol.Message, node: str, path: str) -> ServerStopped:
    if isinstance(msg, protocol.Error):
        return ServerStopped(
            f"the server ended the backup ({msg.code}: {msg.message})", node=node, path=path
        )
    return ServerStopped("the server cancelled the backup", node=node, path=path)


async def _receive_signature(chan: net.Channel, ctx: BackupContext, path: str) -> bytes:
    buf = bytearray()
    while True:
        msg = await chan.receive(timeout=SIG_CHUNK_TIMEOUT, raise_errors=False)
        if isinstance(msg, protocol.SignatureEnd):
            return bytes(buf)
        if isinstance(msg, (protocol.Cancel, protocol.Error)):
            raise _server_stopped(msg, ctx.node, path)
        assert isinstance(msg, protocol.SignatureChunk)  # the conversation allows nothing else
        buf += msg.data
        if len(buf) > ctx.max_signature:
            raise RequestRefused(
                ErrorCode.REFUSED,
                f"the signature exceeds the agent's limit of {ctx.max_signature} bytes "
                "(--max-signature-mb)", node=ctx.node, path=path,
            )


@attrs.define
class _Box:
    built: _Built | None = None
    error: BaseException | None = None
    aborted: str | None = None
    stopped_by_server: ServerStopped | None = None
    chunks: int = 0  # delta-chunks sent (keep-alives included)
    answered: _Built | None = None  # backup-done sent before the build ended
    refused: ServerStopped | None = None  # the server's cancel or error after that answer


async def _stream_delta(
    ctx: BackupContext,
    chan: net.Channel,
    path: str,
    root: str,
    exclude: tuple[str, ...],
    base_sig: Signature | None,
    estimate: int,
    hold: bool,
    kept_index: ArchiveIndex | None | _Unread = _UNREAD,
    *,
    layout: ArchiveIndex | None = None,
    streamed: int = 0,
    phases: Phases | None = None,
) -> _Built:
    send, receive = trio.open_memory_channel[bytes | _Built](CHANNEL_SLOTS)
    handover = _Handover(send)
    handover.local = _server_here(chan)
    box = _Box()

    async def produce() -> None:
        async with send:
            try:
                box.built = await trio.to_thread.run_sync(
                    _build, root, exclude, base_sig, estimate, hold, handover, ctx.cache, layout,
                    kept_index, phases, streamed, limiter=ctx.limiter,
                )
            except Exception as exc:  # reported to the server below; a bug is logged there
                box.error = exc

    async def watch_peer(scope: trio.CancelScope) -> None:
        # The server says nothing during the stream; anything it does say (cancel, an error,
        # a hang-up) ends this backup, until it has its answer: it then hangs up once it
        # stored the archive, which lets this build (still to compress) go on at once.
        try:
            msg = await chan.receive(timeout=None, raise_errors=False)
            if box.answered is None:
                if isinstance(msg, (protocol.Cancel, protocol.Error)):
                    box.stopped_by_server = _server_stopped(msg, ctx.node, path)
                box.aborted = f"server sent {msg.TYPE} during the stream"
            elif isinstance(msg, (protocol.Cancel, protocol.Error)):
                # It did not store the archive (its check or its commit failed).
                box.refused = _server_stopped(msg, ctx.node, path)
        except DeltabkpError as exc:
            if box.answered is None:
                box.aborted = str(exc)
        if box.answered is not None:
            handover.server_done.set()
            return
        scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce)
        nursery.start_soon(watch_peer, nursery.cancel_scope)
        try:
            async with receive:
                async for piece in receive:
                    handover.taken()
                    if box.answered is not None:
                        continue  # (nothing comes after the answer; never sent if it did)
                    if box.aborted is not None:
                        # The watcher saw the server go (or speak) in the same scheduler
                        # batch that brought this piece: nothing more goes.
                        break
                    if isinstance(piece, _Built):  # the last delta chunk went before it
                        box.answered = piece  # (first: the server may hang up at once)
                        try:
                            await chan.send(protocol.BackupDone(
                                piece.archive_hash, piece.archive_size, piece.files,
                                piece.changed, piece.skipped))
                        except BaseException:
                            box.answered = None
                            raise
                        continue
                    box.chunks += 1
                    # A server that stops reading is dropped by the send deadline
                    # (PeerUnavailable); caught here, or it would leave as an ExceptionGroup.
                    await chan.send(protocol.DeltaChunk(piece))
        except PeerUnavailable as exc:
            if box.aborted is None:
                box.aborted = str(exc)
        finally:
            handover.close()  # the build stops at its next chunk, if it still runs
        nursery.cancel_scope.cancel()  # the stream is done (or dead): stop watching

    if box.answered is not None:
        if box.refused is not None:
            # The server did not store it: the kept build stays a base for the next build
            # (not the server's: that backup makes a rolling delta), nothing is cached.
            raise box.refused
        if box.built is not None:
            return box.built
        # Answered; the kept build was lost after (logged): the server has its archive.
        if box.error is not None:
            log.warning("backup of %s: answered, but the archive's own build then failed "
                        "(the next build is a full one): %s", path, box.error)
        return box.answered
    if box.stopped_by_server is not None:
        raise box.stopped_by_server
    if box.aborted is not None:
        raise PeerUnavailable(f"backup abandoned: {box.aborted}", node=ctx.node, path=path)
    if box.error is not None:
        if isinstance(box.error, _NoLayout):
            box.error.after_chunks = box.chunks > 0
        raise box.error
    if box.built is None:  # stopped without the peer going away: we are being cancelled
        await trio.lowlevel.checkpoint()
        raise PeerUnavailable("backup stopped", node=ctx.node, path=path)
    return box.built


def _server_here(chan: net.Channel) -> bool:
    """The server speaks from this host's loopback (``AFTER_ANSWER_WAIT_S``)."""
    try:
        return net.is_loopback(net.Address.parse(chan.peer).host)
    except DeltabkpError:
        return False


def describe_failure(exc: BaseException) -> tuple[ErrorCode, str]:
    """(code, reason) of the ``error`` sent to the server when a build fails; the server
    knows which node and path it asked about."""
    if isinstance(exc, RequestRefused) and isinstance(exc.code, ErrorCode):
        return exc.code, exc.reason
    if isinstance(exc, ArchiveError):
        return ErrorCode.FAILED, f"archiving failed: {exc.reason}"
    if isinstance(exc, DeltabkpError):
        return ErrorCode.FAILED, f"backup failed: {exc.reason}"
    return ErrorCode.INTERNAL, f"internal error of the agent during the backup: {exc!r}"
