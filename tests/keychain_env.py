"""A real, private Secret Service for the keychain tests.

The recipe (Debian's gnome-keyring, headless, no prompt):

1. ``dbus-run-session -- python tests/keychain_child.py ...`` gives the child its own
   session bus, torn down when the child exits.
2. The child's environment has a fresh temporary ``HOME``, ``XDG_DATA_HOME`` (where the
   ``login.keyring`` file is written), ``XDG_RUNTIME_DIR`` (the daemon's control socket,
   so it never finds and hands over to a real user's daemon), ``XDG_CONFIG_HOME`` (no
   ``keyringrc.cfg``) and no ``DISPLAY``/``WAYLAND_DISPLAY`` (a prompt can never appear).
3. The child starts ``gnome-keyring-daemon --foreground --unlock --components=secrets``
   as its own subprocess and writes a random, *non-empty* password to its stdin: the
   daemon creates the ``login`` collection with that password, unlocked, and makes it
   the default. (An empty password creates no collection, and every write then fails
   for want of a prompter.)
4. The child waits until ``org.freedesktop.secrets`` is owned by *that* daemon's pid
   (so D-Bus activation never starts a second, locked one) and the default collection
   exists and is unlocked; then it runs its scenario and stops the daemon.

:func:`run_in_secret_service` does steps 1-2 from the test process;
:func:`secret_service` does steps 3-4 inside the child.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

#: The programs the real Secret Service tests need.
REQUIRED_TOOLS: Final = ("dbus-run-session", "gnome-keyring-daemon", "secret-tool")
INSTALL_HINT: Final = ".ci/install-system-deps"
CHILD: Final = Path(__file__).with_name("keychain_child.py")

SECRETS_BUS_NAME: Final = "org.freedesktop.secrets"
DEFAULT_COLLECTION: Final = "/org/freedesktop/secrets/aliases/default"

#: Environment variables that could point the child at a real user's session or
#: keyring, or pick a keyring backend behind the test's back.
_SCRUBBED: Final = (
    "DBUS_SESSION_BUS_ADDRESS",
    "DISPLAY",
    "WAYLAND_DISPLAY",
    "GNOME_KEYRING_CONTROL",
    "SSH_AUTH_SOCK",
    "PYTHON_KEYRING_BACKEND",
)


class SecretServiceError(RuntimeError):
    """The private Secret Service could not be started or a child scenario failed."""


def missing_tools() -> list[str]:
    """The required programs that are not on PATH."""
    return [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]


def in_ci() -> bool:
    """True when the CI environment variable is set to a true-ish value."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_secret_service_tools() -> None:
    """Skip the calling test if the tools are missing, or fail it under CI, where a
    skipped keychain test would hide a broken setup."""
    import pytest

    missing = missing_tools()
    if not missing:
        return
    message = (
        f"the real Secret Service tests need {', '.join(missing)} on PATH; "
        f"run {INSTALL_HINT} (Debian: gnome-keyring, dbus, libsecret-tools)"
    )
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def isolated_env(root: Path) -> dict[str, str]:
    """A copy of this process's environment pointing HOME and every XDG directory
    into ``root``, with nothing that leads to a real user's session."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _SCRUBBED and not k.startswith("KEYRING_PROPERTY_")
    }
    dirs = {
        "HOME": root / "home",
        "XDG_DATA_HOME": root / "data",
        "XDG_CONFIG_HOME": root / "config",
        "XDG_CACHE_HOME": root / "cache",
        "XDG_RUNTIME_DIR": root / "run",
    }
    for name, path in dirs.items():
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        env[name] = str(path)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_in_secret_service(
    scenario: str, *, args: dict[str, str] | None = None, timeout: float = 25.0
) -> dict[str, Any]:
    """Run one scenario of ``keychain_child.py`` on its own session bus with its own
    gnome-keyring, and return the observations it wrote (a JSON object).

    Everything (bus, daemon, keyring files, HOME) lives in a temporary directory that
    is removed afterwards. Raises :class:`SecretServiceError` with the child's output
    if it fails.
    """
    # A short path: the daemon's control socket must fit in sun_path (108 bytes).
    root = Path(tempfile.mkdtemp(prefix="odkc-"))
    try:
        env = isolated_env(root)
        out = root / "observations.json"
        command = [
            "dbus-run-session",
            "--",
            sys.executable,
            str(CHILD),
            scenario,
            "--root",
            str(root),
            "--out",
            str(out),
        ]
        for name, value in (args or {}).items():
            command += [f"--{name}", value]
        try:
            done = subprocess.run(
                command,
                env=env,
                cwd=root,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise SecretServiceError(
                f"scenario {scenario!r} timed out after {timeout} s\n{_tail(exc.stderr)}"
                f"{_daemon_log(root)}"
            ) from None
        if done.returncode != 0 or not out.exists():
            raise SecretServiceError(
                f"scenario {scenario!r} exited with {done.returncode}\n"
                f"stdout:\n{_tail(done.stdout)}\nstderr:\n{_tail(done.stderr)}"
                f"{_daemon_log(root)}"
            )
        data = json.loads(out.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise SecretServiceError(f"scenario {scenario!r} wrote no JSON object")
        return data
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _tail(text: str | bytes | None, limit: int = 4000) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return text[-limit:]


def _daemon_log(root: Path) -> str:
    log = root / "gnome-keyring.log"
    if not log.exists():
        return ""
    return f"\ngnome-keyring-daemon:\n{_tail(log.read_text(errors='replace'))}"


# -- inside the child (on the private session bus) ----------------------------------------


@contextlib.contextmanager
def secret_service(root: Path, *, ready_timeout: float = 10.0) -> Iterator[int]:
    """Start gnome-keyring-daemon on the current session bus with an unlocked login
    collection; yield its pid; stop it (and reap it) on exit."""
    if not os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
        raise SecretServiceError("no session bus: run this under dbus-run-session")
    password = secrets.token_hex(16)  # non-empty: an empty one creates no collection
    with open(root / "gnome-keyring.log", "wb") as log:
        daemon = subprocess.Popen(
            ["gnome-keyring-daemon", "--foreground", "--unlock", "--components=secrets"],
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=log,
        )
        try:
            assert daemon.stdin is not None
            daemon.stdin.write(password.encode("ascii"))
            daemon.stdin.close()
            _wait_until_ready(daemon, ready_timeout)
            yield daemon.pid
        finally:
            daemon.terminate()
            try:
                daemon.wait(timeout=5)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(timeout=5)


def _wait_until_ready(daemon: subprocess.Popen[bytes], timeout: float) -> None:
    """Poll until our daemon owns the Secret Service name and the default collection
    exists and is unlocked."""
    import secretstorage
    from jeepney import DBus  # type: ignore[import-untyped]

    deadline = time.monotonic() + timeout
    state = "not started"
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise SecretServiceError(f"gnome-keyring-daemon exited with {daemon.returncode}")
        try:
            conn = secretstorage.dbus_init()
        except secretstorage.exceptions.SecretServiceNotAvailableException as exc:
            raise SecretServiceError(f"cannot connect to the session bus: {exc}") from exc
        try:
            bus = DBus()
            owned = conn.send_and_get_reply(bus.NameHasOwner(SECRETS_BUS_NAME)).body[0]
            if not owned:
                state = f"{SECRETS_BUS_NAME} not yet on the bus"
            else:
                reply = conn.send_and_get_reply(bus.GetConnectionUnixProcessID(SECRETS_BUS_NAME))
                owner_pid = reply.body[0]
                if owner_pid != daemon.pid:
                    raise SecretServiceError(
                        f"{SECRETS_BUS_NAME} is owned by pid {owner_pid}, not by our "
                        f"daemon {daemon.pid}"
                    )
                try:
                    locked = secretstorage.Collection(conn, DEFAULT_COLLECTION).is_locked()
                except secretstorage.exceptions.ItemNotFoundException:
                    state = "no default collection yet"
                else:
                    if not locked:
                        return
                    state = "the default collection is locked"
        finally:
            conn.close()
        time.sleep(0.02)
    raise SecretServiceError(f"the Secret Service was not ready after {timeout} s: {state}")


def secret_tool_items(service: str) -> list[dict[str, str]]:
    """Every Secret Service item whose ``service`` attribute is ``service``, as seen by
    libsecret's ``secret-tool`` (an independent client): ``username`` and ``secret``."""
    done = subprocess.run(
        ["secret-tool", "search", "--all", "service", service],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    # secret-tool prints label/secret/dates on stdout and the attributes on stderr,
    # item by item; it exits 1 with no output when nothing matches.
    found = [
        line[len("secret = ") :]
        for line in done.stdout.splitlines()
        if line.startswith("secret = ")
    ]
    users = [
        line.split(" = ", 1)[1]
        for line in done.stderr.splitlines()
        if line.startswith("attribute.username = ")
    ]
    headers = [line for line in done.stdout.splitlines() if line.startswith("[/")]
    if not (len(found) == len(users) == len(headers)):
        raise SecretServiceError(f"unexpected secret-tool output:\n{done.stdout}\n{done.stderr}")
    return [{"username": u, "secret": s} for u, s in zip(users, found, strict=True)]
