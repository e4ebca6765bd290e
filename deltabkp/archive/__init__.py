"""The archive: deterministic, rsyncable, hot-safe tgz of a live directory; quick check; restore.

``TgzBuilder`` / ``build_archive`` write the tgz (docs/formats.md "Archive"),
``tree_fingerprint`` answers "unchanged?" from metadata alone, ``extract_archive`` restores
faithfully, safely and all or nothing.  ``IncrementalBuilder`` makes the same bytes as
``TgzBuilder`` from the previous build's ``ArchiveIndex`` and archive, reading only what
changed (and hands over the tar it compressed, ``BuildHandover``); ``encode_layout`` /
``LayoutPatcher`` describe the next archive by the layout of the previous one (the layout
delta), inflating it only around what changed given its ``SeekPoints``; ``LayoutStreamer``
makes it while an ``IncrementalBuilder`` builds (versions 2 and 3).  Invariants are stated
in each private module.
"""

from __future__ import annotations

from deltabkp.archive._build import ArchiveReport, FileIssue, TgzBuilder, build_archive
from deltabkp.archive._extract import ExtractReport, check_destination, extract_archive
from deltabkp.archive._incremental import (
    ArchiveIndex,
    BuildHandover,
    IncrementalBuilder,
    IncrementalStats,
)
from deltabkp.archive._layout import (
    LAYOUT_EARLY_VERSION,
    LAYOUT_MAGIC,
    LAYOUT_STREAM_VERSION,
    LAYOUT_VERSION,
    LayoutPatcher,
    LayoutStreamer,
    encode_layout,
    layout_capabilities,
    layout_capability,
)
from deltabkp.archive._seek import SeekPoints
from deltabkp.archive._walk import Fingerprint, tree_fingerprint

__all__ = [
    "LAYOUT_EARLY_VERSION",
    "LAYOUT_MAGIC",
    "LAYOUT_STREAM_VERSION",
    "LAYOUT_VERSION",
    "ArchiveIndex",
    "ArchiveReport",
    "BuildHandover",
    "ExtractReport",
    "FileIssue",
    "Fingerprint",
    "IncrementalBuilder",
    "IncrementalStats",
    "LayoutPatcher",
    "LayoutStreamer",
    "SeekPoints",
    "TgzBuilder",
    "build_archive",
    "check_destination",
    "encode_layout",
    "extract_archive",
    "layout_capabilities",
    "layout_capability",
    "tree_fingerprint",
]
