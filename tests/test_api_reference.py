"""The API reference in docs/ matches the code, and it documents the whole public API."""

from __future__ import annotations

import importlib.util
import inspect
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

import ondevice
import ondevice.sample

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs" / "api.md"
REGENERATE = ".venv/bin/python docs/gen_api.py > docs/api.md"


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_api", ROOT / "docs" / "gen_api.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_api", module)
    spec.loader.exec_module(module)
    return module


gen_api = _load_generator()


@pytest.fixture(scope="module")
def rendered() -> str:
    return gen_api.render()


@pytest.fixture(scope="module")
def committed() -> str:
    return DOCS.read_text(encoding="utf-8")


def test_api_reference_is_in_step_with_the_code(rendered, committed):
    assert gen_api.REGENERATE == REGENERATE
    assert committed == rendered, f"docs/api.md is stale: regenerate it with {REGENERATE}"


def test_the_generator_prints_the_reference_when_run_as_the_docs_say(tmp_path, rendered):
    import subprocess

    result = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "gen_api.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == rendered  # the same bytes from another directory and process


@pytest.mark.parametrize("name", sorted(ondevice.__all__))
def test_every_public_name_is_documented(name, committed):
    assert f"### `{name}`\n" in committed, f"{name} has no section in docs/api.md"
    doc = gen_api.doc_of("ondevice", name)
    assert doc.strip(), f"ondevice.{name} has no docstring (or #: comment)"


@pytest.mark.parametrize("name", ondevice.sample.__all__)
def test_the_sample_module_is_documented(name, committed):
    assert f"### `{name}`\n" in committed
    assert gen_api.doc_of("ondevice.sample", name).strip()


def test_every_documented_method_has_a_docstring(committed):
    assert "*No docstring.*" not in committed
    # Every public method of every exported class has its own heading.
    for name in ondevice.__all__:
        cls = getattr(ondevice, name)
        if not inspect.isclass(cls) or issubclass(cls, BaseException):
            continue
        for member, value in vars(cls).items():
            if member.startswith("_") or not (
                inspect.isfunction(value) or isinstance(value, property | classmethod)
            ):
                continue
            assert f"#### `{name}.{member}`\n" in committed, f"{name}.{member} is missing"


def test_the_reference_shows_what_the_readme_left_out(committed):
    def section(heading: str) -> str:
        start = committed.index(f"#### `{heading}`\n")
        return committed[start : committed.index("\n#### ", start + 1)]

    assert "user_id: str | None = None" in section("PersonalizationEngine.export_profile_to")
    assert "exclude: Iterable[str] = ()" in section("PersonalizationEngine.get_recommendations")
    many = section("PersonalizationEngine.update_profile_many")
    assert "records: Iterable[tuple[str, Interaction | Mapping[str, Any]]]" in many
    assert "`(user_id, interaction)` pairs" in many
    # Defaults show as code, never as an object's repr.
    assert "clock: Callable[[], float] = time.time" in committed
    assert "<built-in" not in committed and " at 0x" not in committed
    assert "<factory>" not in committed


def test_the_app_facing_parts_of_ondevice_sync_are_covered(committed):
    from ondevice_sync import errors

    for heading in (
        "ondevice_sync.ohttp.OhttpTransport",
        "ondevice_sync.client.HttpTransport",
        "ondevice_sync.client.Transport",
        "ondevice_sync.ohttp.fetch_key_config",
    ):
        assert f"### `{heading}`\n" in committed
    assert "relay_url: str" in committed and "key_config_pin: str" in committed
    for name in errors.__all__:
        assert f"### `ondevice_sync.errors.{name}`\n" in committed
    # SyncSettings with every field it takes.
    settings = committed[committed.index("### `SyncSettings`") :]
    for field in inspect.signature(ondevice.SyncSettings).parameters:
        assert f"    {field}: " in settings.split("\n### ")[0]


def test_the_exception_trees_follow_the_classes(committed):
    # Each tree line is indented under its parent class.
    lines = [line for line in committed.splitlines() if re.match(r"\s*- \[`\w+Error`\]", line)]
    depth = {}
    for line in lines:
        name = re.search(r"\[`(\w+)`\]", line).group(1)
        depth.setdefault(name, (len(line) - len(line.lstrip())) // 2)
    assert depth["OndeviceError"] == 0
    assert depth["ProfileError"] == 1 and depth["ProfileUnreadableError"] == 2
    assert depth["ValidationError"] == 1 and depth["PolicyViolationError"] == 2
    assert depth["KeychainUnavailableError"] == 2


def test_every_link_in_the_reference_has_a_target(committed):
    prose = re.sub(r"^```.*?^```$", "", committed, flags=re.M | re.S)  # not code blocks
    headings = re.findall(r"^#+ (.+)$", prose, flags=re.M)
    anchors = {gen_api.slug(heading.replace("`", "")) for heading in headings}
    assert len(anchors) == len(headings), "two headings share an anchor"
    links = re.findall(r"\]\(#([^)]+)\)", prose)
    assert len(links) > 100, "the reference links (almost) nothing"
    missing = sorted({link for link in links if link not in anchors})
    assert not missing, f"links to no heading: {missing}"


def test_the_github_anchor_rule():
    heading = "The sample catalog: ondevice.sample"
    assert gen_api.slug(heading) == "the-sample-catalog-ondevicesample"
    assert gen_api.slug("PersonalizationEngine.get_recommendations") == (
        "personalizationengineget_recommendations"
    )


def test_the_readme_links_the_reference():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(docs/api.md)" in readme
