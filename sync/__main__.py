"""``python -m ondevice_sync``: the same as ``python -m ondevice_sync.server`` (the server stub)."""

from ondevice_sync.server import main

raise SystemExit(main())
