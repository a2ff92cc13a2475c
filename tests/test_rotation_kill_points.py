"""A key rotation killed at any step leaves a profile that opens with the old or the new
secret, and loses no committed data (issue 10, item 1).

Deterministic, not random timing: every change of key material marks its steps with
``ondevice.keys.step`` (``ondevice.rotation.STEPS``). For every kind of rotation (raw
key, passphrase and keychain, each to each, the same secret again, and
``change_passphrase``) the steps are first recorded on a full run; then, for each step,
a forked child process opens the profile, commits one more interaction, starts the
rotation and ends itself with ``os._exit`` at that step (no cleanup, no flush: the
files are as a killed process leaves them). The parent then opens a copy of what is
left with the old secret and another copy with the new one.

The same is done one level down: the open that finishes or undoes an interrupted
rotation is itself killed at each of its steps.

The keychain is a JSON file beside the profile (allowlisted for these tests only), so
its entries outlive the killed child and are copied with the profile.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import signal
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keyring
import keyring.backend
import keyring.core
import keyring.errors
import pytest

import ondevice.keys
from ondevice import (
    Keychain,
    KeyProvider,
    KeyProviderError,
    Passphrase,
    PersonalizationEngine,
    ProfileUnreadableError,
    RawKey,
)
from ondevice.rotation import STEPS

from conftest import FAST_KDF, snapshot

SERVICE = "ondevice-kill-test"
KILLED = 77  # the child's exit status when it ended itself at the chosen step
FINISHED = 78  # the rotation ran to the end without reaching the chosen step
MARKERS = ["before-1", "before-2", "before-3"]
CHILD_MARKER = "committed-by-the-killed-process"


class FileKeyring(keyring.backend.KeyringBackend):
    """A keychain in a JSON file: its state outlives a killed process."""

    priority = 1

    def __init__(self, path: Path) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.path = path

    def entries(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        assert isinstance(data, dict)
        return data

    def _save(self, data: dict[str, str]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)

    def get_password(self, service: str, username: str) -> str | None:
        return self.entries().get(f"{service}/{username}")

    def set_password(self, service: str, username: str, password: str) -> None:
        data = self.entries()
        data[f"{service}/{username}"] = password
        self._save(data)

    def delete_password(self, service: str, username: str) -> None:
        data = self.entries()
        if data.pop(f"{service}/{username}", None) is None:
            raise keyring.errors.PasswordDeleteError("no such password")
        self._save(data)


getattr(keyring.backend.KeyringBackend, "_classes", set()).discard(FileKeyring)


@dataclass(frozen=True)
class Secret:
    """A key provider's secret, to build the provider for a given copy of a case."""

    kind: str
    value: Any = None

    def provider(self, case: Path) -> KeyProvider:
        if self.kind == "raw":
            return RawKey(self.value)
        if self.kind == "passphrase":
            return Passphrase(self.value, kdf=FAST_KDF)
        return Keychain(service=SERVICE, backend=FileKeyring(case / "keyring.json"))

    def __str__(self) -> str:
        return {"raw": "raw", "passphrase": f"pass:{self.value}", "keychain": "keychain"}[self.kind]


RAW_OLD, RAW_NEW = Secret("raw", bytes(range(32))), Secret("raw", bytes(range(1, 33)))
PASS_OLD, PASS_NEW = Secret("passphrase", "old"), Secret("passphrase", "new")
KEYCHAIN = Secret("keychain")


@dataclass(frozen=True)
class Kind:
    """One kind of rotation: from ``old`` to ``new``."""

    name: str
    old: Secret
    new: Secret
    action: str = "rekey"

    def run(self, engine: PersonalizationEngine, case: Path) -> None:
        if self.action == "change_passphrase":
            engine.change_passphrase(self.new.value, kdf=FAST_KDF)
        else:
            engine.rekey(self.new.provider(case))


KINDS = [
    Kind("raw -> raw", RAW_OLD, RAW_NEW),
    Kind("raw -> passphrase", RAW_OLD, PASS_NEW),
    Kind("raw -> keychain", RAW_OLD, KEYCHAIN),
    Kind("passphrase -> raw", PASS_OLD, RAW_NEW),
    Kind("passphrase -> passphrase", PASS_OLD, PASS_NEW),
    Kind("passphrase -> same passphrase", PASS_OLD, PASS_OLD),
    Kind("passphrase -> keychain", PASS_OLD, KEYCHAIN),
    Kind("keychain -> raw", KEYCHAIN, RAW_NEW),
    Kind("keychain -> passphrase", KEYCHAIN, PASS_NEW),
    Kind("keychain -> keychain", KEYCHAIN, KEYCHAIN),
    Kind("change_passphrase", PASS_OLD, PASS_NEW, "change_passphrase"),
]


@pytest.fixture(autouse=True)
def _file_keyring(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The file keyring is allowlisted and is keyring's default (it stands for the OS
    keychain, also when a passphrase provider finishes a move away from a keychain)."""
    name = f"{FileKeyring.__module__}.{FileKeyring.__qualname__}"
    monkeypatch.setattr(ondevice.keys, "_SECURE_BACKENDS", ondevice.keys._SECURE_BACKENDS | {name})
    monkeypatch.setattr(keyring.core, "_keyring_backend", keyring.core._keyring_backend)
    monkeypatch.setattr(ondevice.keys, "step_hook", None)
    yield


def _use_keyring_of(case: Path) -> None:
    keyring.set_keyring(FileKeyring(case / "keyring.json"))  # type: ignore[no-untyped-call]


def _open(case: Path, secret: Secret) -> PersonalizationEngine:
    _use_keyring_of(case)
    return PersonalizationEngine(case / "profile", key=secret.provider(case), create=False)


def _read_back(engine: PersonalizationEngine) -> list[str]:
    users = engine.export_profile("alice")["users"]
    return sorted(row["item_id"] for user in users for row in user["interactions"])


def _template(root: Path, kind: Kind) -> Path:
    """A closed profile under ``kind.old`` holding the committed markers."""
    case = root / "template"
    case.mkdir(parents=True)
    _use_keyring_of(case)
    with PersonalizationEngine(case / "profile", key=kind.old.provider(case)) as engine:
        for marker in MARKERS:
            engine.update_profile("alice", {"item_id": marker, "event": "view"})
    return case


def _copy(case: Path, to: Path) -> Path:
    shutil.copytree(case, to)
    return to


def _spawn(case: Path, body: Callable[[], None], kill_at: int) -> int:
    """Fork; the child runs ``body``, whose step hook (installed by ``_arm``) ends the
    process at step number ``kill_at``. Returns the child's pid (see ``_reap``)."""
    with warnings.catch_warnings():
        # Python 3.12+ warns about forking a process with threads (another test's may
        # linger); the child only touches its own copy and ends with os._exit.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            counter = itertools.count()

            def hook(name: str) -> None:
                if next(counter) == kill_at:
                    os._exit(KILLED)

            _ARMED.append(hook)
            body()
            code = FINISHED
        except BaseException:
            (case / "child-error.txt").write_text(traceback.format_exc())
        finally:
            os._exit(code)
    return pid


def _reap(pid: int, deadline: float) -> int:
    """Wait for a child of ``_spawn`` (killing it past ``deadline``); its exit code."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -signal.SIGKILL
        time.sleep(0.002)


def _kill_each(cases: list[Path], body_for: Callable[[Path], Callable[[], None]]) -> None:
    """Run ``body_for(case)`` in a child killed at step i for the i-th case; the
    children run side by side (each on its own copy). Each must have ended itself at
    its step."""
    pids = [_spawn(case, body_for(case), kill_at=i) for i, case in enumerate(cases)]
    deadline = time.monotonic() + 60
    codes = [_reap(pid, deadline) for pid in pids]
    for case, code in zip(cases, codes, strict=True):
        error = case / "child-error.txt"
        assert not error.exists(), error.read_text()
        assert code == KILLED, f"{case.name}: exit code {code}"


#: The hook of the current run (a child's killer, or the recorder), for ``_arm``.
_ARMED: list[Callable[[str], None]] = []


def _arm() -> None:
    """Install the hook handed to the current (child or recording) run."""
    ondevice.keys.step_hook = _ARMED[-1]


def _rotation(case: Path, kind: Kind) -> Callable[[], None]:
    """Open with the old secret, commit one more interaction, arm the hook, rotate."""

    def body() -> None:
        engine = _open(case, kind.old)
        engine.update_profile("alice", {"item_id": CHILD_MARKER, "event": "view"})
        _arm()
        kind.run(engine, case)
        engine.close()

    return body


def _opening(case: Path, secret: Secret) -> Callable[[], None]:
    """Arm the hook, open with ``secret`` (settling an interrupted rotation)."""

    def body() -> None:
        _arm()
        try:
            engine = _open(case, secret)
        except (ProfileUnreadableError, KeyProviderError):
            return  # this secret does not open this state: an open that writes nothing
        engine.close()

    return body


def _record(case: Path, body_for: Callable[[Path], Callable[[], None]]) -> list[str]:
    """The steps a full run marks, on a throwaway copy (in this process)."""
    seen: list[str] = []
    scratch = _copy(case, case.with_name(case.name + "-record"))
    _ARMED.append(seen.append)
    try:
        body_for(scratch)()
    finally:
        ondevice.keys.step_hook = None
        _ARMED.pop()
        shutil.rmtree(scratch)
    return seen


@dataclass
class Outcome:
    opens: bool
    error: str = ""


def _key_material(profile: Path) -> dict[str, bytes]:
    return {k: v for k, v in snapshot(profile).items() if not k.startswith("profile.db")}


def _try_open(case: Path, secret: Secret, expected: list[str]) -> Outcome:
    """Open a copy of ``case`` with ``secret``. If it opens: every committed marker is
    there, the key files are settled (no pending key, no leftovers, no keychain entry
    but the one key.json names), and it opens again. If not: no key material changed
    (SQLite may checkpoint a killed process's WAL into the database as it closes the
    failed connection: the same committed pages, moved)."""
    before = _key_material(case / "profile")
    entries_before = FileKeyring(case / "keyring.json").entries()
    try:
        engine = _open(case, secret)
    except (ProfileUnreadableError, KeyProviderError) as exc:
        assert _key_material(case / "profile") == before, "a failed open changed key files"
        assert FileKeyring(case / "keyring.json").entries() == entries_before
        return Outcome(False, type(exc).__name__)
    with engine:
        assert _read_back(engine) == expected
    left = {p.name for p in (case / "profile").iterdir()}
    assert left <= {"key.json", "profile.db", "profile.db-wal", "profile.db-shm", "profile.lock"}
    descriptor = json.loads((case / "profile" / "key.json").read_bytes())
    is_keychain = descriptor["provider"] == "keychain"
    named = {f"{SERVICE}/{descriptor['account']}"} if is_keychain else set()
    assert set(FileKeyring(case / "keyring.json").entries()) == named
    with _open(case, secret) as engine:
        assert _read_back(engine) == expected
    return Outcome(True)


def _judge(case: Path, kind: Kind, expected: list[str]) -> tuple[bool, bool]:
    old = _try_open(_copy(case, case.with_name(case.name + "-old")), kind.old, expected)
    new = _try_open(_copy(case, case.with_name(case.name + "-new")), kind.new, expected)
    assert old.opens or new.opens, f"{kind.name}: opens with neither ({old.error}, {new.error})"
    return old.opens, new.opens


def _cell(opens_old: bool, opens_new: bool) -> str:
    return {(True, True): "old+new", (True, False): "old", (False, True): "new"}[
        (opens_old, opens_new)
    ]


def _kill_everywhere(
    root: Path, kind: Kind, table: dict[str, dict[str, str]], *, judge: bool = True
) -> list[Path]:
    """Kill ``kind`` at each of its steps; return the cases left by each kill (judged
    unless ``judge`` is false: the caller judges what it does with them)."""
    template = _template(root / kind.name.replace(" ", ""), kind)
    steps = _record(template, lambda c: _rotation(c, kind))
    assert steps and set(steps) <= set(STEPS), steps
    assert steps[-1] == "rotation:committed"
    if kind.action == "rekey":
        assert "database:rekeyed" in steps
    if kind.new == KEYCHAIN:
        assert "keychain:entry-stored" in steps
    expected = sorted([*MARKERS, CHILD_MARKER])
    reached: set[str] = set()
    cases = [_copy(template, template.with_name(f"{template.name}-{i}")) for i in range(len(steps))]
    _kill_each(cases, lambda case: _rotation(case, kind))
    if not judge:
        return cases
    for case, name in zip(cases, steps, strict=True):
        reached.add(name)
        opens_old, opens_new = _judge(case, kind, expected)
        if kind.old != kind.new and kind.action == "rekey":
            # Before the database is re-encrypted only the old key opens it; after,
            # only the new one.
            rekeyed = "database:rekeyed" in reached
            assert (opens_old, opens_new) == (not rekeyed, rekeyed), (kind.name, name)
        if kind.action == "change_passphrase":
            # The new passphrase opens once its key file is in place; the old one
            # until its key file is overwritten.
            written = f"{ondevice.keys.PENDING_FILE}:replaced" in reached
            destroyed = "old-key:overwritten" in reached
            assert (opens_old, opens_new) == (not destroyed, written), (kind.name, name)
        table.setdefault(kind.name, {})[name] = _cell(opens_old, opens_new)
    return cases


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_a_rotation_killed_at_any_step_opens_with_the_old_or_the_new_secret(
    tmp_path: Path, kind: Kind
) -> None:
    table: dict[str, dict[str, str]] = {}
    _kill_everywhere(tmp_path, kind, table)
    print(json.dumps(table))


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_the_open_that_settles_a_killed_rotation_can_itself_be_killed_anywhere(
    tmp_path: Path, kind: Kind
) -> None:
    table: dict[str, dict[str, str]] = {}
    expected = sorted([*MARKERS, CHILD_MARKER])
    killed_at: set[str] = set()
    for first in _kill_everywhere(tmp_path, kind, table, judge=False):
        for secret in dict.fromkeys([kind.old, kind.new]):
            steps = _record(first, lambda c, s=secret: _opening(c, s))
            cases = [
                _copy(first, first.with_name(f"{first.name}-{secret}-{i}"))
                for i in range(len(steps))
            ]
            _kill_each(cases, lambda c, s=secret: _opening(c, s))
            for case in cases:
                _judge(case, kind, expected)
            killed_at.update(steps)
    # Both ways of settling were killed at each of their steps.
    assert {"old-key:released", "old-key:overwritten", "rotation:committed"} <= killed_at
    assert {"pending:released", "pending:discarded"} <= killed_at


def test_passphrase_rekey_killed_after_reencryption_opens_with_the_new_passphrase(
    tmp_path: Path,
) -> None:
    """The reported case, without the step hook (so it runs against any version):
    key.json still wraps the old key under "old", key.json.pending wraps the new key
    under "new", the database is re-encrypted under the new key."""
    path = tmp_path / "p"
    with PersonalizationEngine(path, key=Passphrase("old", kdf=FAST_KDF)) as engine:
        engine.update_profile("alice", {"item_id": "kept", "event": "view"})
        new_key = secrets.token_bytes(32)
        Passphrase("new", kdf=FAST_KDF).store(path, new_key, pending=True)
        engine._store.conn.execute(f"PRAGMA rekey = \"x'{new_key.hex()}'\"")
    with PersonalizationEngine(path, key=Passphrase("new", kdf=FAST_KDF)) as engine:
        assert _read_back(engine) == ["kept"]
    assert not (path / "key.json.pending").exists()
    with PersonalizationEngine(path, key=Passphrase("new", kdf=FAST_KDF)) as engine:
        assert _read_back(engine) == ["kept"]
