"""`python -m hvctl.cli`."""

import os

from hvctl.cli import main

os.environ.setdefault("COLUMNS", "120")
main()
