"""Quality gates: the public code type-checks strictly and lints clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def _tool(name: str) -> list[str]:
    exe = Path(sys.executable).with_name(name)
    if exe.exists():
        return [str(exe)]
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]' installs it")
    return [found]


@pytest.mark.slow
def test_mypy_strict_passes_on_ondevice_and_ondevice_sync(tmp_path: Path) -> None:
    # The import package ondevice_sync lives in the folder sync/ (setuptools maps it), and
    # mypy cannot follow an editable install's import hook: check both packages under
    # their import names through a tree of links to the source folders.
    (tmp_path / "ondevice").symlink_to(ROOT / "ondevice", target_is_directory=True)
    (tmp_path / "ondevice_sync").symlink_to(ROOT / "sync", target_is_directory=True)
    result = subprocess.run(
        [*_tool("mypy"), "--config-file", str(ROOT / "pyproject.toml"), "--strict",
         "-p", "ondevice", "-p", "ondevice_sync"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues found in" in result.stdout


def test_ruff_passes():
    result = subprocess.run(
        [*_tool("ruff"), "check", "ondevice", "sync", "tests", "examples", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
