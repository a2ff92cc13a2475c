"""The README's main job: `ondevice demo` runs offline and its wipe holds."""

from __future__ import annotations

import subprocess
import sys


def test_demo_records_reports_exports_and_wipes_leaving_nothing(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ondevice", "demo", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "refused an undeclared field: PolicyViolationError" in out
    assert "'guide-dark-mode' readable on disk: False" in out
    assert "readable without the passphrase: False" in out
    assert "files left behind: []" in out
    assert "reopening after the wipe: ProfileNotFoundError" in out
    assert not (tmp_path / "profile").exists()
    assert result.stderr == ""
