"""The built-in demo behind ``ondevice demo``: record, report, export, wipe, offline.

It creates an encrypted profile in a temporary directory with a key generated for the
run, records a scripted session for two people, shows what is stored and why, writes
an encrypted export, crypto-shreds the profile and shows that the wipe holds. It needs
no network and no setup. Output goes to the text stream it is given.
"""

from __future__ import annotations

import json
import secrets
import tempfile
from pathlib import Path
from typing import TextIO

from .engine import PersonalizationEngine
from .errors import OndeviceError
from .keys import RawKey
from .policy import ContextField, Interaction, Policy, Signal

__all__ = ["DEMO_POLICY", "run_demo"]

DEMO_POLICY = Policy(
    signals=(
        Signal(
            "plan", "str", "show features of the user's plan", 365, choices=("free", "pro", "team")
        ),
    ),
    context=(
        ContextField(
            "daypart",
            "str",
            "learn what you like at which time of day",
            30,
            choices=("morning", "afternoon", "evening"),
        ),
    ),
)

_SESSION = {
    "alice": [
        ("guide-keyboard-shortcuts", "view", "morning"),
        ("guide-dark-mode", "click", "morning"),
        ("template-weekly-report", "purchase", "afternoon"),
    ],
    "bob": [
        ("template-invoice", "view", "evening"),
        ("template-invoice", "like", "evening"),
    ],
}


def run_demo(out: TextIO, *, directory: Path | None = None) -> int:
    """Run the demo, writing a human-readable account to ``out``; return an exit code."""

    def say(text: str = "") -> None:
        out.write(text + "\n")

    with tempfile.TemporaryDirectory(prefix="ondevice-demo-") as tmp:
        path = (directory or Path(tmp)) / "profile"
        key = secrets.token_bytes(32)  # held in memory only, for this run
        say(f"1. Creating an encrypted profile in {path}")
        with PersonalizationEngine(
            path, key=RawKey(key), policy=DEMO_POLICY, privacy_level="contextual"
        ) as engine:
            say(
                f"   privacy level: {engine.privacy_level.value}; files: "
                f"{sorted(p.name for p in path.iterdir())}"
            )
            say("2. Recording a scripted session")
            for user, events in _SESSION.items():
                engine.set_signals(user, {"plan": "pro" if user == "alice" else "free"})
                for item, event, daypart in events:
                    engine.update_profile(
                        user, Interaction(item, event, context={"daypart": daypart})
                    )
                    say(f"   {user:<6} {event:<8} {item}")
            try:
                engine.update_profile("alice", {"item_id": "x", "gps": "52.37,4.89"})
            except OndeviceError as exc:
                say(f"   refused an undeclared field: {type(exc).__name__}: {exc}")
            on_disk = b"".join(p.read_bytes() for p in path.iterdir() if p.is_file())
            say(f"   'guide-dark-mode' readable on disk: {b'guide-dark-mode' in on_disk}")
            say("3. What do you know about alice, and why?")
            report = engine.report("alice").to_dict()
            for f in report["fields"]:
                if f["collected"]:
                    days = f["retention_days"]
                    kept = "until removed" if days is None else f"{days:g} days"
                    say(f"   - {f['name']} ({kept}): {f['purpose']}")
            say("   " + json.dumps(report["users"][0], sort_keys=True))
            export_path = engine.export_profile_to(
                Path(tmp) / "alice-export.json", user_id="alice", passphrase="demo passphrase"
            )
            readable = b"guide-dark-mode" in export_path.read_bytes()
            say(
                f"4. Encrypted export written ({export_path.stat().st_size} bytes; "
                f"readable without the passphrase: {readable})"
            )
            say("5. Forget me: crypto-shredding the whole profile")
            engine.wipe()
        left = sorted(p.name for p in path.iterdir()) if path.exists() else []
        say(f"   files left behind: {left}")
        try:
            PersonalizationEngine(path, key=RawKey(key), create=False)
        except OndeviceError as exc:
            say(f"   reopening after the wipe: {type(exc).__name__}")
        say("Done: nothing left the device, nothing readable stayed on disk.")
    return 0
