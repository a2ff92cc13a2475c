"""The built-in demo behind ``ondevice demo``: the whole journey, offline.

It creates encrypted profiles in a temporary directory with a key generated for the
run, loads the signed sample catalog shipped in the package, records a scripted session
for a few people, prints recommendations at every privacy level with their
explanations, starts the sync server stub on loopback, lets one simulated week pass
while the device reports (each report at its own random moment), prints exactly what
left the device and what the server publishes once the week has closed, exports,
crypto-shreds, and shows that the wipe holds. It needs no network and no setup. Output
goes to the text stream it is given.
"""

from __future__ import annotations

import datetime as _dt
import json
import secrets
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import TextIO

from .engine import PersonalizationEngine
from .errors import OndeviceError
from .keys import RawKey
from .policy import Interaction, PrivacyLevel
from .sample import SAMPLE_BUNDLE, SAMPLE_PUBLIC_KEY, sample_policy
from .sync_settings import SyncSettings

__all__ = ["SESSION", "run_demo"]

#: The scripted session: (user, plan, [(item, event, daypart)]).
SESSION: tuple[tuple[str, str, list[tuple[str, str, str]]], ...] = (
    (
        "alice",
        "pro",
        [
            ("spreadsheets-budget-template", "view", "morning"),
            ("spreadsheets-expense-tracker-template", "click", "morning"),
            ("spreadsheets-pivot-table-guide", "purchase", "morning"),
        ],
    ),
    (
        "bob",
        "free",
        [
            ("photos-collage-template", "view", "evening"),
            ("photos-portrait-retouch-template", "like", "evening"),
        ],
    ),
    ("carol", "team", []),  # a brand-new user: cold start
)


class _SimulatedClock:
    """The demo's clock: starts at the beginning of this ISO week (UTC), moved by hand."""

    def __init__(self) -> None:
        today = _dt.datetime.now(_dt.UTC).date()
        monday = today - _dt.timedelta(days=today.weekday())
        start = _dt.datetime(monday.year, monday.month, monday.day, 8, tzinfo=_dt.UTC)
        self.now = start.timestamp()

    def __call__(self) -> float:
        return self.now


def _when(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).strftime("%a %H:%M UTC")


def run_demo(out: TextIO, *, directory: Path | None = None) -> int:
    """Run the demo, writing a human-readable account to ``out``; return an exit code."""
    from ondevice_sync.protocol import WEEK_SECONDS, epoch_of, epoch_start
    from ondevice_sync.server import ServerConfig, SyncServer

    def say(text: str = "") -> None:
        out.write(text + "\n")

    with tempfile.TemporaryDirectory(prefix="ondevice-demo-") as tmp:
        root = directory or Path(tmp)
        key = secrets.token_bytes(32)  # held in memory only, for this run
        clock = _SimulatedClock()
        server = SyncServer(
            config=ServerConfig(k=8, db_path=Path(tmp) / "server-counts.db", port=0),
            clock=clock,
        ).start()
        try:
            settings = SyncSettings(server_url=server.url, timeout=5.0)
            engines = {}
            say("1. One encrypted profile per privacy level, the signed sample catalog loaded")
            for level in reversed(PrivacyLevel):
                engines[level] = PersonalizationEngine(
                    root / f"profile-{level.value}",
                    key=RawKey(key),
                    policy=sample_policy(),
                    privacy_level=level,
                    bundle=SAMPLE_BUNDLE,
                    bundle_public_key=SAMPLE_PUBLIC_KEY,
                    sync=settings,
                    clock=clock,
                )
            say("2. Recording the same scripted session in each (and each user's plan)")
            for engine in engines.values():
                for user, plan, events in SESSION:
                    engine.set_signals(user, {"plan": plan})
                    for item, event, part in events:
                        engine.update_profile(
                            user, Interaction(item, event, context={"daypart": part})
                        )
            for user, plan, events in SESSION:
                done = ", ".join(f"{e} {i}" for i, e, _ in events) or "no interactions yet"
                say(f"   {user} (plan {plan}): {done}")
            strict = engines[PrivacyLevel.INDIVIDUAL]
            try:
                strict.update_profile("alice", {"item_id": "x", "gps": "52.37,4.89"})
            except OndeviceError as exc:
                say(f"   refused an undeclared field: {type(exc).__name__}")
            path = strict.path
            on_disk = b"".join(p.read_bytes() for p in path.iterdir() if p.is_file())
            say(f"   'pivot-table' readable in the profile files: {b'pivot-table' in on_disk}")

            say("3. Recommendations for alice at each level (top 3, with the why)")
            for level, engine in engines.items():
                recs = engine.get_recommendations("alice", {"daypart": "morning"}, k=3)
                say(f"   [{level.value}] answered by {recs.level.value}")
                for r in recs:
                    say(f"      - {r.title}: {r.explanation}")
            recs = strict.get_recommendations("carol", k=2)
            say(
                f"   carol (no history) at individual: answered by {recs.level.value}; "
                f"fell back because: {'; '.join(recs.fallbacks)}"
            )

            say(f"4. One simulated week of reporting to the server stub on {server.url}")
            say(
                "   every user's report leaves at its own random moment of the week, at "
                "least an hour after the device's previous one (the app calls sync_due() "
                "from a timer; here every 30 simulated minutes)"
            )
            week = epoch_of(clock.now)
            end = epoch_start(week) + WEEK_SECONDS
            sent: dict[str, float] = {}
            # Until every report left: one pushed past the week's end by the hour between
            # reports leaves early the next week, labelled with its own week.
            while clock.now < end + 86400 and len(sent) < len(SESSION):
                for outcome in strict.sync_due():
                    if outcome.status == "sent":
                        sent[outcome.user_id] = clock.now
                        why = f" ({outcome.reason})" if outcome.reason else ""
                        say(
                            f"   {_when(clock.now)}  {outcome.user_id}: sent{why}; "
                            f"the bytes that left: {outcome.body}"
                        )
                clock.now += 1800
            none_outcome = engines[PrivacyLevel.NONE].sync("alice")
            say(f"   at level none: {none_outcome.status} ({none_outcome.reason})")
            budget = strict.report("alice").users[0].privacy_budget
            say(
                f"   alice's lifetime privacy budget (epsilon): {budget['lifetime_spent']:.2f} "
                f"of {budget['lifetime_cap']:.2f} per {budget['period_days']:g} days spent on "
                f"the memo of her segment; later reports of the same segment spend nothing "
                f"(each report randomizes the memo again at epsilon {budget['epsilon_1']:.2f})"
            )
            url = f"{server.url}/v1/stats?epoch={week}"
            try:
                with urllib.request.urlopen(url, timeout=5):  # loopback only
                    pass
            except urllib.error.HTTPError as exc:
                say(f"   asked for {week}'s statistics during the week: HTTP {exc.code}")
            clock.now = end + WEEK_SECONDS + 2 * 86400  # the week closed, the grace passed
            with urllib.request.urlopen(url, timeout=5) as answer:  # loopback only
                stats = json.loads(answer.read())
            say(f"   after it closed, the server publishes for {week}: "
                f"{json.dumps(stats, sort_keys=True)}")
            say(
                f"   ({len(sent)} reports: every cell is under the threshold of "
                f"{stats['k_threshold']}, so all are suppressed; the published numbers "
                "carry noise, never an exact count)"
            )

            say("5. What do you know about alice, and why?")
            for f in strict.report("alice").to_dict()["fields"]:
                if f["collected"]:
                    days = f["retention_days"]
                    kept = "until removed" if days is None else f"{days:g} days"
                    say(f"   - {f['name']} ({kept}): {f['purpose']}")
            export = strict.export_profile_to(
                Path(tmp) / "alice.export", user_id="alice", passphrase="demo passphrase"
            )
            readable = b"pivot-table" in export.read_bytes()
            say(
                f"6. Encrypted export written ({export.stat().st_size} bytes; "
                f"readable without the passphrase: {readable})"
            )
            say("7. Forget me: crypto-shredding every profile")
            for engine in engines.values():
                engine.wipe()
        finally:
            server.close()
        left = sorted(p.name for p in root.iterdir() if p.name.startswith("profile-"))
        say(f"   profile directories left behind: {left}")
        try:
            PersonalizationEngine(path, key=RawKey(key), create=False)
        except OndeviceError as exc:
            say(f"   reopening after the wipe: {type(exc).__name__}")
        say("Done: only randomized segment IDs left the device; nothing readable stayed on disk.")
    return 0
