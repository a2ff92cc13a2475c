"""Helpers shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

import time
from typing import Any


class TimedConnection:
    """Wraps a database connection and adds up the time of every statement, keyed by
    its SQL (``many:`` marks ``executemany``); used by the ``--breakdown`` options."""

    def __init__(self, conn: Any, totals: dict[str, list[float]]) -> None:
        self._conn = conn
        self._totals = totals

    def _timed(self, method: str, sql: str, *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return getattr(self._conn, method)(sql, *args)
        finally:
            key = ("many: " if method == "executemany" else "") + " ".join(sql.split())
            self._totals[key[:96]].append(time.perf_counter() - t0)

    def execute(self, sql: str, *args: Any) -> Any:
        return self._timed("execute", sql, *args)

    def executemany(self, sql: str, *args: Any) -> Any:
        return self._timed("executemany", sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)
