"""The README's main job: `ondevice demo` runs offline end to end, explains what it shows,
and its wipe holds."""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import subprocess
import sys

import pytest

from ondevice import SyncSettings


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    directory = tmp_path_factory.mktemp("demo")
    result = subprocess.run(
        [sys.executable, "-m", "ondevice", "demo", "--dir", str(directory)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout, directory


def _prose(out: str) -> str:
    """The output with its line wrapping undone."""
    return " ".join(out.split())


def test_demo_runs_the_whole_journey_and_leaves_nothing(demo):
    out, directory = demo
    assert "refused an undeclared field: PolicyViolationError" in out
    assert "'pivot-table' readable in the profile files: False" in out
    for level in ("individual", "contextual", "behavioral", "segment", "none"):
        assert f"[{level}] answered by {level}" in out
    # Exactly the one allowed message left, once per user.
    bodies = re.findall(r"the bytes that left: (\{.*\})", out)
    assert len(bodies) == 3
    for body in bodies:
        assert set(json.loads(body)) == {"version", "epoch", "segment"}
    # Each at its own moment of the simulated week, at least an hour apart.
    moments = re.findall(r"^   (\w{3} \d\d:\d\d) UTC  (\w+): sent", out, flags=re.M)
    assert sorted(user for _, user in moments) == ["alice", "bob", "carol"]
    assert len({when for when, _ in moments}) == 3
    assert "readable without the passphrase: False" in out
    assert "profile directories left behind: []" in out
    assert "reopening after the wipe: ProfileNotFoundError" in out
    assert not any(p.name.startswith("profile-") for p in directory.iterdir())


def test_the_demo_says_why_carol_reports_without_any_history(demo):
    out, _ = demo
    prose = _prose(out)
    # Listed with what is stored about her, not as collecting nothing.
    assert "carol (plan team): no interactions yet: only the declared plan is stored" in out
    # Her answer and her report come from the segment of that plan, and the output says so.
    assert (
        "carol (no interactions yet) at individual: answered by segment, from the segment "
        "her declared plan puts her in (“plan=team”)" in out
    )
    assert "her declared plan (team) places her in segment “plan=team”, so she reports" in prose
    assert (
        "a user with neither a declared signal nor any taste yet is in no segment and sends "
        "nothing" in prose
    )
    # The reports come from the individual profile; the profile at level none sends nothing
    # for anyone, carol included.
    assert "Reporting runs on the profile at level individual" in prose
    assert (
        "the profile at level none stores nothing, so it reports nothing: alice: skipped, "
        "bob: skipped, carol: skipped (privacy level none: nothing to report)" in out
    )


def test_the_demo_names_the_budget_epsilon_and_its_cap(demo):
    out, _ = demo
    prose = _prose(out)
    defaults = SyncSettings(server_url="http://example.invalid")
    found = re.search(
        r"ε spent (\d+\.\d\d) \(ln 3\) of a lifetime cap of (\d+\.\d\d) \((\d)·ln 3\) per "
        r"365 days",
        prose,
    )
    assert found, "the budget line does not say it is epsilon, out of which cap"
    spent, cap, multiple = found.groups()
    assert spent == f"{defaults.epsilon_inf:.2f}"  # one memo drawn at ε∞
    assert cap == f"{defaults.lifetime_cap:.2f}"
    assert int(multiple) * math.log(3) == pytest.approx(defaults.lifetime_cap)
    assert f"ε₁ = {defaults.epsilon_1:.2f} (2·ln 3)" in prose
    assert f"at most ε∞ = {defaults.epsilon_inf:.2f} (ln 3) about her segment" in prose


def test_the_demo_explains_why_the_statistics_hold_no_numbers(demo):
    out, _ = demo
    prose = _prose(out)
    week = re.search(r"publishes for (\d{4}-W\d\d): (\{.*\})", out)
    assert week
    epoch, stats = week.group(1), json.loads(week.group(2))
    # Nothing before the week closes, and the output says when it closes.
    assert f"asked for {epoch}'s statistics before it closed: HTTP 425" in out
    closes = re.search(rf"{epoch} closes \w{{3}} (\d{{4}}-\d\d-\d\d \d\d:\d\d) UTC", prose)
    assert closes
    when = dt.datetime.strptime(closes.group(1), "%Y-%m-%d %H:%M").replace(tzinfo=dt.UTC)
    assert when.timestamp() == stats["closed_at"]
    # Three reports stay under the k threshold: every cell suppressed, no total...
    assert stats["segments"] == [] and stats["suppressed"] == list(range(stats["k"]))
    assert stats["noisy_total"] is None
    # ...and the output says why, with the threshold the server applied.
    threshold = stats["k_threshold"]
    assert threshold > 3
    assert (
        f"published only when its noisy count and its estimate both reach the k threshold "
        f"of {threshold} reports" in prose
    )
    assert "This week holds 3 reports in all" in prose
    assert f"standard deviation {stats['noise_standard_deviation']:.1f} reports" in prose
