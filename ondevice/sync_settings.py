"""Settings and outcomes of segment reporting (``PersonalizationEngine.sync``).

Reporting is opt-in: an engine without :class:`SyncSettings` never touches the network.
What leaves the device is at most one message per local user and epoch (ISO week): the
protocol version, the epoch, and a segment ID randomized on the device in two layers
(:mod:`ondevice_sync.privacy`): a memo drawn once per true segment at ``epsilon_inf``, then a
fresh randomization of the memo at ``epsilon_1`` for every report. Each report leaves
at its own random moment of the week, on its own connection (:mod:`ondevice.reporting`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Literal

from .errors import InvalidInputError

__all__ = ["SyncOutcome", "SyncSettings"]

_LN3 = math.log(3)


@dataclass(frozen=True, slots=True)
class SyncSettings:
    """Where and how to report the segment.

    ``server_url``
        The base URL of the sync server, or of a forwarding proxy in front of it.
    ``epsilon_inf``
        Lifetime bound for an unchanged segment: the memo of each true segment is drawn
        once with this epsilon (default ln 3). However many reports a server links, it
        learns no more than this about a segment the user keeps.
    ``epsilon_1``
        What one report reveals about the memo (default ln 9 = 2 ln 3): the fresh
        second layer that keeps the memo from being sent verbatim.
    ``lifetime_cap``
        The most epsilon that new memos may spend in any 365 days (default 4 ln 3: four
        segment changes a year get a fresh memo).
    ``when_spent``
        What happens when the segment changes and no new memo fits the cap:
        ``"repeat"`` (the default) keeps reporting fresh randomizations of the last
        memo, which reveals nothing new and keeps the weekly report looking like any
        other (a user with no memo at all, after ``wipe_profile``, level ``none`` or a
        catalog with another number of segments, sends nothing); ``"skip"`` sends
        nothing for that user until a memo fits, so a week without a report can tell a
        server that links the device's reports that its segment changed.
    ``schedule``
        True (the default): each report leaves at an independent random moment of its
        week, drawn when the week's report is first asked for; ``sync()`` sends only what
        is due. False sends at the first ``sync()`` of the week (demos, tests).
    ``min_gap``
        Seconds that separate two reports of this profile (several local users), with or
        without ``schedule``: a report due sooner after another is pushed back to a
        random moment ``min_gap`` to ``2 * min_gap`` after it (default one hour), so
        reports of one device never leave back to back.
    ``timeout``
        Seconds per request (at most 300).
    ``transport``
        A :class:`ondevice_sync.client.Transport`: for example an
        :class:`ondevice_sync.ohttp.OhttpTransport` (Oblivious HTTP through a relay), or an
        in-process one in tests. None means plain HTTP(S) to ``server_url``.
    ``rng``
        A :class:`random.Random` for the memo, report and schedule draws: tests only.
        None (the default) uses the operating system's CSPRNG.
    """

    server_url: str
    epsilon_inf: float = _LN3
    epsilon_1: float = 2 * _LN3
    lifetime_cap: float = 4 * _LN3
    when_spent: Literal["repeat", "skip"] = "repeat"
    schedule: bool = True
    min_gap: float = 3600.0
    timeout: float = 5.0
    transport: Any = None
    rng: random.Random | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.server_url, str) or not self.server_url.startswith(
            ("http://", "https://")
        ):
            raise InvalidInputError("server_url must be an http:// or https:// URL")
        for name in ("epsilon_inf", "epsilon_1", "lifetime_cap", "timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidInputError(f"{name} must be a number")
            if not math.isfinite(value) or value <= 0:
                raise InvalidInputError(f"{name} must be positive and finite")
        for name in ("epsilon_inf", "epsilon_1"):
            if getattr(self, name) > 20.0:
                raise InvalidInputError(f"{name} must be at most 20")
        if self.timeout > 300:
            raise InvalidInputError("timeout must be at most 300 seconds")
        if self.transport is not None and not callable(getattr(self.transport, "request", None)):
            raise InvalidInputError(
                "transport must have a request(method, url, headers, body, timeout) method"
            )
        if self.epsilon_inf > self.lifetime_cap:
            raise InvalidInputError("epsilon_inf must not exceed lifetime_cap")
        if self.when_spent not in ("repeat", "skip"):
            raise InvalidInputError("when_spent must be 'repeat' or 'skip'")
        if not isinstance(self.schedule, bool):
            raise InvalidInputError("schedule must be True or False")
        gap = self.min_gap
        if isinstance(gap, bool) or not isinstance(gap, int | float):
            raise InvalidInputError("min_gap must be a number of seconds")
        if not math.isfinite(gap) or not 0 <= gap <= 86400:
            raise InvalidInputError("min_gap must be between 0 and 86400 seconds")
        if self.rng is not None and not isinstance(self.rng, random.Random):
            raise InvalidInputError("rng must be a random.Random (tests only) or None")


@dataclass(frozen=True, slots=True)
class SyncOutcome:
    """What :meth:`~ondevice.PersonalizationEngine.sync` did for one user.

    ``status`` is one of:

    - ``sent``: the server counted the report;
    - ``scheduled``: this week's report leaves at ``retry_at`` (a random moment of the
      week, or pushed back so that two reports of this device never leave back to back);
      nothing sent now;
    - ``already_sent``: this week's report went before, or a later week was already
      reported (the clock went back): nothing sent now;
    - ``failed``: logged, not delivered; resent (the same bytes) by a ``sync`` after
      ``retry_at``;
    - ``waiting``: a failed report whose retry time has not come, or another engine on
      this profile is sending right now;
    - ``refused``: the server refused the report (not retried);
    - ``skipped``: nothing to report (level ``none``, no segment yet, or the lifetime
      budget is spent with ``when_spent="skip"``, or with ``"repeat"`` when the user
      holds no memo to repeat); nothing sent;
    - ``error`` (from :meth:`~ondevice.PersonalizationEngine.sync_due` only): this
      user's report raised SyncError, given in ``reason``; the other users were served.

    ``user_id`` is the local user; ``epoch`` the ISO week of the report
    (``"2026-W48"``). ``body`` is the exact bytes that left (or will leave).
    ``answer`` is what the egress log keeps of the server's answer (a status code and
    ``counted`` or ``refused``, or an error class for a failed send); ``retry_at`` when
    a scheduled or failed report goes next (Unix seconds). ``epsilon_inf`` and
    ``epsilon_1`` are the two layers' epsilons; ``spent`` is the lifetime epsilon this
    report used (``epsilon_inf`` when it drew a new memo, else 0). ``reason`` says why
    in words (for example that the budget is spent and the last memo was reused).
    """

    user_id: str
    status: str
    epoch: str | None = None
    body: str | None = None
    epsilon_inf: float | None = None
    epsilon_1: float | None = None
    spent: float | None = None
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
            "epsilon_inf": self.epsilon_inf,
            "epsilon_1": self.epsilon_1,
            "spent": self.spent,
            "answer": self.answer,
            "retry_at": self.retry_at,
            "reason": self.reason,
        }
