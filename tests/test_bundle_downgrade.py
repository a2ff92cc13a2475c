"""Issue 10, item 8: an older bundle, validly signed with the pinned key, is refused after
a newer one. The profile keeps the newest accepted version (the signed ``created_at``);
``allow_downgrade=True`` is the operator's explicit escape hatch."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_bundle import make_catalog

from ondevice import PersonalizationEngine, RawKey
from ondevice.bundle import BundleInfo
from ondevice.errors import BundleError, ProfileVersionError
from ondevice.operator.bundle_writer import generate_signing_key, public_key_bytes, write_bundle
from ondevice.store import SCHEMA_VERSION, Store

from conftest import snapshot

OLD, NEW, NEWER = 1_700_000_000.0, 1_700_086_400.0, 1_700_172_800.0


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return generate_signing_key()


@pytest.fixture(scope="module")
def bundles(key: Ed25519PrivateKey, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Bundles of the same catalog family, each validly signed with the pinned key."""
    root = tmp_path_factory.mktemp("versions")
    made = {
        "old": dataclasses.replace(make_catalog(1), created_at=OLD),
        "new": dataclasses.replace(make_catalog(2), created_at=NEW),
        "newer": dataclasses.replace(make_catalog(3), created_at=NEWER),
        # Same created_at as "new", different content.
        "new-twin": dataclasses.replace(make_catalog(4), created_at=NEW),
    }
    paths = {}
    for name, catalog in made.items():
        paths[name] = root / f"{name}.odb"
        write_bundle(catalog, paths[name], private_key=key)
    return paths


def _engine(
    path: Path, raw_key: bytes, key: Ed25519PrivateKey, **kw: object
) -> PersonalizationEngine:
    return PersonalizationEngine(
        path,
        key=RawKey(raw_key),
        privacy_level="behavioral",
        bundle_public_key=public_key_bytes(key),
        **kw,  # type: ignore[arg-type]
    )


def _stored(engine: PersonalizationEngine) -> dict[str, object] | None:
    from ondevice.bundle import VERSION_META_KEY

    with engine._store.read() as conn:
        value = Store.get_meta(conn, VERSION_META_KEY)
    return None if value is None else json.loads(value)


def test_an_older_bundle_is_refused_after_a_newer_one(
    tmp_path: Path, raw_key: bytes, key: Ed25519PrivateKey, bundles: dict[str, Path]
) -> None:
    with _engine(tmp_path / "p", raw_key, key) as engine:
        info = engine.load_bundle(bundles["new"])
        with pytest.raises(BundleError, match="older than the newest bundle"):
            engine.load_bundle(bundles["old"])
        assert engine.catalog is not None and engine.catalog.created_at == NEW
        stored = _stored(engine)
        assert stored == {"created_at": NEW, "sha256": info.sha256, "name": info.name}


def test_the_newest_version_is_kept_in_the_profile_across_engines(
    tmp_path: Path, raw_key: bytes, key: Ed25519PrivateKey, bundles: dict[str, Path]
) -> None:
    path = tmp_path / "p"
    with _engine(path, raw_key, key, bundle=bundles["new"]):
        pass
    # A later engine (another launch, another process) refuses the old bundle, at open
    # and at load, and leaves the record as it was.
    with pytest.raises(BundleError, match="downgrade"):
        _engine(path, raw_key, key, bundle=bundles["old"])
    with _engine(path, raw_key, key) as engine:
        with pytest.raises(BundleError, match="downgrade"):
            engine.load_bundle(bundles["old"])
        assert engine.catalog is None
        stored = _stored(engine)
        assert stored is not None and stored["created_at"] == NEW
        engine.load_bundle(bundles["new"])  # the same bundle again is fine
        engine.load_bundle(bundles["newer"])
        assert engine.catalog is not None and engine.catalog.created_at == NEWER
    with _engine(path, raw_key, key) as engine, pytest.raises(BundleError, match="downgrade"):
        engine.load_bundle(bundles["new"])


def test_two_engines_on_one_profile_share_the_newest_version(
    tmp_path: Path, raw_key: bytes, key: Ed25519PrivateKey, bundles: dict[str, Path]
) -> None:
    path = tmp_path / "p"
    with _engine(path, raw_key, key, bundle=bundles["old"]) as first:
        with _engine(path, raw_key, key, bundle=bundles["newer"]):
            pass
        with pytest.raises(BundleError, match="downgrade"):
            first.load_bundle(bundles["new"])
        assert first.catalog is not None and first.catalog.created_at == OLD  # kept


def test_a_different_bundle_claiming_the_same_version_is_refused(
    tmp_path: Path, raw_key: bytes, key: Ed25519PrivateKey, bundles: dict[str, Path]
) -> None:
    with _engine(tmp_path / "p", raw_key, key, bundle=bundles["new"]) as engine:
        before = engine.catalog
        with pytest.raises(BundleError, match="same created_at"):
            engine.load_bundle(bundles["new-twin"])
        assert engine.catalog is before


def test_allow_downgrade_is_the_operators_escape_hatch(
    tmp_path: Path, raw_key: bytes, key: Ed25519PrivateKey, bundles: dict[str, Path]
) -> None:
    path = tmp_path / "p"
    with _engine(path, raw_key, key, bundle=bundles["newer"]) as engine:
        info = engine.load_bundle(bundles["old"], allow_downgrade=True)
        assert engine.catalog is not None and engine.catalog.created_at == OLD
        # The rollback sticks: the old bundle is now the newest accepted one ...
        assert _stored(engine) == {"created_at": OLD, "sha256": info.sha256, "name": info.name}
    with _engine(path, raw_key, key, bundle=bundles["old"]) as engine:
        # ... and anything later than it is accepted again without the flag.
        engine.load_bundle(bundles["new"])
        with pytest.raises(BundleError, match="downgrade"):
            engine.load_bundle(bundles["old"])
        # Equal versions with different content pass only with the flag too.
        engine.load_bundle(bundles["new-twin"], allow_downgrade=True)
        assert engine.catalog is not None and engine.catalog.created_at == NEW


def test_a_refused_downgrade_at_open_closes_the_profile(
    tmp_path: Path, raw_key: bytes, key: Ed25519PrivateKey, bundles: dict[str, Path]
) -> None:
    path = tmp_path / "p"
    with _engine(path, raw_key, key, bundle=bundles["new"]):
        pass
    before = snapshot(path)
    with pytest.raises(BundleError):
        _engine(path, raw_key, key, bundle=bundles["old"])
    assert snapshot(path) == before
    with _engine(path, raw_key, key) as engine:  # not left locked or half-open
        assert engine.users() == []


def test_a_newer_profile_with_a_bundle_is_refused_untouched(
    tmp_path: Path, raw_key: bytes, key: Ed25519PrivateKey, bundles: dict[str, Path]
) -> None:
    path = tmp_path / "p"
    with _engine(path, raw_key, key) as engine, engine._store.write() as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    before = snapshot(path)
    with pytest.raises(ProfileVersionError):
        _engine(path, raw_key, key, bundle=bundles["new"])
    assert snapshot(path) == before


def _info(created_at: float, sha: str = "a" * 64, name: str = "c") -> BundleInfo:
    return BundleInfo(1, name, created_at, 3, 0, 0, 100, sha)


def test_the_version_order() -> None:
    from ondevice.bundle import check_version, version_record

    newest = version_record(_info(NEW))
    check_version(_info(OLD), None)  # nothing accepted yet
    check_version(_info(NEW), newest)  # the same bundle
    check_version(_info(NEWER, "b" * 64), newest)
    check_version(_info(NEW + 1e-6, "b" * 64), newest)  # later by a microsecond
    with pytest.raises(BundleError, match="older than"):
        check_version(_info(NEW - 1e-6), newest)
    with pytest.raises(BundleError, match="same created_at"):
        check_version(_info(NEW, "b" * 64), newest)
    for broken in ("", "[]", '{"created_at": "x"}', '{"sha256": "a"}'):
        with pytest.raises(BundleError, match="unreadable"):
            check_version(_info(NEWER), broken)
