"""Every Python code block of the README and the docs runs as shown, and where the text
shows its output ("prints:" or "real output" followed by a block), prints exactly that."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"```(\w*)\n(.*?)```", re.S)


def _blocks() -> list[tuple[str, int, str, str | None]]:
    """(document, index, code, the output shown after it or None)."""
    found = []
    for document in DOCUMENTS:
        text = document.read_text()
        matches = list(_BLOCK.finditer(text))
        for n, match in enumerate(matches):
            if match.group(1) != "python":
                continue
            shown = None
            if n + 1 < len(matches) and matches[n + 1].group(1) == "":
                between = text[match.end() : matches[n + 1].start()]
                if re.search(r"prints:|real output", between):
                    shown = matches[n + 1].group(2)
            found.append((document.name, n, match.group(2), shown))
    return found


BLOCKS = _blocks()


def test_the_readme_has_code_to_run_and_shows_its_output():
    # The extraction itself is under test: the quickstart and the recommendations.
    readme = [(code, shown) for doc, _, code, shown in BLOCKS if doc == "README.md"]
    assert len(readme) >= 2
    assert all(shown for _, shown in readme[:2])


@pytest.mark.parametrize(
    ("document", "index", "code", "shown"), BLOCKS, ids=[f"{d}-{i}" for d, i, _, _ in BLOCKS]
)
def test_a_code_block_runs_as_shown(document, index, code, shown, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    if shown is not None:
        assert result.stdout == shown
