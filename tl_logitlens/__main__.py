"""``python -m tl_logitlens``: the same command line as ``tl-logitlens``."""

import sys

from .cli import main

sys.exit(main())
