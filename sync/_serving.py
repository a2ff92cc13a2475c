"""The life cycle shared by the sync server and the OHTTP relay: serve from a background
thread or from the caller's, stop, close once, and be a context manager."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Protocol, Self

__all__ = ["Serving", "serve_until_signalled"]


class _Loop(Protocol):
    def serve_forever(self, poll_interval: float = ...) -> None: ...

    def shutdown(self) -> None: ...

    def server_close(self) -> None: ...


class Serving:
    """Mixin over a socketserver-like loop returned by :meth:`_loop`.

    Subclasses set ``self._thread = None`` and ``self._closed = False`` in ``__init__``,
    return their loop from :meth:`_loop`, name the background thread with
    :attr:`_thread_name`, and release what else they hold in :meth:`_release`.
    """

    _thread: threading.Thread | None
    _closed: bool
    _thread_name = "serving"

    def _loop(self) -> _Loop:
        raise NotImplementedError

    def _release(self) -> None:
        """Release what the subclass holds besides the loop (called once, last)."""

    def start(self) -> Self:
        """Serve from a background daemon thread; returns ``self``."""
        self._thread = threading.Thread(
            target=self._loop().serve_forever,
            kwargs={"poll_interval": 0.05},
            name=self._thread_name,
            daemon=True,
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve from the calling thread until :meth:`shutdown` is called elsewhere."""
        self._loop().serve_forever()

    def shutdown(self) -> None:
        """Stop serving (call from another thread than ``serve_forever``)."""
        self._loop().shutdown()

    def close(self) -> None:
        """Stop serving, release the port and whatever else is held (idempotent)."""
        if self._closed:
            return
        self._closed = True
        loop = self._loop()
        if self._thread is not None:
            loop.shutdown()
            self._thread.join()
        loop.server_close()
        self._release()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def serve_until_signalled(serving: Serving, *, port: int, ready_file: Path | None) -> None:
    """A command line's serving loop: stop cleanly on SIGTERM or SIGINT, write the bound
    ``port`` to ``ready_file`` (atomically) once listening, serve, then close."""

    def _stop(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=serving.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if ready_file is not None:
        partial = ready_file.with_name(ready_file.name + ".partial")
        partial.write_text(f"{port}\n")
        partial.replace(ready_file)
    try:
        serving.serve_forever()
    finally:
        serving.close()
