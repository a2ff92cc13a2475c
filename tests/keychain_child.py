"""Scenarios of the keychain tests, run inside a private D-Bus session.

Started by :func:`keychain_env.run_in_secret_service` as
``dbus-run-session -- python keychain_child.py SCENARIO --root DIR --out FILE ...``.
It starts its own gnome-keyring (:func:`keychain_env.secret_service`), drives
``ondevice`` through the *default* keyring backend, and writes what it observed (the
Secret Service's items as ``secret-tool`` sees them, files, errors) to ``--out`` as
JSON. The test process makes the assertions.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlcipher3

import ondevice
from ondevice.keys import KEY_FILE, Keychain

import keychain_env  # this file runs as a script: its directory is on sys.path
from keychain_env import secret_tool_items

DB_FILE = "profile.db"
# The cheapest parameters the SDK accepts (this child does not lower the floor as the
# test process does): two derivations, about 0.1 s.
CHEAP_KDF = ondevice.Argon2Params(
    memory_kib=ondevice.keys.KDF_MIN_MEMORY_KIB,
    iterations=ondevice.keys.KDF_MIN_ITERATIONS,
    lanes=1,
)

Observations = dict[str, Any]


def record(engine: ondevice.PersonalizationEngine, markers: list[str]) -> None:
    for marker in markers:
        engine.update_profile("alice", {"item_id": marker, "event": "view"})


def read_back(engine: ondevice.PersonalizationEngine) -> list[str]:
    users = engine.export_profile("alice")["users"]
    return [row["item_id"] for user in users for row in user["interactions"]]


def key_json(profile: Path) -> dict[str, Any]:
    data = json.loads((profile / KEY_FILE).read_bytes())
    assert isinstance(data, dict)
    return data


def backend_name(provider: Keychain) -> str:
    cls = type(provider.backend())
    return f"{cls.__module__}.{cls.__qualname__}"


def opens_with(db: Path, hex_key: str, scratch: Path) -> bool:
    """Whether sqlcipher3 alone (no ondevice code) reads a copy of ``db`` under the raw
    key ``hex_key`` and finds the profile's tables in it."""
    scratch.mkdir()
    copy = scratch / DB_FILE
    shutil.copyfile(db, copy)
    conn = sqlcipher3.connect(str(copy))
    try:
        conn.execute(f"PRAGMA key = \"x'{hex_key}'\"")
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    except sqlcipher3.DatabaseError:
        return False
    finally:
        conn.close()
    return int(tables) > 0


def error_of(fn: Callable[[], object]) -> dict[str, str] | None:
    """The ondevice error ``fn`` raises (class name and message), or None."""
    try:
        fn()
    except ondevice.OndeviceError as exc:
        return {"type": type(exc).__name__, "message": str(exc)}
    return None


def all_bytes(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file())


# -- scenarios ----------------------------------------------------------------------------


def roundtrip(root: Path, service: str, markers: list[str]) -> Observations:
    """Create with the default backend, record, close, reopen with a fresh provider,
    read back; check the Secret Service holds the one key that opens the database."""
    profile = root / "profile"
    obs: Observations = {}
    provider = Keychain(service=service)
    with ondevice.PersonalizationEngine(
        profile, key=provider, privacy_level="behavioral"
    ) as engine:
        record(engine, markers)
    obs["backend"] = backend_name(provider)
    obs["key_json"] = key_json(profile)
    obs["items"] = secret_tool_items(service)
    with ondevice.PersonalizationEngine(profile, key=Keychain(service=service)) as engine:
        obs["read_back"] = read_back(engine)
    obs["files"] = sorted(p.name for p in profile.iterdir())
    blob = all_bytes(profile)
    obs["markers_on_disk"] = [m for m in markers if m.encode() in blob]
    if len(obs["items"]) == 1:
        obs["opens_with_keychain_secret"] = opens_with(
            profile / DB_FILE, obs["items"][0]["secret"], root / "scratch"
        )
    # key=None means the OS keychain under the default service name.
    default = root / "default-profile"
    with ondevice.PersonalizationEngine(default) as engine:
        record(engine, markers[:1])
    obs["default_key_json"] = key_json(default)
    obs["default_items"] = secret_tool_items("ondevice")
    with ondevice.PersonalizationEngine(default) as engine:
        engine.wipe()
    obs["default_items_after_wipe"] = secret_tool_items("ondevice")
    return obs


def wipe(root: Path, service: str, markers: list[str]) -> Observations:
    """wipe() deletes the keychain entry and the files; a copy of the whole profile
    directory taken before cannot be reopened afterwards."""
    profile, backup = root / "profile", root / "backup"
    obs: Observations = {}
    with ondevice.PersonalizationEngine(
        profile, key=Keychain(service=service), privacy_level="behavioral"
    ) as engine:
        record(engine, markers)
    shutil.copytree(profile, backup)
    obs["account"] = key_json(profile)["account"]
    obs["items_before"] = secret_tool_items(service)
    engine = ondevice.PersonalizationEngine(profile, key=Keychain(service=service))
    obs["read_back_before"] = read_back(engine)
    engine.wipe()
    obs["closed_after_wipe"] = engine.closed
    obs["items_after"] = secret_tool_items(service)
    obs["profile_left"] = sorted(p.name for p in profile.iterdir()) if profile.exists() else None
    before = {p.name: p.read_bytes() for p in backup.iterdir()}
    obs["reopen_copy_error"] = error_of(
        lambda: ondevice.PersonalizationEngine(
            backup, key=Keychain(service=service), create=False
        ).close()
    )
    obs["copy_unchanged"] = before == {p.name: p.read_bytes() for p in backup.iterdir()}
    obs["items_after_reopen_attempt"] = secret_tool_items(service)
    return obs


def rekey(root: Path, service: str, markers: list[str]) -> Observations:
    """rekey() with the keychain leaves exactly one entry: the new key's; moving to
    another service or to a passphrase releases the old entry."""
    profile = root / "profile"
    other = service + "-moved"
    obs: Observations = {}
    first, second = markers[: len(markers) // 2], markers[len(markers) // 2 :]
    engine = ondevice.PersonalizationEngine(
        profile, key=Keychain(service=service), privacy_level="behavioral"
    )
    record(engine, first)
    obs["account_before"] = key_json(profile)["account"]
    obs["items_before"] = secret_tool_items(service)
    engine.rekey()
    obs["account_after"] = key_json(profile)["account"]
    obs["items_after"] = secret_tool_items(service)
    obs["files_after"] = sorted(p.name for p in profile.iterdir())
    record(engine, second)
    engine.close()
    if len(obs["items_before"]) == 1:
        obs["opens_with_old_secret"] = opens_with(
            profile / DB_FILE, obs["items_before"][0]["secret"], root / "scratch1"
        )
    if len(obs["items_after"]) == 1:
        obs["opens_with_new_secret"] = opens_with(
            profile / DB_FILE, obs["items_after"][0]["secret"], root / "scratch2"
        )
    engine = ondevice.PersonalizationEngine(profile, key=Keychain(service=service))
    obs["read_back_after_rekey"] = read_back(engine)
    engine.rekey(Keychain(service=other))
    obs["moved_items_old_service"] = secret_tool_items(service)
    obs["moved_items_new_service"] = secret_tool_items(other)
    obs["moved_key_json"] = key_json(profile)
    engine.rekey(ondevice.Passphrase("correct horse", kdf=CHEAP_KDF))
    obs["passphrase_items_old_service"] = secret_tool_items(other)
    obs["passphrase_provider"] = key_json(profile)["provider"]
    engine.close()
    with ondevice.PersonalizationEngine(
        profile, key=ondevice.Passphrase("correct horse", kdf=CHEAP_KDF)
    ) as engine:
        obs["read_back_passphrase"] = read_back(engine)
    return obs


def locked(root: Path, service: str, markers: list[str]) -> Observations:
    """A locked keychain (no prompt can be shown) is a clear error, at once, and the
    failed open changes nothing on disk."""
    import secretstorage

    profile = root / "profile"
    obs: Observations = {}
    with ondevice.PersonalizationEngine(profile, key=Keychain(service=service)) as engine:
        record(engine, markers)
    before = {p.name: p.read_bytes() for p in profile.iterdir()}
    conn = secretstorage.dbus_init()
    try:
        collection = secretstorage.Collection(conn, keychain_env.DEFAULT_COLLECTION)
        collection.lock()
        obs["locked"] = collection.is_locked()
    finally:
        conn.close()
    started = time.monotonic()
    obs["open_error"] = error_of(
        lambda: ondevice.PersonalizationEngine(profile, key=Keychain(service=service)).close()
    )
    obs["open_seconds"] = time.monotonic() - started
    obs["files_unchanged"] = before == {p.name: p.read_bytes() for p in profile.iterdir()}
    return obs


SCENARIOS: dict[str, Callable[[Path, str, list[str]], Observations]] = {
    "roundtrip": roundtrip,
    "wipe": wipe,
    "rekey": rekey,
    "locked": locked,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--service", required=True)
    parser.add_argument("--markers", required=True, help="comma-separated item ids")
    args = parser.parse_args(argv)
    markers = args.markers.split(",")
    with keychain_env.secret_service(args.root) as pid:
        obs = SCENARIOS[args.scenario](args.root, args.service, markers)
        obs["daemon_pid"] = pid
    args.out.write_text(json.dumps(obs), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
