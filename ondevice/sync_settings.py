"""Settings and outcomes of segment reporting (``PersonalizationEngine.sync``).

Reporting is opt-in: an engine without :class:`SyncSettings` never touches the network.
What leaves the device is exactly one message per local user and epoch (ISO week): the
protocol version, the epoch, and a segment ID randomized on the device with k-ary
randomized response at ``epsilon`` (see :mod:`sync.privacy` for why ``ln 3``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import InvalidInputError

__all__ = ["SyncOutcome", "SyncSettings"]

_LN3 = math.log(3)


@dataclass(frozen=True, slots=True)
class SyncSettings:
    """Where and how to report the segment.

    ``server_url``: the base URL of the sync server (or of an Oblivious HTTP relay in
    front of it: any base URL works, no code change). ``epsilon``: local differential
    privacy of one report (default ln 3: the true segment is reported with probability
    ``3 / (K + 2)``). ``budget_cap`` and ``budget_period_days``: the most epsilon spent
    in any rolling period (default 5 ln 3 over 28 days: at most five weekly reports
    even if epochs were shorter). ``timeout``: seconds per request. ``transport``: a
    :class:`sync.client.Transport` (tests pass an in-process one); None means HTTP.
    """

    server_url: str
    epsilon: float = _LN3
    budget_cap: float = 5 * _LN3
    budget_period_days: float = 28.0
    timeout: float = 5.0
    transport: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.server_url, str) or not self.server_url.startswith(
            ("http://", "https://")
        ):
            raise InvalidInputError("server_url must be an http:// or https:// URL")
        for name in ("epsilon", "budget_cap", "budget_period_days", "timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidInputError(f"{name} must be a number")
            if not math.isfinite(value) or value <= 0:
                raise InvalidInputError(f"{name} must be positive and finite")
        if self.epsilon > self.budget_cap:
            raise InvalidInputError("epsilon must not exceed budget_cap")
        if self.budget_period_days > 365:
            # The budget ledger is kept a year: a longer period could not be enforced.
            raise InvalidInputError("budget_period_days must be at most 365")


@dataclass(frozen=True, slots=True)
class SyncOutcome:
    """What :meth:`~ondevice.PersonalizationEngine.sync` did for one user.

    ``status`` is one of ``sent`` (the server counted the report), ``already_sent``
    (this epoch's report was sent before: nothing sent now), ``failed`` (logged, not
    delivered; retried by a later ``sync`` after ``retry_at``), ``waiting`` (a failed
    report whose retry time has not come), ``skipped`` (nothing to report, or level
    ``none``: nothing sent). ``body`` is the exact bytes that left (or would leave).
    """

    user_id: str
    status: str
    epoch: str | None = None
    body: str | None = None
    epsilon: float | None = None
    answer: str | None = None
    retry_at: float | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "user_id": self.user_id,
            "status": self.status,
            "epoch": self.epoch,
            "body": self.body,
            "epsilon": self.epsilon,
            "answer": self.answer,
            "retry_at": self.retry_at,
            "reason": self.reason,
        }
