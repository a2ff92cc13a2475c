"""The public surface: one front door, one exception tree, typed."""

from __future__ import annotations

import inspect
from pathlib import Path

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
