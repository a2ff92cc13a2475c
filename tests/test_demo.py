"""The README's main job: `ondevice demo` runs offline end to end and its wipe holds."""

from __future__ import annotations

import json
import re
import subprocess
import sys


def test_demo_runs_the_whole_journey_and_leaves_nothing(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ondevice", "demo", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "refused an undeclared field: PolicyViolationError" in out
    assert "'pivot-table' readable in the profile files: False" in out
    for level in ("individual", "contextual", "behavioral", "segment", "none"):
        assert f"[{level}] answered by {level}" in out
    assert "carol (no history) at individual: answered by segment" in out
    # Exactly the one allowed message left, once per user.
    bodies = re.findall(r"the bytes that left: (\{.*\})", out)
    assert len(bodies) == 3
    for body in bodies:
        assert set(json.loads(body)) == {"version", "epoch", "segment"}
    # Each at its own moment of the simulated week, at least an hour apart.
    moments = re.findall(r"^   (\w{3} \d\d:\d\d) UTC  (\w+): sent", out, flags=re.M)
    assert sorted(user for _, user in moments) == ["alice", "bob", "carol"]
    assert len({when for when, _ in moments}) == 3
    assert "at level none: skipped" in out
    # Nothing is published while the week is open; afterwards three reports are under
    # the server's k threshold: every cell is suppressed, and no exact total is given.
    assert "statistics during the week: HTTP 425" in out
    assert '"segments": []' in out and '"suppressed": [0, 1, 2, 3, 4, 5, 6, 7]' in out
    assert '"noisy_total": null' in out
    assert "readable without the passphrase: False" in out
    assert "profile directories left behind: []" in out
    assert "reopening after the wipe: ProfileNotFoundError" in out
    assert not any(p.name.startswith("profile-") for p in tmp_path.iterdir())
    assert result.stderr == ""
