"""``python -m hvctl.devhost``: see ``hvctl.devhost.main``."""

from hvctl.devhost import main

raise SystemExit(main())
