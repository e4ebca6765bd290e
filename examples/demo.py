"""The README's main demo: sync a changed archive with the delta engine, print the bytes saved.

    python examples/demo.py

(For now this runs the engine example, ``examples/engine_demo.py``; see there.)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
