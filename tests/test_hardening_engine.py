"""Issue 10, items 2 and 3: an engine never acknowledges a write it cannot keep (its
files deleted or replaced under it), and every path that writes follows a privacy level
lowered by another engine, not only update_profile."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from ondevice import PersonalizationEngine, PolicyViolationError, ProfileGoneError
from ondevice.store import Store

from conftest import T0
from planted import HISTORY, PLANTED


def _rows(engine: PersonalizationEngine) -> dict[str, int]:
    with engine._store.read() as conn:
        return Store.count_rows(conn)


# -- item 3: the level a user chose ----------------------------------------------------


def test_recommendations_cache_no_user_vector_after_another_engine_lowered_the_level(
    open_engine, tmp_path
):
    path = tmp_path / "shared"
    app = open_engine("individual", path=path)
    for n, item in enumerate(HISTORY):
        app.update_profile("u", {"item_id": item, "event": "purchase", "timestamp": T0 - 60 + n})
    settings = open_engine("individual", path=path)
    settings.set_privacy_level("behavioral")  # the user lowers it in another window
    app.get_recommendations("u", k=3)  # folds a vector in memory: must not store it
    with app._store.read() as conn:
        assert [name for name, _, _ in Store.derived(conn, "u")] == []
    assert app.privacy_level.value == "behavioral"


@pytest.mark.parametrize("lowered", ["segment", "none"])
def test_blocking_after_another_engine_lowered_the_level_stores_nothing(
    open_engine, tmp_path, lowered
):
    path = tmp_path / "shared"
    app = open_engine("behavioral", path=path)
    app.update_profile("u", {"item_id": "i1", "timestamp": T0 - 5})
    open_engine("behavioral", path=path).set_privacy_level(lowered)
    with pytest.raises(PolicyViolationError, match="blocking items"):
        app.block_item("u", "i3")
    assert _rows(app)["blocks"] == 0
    app.close()
    reopened = open_engine(lowered, path=path)
    reopened.purge_expired()
    assert _rows(reopened)["blocks"] == 0


@pytest.mark.parametrize("lowered", ["segment", "none"])
def test_an_import_after_another_engine_lowered_the_level_keeps_only_what_it_allows(
    open_engine, tmp_path, lowered
):
    source = open_engine("contextual", path=tmp_path / "source")
    source.update_profile(
        "u", {"item_id": PLANTED, "timestamp": T0 - 5, "context": {"daypart": "morning"}}
    )
    source.block_item("u", "i3")
    export = source.export_profile("u")
    path = tmp_path / "shared"
    app = open_engine("contextual", path=path)
    open_engine("contextual", path=path).set_privacy_level(lowered)
    app.import_profile(export)
    rows = _rows(app)
    assert rows["interactions"] == rows["context"] == rows["blocks"] == 0
    if lowered == "none":  # none stores nothing at all
        assert all(n == 0 for n in rows.values())


def test_sync_after_another_engine_lowered_the_level_to_none_sends_nothing(
    open_engine, tmp_path, clock
):
    from ondevice import SyncSettings

    sent: list[bytes] = []

    class Recorder:
        def request(self, method, url, headers, body, timeout):
            sent.append(body)
            raise AssertionError("nothing may be sent at level none")

    path = tmp_path / "shared"
    app = open_engine(
        "segment",
        path=path,
        sync=SyncSettings(
            server_url="http://sync.invalid", transport=Recorder(), schedule=False, min_gap=0
        ),
    )
    app.set_signals("u", {"plan": "pro"})
    open_engine("segment", path=path).set_privacy_level("none")
    outcome = app.sync("u")
    assert outcome.status == "skipped" and sent == []
    assert _rows(app)["report_memos"] == 0


# -- item 2: files deleted or replaced under an open engine ----------------------------


def test_a_deleted_profile_directory_refuses_every_later_write(make_engine, profile_dir):
    engine = make_engine()
    assert engine.update_profile("u", {"item_id": "a", "timestamp": T0 - 5})
    shutil.rmtree(profile_dir)
    with pytest.raises(ProfileGoneError, match="deleted or replaced"):
        engine.update_profile("u", {"item_id": "b", "timestamp": T0 - 4})
    with pytest.raises(ProfileGoneError):
        engine.set_signals("u", {"plan": "pro"})
    with pytest.raises(ProfileGoneError):
        engine.export_profile("u")
    assert not profile_dir.exists()  # and nothing recreated it


def test_an_old_engine_refuses_to_write_into_a_new_profile_at_the_same_path(
    make_engine, profile_dir, raw_key
):
    old = make_engine()
    old.update_profile("u", {"item_id": "a", "timestamp": T0 - 5})
    shutil.rmtree(profile_dir)
    new = make_engine()  # a new profile where the old one was
    new.update_profile("v", {"item_id": "z", "timestamp": T0 - 5})
    with pytest.raises(ProfileGoneError):
        old.update_profile("u", {"item_id": "b", "timestamp": T0 - 4})
    assert new.users() == ["v"]
    assert new.export_profile()["users"][0]["interactions"][0]["item_id"] == "z"


def test_ondevice_wipe_elsewhere_stops_an_open_engine_from_acknowledging_writes(
    make_engine, profile_dir, raw_key
):
    engine = make_engine()
    engine.update_profile("u", {"item_id": "a", "timestamp": T0 - 5})
    result = subprocess.run(
        [sys.executable, "-m", "ondevice", "wipe", str(profile_dir), "--yes",
         "--raw-key-env", "K"],
        env={"K": raw_key.hex(), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    with pytest.raises(ProfileGoneError):
        engine.update_profile("u", {"item_id": "b", "timestamp": T0 - 4})
    with pytest.raises(ProfileGoneError):
        engine.block_item("u", "a")
    assert not (profile_dir / "profile.db").exists()
