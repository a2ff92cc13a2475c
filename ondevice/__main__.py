"""``python -m ondevice``: the ``ondevice`` command (see :mod:`ondevice.cli`)."""

from ondevice.cli import main

raise SystemExit(main())
