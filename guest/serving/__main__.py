"""``python -m guest.serving serve …``: the resident model server (guest/serving/server.py)."""

from guest.serving.server import main

raise SystemExit(main())
