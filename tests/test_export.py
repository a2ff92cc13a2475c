"""Export, wipe, import: the same profile comes back; encrypted exports reveal nothing."""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ondevice import ExportError, InvalidInputError, PolicyViolationError
from ondevice.export import day_to_iso, encode_export
from ondevice.store import Store

from conftest import FAST_KDF, T0

MARKER = "EXP-marker-7781"

_ids = st.text(alphabet=string.ascii_letters + string.digits + "-_é", min_size=1, max_size=20)
_interaction = st.fixed_dictionaries(
    {
        "item_id": _ids,
        "event": st.sampled_from(["view", "click", "purchase", "like"]),
        "timestamp": st.floats(min_value=T0 - 80 * 86400, max_value=T0, allow_nan=False),
        "value": st.one_of(st.none(), st.floats(-1e6, 1e6, allow_nan=False)),
        "context": st.fixed_dictionaries(
            {}, optional={"daypart": st.sampled_from(["morning", "evening"]), "device": _ids}
        ),
    }
)
_user = st.fixed_dictionaries(
    {
        "interactions": st.lists(_interaction, max_size=15),
        "signals": st.fixed_dictionaries(
            {}, optional={"plan": st.sampled_from(["free", "pro"]), "seats": st.integers(0, 10**6)}
        ),
    }
)


def _strip(export: dict) -> dict:
    return {k: v for k, v in export.items() if k != "exported_at"}


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(users=st.dictionaries(_ids, _user, min_size=1, max_size=4))
def test_export_wipe_import_restores_an_identical_profile(make_engine, users):
    engine = make_engine(privacy_level="contextual")
    for uid in engine.users():
        engine.wipe_profile(uid)
    for uid, data in users.items():
        for it in data["interactions"]:
            engine.update_profile(uid, it)
        if data["signals"]:
            engine.set_signals(uid, data["signals"])
    before = engine.export_profile()
    for uid in users:
        engine.wipe_profile(uid)
    assert engine.export_profile()["users"] == []
    imported = engine.import_profile(json.loads(json.dumps(before)))
    assert sorted(imported) == sorted(u["user_id"] for u in before["users"])
    assert _strip(engine.export_profile()) == _strip(before)


def test_import_into_a_fresh_profile_through_an_encrypted_file(make_engine, tmp_path, raw_key):
    engine = make_engine(privacy_level="contextual")
    engine.update_profile(
        "alice", {"item_id": MARKER, "timestamp": T0 - 5, "context": {"device": MARKER}}
    )
    engine.set_signals("alice", {"plan": "pro"})
    path = engine.export_profile_to(tmp_path / "alice.export", passphrase="export pw")
    assert MARKER.encode() not in path.read_bytes()
    assert b"alice" not in path.read_bytes()
    other = make_engine(path=tmp_path / "other", privacy_level="contextual")
    assert other.import_profile(path, passphrase="export pw") == ["alice"]
    assert _strip(other.export_profile()) == _strip(engine.export_profile())


def test_plaintext_export_file_needs_an_explicit_yes(make_engine, tmp_path):
    engine = make_engine()
    engine.update_profile("u", {"item_id": MARKER})
    with pytest.raises(InvalidInputError, match="allow_plaintext"):
        engine.export_profile_to(tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()
    path = engine.export_profile_to(tmp_path / "x.json", allow_plaintext=True)
    assert MARKER.encode() in path.read_bytes()
    assert path.stat().st_mode & 0o777 == 0o600


def test_wrong_export_passphrase_and_tampering_are_refused(make_engine, tmp_path):
    engine = make_engine()
    engine.update_profile("u", {"item_id": "a"})
    path = engine.export_profile_to(tmp_path / "e", passphrase="pw")
    before = engine.export_profile()
    with pytest.raises(ExportError, match="wrong passphrase"):
        engine.import_profile(path, passphrase="not pw")
    with pytest.raises(ExportError, match="encrypted"):
        engine.import_profile(path)
    doc = json.loads(path.read_bytes())
    doc["kdf"]["iterations"] = 1
    with pytest.raises(ExportError):
        engine.import_profile(json.dumps(doc).encode(), passphrase="pw")
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 1
    with pytest.raises(ExportError):
        engine.import_profile(bytes(raw), passphrase="pw")
    assert _strip(engine.export_profile()) == _strip(before)


def test_import_of_undeclared_signal_writes_nothing(make_engine):
    engine = make_engine()
    engine.update_profile("keep", {"item_id": "a", "timestamp": T0 - 1})
    export = engine.export_profile()
    export["users"].append(
        {
            "user_id": "new",
            "created_at": T0,
            "signals": [{"name": "salary", "value": 1, "updated_at": T0}],
        }
    )
    export["users"][0]["interactions"].append({"item_id": "b", "timestamp": T0})
    with engine._store.read() as conn:
        before = Store.count_rows(conn)
    with pytest.raises(PolicyViolationError):
        engine.import_profile(export)
    with engine._store.read() as conn:
        assert Store.count_rows(conn) == before


@pytest.mark.parametrize(
    "doc",
    [
        {"format": "something-else", "version": 1, "users": []},
        {"format": "ondevice.export", "version": 99, "users": []},
        {"format": "ondevice.export", "version": 1, "users": "nope"},
        {"format": "ondevice.export", "version": 1, "users": [{"user_id": 5}]},
        {"format": "ondevice.export", "version": 1, "users": [{"user_id": "u", "created_at": "x"}]},
    ],
)
def test_malformed_exports_are_clear_errors(make_engine, doc):
    engine = make_engine()
    with pytest.raises((ExportError, InvalidInputError)):
        engine.import_profile(doc)
    assert engine.users() == []


def test_import_at_a_lower_level_drops_what_the_level_does_not_collect(make_engine, tmp_path):
    engine = make_engine(privacy_level="contextual")
    engine.update_profile("u", {"item_id": "a", "timestamp": T0 - 1, "context": {"device": "x"}})
    engine.set_signals("u", {"plan": "free"})
    export = engine.export_profile()
    low = make_engine(path=tmp_path / "low", privacy_level="segment")
    low.import_profile(export)
    user = low.export_profile()["users"][0]
    assert user["interactions"] == [] and user["signals"][0]["value"] == "free"
    # The window is dropped, but the segment level's counters learn of it (no item ids).
    assert export["users"][0]["activity"] == []  # contextual keeps the window instead
    assert user["activity"] == [
        {"day": day_to_iso(int((T0 - 1) // 86400)), "event": "view", "count": 1}
    ]


def test_export_bytes_are_versioned_and_documented_fields_present(make_engine):
    engine = make_engine()
    engine.update_profile("u", {"item_id": "a"})
    doc = json.loads(encode_export(engine.export_profile(), passphrase=None))
    assert doc["format"] == "ondevice.export" and doc["version"] == 1
    assert {p["name"] for p in doc["purposes"]} >= {"interactions.item_id", "plan"}
    assert set(doc["users"][0]) == {
        "user_id",
        "created_at",
        "signals",
        "interactions",
        "activity",
        "derived",
        "blocked_items",
        "egress",
        "report_memos",
        "report_schedule",
        "privacy_budget",
    }
    enc = json.loads(encode_export(doc, passphrase="x", kdf=FAST_KDF))
    assert enc["format"] == "ondevice.export.encrypted" and enc["version"] == 1


def test_an_export_asking_for_a_huge_kdf_is_refused_cheaply(make_engine):
    engine = make_engine()
    doc = {
        "format": "ondevice.export.encrypted",
        "version": 1,
        "kdf": {"name": "argon2id", "memory_kib": 4 * 1024 * 1024, "iterations": 3, "lanes": 4},
        "sealed": {
            "salt": "AAAAAAAAAAAAAAAAAAAAAA==",
            "nonce": "AAAAAAAAAAAAAAAA",
            "ciphertext": "AAAA",
        },
    }
    with pytest.raises(ExportError):
        engine.import_profile(json.dumps(doc).encode(), passphrase="pw")
