"""Every example runs as written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_quickstart_records_exports_and_wipes(tmp_path):
    script = EXAMPLES / "quickstart.py"
    assert len(script.read_text().splitlines()) <= 30
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["1", "['alice.export']"]
    assert b"guide-dark-mode" not in (tmp_path / "alice.export").read_bytes()


def test_sample_recommendations_print_three_explained_items(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "sample_recommendations.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    for line in lines:
        title, _, why = line.partition(" - ")
        assert title and title != "Collage template"
        assert why.startswith("because you liked “Collage template”")
    readme = (EXAMPLES.parent / "README.md").read_text()
    assert result.stdout.strip() in readme  # the README quotes the real output
