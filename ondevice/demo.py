"""The built-in demo behind ``ondevice demo``: the whole journey, offline.

It creates encrypted profiles in a temporary directory with a key generated for the
run, loads the signed sample catalog shipped in the package, records a scripted session
for a few people, prints recommendations at every privacy level with their
explanations, starts the sync server stub on loopback, lets one simulated week pass
while the device reports (each report at its own random moment), prints exactly what
left the device and what the server publishes once the week has closed (and why a week
of one device's reports publishes no numbers), exports, crypto-shreds, and shows that
the wipe holds. It needs no network and no setup. Output
goes to the text stream it is given.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
import secrets
import tempfile
import textwrap
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


def _date(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).strftime("%a %Y-%m-%d %H:%M UTC")


def _in_ln3(epsilon: float) -> str:
    """`` (4·ln 3)`` when ``epsilon`` is a whole multiple of ln 3, else nothing."""
    multiple = epsilon / math.log(3)
    whole = round(multiple)
    if whole < 1 or not math.isclose(multiple, whole, rel_tol=1e-9):
        return ""
    return " (ln 3)" if whole == 1 else f" ({whole}·ln 3)"


def _segment_of(explanation: str) -> str:
    """The segment name a segment-level explanation quotes (“plan=team”)."""
    found = re.search(r"segment “([^”]+)”", explanation)
    return found.group(1) if found else "?"


def run_demo(out: TextIO, *, directory: Path | None = None) -> int:
    """Run the demo, writing a human-readable account to ``out``; return an exit code."""
    from ondevice_sync.protocol import WEEK_SECONDS, epoch_of, epoch_start
    from ondevice_sync.server import ServerConfig, SyncServer, closes_at

    def say(text: str = "") -> None:
        out.write(text + "\n")

    def explain(text: str) -> None:
        out.write(textwrap.fill(text, 100, initial_indent="   ", subsequent_indent="   "))
        out.write("\n")

    with tempfile.TemporaryDirectory(prefix="ondevice-demo-") as tmp:
        root = directory or Path(tmp)
        key = secrets.token_bytes(32)  # held in memory only, for this run
        clock = _SimulatedClock()
        config = ServerConfig(k=8, db_path=Path(tmp) / "server-counts.db", port=0)
        server = SyncServer(config=config, clock=clock).start()
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
                done = ", ".join(f"{e} {i}" for i, e, _ in events) or (
                    "no interactions yet: only the declared plan is stored"
                )
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
            plans = {user: plan for user, plan, _ in SESSION}
            recs = strict.get_recommendations("carol", k=2)
            carol_segment = _segment_of(recs[0].explanation) if len(recs) else "?"
            say(
                f"   carol (no interactions yet) at individual: answered by {recs.level.value}, "
                f"from the segment her declared plan puts her in (“{carol_segment}”); "
                f"the levels above fell back because: {'; '.join(recs.fallbacks)}"
            )

            say(f"4. One simulated week of reporting to the server stub on {server.url}")
            explain(
                "Reporting runs on the profile at level individual (think of it as one device "
                "with three users). Once a week it reports, for each user who is in a segment, "
                "that segment randomized on the device, and nothing else. carol has no "
                f"interactions, but her declared plan ({plans['carol']}) places her in segment "
                f"“{carol_segment}”, so she reports like the others; a user with neither a "
                "declared signal nor any taste yet is in no segment and sends nothing."
            )
            explain(
                "Every user's report leaves at its own random moment of the week, at least an "
                "hour after the device's previous one (the app calls sync_due() from a timer; "
                "here every 30 simulated minutes):"
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
            nothing = [engines[PrivacyLevel.NONE].sync(user) for user, _, _ in SESSION]
            say(
                "   the profile at level none stores nothing, so it reports nothing: "
                + ", ".join(f"{o.user_id}: {o.status}" for o in nothing)
                + f" ({nothing[0].reason})"
            )
            budget = strict.report("alice").users[0].privacy_budget
            spent, cap = budget["lifetime_spent"], budget["lifetime_cap"]
            eps_1, eps_inf = budget["epsilon_1"], budget["epsilon_inf"]
            explain(
                f"alice's privacy budget: ε spent {spent:.2f}{_in_ln3(spent)} of a lifetime "
                f"cap of {cap:.2f}{_in_ln3(cap)} per {budget['period_days']:g} days, on the "
                "one-time randomized draw (the memo) of her segment. Later reports of the "
                "same segment spend nothing: each randomizes the memo again at "
                f"ε₁ = {eps_1:.2f}{_in_ln3(eps_1)}, and however many of them a server links, "
                f"it learns at most ε∞ = {eps_inf:.2f}{_in_ln3(eps_inf)} about her segment."
            )
            closes = closes_at(week, epoch_window=config.epoch_window, grace=config.grace)
            weeks = config.epoch_window
            explain(
                f"The server publishes a week's statistics only once the week is closed: "
                f"reports for {week} are accepted until {weeks} week{'s' if weeks != 1 else ''} "
                f"after it ends (a device may send late), then a grace of "
                f"{config.grace / 3600:g} hours passes; {week} closes {_date(closes)}."
            )
            url = f"{server.url}/v1/stats?epoch={week}"
            try:
                with urllib.request.urlopen(url, timeout=5):  # loopback only
                    pass
            except urllib.error.HTTPError as exc:
                say(f"   asked for {week}'s statistics before it closed: HTTP {exc.code}")
            clock.now = closes  # the week closed, the grace passed
            with urllib.request.urlopen(url, timeout=5) as answer:  # loopback only
                stats = json.loads(answer.read())
            say(f"   after it closed, the server publishes for {week}: "
                f"{json.dumps(stats, sort_keys=True)}")
            threshold = stats["k_threshold"]
            explain(
                f"Every segment is listed under \"suppressed\", with no number: a segment's "
                f"count is published only when its noisy count and its estimate both reach "
                f"the k threshold of {threshold} reports, so that no small group can be "
                f"singled out, and the noisy total only when it reaches {threshold} too. "
                f"This week holds {len(sent)} reports in all (one device, three users), far "
                f"under it. Once enough devices report for a segment to reach the threshold, "
                f"its estimate is published under \"segments\": debiased for the "
                f"randomization, from counts with noise of standard deviation "
                f"{stats['noise_standard_deviation']:.1f} reports added once, never an exact "
                f"count."
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
