"""Helpers of the desktop example's test: a private Xvfb, real X input with xdotool,
and a small PNG reader (standard library only)."""

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

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "examples" / "desktop_app.py"
TOOLS = ("Xvfb", "xdotool")


def require_tools() -> None:
    """Skip without Xvfb and xdotool, except in CI, where their absence is a failure."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if not missing:
        return
    message = f"missing {', '.join(missing)}: run .ci/install-system-deps (apt: xvfb xdotool)"
    if os.environ.get("CI"):
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
    """What a scripted run of the app left behind."""

    returncode: int
    stderr: str
    log: dict[str, Any]
    found_windows: list[int] = field(default_factory=list)
    xdotool_clicked: bool = False


def run_app(
    *,
    display: str,
    workdir: Path,
    steps: list[dict[str, Any]],
    ready_file: Path | None,
    passphrase: str,
    level: str = "individual",
    timeout: float = 60.0,
) -> AppRun:
    """Run the app in script mode; when it announces a button (``ready_file``), find its
    window with ``xdotool search`` and click the button with the real X pointer."""
    script = workdir / "script.json"
    script.write_text(json.dumps(steps))
    log_path = workdir / "log.json"
    env = {**os.environ, "DISPLAY": display, "DESKTOP_APP_PASSPHRASE": passphrase}
    env.pop("XAUTHORITY", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            str(APP),
            "--profile",
            str(workdir / "profile"),
            "--passphrase-env",
            "DESKTOP_APP_PASSPHRASE",
            "--script",
            str(script),
            "--log",
            str(log_path),
            "--level",
            level,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    found: list[int] = []
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
                found = [int(line) for line in search.stdout.split()]
                subprocess.run(
                    [
                        "xdotool",
                        "mousemove",
                        "--sync",
                        str(target["x"]),
                        str(target["y"]),
                        "click",
                        "1",
                    ],
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


def read_png(path: Path) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB or RGBA PNG: ``(width, height, rows of pixel bytes)``."""
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    pos, idat = 8, b""
    width = height = channels = 0
    while pos < len(data):
        (size,) = struct.unpack_from(">I", data, pos)
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + size]
        (crc,) = struct.unpack_from(">I", data, pos + 8 + size)
        if zlib.crc32(kind + body) != crc:
            raise ValueError(f"bad CRC in {kind!r}")
        pos += 12 + size
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            if depth != 8 or colour not in (2, 6) or interlace:
                raise ValueError("only 8-bit, non-interlaced RGB/RGBA PNGs")
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    raw = zlib.decompress(idat)
    stride = width * channels
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        filt = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride if filt else 0):
            left = line[i - channels] if i >= channels else 0
            up = prev[i]
            corner = prev[i - channels] if i >= channels else 0
            if filt == 1:
                line[i] = (line[i] + left) & 0xFF
            elif filt == 2:
                line[i] = (line[i] + up) & 0xFF
            elif filt == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif filt == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                pred = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                line[i] = (line[i] + pred) & 0xFF
        rows.append(
            bytes(line)
            if channels == 3
            else bytes(b for px in range(width) for b in line[px * 4 : px * 4 + 3])
        )
        prev = line
    return width, height, rows
