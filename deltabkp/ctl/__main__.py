"""``python -m deltabkp.ctl`` is ``deltabkp ctl``."""

import sys

from deltabkp.ctl import main

sys.exit(main())
