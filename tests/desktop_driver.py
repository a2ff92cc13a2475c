"""The test process's side of the desktop example's GUI tests (and of
``benchmarks/bench_desktop_stall.py``): a private Xvfb, one run of the app driven by
``desktop_runner.py`` (optionally on a private D-Bus session with its own gnome-keyring),
a real X pointer click with xdotool, and a reader for the PNG screenshots ``mss`` wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from keychain_env import in_ci, isolated_env

TESTS = Path(__file__).resolve().parent
RUNNER = TESTS / "desktop_runner.py"
TOOLS = ("Xvfb", "xdotool")
PASSPHRASE_VAR = "DESKTOP_APP_PASSPHRASE"
#: keyring's "fail" backend: the app finds no secure keychain, on any machine.
NO_KEYCHAIN = "keyring.backends.fail.Keyring"


def require_tools() -> None:
    """Skip without Xvfb and xdotool, except in CI, where their absence is a failure."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if not missing:
        return
    message = f"missing {', '.join(missing)}: run .ci/install-system-deps (apt: xvfb xdotool)"
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


@contextmanager
def xvfb(timeout: float = 15.0) -> Iterator[str]:
    """A private Xvfb on a display number it picks itself (``-displayfd``: the server
    writes the number once it accepts connections); yields ``":N"``, kills it after."""
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write_end), "-screen", "0", "1280x800x24", "-nolisten", "tcp"],
        pass_fds=(write_end,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    os.close(write_end)
    try:
        number = b""
        deadline = time.monotonic() + timeout
        os.set_blocking(read_end, False)
        while not number.endswith(b"\n"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"Xvfb did not start: {proc.stderr.read() if proc.stderr else ''!r}"
                )
            try:
                chunk = os.read(read_end, 16)
            except BlockingIOError:
                time.sleep(0.02)
                continue
            if not chunk:
                time.sleep(0.02)
            number += chunk
        yield f":{int(number)}"
    finally:
        os.close(read_end)
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


@dataclass
class AppRun:
    """What one run of the app left behind."""

    returncode: int
    stderr: str
    log: dict[str, Any]
    #: The windows xdotool found by the app's title, with their geometry.
    found_windows: list[dict[str, int]] = field(default_factory=list)
    xdotool_clicked: bool = False

    def step(self, do: str, n: int = 0) -> dict[str, Any]:
        """The ``n``-th logged step of kind ``do``."""
        return [s for s in self.log["steps"] if s["do"] == do][n]  # type: ignore[no-any-return]

    def dialogs(self, kind: str) -> list[str]:
        """The texts of the dialogs of one kind the app opened, in order."""
        return [d["text"] for d in self.log["dialogs"] if d["dialog"] == kind]


def run_app(
    *,
    display: str,
    workdir: Path,
    steps: list[dict[str, Any]],
    app_args: list[str],
    name: str = "run",
    passphrase: str | None = None,
    inline: bool = False,
    secret_service: Path | None = None,
    ready_file: Path | None = None,
    timeout: float = 90.0,
) -> AppRun:
    """Run the app under ``desktop_runner.py`` with ``steps``; ``passphrase`` is passed
    through ``--passphrase-env``. Without ``secret_service`` the app finds no keychain;
    with it (a short directory) the run gets its own D-Bus session and gnome-keyring,
    and HOME and the XDG directories inside that directory. When the app announces a
    button (``ready_file``), xdotool finds its window and clicks the button."""
    workdir.mkdir(parents=True, exist_ok=True)
    script, log_path = workdir / f"{name}.steps.json", workdir / f"{name}.log.json"
    script.write_text(json.dumps(steps))
    command = [sys.executable, str(RUNNER), "--script", str(script), "--log", str(log_path)]
    command += ["--inline"] if inline else []
    if secret_service is None:
        env = {**os.environ, "PYTHON_KEYRING_BACKEND": NO_KEYCHAIN}
    else:
        env = isolated_env(secret_service)
        command = ["dbus-run-session", "--", *command, "--secret-service", str(secret_service)]
    env["DISPLAY"] = display
    env.pop("XAUTHORITY", None)
    if passphrase is not None:
        env[PASSPHRASE_VAR] = passphrase
        app_args = [*app_args, "--passphrase-env", PASSPHRASE_VAR]
    proc = subprocess.Popen(
        [*command, "--", *app_args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    found: list[dict[str, int]] = []
    clicked = False
    deadline = time.monotonic() + timeout
    try:
        while ready_file is not None and proc.poll() is None and time.monotonic() < deadline:
            if ready_file.exists():
                target = json.loads(ready_file.read_text())
                search = subprocess.run(
                    ["xdotool", "search", "--name", f"^{target['title']}$"],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=10,
                )
                for window in search.stdout.split():
                    geometry = subprocess.run(
                        ["xdotool", "getwindowgeometry", "--shell", window],
                        env=env,
                        capture_output=True,
                        text=True,
                        timeout=10,
                    )
                    pairs = (line.split("=") for line in geometry.stdout.split())
                    found.append({key.lower(): int(value) for key, value in pairs})
                xy = [str(target["x"]), str(target["y"])]
                subprocess.run(
                    ["xdotool", "mousemove", "--sync", *xy, "click", "1"],
                    env=env,
                    check=True,
                    capture_output=True,
                    timeout=10,
                )
                clicked = True
                break
            time.sleep(0.05)
        _, stderr = proc.communicate(timeout=max(deadline - time.monotonic(), 1.0))
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    log = json.loads(log_path.read_text()) if log_path.exists() else {}
    return AppRun(proc.returncode, stderr, log, found, clicked)


def read_png(path: Path) -> tuple[int, int, bytes]:
    """``(width, height, RGB bytes)`` of a PNG as ``mss.tools.to_png`` writes it: 8-bit
    RGB, no interlacing, every row stored unfiltered. Anything else raises ValueError."""
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG file")
    chunks: dict[bytes, list[bytes]] = {}
    pos = 8
    while pos < len(data):
        size, kind = struct.unpack_from(">I4s", data, pos)
        body = data[pos + 8 : pos + 8 + size]
        if zlib.crc32(kind + body) != struct.unpack_from(">I", data, pos + 8 + size)[0]:
            raise ValueError(f"bad CRC in the {kind!r} chunk of {path}")
        chunks.setdefault(kind, []).append(body)
        pos += 12 + size
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"][0])
    if (depth, colour, interlace) != (8, 2, 0):
        raise ValueError(f"{path} is not 8-bit RGB without interlacing")
    raw = zlib.decompress(b"".join(chunks[b"IDAT"]))
    stride = 1 + 3 * width
    if len(raw) != stride * height or any(raw[y * stride] for y in range(height)):
        raise ValueError(f"{path} has filtered rows: not written by mss")
    return width, height, b"".join(raw[y * stride + 1 : (y + 1) * stride] for y in range(height))
