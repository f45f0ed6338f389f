"""``PYTHONPATH=tests python -m framework.devhost``: see ``framework.devhost.main``."""

from framework.devhost import main

raise SystemExit(main())
