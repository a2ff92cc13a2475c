"""The operator's command line: keygen, build with a progress bar, verify."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

from ondevice.synthetic import generate


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ondevice.operator", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_keygen_build_verify_from_a_csv_panel(tmp_path):
    data = generate(n_users=200, n_items=60, seed=3)
    panel = tmp_path / "panel.csv"
    with panel.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["user", "item", "timestamp"])
        for u, i, t in zip(data.users, data.items, data.times, strict=True):
            w.writerow([f"u{u}", f"i{i}", int(t)])
    signals = tmp_path / "signals.csv"
    with signals.open("w", newline="") as fh:
        w = csv.writer(fh)
        for user, sig in data.signals.items():
            w.writerow([user, "plan", sig["plan"]])
    key = tmp_path / "signing.key"
    made = _run("keygen", "--out", str(key))
    assert made.returncode == 0, made.stderr
    public = json.loads(made.stdout)["public_key"]
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_bytes()) == 32
    bundle = tmp_path / "c.bundle"
    built = _run(
        "build",
        "--panel",
        str(panel),
        "--signals",
        str(signals),
        "--rule-signal",
        "plan",
        "--signing-key",
        str(key),
        "--out",
        str(bundle),
        "--factors",
        "8",
        "--min-segment-users",
        "20",
        "--segments",
        "3",
    )
    assert built.returncode == 0, built.stderr
    summary = json.loads(built.stdout)
    assert summary["items"] == 60 and summary["public_key"] == public
    assert 1 <= summary["segments"] <= 10
    # tqdm's bars, one per stage: "als: 100%|██████████| 15/15 [00:00<00:00, ...]"
    for stage in ("neighbours", "als", "segments"):
        assert f"{stage}: 100%|" in built.stderr, built.stderr
    ok = _run("verify", "--bundle", str(bundle), "--public-key", public)
    assert ok.returncode == 0 and json.loads(ok.stdout)["sha256"] == summary["sha256"]
    other = _run("keygen", "--out", str(tmp_path / "other.key"))
    wrong = _run(
        "verify", "--bundle", str(bundle), "--public-key", json.loads(other.stdout)["public_key"]
    )
    assert wrong.returncode == 1 and "signature" in wrong.stderr.lower()
    assert "Traceback" not in wrong.stderr
