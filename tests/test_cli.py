"""The ``ondevice`` command: report, export, import and wipe from a shell.

Most tests call ``ondevice.cli.main([...])`` in-process; a few run ``python -m ondevice``
in a real subprocess (the entry point, a non-terminal stdin, a real pseudo-terminal for
the confirmation prompt).
"""

from __future__ import annotations

import io
import json
import os
import pty
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from ondevice import Passphrase, PersonalizationEngine, RawKey, __version__
from ondevice.cli import Command, main, register
from ondevice.keys import UNREADABLE

from conftest import FAST_KDF, demo_policy, snapshot

PASS = "correct horse battery staple"
EXPORT_PASS = "another long export passphrase"
MARKERS = ("MARKER-cli-item-7f3a", "MARKER-cli-item-9c1e", "MARKER-cli-item-b2d4")
PROFILE_FILES = ("profile.db", "profile.db-wal", "profile.db-shm", "key.json")


def _create(path: Path, **key: Any) -> None:
    """A profile created through the library (cheap KDF), with a declared signal."""
    provider = key.get("key", Passphrase(PASS, kdf=FAST_KDF))
    with PersonalizationEngine(path, key=provider, policy=demo_policy()) as engine:
        engine.update_profile("alice", {"item_id": MARKERS[0], "event": "view"})
        engine.update_profile("alice", {"item_id": MARKERS[1], "event": "purchase", "value": 2})
        engine.set_signals("alice", {"plan": "pro", "seats": 3})
        engine.update_profile("bob", {"item_id": MARKERS[2], "event": "click"})


@pytest.fixture
def profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "profile"
    _create(path)
    monkeypatch.setenv("ONDEVICE_PASS", PASS)
    monkeypatch.setenv("ONDEVICE_EXPORT_PASS", EXPORT_PASS)
    return path


def _key(path: Path) -> list[str]:
    return [str(path), "--passphrase-env", "ONDEVICE_PASS"]


def _run(capsys: pytest.CaptureFixture[str], argv: Sequence[str]) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _subprocess(argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ONDEVICE_PASS": PASS, "ONDEVICE_EXPORT_PASS": EXPORT_PASS}
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run(
        [sys.executable, "-m", "ondevice", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
        **kwargs,
    )


def _export_without_time(path: Path) -> dict[str, Any]:
    with PersonalizationEngine(path, key=Passphrase(PASS), create=False) as engine:
        data = engine.export_profile()
    del data["exported_at"]
    return data


# -- report --------------------------------------------------------------------------------


def test_report_json_lists_users_signals_and_purposes(
    profile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(capsys, ["report", *_key(profile)])
    assert (code, err) == (0, "")
    data = json.loads(out)
    users = {u["user_id"]: u for u in data["users"]}
    assert set(users) == {"alice", "bob"}
    assert users["alice"]["interactions"] == 2
    assert users["alice"]["signals"] == {"plan": "pro", "seats": 3}
    fields = {f["name"]: f for f in data["fields"]}
    assert fields["plan"]["purpose"] == "choose plan-specific tips"
    assert fields["plan"]["collected"] is True
    assert fields["derived.user_vector"]["collected"] is False  # behavioral level
    assert data["privacy_level"] == "behavioral"
    assert out == json.dumps(data, indent=2, sort_keys=True) + "\n"


def test_report_for_one_user_leaves_out_the_others(
    profile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(capsys, ["report", *_key(profile), "--user", "bob"])
    assert code == 0
    assert [u["user_id"] for u in json.loads(out)["users"]] == ["bob"]


def test_report_for_an_unknown_user_is_an_error(
    profile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(capsys, ["report", *_key(profile), "--user", "carol"])
    assert (code, out) == (1, "")
    assert err == "ondevice: error: there is no user 'carol' in this profile\n"


def test_report_text_shows_purposes_retention_and_per_user_counts(
    profile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(capsys, ["report", *_key(profile), "--format", "text"])
    assert code == 0
    assert "[x] plan  (kept 365 days; from level segment)" in out
    assert "choose plan-specific tips" in out
    assert "[ ] derived.user_vector" in out
    assert "[ ] daypart" in out  # context is collected from the contextual level only
    assert "Users (2):" in out
    alice = out[out.index("  alice") : out.index("  bob")]
    assert "interactions: 2" in alice
    assert "plan='pro'" in alice and "seats=3" in alice
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)


# -- export and import ---------------------------------------------------------------------


def test_encrypted_export_hides_markers_and_imports_into_a_fresh_profile(
    profile: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "export.json"
    code, out, _ = _run(
        capsys,
        [
            "export",
            *_key(profile),
            "--out",
            str(target),
            "--export-passphrase-env",
            "ONDEVICE_EXPORT_PASS",
        ],
    )
    assert code == 0
    assert json.loads(out) == {"path": str(target), "encrypted": True, "users": ["alice", "bob"]}
    blob = target.read_bytes()
    for marker in (*MARKERS, "alice", "plan-specific"):
        assert marker.encode() not in blob
    assert target.stat().st_mode & 0o077 == 0

    fresh = tmp_path / "fresh"
    with PersonalizationEngine(fresh, key=Passphrase(PASS, kdf=FAST_KDF), policy=demo_policy()):
        pass
    code, out, _ = _run(
        capsys,
        ["import", *_key(fresh), str(target), "--export-passphrase-env", "ONDEVICE_EXPORT_PASS"],
    )
    assert code == 0
    assert json.loads(out) == ["alice", "bob"]
    assert _export_without_time(fresh) == _export_without_time(profile)


def test_plaintext_export_goes_to_stdout_and_imports_from_stdin(
    profile: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    code, out, _ = _run(capsys, ["export", *_key(profile), "--plaintext", "--user", "alice"])
    assert code == 0
    doc = json.loads(out)
    assert [u["user_id"] for u in doc["users"]] == ["alice"]
    assert {i["item_id"] for i in doc["users"][0]["interactions"]} == set(MARKERS[:2])

    fresh = tmp_path / "fresh"
    with PersonalizationEngine(fresh, key=Passphrase(PASS, kdf=FAST_KDF), policy=demo_policy()):
        pass
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(out.encode())))
    code, out, _ = _run(capsys, ["import", *_key(fresh), "-"])
    assert (code, json.loads(out)) == (0, ["alice"])
    with PersonalizationEngine(fresh, key=Passphrase(PASS), create=False) as engine:
        assert engine.report("alice").users[0].interactions == 2


def test_plaintext_export_to_a_file_is_readable(
    profile: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "plain.json"
    code, out, _ = _run(capsys, ["export", *_key(profile), "--plaintext", "--out", str(target)])
    assert code == 0
    assert json.loads(out)["encrypted"] is False
    assert MARKERS[2].encode() in target.read_bytes()


@pytest.mark.parametrize("with_out", [True, False], ids=["to-file", "to-stdout"])
def test_export_without_passphrase_or_plaintext_is_refused_and_writes_nothing(
    profile: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], with_out: bool
) -> None:
    target = tmp_path / "export.json"
    argv = ["export", *_key(profile), *(["--out", str(target)] if with_out else [])]
    code, out, err = _run(capsys, argv)
    assert code == 2
    assert out == ""
    assert "--export-passphrase-env VAR" in err and "--plaintext" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profile"]


def test_encrypted_export_to_stdout_is_refused(
    profile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(
        capsys, ["export", *_key(profile), "--export-passphrase-env", "ONDEVICE_EXPORT_PASS"]
    )
    assert (code, out) == (2, "")
    assert "needs --out FILE" in err


def test_plaintext_and_export_passphrase_are_mutually_exclusive(
    profile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(
        capsys,
        ["export", *_key(profile), "--plaintext", "--export-passphrase-env", "X"],
    )
    assert code == 2
    assert "not allowed with argument" in err


def test_import_with_a_wrong_export_passphrase_imports_nothing(
    profile: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target = tmp_path / "export.json"
    argv = ["--out", str(target), "--export-passphrase-env", "ONDEVICE_EXPORT_PASS"]
    assert main(["export", *_key(profile), *argv]) == 0
    with PersonalizationEngine(profile, key=Passphrase(PASS), create=False) as engine:
        engine.wipe_profile("bob")
    monkeypatch.setenv("WRONG", "not the export passphrase")
    capsys.readouterr()
    code, out, err = _run(
        capsys, ["import", *_key(profile), str(target), "--export-passphrase-env", "WRONG"]
    )
    assert (code, out) == (1, "")
    assert err == (
        "ondevice: error: cannot decrypt the export: wrong passphrase, or the file was modified\n"
    )
    with PersonalizationEngine(profile, key=Passphrase(PASS), create=False) as engine:
        assert engine.users() == ["alice"]


def test_import_of_an_encrypted_export_without_its_passphrase_says_so(
    profile: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "export.json"
    argv = ["--out", str(target), "--export-passphrase-env", "ONDEVICE_EXPORT_PASS"]
    assert main(["export", *_key(profile), *argv]) == 0
    capsys.readouterr()
    code, _, err = _run(capsys, ["import", *_key(profile), str(target)])
    assert code == 1
    assert "this export is encrypted" in err


def test_import_of_a_missing_file_is_an_error(
    profile: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(capsys, ["import", *_key(profile), str(tmp_path / "nope.json")])
    assert code == 1
    assert "no export file at" in err


# -- keys and errors -----------------------------------------------------------------------


def test_wrong_passphrase_fails_with_the_documented_message(
    profile: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot(profile)
    monkeypatch.setenv("ONDEVICE_PASS", "wrong passphrase")
    code, out, err = _run(capsys, ["report", *_key(profile)])
    assert (code, out) == (1, "")
    assert err == f"ondevice: error: {UNREADABLE}\n"
    assert snapshot(profile) == before


def test_wrong_passphrase_in_a_real_process_prints_no_traceback(profile: Path) -> None:
    env_pass = {"ONDEVICE_PASS": "wrong passphrase"}
    proc = subprocess.run(
        [sys.executable, "-m", "ondevice", "report", *_key(profile)],
        capture_output=True,
        text=True,
        env={**os.environ, **env_pass},
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == f"ondevice: error: {UNREADABLE}\n"


@pytest.mark.parametrize(
    "argv_tail",
    [
        ["report", "{p}", "--passphrase-env", "ONDEVICE_UNSET_VAR"],
        ["report", "{p}", "--raw-key-env", "ONDEVICE_UNSET_VAR"],
        [
            "export",
            "{p}",
            "--passphrase-env",
            "ONDEVICE_PASS",
            "--out",
            "{p}/x",
            "--export-passphrase-env",
            "ONDEVICE_UNSET_VAR",
        ],
    ],
    ids=["passphrase", "raw-key", "export-passphrase"],
)
def test_missing_env_var_is_a_clear_error_naming_it(
    profile: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv_tail: list[str],
) -> None:
    monkeypatch.delenv("ONDEVICE_UNSET_VAR", raising=False)
    code, out, err = _run(capsys, [a.replace("{p}", str(profile)) for a in argv_tail])
    assert (code, out) == (1, "")
    assert err.startswith("ondevice: error: the environment variable ONDEVICE_UNSET_VAR")
    assert "is not set" in err
    assert not (profile / "x").exists()


def test_empty_env_var_is_refused(
    profile: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ONDEVICE_PASS", "")
    code, _, err = _run(capsys, ["report", *_key(profile)])
    assert code == 1
    assert "ONDEVICE_PASS (named by --passphrase-env) is empty" in err


def test_passphrase_is_not_accepted_on_the_command_line(
    profile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Not even as an abbreviation of --passphrase-env (which would echo it in an error).
    code, _, err = _run(capsys, ["report", str(profile), "--passphrase", PASS])
    assert code == 2
    assert "unrecognized arguments" in err


def test_raw_key_from_env_opens_a_raw_key_profile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    key = os.urandom(32)
    path = tmp_path / "raw"
    _create(path, key=RawKey(key))
    monkeypatch.setenv("RAW", key.hex())
    code, out, _ = _run(capsys, ["report", str(path), "--raw-key-env", "RAW"])
    assert code == 0
    assert len(json.loads(out)["users"]) == 2
    monkeypatch.setenv("RAW", "zz" * 32)
    code, _, err = _run(capsys, ["report", str(path), "--raw-key-env", "RAW"])
    assert code == 1
    assert "64 hex digits" in err
    monkeypatch.setenv("RAW", os.urandom(32).hex())
    code, _, err = _run(capsys, ["report", str(path), "--raw-key-env", "RAW"])
    assert (code, err) == (1, f"ondevice: error: {UNREADABLE}\n")


def test_no_key_option_on_a_passphrase_profile_names_the_missing_option(
    profile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(capsys, ["report", str(profile)])
    assert code == 1
    assert "protected by a passphrase" in err and "--passphrase-env VAR" in err


def test_missing_profile_is_not_found_and_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ONDEVICE_PASS", PASS)
    missing = tmp_path / "missing"
    code, out, err = _run(capsys, ["report", *_key(missing)])
    assert (code, out) == (1, "")
    assert err == f"ondevice: error: no ondevice profile in {missing}\n"
    assert not missing.exists()


# -- wipe ----------------------------------------------------------------------------------


def test_wipe_without_yes_and_without_a_terminal_refuses_and_deletes_nothing(
    profile: Path,
) -> None:
    before = snapshot(profile)
    proc = _subprocess(["wipe", *_key(profile)])
    assert proc.returncode == 2
    assert "refusing to wipe" in proc.stderr and "--yes" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert snapshot(profile) == before


def test_wipe_yes_crypto_shreds_the_profile(
    profile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (profile / "profile.db-wal").touch()  # make sure the side files exist to be removed
    (profile / "profile.db-shm").touch()
    code, out, _ = _run(capsys, ["wipe", *_key(profile), "--yes"])
    assert code == 0
    assert "wiped the profile" in out
    assert not any((profile / name).exists() for name in PROFILE_FILES)
    code, _, err = _run(capsys, ["report", *_key(profile)])
    assert code == 1
    assert "no ondevice profile" in err


def test_wipe_user_removes_that_user_only(
    profile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(capsys, ["wipe", *_key(profile), "--user", "alice", "--yes"])
    assert (code, out) == (0, "wiped user 'alice'\n")
    code, out, _ = _run(capsys, ["report", *_key(profile)])
    assert code == 0
    assert [u["user_id"] for u in json.loads(out)["users"]] == ["bob"]
    assert (profile / "key.json").exists()


def test_wipe_of_an_unknown_user_is_an_error(
    profile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _export_without_time(profile)
    code, _, err = _run(capsys, ["wipe", *_key(profile), "--user", "carol", "--yes"])
    assert code == 1
    assert "no user 'carol'" in err
    assert _export_without_time(profile) == before


def _wipe_on_a_terminal(profile: Path, answer: bytes) -> subprocess.CompletedProcess[str]:
    master, slave = pty.openpty()
    try:
        os.write(master, answer)  # typed ahead: the terminal buffers it for the prompt
        return _subprocess(["wipe", *_key(profile)], stdin=slave)
    finally:
        os.close(slave)
        os.close(master)


def test_wipe_on_a_terminal_asks_and_only_yes_wipes(profile: Path) -> None:
    before = snapshot(profile)
    proc = _wipe_on_a_terminal(profile, b"no\n")
    assert proc.returncode == 1
    assert "Type 'yes' to continue" in proc.stderr
    assert "aborted: nothing was deleted" in proc.stderr
    assert snapshot(profile) == before

    proc = _wipe_on_a_terminal(profile, b"yes\n")
    assert proc.returncode == 0, proc.stderr
    assert not any((profile / name).exists() for name in PROFILE_FILES)


# -- the entry point, help and version -----------------------------------------------------


def test_python_m_ondevice_reports_json(profile: Path) -> None:
    proc = _subprocess(["report", *_key(profile), "--user", "alice"])
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert [u["user_id"] for u in data["users"]] == ["alice"]
    assert proc.stderr == ""


def test_a_closed_stdout_pipe_ends_quietly(profile: Path) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written: EPIPE
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "ondevice", "report", *_key(profile)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "ONDEVICE_PASS": PASS},
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 1
    assert proc.stderr == ""


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("report", ["--user", "--format", "--passphrase-env", "--raw-key-env"]),
        (
            "export",
            [
                "--user",
                "--out",
                "--export-passphrase-env",
                "--plaintext",
                "--passphrase-env",
                "--raw-key-env",
            ],
        ),
        ("import", ["FILE", "--export-passphrase-env", "--passphrase-env", "--raw-key-env"]),
        ("wipe", ["--user", "--yes", "--passphrase-env", "--raw-key-env"]),
    ],
)
def test_help_of_every_subcommand_exits_0_and_lists_its_options(
    capsys: pytest.CaptureFixture[str], command: str, options: list[str]
) -> None:
    code, out, _ = _run(capsys, [command, "--help"])
    assert code == 0
    assert out.startswith(f"usage: ondevice {command}")
    for option in [*options, "PROFILE_DIR"]:
        assert option in out


def test_top_level_help_lists_every_command_and_version_prints_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = _run(capsys, ["--help"])
    assert code == 0
    for command in ("report", "export", "import", "wipe"):
        assert command in out
    code, out, _ = _run(capsys, ["--version"])
    assert (code, out) == (0, f"ondevice {__version__}\n")
    code, _, err = _run(capsys, [])
    assert code == 2
    assert "COMMAND" in err


def test_registering_a_command_twice_is_refused() -> None:
    duplicate = Command(
        name="report", help="x", description="x", configure=lambda p: None, run=lambda a: 0
    )
    with pytest.raises(ValueError, match="already registered"):
        register(duplicate)


# -- verify --------------------------------------------------------------------------------


def test_verify_passes_a_sound_profile_and_fails_a_damaged_page(
    profile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(capsys, ["verify", *_key(profile)])
    assert (code, err) == (0, "")
    assert out.startswith("verified ") and "every page authenticates" in out
    db = profile / "profile.db"
    data = bytearray(db.read_bytes())
    pages = len(data) // 4096
    assert f"verified {pages} pages" in out
    data[(pages - 1) * 4096 + 1000] ^= 0x10  # the last page
    db.write_bytes(bytes(data))
    before = snapshot(profile)
    code, out, err = _run(capsys, ["verify", *_key(profile)])
    assert (code, out) == (1, "")
    assert err == f"ondevice: error: {UNREADABLE}\n"
    assert snapshot(profile) == before
