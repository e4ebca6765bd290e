"""deltabkp: rsync-style delta sync of archives, as a sans-I/O library.

The public API is ``__all__``; every other module is private.
"""

from __future__ import annotations

from deltabkp import archive, engine, errors, rdiff
from deltabkp.archive import *  # noqa: F403
from deltabkp.engine import *  # noqa: F403
from deltabkp.errors import *  # noqa: F403

__version__ = "0.1.0"

# ``rdiff`` (librsync formats) stays a namespace: its names mirror the engine's.
__all__ = ["__version__", "rdiff", *errors.__all__, *engine.__all__, *archive.__all__]
