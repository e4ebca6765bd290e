import sys

from deltabkp.cli import main

sys.exit(main())
