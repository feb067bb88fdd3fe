"""`python -m cli ...`: the `tmc` command (the same as the console script)."""

import sys

from cli.main import main

sys.exit(main())
