"""The built-in demo behind ``ondevice demo``: the whole journey, offline.

It creates encrypted profiles in a temporary directory with a key generated for the
run, loads the signed sample catalog shipped in the package, records a scripted session
for a few people, prints recommendations at every privacy level with their
explanations, starts the sync server stub on loopback, syncs, prints exactly what left
the device, exports, crypto-shreds, and shows that the wipe holds. It needs no network
and no setup. Output goes to the text stream it is given.
"""

from __future__ import annotations

import json
import secrets
import tempfile
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


def run_demo(out: TextIO, *, directory: Path | None = None) -> int:
    """Run the demo, writing a human-readable account to ``out``; return an exit code."""
    from sync.server import ServerConfig, SyncServer

    def say(text: str = "") -> None:
        out.write(text + "\n")

    with tempfile.TemporaryDirectory(prefix="ondevice-demo-") as tmp:
        root = directory or Path(tmp)
        key = secrets.token_bytes(32)  # held in memory only, for this run
        server = SyncServer(
            config=ServerConfig(k=8, db_path=Path(tmp) / "server-counts.db", port=0)
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
                )
            say("2. Recording the same scripted session in each")
            for engine in engines.values():
                for user, plan, events in SESSION:
                    engine.set_signals(user, {"plan": plan})
                    for item, event, part in events:
                        engine.update_profile(
                            user, Interaction(item, event, context={"daypart": part})
                        )
            for user, _, events in SESSION:
                say(f"   {user}: " + (", ".join(f"{e} {i}" for i, e, _ in events) or "nothing"))
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

            say(f"4. Syncing to the server stub on {server.url} (loopback)")
            for user, _, _ in SESSION:
                outcome = strict.sync(user)
                say(f"   {user}: {outcome.status}; the bytes that left: {outcome.body}")
            none_outcome = engines[PrivacyLevel.NONE].sync("alice")
            say(f"   at level none: {none_outcome.status} ({none_outcome.reason})")
            report = strict.report("alice").users[0]
            say(
                f"   alice's egress log: {report.reports_sent} report(s); privacy budget: "
                f"{report.privacy_budget['epsilon_spent']:.2f} of "
                f"{report.privacy_budget['epsilon_cap']:.2f} spent over "
                f"{report.privacy_budget['period_days']:g} days"
            )
            epoch = outcome.epoch or ""
            url = f"{server.url}/v1/stats?epoch={epoch}"
            with urllib.request.urlopen(url, timeout=5) as answer:  # loopback only
                stats = json.loads(answer.read())
            say(f"   the server publishes for {epoch}: {json.dumps(stats, sort_keys=True)}")

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
