"""The CLI reference in docs/ matches --help, and `ondevice recommend` works."""

from __future__ import annotations

import json
from pathlib import Path

from ondevice import Passphrase, PersonalizationEngine
from ondevice.cli import main, reference_markdown
from ondevice.sample import sample_policy

from conftest import FAST_KDF

DOCS = Path(__file__).parent.parent / "docs" / "cli.md"


def test_cli_reference_is_in_step_with_help():
    assert DOCS.read_text() == reference_markdown(), (
        'docs/cli.md is stale: regenerate it with python -c "from ondevice.cli import '
        "reference_markdown; print(reference_markdown(), end='')\" > docs/cli.md"
    )


def test_recommend_prints_ranked_items_with_explanations(tmp_path, monkeypatch, capsys):
    path = tmp_path / "p"
    with PersonalizationEngine(
        path,
        key=Passphrase("pw", kdf=FAST_KDF),
        policy=sample_policy(),
        privacy_level="behavioral",
    ) as engine:
        engine.update_profile("me", {"item_id": "photos-collage-template", "event": "like"})
    monkeypatch.setenv("PROFILE_PASS", "pw")
    code = main(
        [
            "recommend",
            str(path),
            "--passphrase-env",
            "PROFILE_PASS",
            "--user",
            "me",
            "--sample",
            "-k",
            "3",
            "--context",
            "daypart=evening",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["level"] == "behavioral" and len(out["items"]) == 3
    assert all(i["explanation"] for i in out["items"])
    assert "photos-collage-template" not in [i["item_id"] for i in out["items"]]


def test_recommend_refuses_undeclared_context_and_unpinned_bundles(tmp_path, monkeypatch, capsys):
    path = tmp_path / "p"
    PersonalizationEngine(path, key=Passphrase("pw", kdf=FAST_KDF), policy=sample_policy()).close()
    monkeypatch.setenv("PROFILE_PASS", "pw")
    base = ["recommend", str(path), "--passphrase-env", "PROFILE_PASS", "--user", "me"]
    assert main([*base, "--sample", "--context", "gps=1"]) == 1
    assert "not declared" in capsys.readouterr().err
    assert main([*base, "--bundle", str(tmp_path / "b.bundle")]) == 2
    assert "--bundle-public-key" in capsys.readouterr().err
