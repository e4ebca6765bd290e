"""``python -m deltabkp`` is the ``deltabkp`` command."""

import sys

from deltabkp.cli import main

sys.exit(main())
