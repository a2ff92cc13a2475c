"""What ships: the sdist and the wheel built for real, and the wheel installed alone.

The sdist is built from the repository and the wheel from the sdist (``python -m build``),
so a file the sdist forgot breaks the wheel. The wheel is then installed into a fresh
virtual environment outside the repository, with nothing else, and runs the demo and the
README's quickstart.
"""

from __future__ import annotations

import email
import email.message
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DIST = "ondevice_personalization"

# Modules a desktop app never needs: the operator's builder, the evaluation harness, the
# server side of the sync protocol and their dependencies.
NOT_ON_THE_DEVICE = (
    "ondevice.operator", "ondevice.eval", "ondevice_sync.server", "ondevice_sync.gateway",
    "ondevice_sync.relay", "implicit", "scipy", "threadpoolctl", "tqdm", "matplotlib",
)


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "would be ignored" not in result.stdout + result.stderr
    return out


def _one(dist: Path, pattern: str) -> Path:
    found = sorted(dist.glob(pattern))
    assert len(found) == 1, found
    return found[0]


def _metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return email.message_from_bytes(zf.read(name))


@pytest.mark.slow
def test_the_wheel_holds_the_two_packages_their_data_and_the_license(dist: Path) -> None:
    wheel = _one(dist, f"{DIST}-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"ondevice", "ondevice_sync", f"{DIST}-0.2.0.dist-info"}
    for required in (
        "ondevice/py.typed", "ondevice_sync/py.typed", "ondevice/data/sample.bundle",
        "ondevice/data/sample.pub", "ondevice_sync/server.py", "ondevice/levels/individual.py",
        f"{DIST}-0.2.0.dist-info/licenses/LICENSE",
    ):
        assert required in names, required
    # the folder sync/ ships under its import name only, and no test or bench code ships
    assert not any(n.startswith(("sync/", "tests/", "benchmarks/")) for n in names)
    assert "ondevice-sync-server = ondevice_sync.server:main" in entry_points
    assert "ondevice-ohttp-relay = ondevice_sync.relay:main" in entry_points
    assert "ondevice = ondevice.cli:main" in entry_points


@pytest.mark.slow
def test_the_wheel_metadata_says_what_a_user_needs(dist: Path) -> None:
    meta = _metadata(_one(dist, f"{DIST}-*.whl"))
    assert meta["Name"] == "ondevice-personalization"
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta["License-File"] == "LICENSE"
    assert meta["Requires-Python"] == ">=3.11"
    requires = meta.get_all("Requires-Dist") or []
    runtime = sorted(r for r in requires if "extra ==" not in r)
    assert runtime == ["cryptography>=44", "numpy>=1.26", "pyhpke>=0.6", "sqlcipher3>=0.6.2"]
    keyring_extra = [r for r in requires if "extra == \"keyring\"" in r]
    assert keyring_extra and not any("secretstorage" in r.lower() for r in keyring_extra)
    operator_extra = " ".join(r for r in requires if "extra == \"operator\"" in r)
    for dep in ("implicit", "scipy", "threadpoolctl", "tqdm"):
        assert dep in operator_extra
    urls = {u.split(",")[0] for u in meta.get_all("Project-URL") or []}
    assert {"Homepage", "Documentation", "Source", "Issues", "Changelog"} <= urls
    classifiers = meta.get_all("Classifier") or []
    assert "Typing :: Typed" in classifiers
    assert "Programming Language :: Python :: 3.11" in classifiers


@pytest.mark.slow
def test_the_sdist_is_the_source_docs_and_examples_without_the_test_suite(dist: Path) -> None:
    sdist = _one(dist, f"{DIST}-*.tar.gz")
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for required in (
        "pyproject.toml", "MANIFEST.in", "LICENSE", "README.md", "CHANGELOG.md",
        "sync/server.py", "sync/py.typed", "ondevice/engine.py", "ondevice/data/sample.bundle",
        "docs/privacy.md", "docs/cli.md", "examples/quickstart.py",
    ):
        assert required in names, required
    # left out on purpose (MANIFEST.in says why): no half test suite that cannot collect
    assert not any(n.startswith(("tests/", "benchmarks/", ".ci/")) for n in names)
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)


def _fresh_venv(where: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=300)
    return where / "bin" / "python"


def _run(python: Path, *args: str, cwd: Path, timeout: float = 600) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(
        [str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{args}: {result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.slow
def test_the_wheel_alone_in_a_fresh_venv_runs_the_demo_and_the_quickstart(
    dist: Path, tmp_path: Path
) -> None:
    python = _fresh_venv(tmp_path / "venv")
    work = tmp_path / "outside"
    work.mkdir()
    _run(python, "-m", "pip", "install", "-q", str(_one(dist, f"{DIST}-*.whl")), cwd=work)
    # only the wheel and its runtime dependencies: none of the operator's
    listed = _run(python, "-m", "pip", "list", "--format=freeze", cwd=work).lower()
    installed = {line.split("==")[0] for line in listed.split()}
    assert {"ondevice-personalization", "sqlcipher3", "numpy", "cryptography"} <= installed
    assert not installed & {"implicit", "scipy", "threadpoolctl", "tqdm", "keyring", "pytest"}
    # imported from the venv, not from the repository
    where = _run(python, "-c", "import ondevice, ondevice_sync; print(ondevice.__file__, "
                 "ondevice_sync.__file__)", cwd=work)
    assert str(ROOT) not in where and str(tmp_path / "venv") in where

    demo = _run(python, "-m", "ondevice", "demo", cwd=work)
    # the demo's own checks held: reports left as segment IDs only, and the wipe holds
    assert '{"version":2,"epoch":' in demo and '"segment":' in demo
    assert "ProfileNotFoundError" in demo
    assert not list(work.iterdir()), "the demo left files in the working directory"

    # the README's quickstart, as shown, and what it imported
    (work / "quickstart.py").write_text((ROOT / "examples" / "quickstart.py").read_text())
    probe = (
        "import runpy, sys; runpy.run_path('quickstart.py', run_name='__main__'); "
        f"print(sorted(m for m in sys.modules if m.startswith({NOT_ON_THE_DEVICE!r})))"
    )
    out = _run(python, "-c", probe, cwd=work).splitlines()
    assert out == ["1", "['alice.export']", "[]"]
