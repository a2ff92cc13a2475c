"""The public surface: one front door, one exception tree, typed."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import ondevice
from ondevice import errors


def test_all_is_sorted_and_equals_the_public_names():
    public = {
        n for n, v in vars(ondevice).items() if not n.startswith("_") and not inspect.ismodule(v)
    }
    assert ondevice.__all__ == sorted(ondevice.__all__)
    assert set(ondevice.__all__) == public


def test_every_error_derives_from_the_one_root():
    classes = [v for v in vars(errors).values() if inspect.isclass(v) and issubclass(v, Exception)]
    assert len(classes) == len(errors.__all__)
    for cls in classes:
        assert issubclass(cls, errors.OndeviceError)
        assert cls.__name__ in errors.__doc__, f"{cls.__name__} missing from the drawn tree"


def test_validation_errors_are_value_errors_too():
    assert issubclass(errors.PolicyViolationError, ValueError)
    assert issubclass(errors.InvalidInputError, ValueError)


def test_package_is_typed_and_public_callables_are_documented():
    assert (Path(ondevice.__file__).parent / "py.typed").exists()
    for name in ondevice.__all__:
        obj = getattr(ondevice, name)
        assert inspect.getdoc(obj), f"{name} has no docstring"
    engine = ondevice.PersonalizationEngine
    for name, member in inspect.getmembers(engine, inspect.isfunction):
        if not name.startswith("_"):
            assert member.__doc__, f"PersonalizationEngine.{name} has no docstring"
            assert "return" in member.__annotations__, f"{name} lacks a return annotation"


def test_the_device_runtime_never_imports_operator_or_evaluation_code(tmp_path):
    import subprocess
    import sys

    code = f"""
import sys
from ondevice import PersonalizationEngine, RawKey
from ondevice.sample import SAMPLE_BUNDLE, SAMPLE_PUBLIC_KEY, sample_policy
e = PersonalizationEngine({str(tmp_path / "p")!r}, key=RawKey(bytes(32)), policy=sample_policy(),
    privacy_level="individual", bundle=SAMPLE_BUNDLE, bundle_public_key=SAMPLE_PUBLIC_KEY)
e.update_profile("me", {{"item_id": "photos-collage-template"}})
assert len(e.get_recommendations("me", k=3)) == 3
e.wipe()
print(sorted(m for m in sys.modules if m.startswith(("ondevice.operator", "ondevice.eval"))))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_library_prints_nothing_unless_the_app_configures_logging(tmp_path):
    """A refused bundle with no catalog loaded raises; the library's own warning goes to
    its logger, which has a NullHandler: nothing reaches stderr by itself."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import os
        from ondevice import BundleError, PersonalizationEngine, RawKey
        try:
            PersonalizationEngine({str(tmp_path / "p")!r}, key=RawKey(os.urandom(32)),
                                  bundle={str(tmp_path / "missing.bundle")!r},
                                  bundle_public_key=bytes(32))
        except BundleError:
            print("refused")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "refused\n", "")


def test_a_refused_bundle_is_logged_truthfully(tmp_path, caplog):
    import logging
    import os

    from ondevice import BundleError, PersonalizationEngine, RawKey

    with caplog.at_level(logging.WARNING, logger="ondevice"), pytest.raises(BundleError):
        PersonalizationEngine(
            tmp_path / "p",
            key=RawKey(os.urandom(32)),
            bundle=tmp_path / "missing.bundle",
            bundle_public_key=bytes(32),
        )
    (record,) = [r for r in caplog.records if "catalog bundle refused" in r.getMessage()]
    assert "no catalog is loaded" in record.getMessage()
    assert "keeping the previous one" not in record.getMessage()


def test_the_license_is_declared_and_shipped():
    import tomllib
    from pathlib import Path

    root = Path(__file__).parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    text = (root / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
