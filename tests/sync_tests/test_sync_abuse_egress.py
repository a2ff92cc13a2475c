"""Nothing a server writes reaches the engine's egress log or its export (issue 10,
item 13): the log keeps "<status> counted", "<status> refused" or an error class name.

The engine here reports through a transport that answers like a hostile server: JSON
fields full of markup, control characters and a phone number, oversize answers.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from ondevice import SyncSettings
from ondevice_sync.client import MAX_REPORT_ANSWER_SIZE, Response

MARK = "call-555-0100"
HOSTILE = f"<script>alert(1)</script>\r\n\x1b[2J{MARK}\x00"
WEEK = 7 * 86400.0


class HostileServer:
    """Answers each report with the next of ``answers`` (status, body)."""

    def __init__(self, answers: list[tuple[int, bytes]]) -> None:
        self.answers = answers

    def request(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes, timeout: float
    ) -> Response:
        status, answer = self.answers.pop(0)
        return Response(status, {"content-type": "application/json", "x-note": HOSTILE}, answer)


def hostile(code: int, **fields: Any) -> tuple[int, bytes]:
    return code, json.dumps(fields).encode()


@pytest.mark.parametrize(
    ("answer", "status", "logged"),
    [
        (hostile(200, status=HOSTILE, message=HOSTILE), "sent", "200 counted"),
        (hostile(403, error=HOSTILE, message=HOSTILE), "refused", "403 refused"),
        (hostile(409, error="epoch_out_of_window", message=HOSTILE), "refused", "409 refused"),
        (hostile(503, error=HOSTILE, message=HOSTILE), "failed", "ServerUnavailableError"),
        (hostile(429, error="rate_limited", message=HOSTILE), "failed", "ServerUnavailableError"),
        # Over the report answer's cap: never read whole (the transport stops at the cap).
        # Counted (a 200), however long the body: never a failure to resend.
        ((200, (MARK * 200).encode()[: MAX_REPORT_ANSWER_SIZE * 2]), "sent", "200 counted"),
    ],
)
def test_the_egress_log_and_the_export_keep_only_a_status_or_a_class_name(
    open_engine: Callable[..., Any],
    answer: tuple[int, bytes],
    status: str,
    logged: str,
) -> None:
    server = HostileServer([answer])
    settings = SyncSettings(
        server_url="http://sync.invalid", transport=server, schedule=False, min_gap=0.0,
        rng=random.Random(7),
    )
    engine = open_engine("segment", sync=settings)
    engine.set_signals("u", {"plan": "pro"})
    outcome = engine.sync("u")
    assert (outcome.status, outcome.answer) == (status, logged)
    exported = engine.export_profile("u")
    (entry,) = exported["users"][0]["egress"]
    assert entry["answer"] == logged
    text = json.dumps(exported)
    assert MARK not in text and "<script>" not in text
    assert MARK not in repr(outcome)
