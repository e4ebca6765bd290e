"""deltabkp: rsync-style delta sync of archives, as a sans-I/O library.

The public API is ``__all__``; every other module is private.

``import deltabkp`` is cheap: the error tree is imported at once, the engine's and the
archive's names (numpy, zlib workers) on first use (PEP 562 ``__getattr__``), so that a
``deltabkp ctl`` command or a daemon's start-up pays only for what it touches.  Type checkers
and the API docs see every name through the ``TYPE_CHECKING`` imports; ``_ENGINE_NAMES`` and
``_ARCHIVE_NAMES`` must be exactly ``engine.__all__`` and ``archive.__all__``
(tests/test_package.py checks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deltabkp import errors
from deltabkp._lazy import lazy_attributes
from deltabkp.errors import *  # noqa: F403

__version__ = "0.1.0"

#: The engine's and the archive's public names (their ``__all__``), imported on first use.
_ENGINE_NAMES = (
    "DeltaEncoder", "Patcher", "Signature", "SignatureBuilder", "default_block_size", "delta",
    "patch", "signature",
)
_ARCHIVE_NAMES = (
    "LAYOUT_EARLY_VERSION", "LAYOUT_MAGIC", "LAYOUT_STREAM_VERSION", "LAYOUT_VERSION",
    "ArchiveIndex", "ArchiveReport", "BuildHandover", "ExtractReport", "FileIssue", "Fingerprint",
    "IncrementalBuilder", "IncrementalStats", "LayoutPatcher", "LayoutStreamer", "SeekPoints",
    "TgzBuilder", "build_archive", "check_destination",
    "encode_layout", "extract_archive", "layout_capabilities", "layout_capability",
    "tree_fingerprint",
)
_LAZY = {**dict.fromkeys(_ENGINE_NAMES, "deltabkp.engine"),
         **dict.fromkeys(_ARCHIVE_NAMES, "deltabkp.archive")}
#: Subpackages reachable as attributes before anyone imported them.
_SUBMODULES = ("archive", "engine", "rdiff")

if TYPE_CHECKING:
    from deltabkp import archive, engine, rdiff
    from deltabkp.archive import *  # noqa: F403
    from deltabkp.engine import *  # noqa: F403

    # ``rdiff`` (librsync formats) stays a namespace: its names mirror the engine's.
    __all__ = ["__version__", "rdiff"]
    __all__ += errors.__all__
    __all__ += engine.__all__
    __all__ += archive.__all__
else:
    __all__ = ["__version__", "rdiff", *errors.__all__, *_ENGINE_NAMES, *_ARCHIVE_NAMES]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, _SUBMODULES)
