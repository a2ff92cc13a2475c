"""The operator's side needs the ``operator`` extra; the device runtime never does.

Each check runs in a fresh interpreter in which the extra's modules are made impossible
to import (``sys.modules[name] = None``), as on a machine that installed only the device
runtime.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXTRA = ("implicit", "scipy", "threadpoolctl", "tqdm")
INSTALL = "pip install 'ondevice-personalization[operator]'"


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


def _blocking(names: tuple[str, ...]) -> str:
    return "import sys\n" + "".join(f"sys.modules[{n!r}] = None\n" for n in names)


@pytest.mark.parametrize("missing", EXTRA)
@pytest.mark.parametrize(
    "module", ["ondevice.operator", "ondevice.operator.build", "ondevice.eval"]
)
def test_operator_code_without_the_extra_fails_naming_the_install_command(
    module: str, missing: str
) -> None:
    code = _blocking((missing,)) + (
        "try:\n"
        f"    import {module}\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    print('imported')\n"
    )
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert INSTALL in out.stdout and missing in out.stdout


def test_the_evaluation_command_without_the_extra_says_how_to_install_it() -> None:
    code = _blocking(("implicit",)) + (
        "import runpy\nrunpy.run_module('ondevice.eval', run_name='__main__')\n"
    )
    out = _python(code)
    assert out.returncode != 0 and INSTALL in out.stderr


def test_the_device_runtime_runs_every_level_without_the_extra(tmp_path: Path) -> None:
    code = _blocking(EXTRA) + f"""
from ondevice import PersonalizationEngine, RawKey
from ondevice.sample import SAMPLE_BUNDLE, SAMPLE_PUBLIC_KEY, sample_policy
for level in ("none", "segment", "behavioral", "contextual", "individual"):
    with PersonalizationEngine({str(tmp_path)!r} + "/" + level, key=RawKey(bytes(32)),
            policy=sample_policy(), privacy_level=level, bundle=SAMPLE_BUNDLE,
            bundle_public_key=SAMPLE_PUBLIC_KEY) as e:
        e.update_profile("me", {{"item_id": "photos-collage-template", "event": "like"}})
        got = e.get_recommendations("me", k=3)
        assert len(got) == 3 and got.level.value == level, (level, got.level)
print("ok")
"""
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_the_device_runtime_never_imports_the_extras_modules(tmp_path: Path) -> None:
    code = f"""
import sys
from ondevice import PersonalizationEngine, RawKey
from ondevice.sample import SAMPLE_BUNDLE, SAMPLE_PUBLIC_KEY, sample_policy
with PersonalizationEngine({str(tmp_path / "p")!r}, key=RawKey(bytes(32)),
        policy=sample_policy(), privacy_level="individual", bundle=SAMPLE_BUNDLE,
        bundle_public_key=SAMPLE_PUBLIC_KEY) as e:
    e.update_profile("me", {{"item_id": "photos-collage-template"}})
    assert len(e.get_recommendations("me", k=3)) == 3
print(sorted(m for m in sys.modules if m.split(".")[0] in {EXTRA!r}))
"""
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
