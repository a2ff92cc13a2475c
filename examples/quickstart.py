"""The README's quickstart: record, report, export and wipe an encrypted profile."""

import sys
import tempfile
from pathlib import Path

from ondevice import Passphrase, PersonalizationEngine, Policy, Signal

workdir = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())  # README: mkdtemp()
policy = Policy(
    signals=[Signal("plan", "str", "show features of your plan", 365, choices=("free", "pro"))]
)
with PersonalizationEngine(
    workdir / "profile",
    key=Passphrase("correct horse battery"),
    policy=policy,
    privacy_level="behavioral",
) as engine:
    engine.set_signals("alice", {"plan": "pro"})
    engine.update_profile("alice", {"item_id": "guide-dark-mode", "event": "click"})
    print(engine.report("alice").users[0].interactions)  # 1
    engine.export_profile_to(workdir / "alice.export", user_id="alice", passphrase="export pw")
    engine.wipe()  # crypto-shred everything
print(sorted(p.name for p in workdir.iterdir()))  # ['alice.export']
