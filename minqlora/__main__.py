"""`python -m minqlora ...`: the same command as the `minqlora` console script (cli.py)."""

import sys

from .cli import main

sys.exit(main())
