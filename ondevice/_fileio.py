"""Opening files an attacker may have replaced with something that is not a file."""

from __future__ import annotations

import os
import stat
from typing import BinaryIO


class NotARegularFileError(OSError):
    """The path names a FIFO, a device, a socket or a directory, not a regular file."""


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """Open ``path`` for unbuffered binary reading, refusing anything but a regular file.

    The open itself does not block (``O_NONBLOCK``: a FIFO with no writer would otherwise
    wait forever), and the check is made on the opened descriptor (``fstat``), so a path
    swapped between a check and the open cannot slip through. Symbolic links are followed.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotARegularFileError(f"{os.fspath(path)!r} is not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise
