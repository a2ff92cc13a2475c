"""``python -m sync``: the same as ``python -m sync.server`` (the server stub)."""

from sync.server import main

raise SystemExit(main())
