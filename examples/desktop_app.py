"""A small desktop app on ondevice: recommendations with their "why", offline.

It opens (or creates) an encrypted profile for one local user, ``me``, loads the sample
catalog shipped in the package, and shows what the engine recommends and why. Opening
a recommendation records a click on this machine and refreshes the list. Three buttons
answer the questions a person asks of any app that learns from them: "What do you know
about me?", "Export my data" and "Forget me".

Run::

    read -rs ONDEVICE_PASSPHRASE && export ONDEVICE_PASSPHRASE
    .venv/bin/python examples/desktop_app.py --passphrase-env ONDEVICE_PASSPHRASE

Without ``--passphrase-env`` the app keeps its key in the OS keychain where a secure one
exists, and otherwise asks for a passphrase in a dialog. The passphrase
is never taken from the command line, where other users of the machine could read it.
``--profile DIR`` picks the profile directory (default: a per-user data directory),
``--level`` the privacy level (default ``individual``).

``--script FILE --log FILE`` drives the app through its own event loop, for tests: each
step invokes the real widgets (buttons, list rows, the double-click binding), dialogs
are answered by the script instead of a person, screenshots of the app's own window are
written as PNG (read straight from the X server, no extra tools), and what the app
showed is written as JSON. See :class:`ScriptRunner` for the steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import struct
import sys
import time
import tkinter as tk
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from tkinter import filedialog, messagebox, simpledialog, ttk
from typing import Any

from ondevice import (
    Keychain,
    KeychainUnavailableError,
    KeyProvider,
    OndeviceError,
    Passphrase,
    PersonalizationEngine,
    PolicyViolationError,
    ProfileUnreadableError,
    Recommendations,
)
from ondevice.sample import SAMPLE_BUNDLE, SAMPLE_PUBLIC_KEY, daypart, sample_policy

log = logging.getLogger("desktop_app")

APP_TITLE = "ondevice example"
USER = "me"
LEVELS = ("none", "segment", "behavioral", "contextual", "individual")
PROFILE_FILES = ("profile.db", "key.json")


def default_profile_dir() -> Path:
    """The per-user data directory (XDG), where the profile lives by default."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "ondevice-desktop-example"


def current_daypart() -> str:
    """The daypart of the local clock: the only context this app records."""
    return daypart(time.localtime().tm_hour)


# -- dialogs: small functions a script can replace -----------------------------------------


class Dialogs:
    """Every question the app asks a person, behind one small method each."""

    def __init__(self, root: tk.Misc) -> None:
        self.root = root

    def ask_export_path(self) -> str | None:
        """Where to write the export file (None: cancelled)."""
        path = filedialog.asksaveasfilename(
            parent=self.root,
            title="Export my data",
            initialfile="my-data.ondevice-export",
            defaultextension=".ondevice-export",
        )
        return path or None

    def ask_passphrase(self, prompt: str) -> str | None:
        """A passphrase, typed hidden (None: cancelled)."""
        return simpledialog.askstring(APP_TITLE, prompt, show="*", parent=self.root)

    def confirm(self, title: str, question: str) -> bool:
        """Yes or no."""
        return bool(messagebox.askyesno(title, question, parent=self.root))

    def info(self, title: str, message: str) -> None:
        """Tell the user something went well."""
        messagebox.showinfo(title, message, parent=self.root)

    def error(self, title: str, message: str) -> None:
        """Tell the user something could not be done, and why."""
        messagebox.showerror(title, message, parent=self.root)


class ScriptedDialogs(Dialogs):
    """Dialogs answered by a script: queued answers, and a record of what was asked."""

    def __init__(self, root: tk.Misc) -> None:
        super().__init__(root)
        self.answers: dict[str, list[Any]] = {}
        self.asked: list[dict[str, str]] = []

    def queue(self, kind: str, answer: Any) -> None:
        """The answer to give the next time a ``kind`` dialog opens."""
        self.answers.setdefault(kind, []).append(answer)

    def _answer(self, kind: str, text: str) -> Any:
        self.asked.append({"dialog": kind, "text": text})
        queued = self.answers.get(kind)
        return queued.pop(0) if queued else None

    def ask_export_path(self) -> str | None:
        answer = self._answer("export_path", "Export my data")
        return str(answer) if answer else None

    def ask_passphrase(self, prompt: str) -> str | None:
        answer = self._answer("passphrase", prompt)
        return str(answer) if answer else None

    def confirm(self, title: str, question: str) -> bool:
        return bool(self._answer("confirm", f"{title}: {question}"))

    def info(self, title: str, message: str) -> None:
        self._answer("info", f"{title}: {message}")

    def error(self, title: str, message: str) -> None:
        self._answer("error", f"{title}: {message}")


# -- the report, in words ------------------------------------------------------------------


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts is not None else "-"


def format_report(report: Mapping[str, Any], user_id: str = USER) -> str:
    """The answer to "What do you know about me?" (``engine.report(...).to_dict()``)
    as text a person reads."""
    lines = [
        f'What this app keeps about you (user "{user_id}"), on this computer only',
        "",
        f"Privacy level: {report['privacy_level']}",
        f"Stored encrypted: {report['encryption']}",
        f"Keeps your last {report['window']} interactions, "
        f"for at most {report['retention_days']:g} days",
        "",
    ]
    users = report.get("users") or []
    if not users:
        lines.append("Nothing is stored about you yet.")
    for user in users:
        budget = user.get("privacy_budget") or {}
        signals = ", ".join(f"{k} = {v}" for k, v in user["signals"].items()) or "none"
        lines += [
            "What is stored about you now:",
            f"  interactions: {user['interactions']} (oldest {_when(user['oldest_interaction'])},"
            f" newest {_when(user['newest_interaction'])})",
            f"  context values: {user['context_values']}",
            f"  days with activity: {user['active_days']}",
            f"  blocked items: {user['blocked_items']}",
            f"  signals you set: {signals}",
            f"  computed here: {', '.join(user['derived']) or 'nothing'}",
            f"  reports that left this device: {user['reports_sent']}",
        ]
        if budget:
            lines.append(
                f"  lifetime privacy budget (epsilon): {budget['lifetime_spent']:.2f} spent "
                f"of {budget['lifetime_cap']:.2f} per {budget['period_days']:g} days "
                f"({budget['lifetime_remaining']:.2f} left); each segment's memo "
                f"{budget['epsilon_inf']:.2f}, each report {budget['epsilon_1']:.2f}"
            )
        lines.append("")
    lines.append("What may be stored, why, and for how long:")
    for f in report["fields"]:
        days = f["retention_days"]
        kept = f"kept {days:g} days" if days is not None else "kept until you remove it"
        state = "collected" if f["collected"] else "not collected at this level"
        lines += [
            f"  {f['name']}  [{state}; from level {f['collected_from_level']}; {kept}]",
            f"      purpose: {f['purpose']}",
        ]
    return "\n".join(lines) + "\n"


# -- the app -------------------------------------------------------------------------------


class DesktopApp:
    """The main window: recommendations with their "why", and the privacy buttons.

    Widgets have stable names (``recommendations``, ``open``, ``not_interested``,
    ``refresh``, ``report``, ``export``, ``forget``, ``level``, ``status``) so scripts
    and tests find them with ``root.nametowidget``.
    """

    def __init__(
        self,
        *,
        root: tk.Tk,
        engine: PersonalizationEngine,
        profile_dir: Path,
        dialogs: Dialogs,
        count: int = 10,
    ) -> None:
        self.root = root
        self.engine: PersonalizationEngine | None = engine
        self.profile_dir = profile_dir
        self.dialogs = dialogs
        self.count = count
        self.report_window: tk.Toplevel | None = None
        self.report_text: tk.Text | None = None
        #: Button releases that reached the buttons from the X server (tests read it).
        self.pointer_events: list[dict[str, Any]] = []
        self.last: Recommendations | None = None
        self._build()
        self.refresh()

    def _build(self) -> None:
        root = self.root
        root.title(APP_TITLE)
        root.geometry("940x520+0+0")
        root.minsize(640, 360)
        style = ttk.Style(root)
        style.configure("Treeview", rowheight=24)
        outer = ttk.Frame(root, padding=10, name="main")
        outer.pack(fill="both", expand=True)
        ttk.Label(
            outer, text="Recommended for you", font=("TkDefaultFont", 14, "bold"), name="heading"
        ).pack(anchor="w")
        self.level_var = tk.StringVar(master=root)
        ttk.Label(outer, textvariable=self.level_var, name="level", wraplength=900).pack(
            anchor="w", pady=(2, 6)
        )

        table = ttk.Frame(outer, name="table")
        table.pack(fill="both", expand=True)
        self.tree = ttk.Treeview(
            table,
            columns=("title", "why"),
            show="headings",
            selectmode="browse",
            name="recommendations",
            height=12,
        )
        self.tree.heading("title", text="Title")
        self.tree.heading("why", text="Why you see it")
        self.tree.column("title", width=260, stretch=False)
        self.tree.column("why", width=620, stretch=True)
        bar = ttk.Scrollbar(table, orient="vertical", command=self.tree.yview, name="scroll")
        self.tree.configure(yscrollcommand=bar.set)
        self.tree.pack(side="left", fill="both", expand=True)
        bar.pack(side="right", fill="y")
        self.tree.bind("<Double-Button-1>", self.open_selected)
        self.tree.bind("<Return>", self.open_selected)

        row = ttk.Frame(outer, name="actions")
        row.pack(fill="x", pady=(8, 0))
        self.buttons: dict[str, ttk.Button] = {}
        for name, text, command in (
            ("open", "Open", self.open_selected),
            ("not_interested", "Not interested", self.not_interested),
            ("refresh", "Refresh", self.refresh),
        ):
            self.buttons[name] = ttk.Button(row, text=text, command=command, name=name)
            self.buttons[name].pack(side="left", padx=(0, 6))
        for name, text, command in (
            ("forget", "Forget me", self.forget),
            ("export", "Export my data", self.export),
            ("report", "What do you know about me?", self.show_report),
        ):
            self.buttons[name] = ttk.Button(row, text=text, command=command, name=name)
            self.buttons[name].pack(side="right", padx=(6, 0))
        for name, button in self.buttons.items():
            button.bind("<ButtonRelease-1>", self._pointer_release(name), add="+")

        self.status_var = tk.StringVar(master=root, value="")
        ttk.Label(outer, textvariable=self.status_var, name="status", wraplength=900).pack(
            anchor="w", pady=(8, 0)
        )

    def _pointer_release(self, name: str) -> Callable[[tk.Event[Any]], None]:
        def record(event: tk.Event[Any]) -> None:
            self.pointer_events.append(
                {
                    "widget": name,
                    "send_event": bool(event.send_event),
                    "x_root": event.x_root,
                    "y_root": event.y_root,
                    "time": event.time,
                }
            )

        return record

    # -- actions --------------------------------------------------------------------------

    def _selected(self) -> tuple[str, str] | None:
        selection = self.tree.selection()
        if not selection:
            self.status_var.set("Select a recommendation first.")
            return None
        item_id = selection[0]
        return item_id, str(self.tree.set(item_id, "title"))

    def refresh(self) -> None:
        """Ask the engine again and redraw the list."""
        self.tree.delete(*self.tree.get_children())
        if self.engine is None:
            return
        try:
            recs = self.engine.get_recommendations(
                USER, {"daypart": current_daypart()}, k=self.count
            )
        except OndeviceError as exc:
            self.dialogs.error("Recommendations", str(exc))
            return
        self.last = recs
        for rec in recs:
            self.tree.insert("", "end", iid=rec.item_id, values=(rec.title, rec.explanation))
        text = f"Answered by the {recs.level.value} level (you chose {recs.requested.value})."
        if recs.level is not recs.requested and recs.fallbacks:
            text += f"\nWhy not a more personal level: {recs.fallbacks[0]}."
        self.level_var.set(text)

    def open_selected(self, event: tk.Event[Any] | None = None) -> None:
        """Open the selected recommendation: record a click here, and refresh."""
        selected = self._selected()
        if selected is None or self.engine is None:
            return
        item_id, title = selected
        try:
            stored = self.engine.update_profile(
                USER,
                {"item_id": item_id, "event": "click", "context": {"daypart": current_daypart()}},
            )
        except OndeviceError as exc:
            self.dialogs.error("Open", str(exc))
            return
        where = "recorded on this computer" if stored else "not recorded (privacy level none)"
        self.status_var.set(f"Opened “{title}”: {where}.")
        self.refresh()

    def not_interested(self) -> None:
        """Never show the selected item again, if the privacy level keeps a block list."""
        selected = self._selected()
        if selected is None or self.engine is None:
            return
        item_id, title = selected
        try:
            self.engine.block_item(USER, item_id)
        except PolicyViolationError:
            level = self.engine.privacy_level.value
            message = (
                f"At the “{level}” privacy level this app keeps no list of items, so it "
                "cannot remember that you are not interested. Choose the behavioral "
                "level or higher (--level) to hide items."
            )
            self.status_var.set(message)
            self.dialogs.error("Not interested", message)
            return
        except OndeviceError as exc:
            self.dialogs.error("Not interested", str(exc))
            return
        self.status_var.set(f"You will not see “{title}” again.")
        self.refresh()

    def show_report(self) -> None:
        """Open (or refresh) the "What do you know about me?" window."""
        if self.engine is None:
            return
        try:
            text = format_report(self.engine.report(USER).to_dict())
        except OndeviceError as exc:
            self.dialogs.error("What do you know about me?", str(exc))
            return
        if self.report_window is None or not self.report_window.winfo_exists():
            win = tk.Toplevel(self.root, name="report_window")
            win.title(f"{APP_TITLE}: what do you know about me?")
            win.geometry("820x560+60+40")
            frame = ttk.Frame(win, padding=8, name="body")
            frame.pack(fill="both", expand=True)
            textbox = tk.Text(frame, wrap="word", name="report_text", font="TkFixedFont")
            bar = ttk.Scrollbar(frame, orient="vertical", command=textbox.yview)
            textbox.configure(yscrollcommand=bar.set)
            ttk.Button(frame, text="Close", command=win.destroy, name="close").pack(
                side="bottom", anchor="e", pady=(6, 0)
            )
            textbox.pack(side="left", fill="both", expand=True)
            bar.pack(side="right", fill="y")
            self.report_window, self.report_text = win, textbox
        assert self.report_text is not None
        self.report_text.configure(state="normal")
        self.report_text.delete("1.0", "end")
        self.report_text.insert("1.0", text)
        self.report_text.configure(state="disabled")
        self.report_window.lift()

    def export(self) -> None:
        """Write an encrypted copy of everything stored about the user."""
        if self.engine is None:
            return
        path = self.dialogs.ask_export_path()
        if not path:
            return
        passphrase = self.dialogs.ask_passphrase(
            "A passphrase for the export file (you need it to read or import it):"
        )
        if not passphrase:
            self.status_var.set("Export cancelled: an export is always encrypted.")
            return
        try:
            written = self.engine.export_profile_to(path, user_id=USER, passphrase=passphrase)
        except OndeviceError as exc:
            self.dialogs.error("Export my data", str(exc))
            return
        self.status_var.set(f"Exported your data, encrypted, to {written}.")
        self.dialogs.info("Export my data", f"Your data is in {written}, encrypted.")

    def forget(self) -> None:
        """After confirmation, crypto-shred the whole profile and show the empty state."""
        if self.engine is None:
            return
        if not self.dialogs.confirm(
            "Forget me",
            "Delete everything this app knows about you? The profile and its key are "
            "destroyed; this cannot be undone.",
        ):
            return
        try:
            self.engine.wipe()
        except OndeviceError as exc:
            self.dialogs.error("Forget me", str(exc))
            return
        self.engine = None
        self.last = None
        if self.report_window is not None and self.report_window.winfo_exists():
            self.report_window.destroy()
        self.tree.delete(*self.tree.get_children())
        for button in self.buttons.values():
            button.state(["disabled"])
        left = [n for n in PROFILE_FILES if (self.profile_dir / n).exists()]
        gone = "no profile is left" if not left else f"still there: {', '.join(left)}"
        self.level_var.set("Your profile is gone.")
        self.status_var.set(
            f"Forgot everything: {self.profile_dir}: {gone}. Nothing new is stored until "
            "you start the app again."
        )


# -- screenshots straight from the X server ------------------------------------------------


def _xauth_cookie(number: str) -> tuple[bytes, bytes]:
    """The MIT-MAGIC-COOKIE-1 for local display ``number`` from the Xauthority file,
    or no authentication."""
    path = Path(os.environ.get("XAUTHORITY") or Path.home() / ".Xauthority")
    try:
        data = path.read_bytes()
    except OSError:
        return b"", b""
    pos = 0

    def field() -> bytes:
        nonlocal pos
        (size,) = struct.unpack_from(">H", data, pos)
        value = data[pos + 2 : pos + 2 + size]
        pos += 2 + size
        return value

    hostname = socket.gethostname().encode()
    try:
        while pos < len(data):
            (family,) = struct.unpack_from(">H", data, pos)
            pos += 2
            address, num, name, cookie = field(), field(), field(), field()
            local = (family == 256 and address == hostname) or family == 0xFFFF
            if local and num.decode() == number and name == b"MIT-MAGIC-COOKIE-1":
                return name, cookie
    except struct.error:
        pass
    return b"", b""


def _recv(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(min(size - len(chunks), 1 << 20))
        if not chunk:
            raise OSError("the X server closed the connection")
        chunks += chunk
    return bytes(chunks)


def _pad4(n: int) -> int:
    return (n + 3) & ~3


class XConnection:
    """A minimal client of the local X server's core protocol, enough to read a
    window's pixels (``GetImage``) and find its top-level frame (``QueryTree``)."""

    def __init__(self) -> None:
        display = os.environ.get("DISPLAY", "")
        host, _, rest = display.rpartition(":")
        number = rest.split(".")[0]
        if host not in ("", "unix") or not number.isdigit():
            raise OSError(f"screenshots need a local X display; DISPLAY is {display!r}")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        try:
            self._setup(number)
        except BaseException:
            self.sock.close()
            raise

    def _setup(self, number: str) -> None:
        try:
            self.sock.connect(f"/tmp/.X11-unix/X{number}")
        except OSError:
            self.sock.connect(f"\0/tmp/.X11-unix/X{number}")
        name, cookie = _xauth_cookie(number)
        hello = struct.pack("<BxHHHH2x", 0x6C, 11, 0, len(name), len(cookie))
        hello += name.ljust(_pad4(len(name)), b"\0") + cookie.ljust(_pad4(len(cookie)), b"\0")
        self.sock.sendall(hello)
        status, _, _, _, length = struct.unpack("<BBHHH", _recv(self.sock, 8))
        info = _recv(self.sock, length * 4)
        if status != 1:
            raise OSError(f"the X server refused the connection: {info!r}")
        (vendor_len,) = struct.unpack_from("<H", info, 16)
        n_formats, self.byte_order = info[21], info[22]
        pos = 32 + _pad4(vendor_len)
        self.formats: dict[int, tuple[int, int]] = {}
        for _ in range(n_formats):
            self.formats[info[pos]] = (info[pos + 1], info[pos + 2])
            pos += 8
        (self.root,) = struct.unpack_from("<I", info, pos)
        self.visuals: dict[int, tuple[int, int, int]] = {}
        n_depths = info[pos + 39]
        pos += 40
        for _ in range(n_depths):
            (n_visuals,) = struct.unpack_from("<H", info, pos + 2)
            pos += 8
            for _ in range(n_visuals):
                vid, _, _, _, red, green, blue = struct.unpack_from("<IBBHIII", info, pos)
                self.visuals[vid] = (red, green, blue)
                pos += 24

    def close(self) -> None:
        """Disconnect."""
        self.sock.close()

    def _reply(self, request: bytes) -> tuple[bytes, bytes]:
        self.sock.sendall(request)
        head = _recv(self.sock, 32)
        if head[0] != 1:
            raise OSError(f"X request {request[0]} failed with error code {head[1]}")
        (length,) = struct.unpack_from("<I", head, 4)
        return head, _recv(self.sock, length * 4)

    def top_level(self, window: int) -> int:
        """The ancestor of ``window`` whose parent is the root: the window a window
        manager and ``xdotool`` see (Tk wraps each toplevel in such a frame)."""
        while True:
            head, _ = self._reply(struct.pack("<BxHI", 15, 2, window))
            root, parent = struct.unpack_from("<II", head, 8)
            if parent in (root, 0):
                return window
            window = parent

    def get_image(self, window: int, width: int, height: int) -> bytes:
        """The window's pixels as 8-bit RGB."""
        head, data = self._reply(
            struct.pack("<BBHIhhHHI", 73, 2, 5, window, 0, 0, width, height, 0xFFFFFFFF)
        )
        depth = head[1]
        (visual,) = struct.unpack_from("<I", head, 8)
        bpp, pad = self.formats[depth]
        stride = (width * bpp + pad - 1) // pad * pad // 8
        red, green, blue = self.visuals.get(visual, (0xFF0000, 0xFF00, 0xFF))
        rgb = bytearray(width * height * 3)
        fast = bpp == 32 and self.byte_order == 0 and (red, green, blue) == (0xFF0000, 0xFF00, 0xFF)
        order: Any = "little" if self.byte_order == 0 else "big"
        step = bpp // 8
        for y in range(height):
            src = data[y * stride : y * stride + width * step]
            out = y * width * 3
            if fast:
                rgb[out : out + width * 3 : 3] = src[2::4]
                rgb[out + 1 : out + width * 3 : 3] = src[1::4]
                rgb[out + 2 : out + width * 3 : 3] = src[0::4]
                continue
            for x in range(width):
                pixel = int.from_bytes(src[x * step : (x + 1) * step], order)
                for c, mask in enumerate((red, green, blue)):
                    shift = (mask & -mask).bit_length() - 1
                    top = mask >> shift
                    rgb[out + 3 * x + c] = ((pixel & mask) >> shift) * 255 // max(top, 1)
        return bytes(rgb)


def capture_toplevel(win: tk.Misc) -> tuple[int, int, int, bytes]:
    """Screenshot a Tk toplevel from the X server: ``(frame id, width, height, rgb)``,
    where the frame is the X window that carries the title."""
    conn = XConnection()
    try:
        frame = conn.top_level(win.winfo_id())
        width, height = win.winfo_width(), win.winfo_height()
        return frame, width, height, conn.get_image(frame, width, height)
    finally:
        conn.close()


def toplevel_frame(win: tk.Misc) -> int:
    """The X id of the frame that carries a Tk toplevel's title."""
    conn = XConnection()
    try:
        return conn.top_level(win.winfo_id())
    finally:
        conn.close()


def write_png(path: Path, width: int, height: int, rgb: bytes) -> None:
    """Write 8-bit RGB pixels as a PNG file (zlib from the standard library)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    rows = b"".join(b"\0" + rgb[y * width * 3 : (y + 1) * width * 3] for y in range(height))
    png = b"\x89PNG\r\n\x1a\n"
    png += chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(rows, 6)) + chunk(b"IEND", b"")
    path.write_bytes(png)


# -- script mode ---------------------------------------------------------------------------


class ScriptRunner:
    """Drives the app through its own event loop, one step per ``root.after`` tick.

    Steps (JSON objects, by ``"do"``):

    - ``snapshot`` ``name``: log what the window shows (rows, the level line, status).
    - ``open`` ``row``, ``how`` (``double_click``, ``button`` or ``return``): select a
      row as a user does and open it.
    - ``not_interested`` ``row``: select a row and press "Not interested".
    - ``report``: press "What do you know about me?" and log the window's text.
    - ``export`` ``path``, ``passphrase``: press "Export my data", answer the dialogs.
    - ``forget`` ``answer`` (bool): press "Forget me" and answer the confirmation.
    - ``screenshot`` ``path``, ``window`` (``main`` or ``report``): PNG of the window.
    - ``await_pointer`` ``button``, ``ready_file``, ``timeout``: write the button's
      screen centre to ``ready_file`` and wait for a real button release from the X
      server (someone else, e.g. xdotool, moves the pointer and clicks).
    """

    def __init__(
        self,
        *,
        app: DesktopApp,
        dialogs: ScriptedDialogs,
        steps: list[dict[str, Any]],
        log_path: Path,
    ) -> None:
        self.app = app
        self.dialogs = dialogs
        self.steps = steps
        self.log_path = log_path
        self.index = 0
        self.result: dict[str, Any] = {
            "profile_dir": str(app.profile_dir),
            "steps": [],
            "snapshots": {},
            "screenshots": [],
            "errors": [],
        }
        self.exit_code = 0
        app.root.report_callback_exception = self._callback_error

    def start(self) -> None:
        """Begin once the window is mapped."""
        self.app.root.after(200, self._next)

    def _callback_error(self, exc: type[BaseException], value: BaseException, tb: Any) -> None:
        log.error("error in a Tk callback", exc_info=(exc, value, tb))
        self.result["errors"].append(f"{exc.__name__}: {value}")
        self.exit_code = 1

    def _next(self) -> None:
        if self.index >= len(self.steps):
            self._finish()
            return
        step = self.steps[self.index]
        self.index += 1
        self.app.root.update_idletasks()
        try:
            outcome = getattr(self, f"_do_{step['do']}")(step)
        except Exception as exc:  # a script error ends the run with a record of it
            log.exception("step %s failed", step)
            self.result["errors"].append(f"{step.get('do')}: {type(exc).__name__}: {exc}")
            self.exit_code = 1
            self._finish()
            return
        self.result["steps"].append({"do": step["do"], **(outcome or {})})
        if not (outcome or {}).get("waiting"):
            self.app.root.after(int(step.get("pause_ms", 50)), self._next)

    def _finish(self) -> None:
        self.result["dialogs"] = self.dialogs.asked
        self.result["pointer_events"] = self.app.pointer_events
        self.result["profile_dir_exists"] = self.app.profile_dir.exists()
        self.result["profile_files_left"] = [
            n for n in PROFILE_FILES if (self.app.profile_dir / n).exists()
        ]
        self.log_path.write_text(json.dumps(self.result, indent=2, ensure_ascii=False))
        if self.app.engine is not None:
            self.app.engine.close()
        self.app.root.destroy()

    def _rows(self) -> list[dict[str, str]]:
        tree = self.app.tree
        return [
            {"item_id": iid, "title": str(tree.set(iid, "title")), "why": str(tree.set(iid, "why"))}
            for iid in tree.get_children()
        ]

    def _select(self, row: int) -> str:
        iid = self.app.tree.get_children()[row]
        self.app.tree.focus_set()
        self.app.tree.selection_set(iid)
        self.app.tree.focus(iid)
        self.app.tree.see(iid)
        self.app.root.update()  # delivers <<TreeviewSelect>> like a real selection
        return str(iid)

    def _do_snapshot(self, step: dict[str, Any]) -> dict[str, Any]:
        shown = {
            "rows": self._rows(),
            "level_line": self.app.level_var.get(),
            "level": self.app.last.level.value if self.app.last else None,
            "status": self.app.status_var.get(),
        }
        self.result["snapshots"][step["name"]] = shown
        return {"name": step["name"]}

    def _do_open(self, step: dict[str, Any]) -> dict[str, Any]:
        iid = self._select(int(step.get("row", 0)))
        title = str(self.app.tree.set(iid, "title"))
        how = step.get("how", "double_click")
        if how == "double_click":
            # Two presses and releases in quick succession at the row: Tk itself turns
            # them into <Double-Button-1> (event_generate cannot send "Double").
            box = self.app.tree.bbox(iid, "title")
            assert isinstance(box, tuple), "the row is not visible"
            x, y, w, h = box
            for n, kind in enumerate(("ButtonPress", "ButtonRelease") * 2):
                self.app.tree.event_generate(
                    f"<{kind}-1>", when="now", x=x + w // 2, y=y + h // 2, time=1000 + 20 * n
                )
        elif how == "return":
            self.app.tree.event_generate("<Return>")
        else:
            self.app.buttons["open"].invoke()
        return {"item_id": iid, "title": title, "how": how, "status": self.app.status_var.get()}

    def _do_not_interested(self, step: dict[str, Any]) -> dict[str, Any]:
        iid = self._select(int(step.get("row", 0)))
        title = str(self.app.tree.set(iid, "title"))
        self.app.buttons["not_interested"].invoke()
        return {"item_id": iid, "title": title, "status": self.app.status_var.get()}

    def _do_report(self, step: dict[str, Any]) -> dict[str, Any]:
        self.app.buttons["report"].invoke()
        text = self.app.report_text.get("1.0", "end") if self.app.report_text else ""
        self.result["report_text"] = text
        return {"chars": len(text)}

    def _do_close_report(self, step: dict[str, Any]) -> dict[str, Any]:
        if self.app.report_window is not None:
            self.app.report_window.nametowidget("body.close").invoke()
        return {}

    def _do_export(self, step: dict[str, Any]) -> dict[str, Any]:
        self.dialogs.queue("export_path", step["path"])
        self.dialogs.queue("passphrase", step["passphrase"])
        self.app.buttons["export"].invoke()
        self.result["export_path"] = step["path"]
        return {"path": step["path"], "status": self.app.status_var.get()}

    def _do_forget(self, step: dict[str, Any]) -> dict[str, Any]:
        self.dialogs.queue("confirm", bool(step.get("answer", True)))
        self.app.buttons["forget"].invoke()
        self.app.root.update_idletasks()
        self.result["after_forget"] = {
            "profile_dir_exists": self.app.profile_dir.exists(),
            "profile_files_left": [n for n in PROFILE_FILES if (self.app.profile_dir / n).exists()],
            "level_line": self.app.level_var.get(),
            "status": self.app.status_var.get(),
            "rows": len(self.app.tree.get_children()),
        }
        return {"answer": bool(step.get("answer", True))}

    def _do_screenshot(self, step: dict[str, Any]) -> dict[str, Any]:
        which = step.get("window", "main")
        win: tk.Misc | None = self.app.root if which == "main" else self.app.report_window
        if win is None:
            raise RuntimeError("the report window is not open")
        win.update()
        time.sleep(0.1)
        win.update()
        window_id, width, height, rgb = capture_toplevel(win)
        path = Path(step["path"])
        write_png(path, width, height, rgb)
        shot = {
            "path": str(path),
            "window": which,
            "window_id": window_id,
            "width": width,
            "height": height,
        }
        self.result["screenshots"].append(shot)
        return shot

    def _do_await_pointer(self, step: dict[str, Any]) -> dict[str, Any]:
        name = step.get("button", "refresh")
        button = self.app.buttons[name]
        root = self.app.root
        root.update()
        seen = len(self.app.pointer_events)
        target = {
            "button": name,
            "x": button.winfo_rootx() + button.winfo_width() // 2,
            "y": button.winfo_rooty() + button.winfo_height() // 2,
            "window_id": toplevel_frame(root),
            "title": root.title(),
        }
        ready = Path(step["ready_file"])
        ready.with_suffix(".tmp").write_text(json.dumps(target))
        ready.with_suffix(".tmp").replace(ready)
        deadline = time.monotonic() + float(step.get("timeout", 20))
        self.result["pointer_target"] = target

        def poll() -> None:
            arrived = [e for e in self.app.pointer_events[seen:] if e["widget"] == name]
            if arrived or time.monotonic() > deadline:
                self.result["pointer_received"] = bool(arrived)
                self.result["snapshots"]["after_pointer"] = {
                    "status": self.app.status_var.get(),
                    "rows": self._rows(),
                }
                root.after(50, self._next)
            else:
                root.after(50, poll)

        root.after(50, poll)
        return {"waiting": True, **target}


# -- entry point ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--profile",
        type=Path,
        default=default_profile_dir(),
        help="profile directory (default: %(default)s)",
    )
    parser.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="read the profile passphrase from environment variable VAR (default: ask in a dialog)",
    )
    parser.add_argument(
        "--level", choices=LEVELS, default="individual", help="privacy level (default: %(default)s)"
    )
    parser.add_argument("--script", type=Path, help="JSON list of UI steps to perform, for tests")
    parser.add_argument("--log", type=Path, help="with --script: where to write the JSON log")
    args = parser.parse_args(argv)
    if args.script is not None and args.log is None:
        parser.error("--script needs --log")
    return args


def choose_key(args: argparse.Namespace, dialogs: Dialogs) -> KeyProvider | None:
    """The OS keychain by default where a secure one exists; a passphrase otherwise
    (or when ``--passphrase-env`` names one, or the profile was made with one)."""
    if args.passphrase_env:
        passphrase = os.environ.get(args.passphrase_env, "")
        if not passphrase:
            print(
                f"desktop_app: environment variable {args.passphrase_env} is empty or unset",
                file=sys.stderr,
            )
            return None
        return Passphrase(passphrase)
    try:
        kind = json.loads((args.profile.expanduser() / "key.json").read_bytes()).get("provider")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind in (None, "keychain"):
        keychain = Keychain(service="ondevice-desktop-example")
        try:
            keychain.check_available()
            return keychain
        except KeychainUnavailableError as exc:
            if kind == "keychain":
                print(f"desktop_app: {exc}", file=sys.stderr)
                return None
            logging.getLogger(__name__).info("no secure keychain; asking for a passphrase")
    typed = dialogs.ask_passphrase(f"Passphrase for your profile in {args.profile}:")
    return Passphrase(typed) if typed else None


def main(argv: list[str] | None = None) -> int:
    """Run the app; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    steps: list[dict[str, Any]] | None = None
    if args.script is not None:
        steps = json.loads(args.script.read_text())
    root = tk.Tk(className="OndeviceExample")
    root.withdraw()
    dialogs: Dialogs = ScriptedDialogs(root) if steps is not None else Dialogs(root)
    key = choose_key(args, dialogs)
    if key is None:
        root.destroy()
        return 2
    try:
        engine = PersonalizationEngine(
            args.profile,
            key=key,
            policy=sample_policy(),
            privacy_level=args.level,
            bundle=SAMPLE_BUNDLE,
            bundle_public_key=SAMPLE_PUBLIC_KEY,
        )
    except ProfileUnreadableError:
        print(
            f"desktop_app: cannot open {args.profile}: wrong passphrase or damaged profile",
            file=sys.stderr,
        )
        root.destroy()
        return 1
    except OndeviceError as exc:
        print(f"desktop_app: cannot open {args.profile}: {exc}", file=sys.stderr)
        root.destroy()
        return 1
    root.deiconify()
    app = DesktopApp(
        root=root, engine=engine, profile_dir=args.profile.expanduser(), dialogs=dialogs
    )
    runner = None
    if steps is not None:
        assert isinstance(dialogs, ScriptedDialogs)
        runner = ScriptRunner(app=app, dialogs=dialogs, steps=steps, log_path=args.log)
        runner.start()
    try:
        root.mainloop()
    finally:
        if app.engine is not None and not app.engine.closed:
            app.engine.close()
    return runner.exit_code if runner is not None else 0


if __name__ == "__main__":
    sys.exit(main())
