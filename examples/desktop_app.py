"""A small desktop app on ondevice: recommendations with their "why", offline.

It opens (or creates) an encrypted profile for one local user, ``me``, with the sample
catalog shipped in the package, and shows what the engine recommends and why. Opening a
recommendation records a click on this computer and refreshes the list. Three buttons
answer what a person asks of an app that learns from them: "What do you know about
me?", "Export my data" and "Forget me". Run it (after ``pip install -e '.[desktop]'``)::

    python examples/desktop_app.py [--profile DIR] [--level LEVEL] [--passphrase-env VAR]

**Keys.** A new profile keeps its key in the OS keychain where a secure one exists, and
is protected by a passphrase, typed twice, otherwise. For an existing profile,
``profile_key_provider`` says which key it needs before anything is decrypted. A
passphrase never comes from the command line, where other users could read it:
``--passphrase-env`` names an environment variable that holds it. The profile lives in
this user's data directory (``platformdirs``) unless ``--profile`` says otherwise.

**Threads: the pattern for any UI toolkit.** The UI thread never calls the engine. One
thread (:class:`EngineWorker`) owns the engine and makes every call, in order; each
result comes back through a queue that the UI thread drains on a timer (``after`` in
Tk, ``QTimer`` in Qt, ``GLib.timeout_add`` in GTK), since UI toolkits are not
thread-safe. A passphrase costs every open, and every export, one Argon2id derivation
(a quarter of a second to seconds, with the machine); Argon2id releases the GIL, so the
window keeps drawing and answering meanwhile (``benchmarks/bench_desktop_stall.py``
measures the event loop's longest stall). The buttons wait until the profile is open.
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import threading
import time
import tkinter as tk
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from tkinter import filedialog, messagebox, simpledialog, ttk
from typing import Any, TypeVar

import platformdirs

from ondevice import (
    Keychain,
    KeychainUnavailableError,
    KeyProvider,
    OndeviceError,
    Passphrase,
    PersonalizationEngine,
    ProfileUnreadableError,
    Recommendations,
    profile_key_provider,
)
from ondevice.sample import SAMPLE_BUNDLE, SAMPLE_PUBLIC_KEY, daypart, sample_policy

APP_NAME, APP_TITLE, USER = "ondevice-desktop-example", "ondevice example", "me"
LEVELS = ("none", "segment", "behavioral", "contextual", "individual")
T = TypeVar("T")
Job = Callable[[PersonalizationEngine], T]  # runs on the worker thread
Done = Callable[[T], object]  # runs on the Tk thread
Failed = Callable[[OndeviceError], object]  # runs on the Tk thread


def default_profile_dir() -> Path:
    """This user's data directory for the app (XDG, Application Support or AppData)."""
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def context() -> dict[str, str]:
    """The only context this app records: the daypart of the local clock."""
    return {"daypart": daypart(time.localtime().tm_hour)}


def _plain(name: str, value: Any) -> str:
    if name.endswith(("_at", "_interaction")) and isinstance(value, float):
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(value))
    if isinstance(value, dict):
        return (
            ", ".join(f"{k.replace('_', ' ')} {_plain(k, v)}" for k, v in value.items()) or "none"
        )
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def format_report(report: Mapping[str, Any]) -> str:
    """``engine.report(USER).to_dict()`` as text a person reads."""
    lines = [
        f"Stored on this computer only, encrypted: {report['encryption']}.",
        f"Privacy level {report['privacy_level']}: your last {report['window']} "
        f"interactions, kept at most {report['retention_days']:g} days.",
        "\nWhat is stored about you now:",
    ]
    for user in report["users"] or [{"nothing": "yet"}]:
        lines += [f"  {name.replace('_', ' ')}: {_plain(name, v)}" for name, v in user.items()]
    lines.append("\nWhat may be stored, why, and for how long:")
    for f in report["fields"]:
        days = f["retention_days"]
        kept = "until you remove it" if days is None else f"{days:g} days"
        state = "collected" if f["collected"] else "not collected at this level"
        lines += [f"  {f['name']} ({state}; kept {kept})", f"      purpose: {f['purpose']}"]
    return "\n".join(lines) + "\n"


class Dialogs:
    """Every question the app asks a person (a test passes a subclass that answers)."""

    def __init__(self, root: tk.Misc) -> None:
        self.root = root

    def ask_passphrase(self, prompt: str) -> str | None:
        return simpledialog.askstring(APP_TITLE, prompt, show="*", parent=self.root) or None

    def ask_export_path(self) -> str | None:
        path = filedialog.asksaveasfilename(parent=self.root, initialfile="me.ondevice-export")
        return path or None

    def confirm(self, title: str, question: str) -> bool:
        return bool(messagebox.askyesno(title, question, parent=self.root))

    def error(self, title: str, message: str) -> None:
        messagebox.showerror(title, message, parent=self.root)


def _raise(exc: Exception) -> None:
    raise exc


class EngineWorker:
    """One thread that owns the engine and makes every call to it, in order.

    ``run(job, done, failed)`` queues ``job()`` for that thread; the Tk thread polls the
    outcomes every 10 ms and calls ``done(result)``, or ``failed(error)`` (default
    ``on_error``) for an :class:`~ondevice.OndeviceError`.
    """

    def __init__(self, root: tk.Misc, on_error: Failed) -> None:
        self.root, self.on_error = root, on_error
        self.engine: PersonalizationEngine | None = None  # used by jobs only
        self.pending = 0  # jobs whose outcome the Tk thread has not handled yet
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._outcomes: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="engine", daemon=True)
        self._thread.start()
        self._poll()

    def run(self, job: Callable[[], T], done: Done[T], failed: Failed | None = None) -> None:
        """Run ``job`` on the worker thread; hand its outcome to ``done`` or ``failed``."""
        self.pending += 1
        self._jobs.put(partial(self._execute, job, done, failed or self.on_error))

    def call(self, job: Job[T], done: Done[T], failed: Failed | None = None) -> None:
        """``run`` a job that takes the open engine."""
        self.run(lambda: job(self._engine()), done, failed)

    def stop(self, timeout: float = 30.0) -> None:
        """Close the engine on its thread once the queued jobs are done."""
        self._jobs.put(None)
        self._thread.join(timeout)

    def _engine(self) -> PersonalizationEngine:
        if self.engine is None or self.engine.closed:
            raise OndeviceError("the profile is not open")
        return self.engine

    def _execute(self, job: Callable[[], T], done: Done[T], failed: Failed) -> None:
        try:
            result = job()
        except OndeviceError as exc:
            self._outcomes.put(partial(failed, exc))
        except Exception as exc:  # a bug: raised again on the Tk thread, which reports it
            self._outcomes.put(partial(_raise, exc))
        else:
            self._outcomes.put(partial(done, result))

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()
        if self.engine is not None and not self.engine.closed:
            self.engine.close()

    def _poll(self) -> None:
        self.root.after(10, self._poll)
        while not self._outcomes.empty():
            self.pending -= 1
            self._outcomes.get()()


class DesktopApp:
    """The main window; ``start()`` opens the profile. Widgets have stable names
    (``recommendations``; buttons ``open``, ``not_interested``, ``refresh``, ``report``,
    ``export``, ``forget``); ``dialogs`` and ``worker`` may be replaced by tests."""

    def __init__(
        self,
        root: tk.Tk,
        profile: Path,
        level: str,
        passphrase: str | None = None,
        dialogs: Dialogs | None = None,
        worker: type[EngineWorker] = EngineWorker,
    ) -> None:
        self.root, self.profile_dir, self.level, self.passphrase = root, profile, level, passphrase
        self.dialogs = dialogs or Dialogs(root)
        self.worker = worker(root, lambda exc: self.dialogs.error(APP_TITLE, str(exc)))
        self.keychain = Keychain(service=APP_NAME)
        self.exit_code = 0
        self.closing = False
        self.report: tk.Text | None = None
        root.title(APP_TITLE)
        root.geometry("940x520+0+0")
        root.protocol("WM_DELETE_WINDOW", self.quit)
        frame = ttk.Frame(root, padding=10)
        frame.pack(fill="both", expand=True)
        self.level_var, self.status_var = tk.StringVar(root), tk.StringVar(root)
        ttk.Label(frame, textvariable=self.level_var, wraplength=900).pack(anchor="w", pady=4)
        tree = ttk.Treeview(
            frame, columns=("title", "why"), show="headings", name="recommendations"
        )
        tree.heading("title", text="Recommended for you")
        tree.heading("why", text="Why you see it")
        tree.column("title", width=260, stretch=False)
        tree.pack(fill="both", expand=True)
        tree.bind("<Double-Button-1>", self.open_selected)
        tree.bind("<Return>", self.open_selected)
        self.tree, row = tree, ttk.Frame(frame)
        row.pack(fill="x", pady=(8, 0))
        self.buttons = {
            name: ttk.Button(row, text=text, command=command, name=name)
            for name, text, command in (
                ("open", "Open", self.open_selected),
                ("not_interested", "Not interested", self.not_interested),
                ("refresh", "Refresh", self.refresh),
                ("forget", "Forget me", self.forget),
                ("export", "Export my data", self.export),
                ("report", "What do you know about me?", self.show_report),
            )
        }
        for name, button in self.buttons.items():
            button.pack(side="left" if name in ("open", "not_interested", "refresh") else "right")
        ttk.Label(frame, textvariable=self.status_var, wraplength=900).pack(anchor="w", pady=4)
        self._enable(False)

    def _enable(self, on: bool) -> None:
        for button in self.buttons.values():
            button.state(["!disabled"] if on else ["disabled"])

    def _fatal(self, message: str) -> None:
        print(f"desktop_app: {message}", file=sys.stderr)
        self.dialogs.error(APP_TITLE, message)
        self.quit(1)

    def quit(self, code: int = 0) -> None:
        """Close the window (once: a dialog cancelled by closing the window calls this
        again); ``main`` then closes the engine on its thread."""
        self.exit_code = code or self.exit_code
        if not self.closing:
            self.closing = True
            self.root.destroy()

    def start(self) -> None:
        """Find out which key the profile needs, ask for it if need be, and open it."""
        self.status_var.set(f"Opening your profile in {self.profile_dir}…")
        self.worker.run(self._which_key, self._choose_key, partial(self._open_failed, None))

    def _which_key(self) -> str | None:
        """The key to use: the profile's kind, "keychain" for a new profile where a secure
        keychain exists, None for a new passphrase. On the worker: asking the OS for its
        keychain can take half a second."""
        kind = profile_key_provider(self.profile_dir)
        if kind == "raw":
            raise OndeviceError("its key is a raw key, kept by another app")
        if self.passphrase is None and kind in (None, "keychain"):
            try:
                self.keychain.check_available()
                return "keychain"
            except KeychainUnavailableError:
                if kind == "keychain":
                    raise
        return kind

    def _choose_key(self, kind: str | None) -> None:
        key: KeyProvider = self.keychain
        if self.passphrase:
            key = Passphrase(self.passphrase)
        elif kind != "keychain":
            typed = (
                self._new_passphrase("your new profile (there is no secure keychain here)")
                if kind is None
                else self.dialogs.ask_passphrase(f"Passphrase of {self.profile_dir}:")
            )
            if not typed:
                self.quit(2)
                return
            key = Passphrase(typed)
        self.worker.run(partial(self._open, key), self._opened, partial(self._open_failed, kind))

    def _open(self, key: KeyProvider) -> None:
        """Open the profile with the sample catalog, on the worker (which then owns it)."""
        self.worker.engine = PersonalizationEngine(
            self.profile_dir,
            key=key,
            policy=sample_policy(),
            privacy_level=self.level,
            bundle=SAMPLE_BUNDLE,
            bundle_public_key=SAMPLE_PUBLIC_KEY,
        )

    def _new_passphrase(self, what: str) -> str | None:
        """A new passphrase, typed twice; a mismatch is refused and asked again."""
        while first := self.dialogs.ask_passphrase(f"Choose a passphrase for {what}:"):
            second = self.dialogs.ask_passphrase("Type the same passphrase again:")
            if second is None or second == first:
                return second
            self.dialogs.error(APP_TITLE, "The passphrases do not match. Type one twice.")
        return None

    def _open_failed(self, kind: str | None, exc: OndeviceError) -> None:
        if isinstance(exc, ProfileUnreadableError) and kind == "passphrase" and not self.passphrase:
            self.dialogs.error(APP_TITLE, "Wrong passphrase (or a damaged profile).")
            self._choose_key(kind)
        else:
            self._fatal(f"cannot open {self.profile_dir}: {exc}")

    def _opened(self, _: object) -> None:
        self.status_var.set("")
        self._enable(True)
        self.refresh()

    def refresh(self) -> None:
        """Ask the engine again and redraw the list."""
        self.worker.call(lambda e: e.get_recommendations(USER, context()), self._show)

    def _show(self, recs: Recommendations) -> None:
        self.tree.delete(*self.tree.get_children())
        for rec in recs:
            self.tree.insert("", "end", iid=rec.item_id, values=(rec.title, rec.explanation))
        text = f"Answered by the {recs.level.value} level (you chose {recs.requested.value})."
        if recs.level is not recs.requested and recs.fallbacks:
            text += f"\nWhy not a more personal level: {recs.fallbacks[0]}."
        self.level_var.set(text)

    def _selected(self) -> tuple[str, str] | None:
        if not (selection := self.tree.selection()):
            self.status_var.set("Select a recommendation first.")
            return None
        return selection[0], str(self.tree.set(selection[0], "title"))

    def open_selected(self, event: object = None) -> None:
        """Open the selected recommendation: record a click on this computer, refresh."""
        if selected := self._selected():
            click = {"item_id": selected[0], "event": "click", "context": context()}
            done = f"Opened “{selected[1]}”: recorded on this computer only."
            self.worker.call(lambda e: e.update_profile(USER, click), self._status(done))
            self.refresh()

    def not_interested(self) -> None:
        """Never show the selected item again (needs a level that keeps a block list)."""
        if selected := self._selected():
            item, done = selected[0], f"You will not see “{selected[1]}” again."
            self.worker.call(lambda e: e.block_item(USER, item), self._status(done))
            self.refresh()

    def _status(self, text: str) -> Callable[[object], None]:
        return lambda _: self.status_var.set(text)

    def show_report(self) -> None:
        """Open (or refresh) the "What do you know about me?" window."""
        self.worker.call(lambda e: format_report(e.report(USER).to_dict()), self._show_report)

    def _show_report(self, text: str) -> None:
        if self.report is None or not self.report.winfo_exists():
            window = tk.Toplevel(self.root, name="report_window")
            window.title(f"{APP_TITLE}: what do you know about me?")
            window.geometry("820x560+60+40")
            ttk.Button(window, text="Close", command=window.destroy, name="close").pack(
                side="bottom"
            )
            self.report = tk.Text(window, wrap="word", name="text")
            self.report.pack(fill="both", expand=True)
        self.report.configure(state="normal")
        self.report.replace("1.0", "end", text)
        self.report.configure(state="disabled")

    def export(self) -> None:
        """Write an encrypted copy of everything stored about the user."""
        if not (path := self.dialogs.ask_export_path()):
            return
        if not (secret := self._new_passphrase("the export (you need it to read the file)")):
            self.status_var.set("Export cancelled: an export is always encrypted.")
            return
        self.status_var.set("Exporting…")
        done = self._status(f"Exported your data, encrypted, to {path}.")
        self.worker.call(lambda e: e.export_profile_to(path, user_id=USER, passphrase=secret), done)

    def forget(self) -> None:
        """After confirmation, crypto-shred the whole profile and show the empty state."""
        question = "Delete everything this app knows about you? This cannot be undone."
        if self.dialogs.confirm("Forget me", question):
            self._enable(False)
            self.worker.call(lambda e: e.wipe(), self._forgotten, self._kept)

    def _kept(self, exc: OndeviceError) -> None:
        self._enable(True)
        self.dialogs.error("Forget me", str(exc))

    def _forgotten(self, _: object) -> None:
        if self.report is not None and self.report.winfo_exists():
            self.report.winfo_toplevel().destroy()
        self.tree.delete(*self.tree.get_children())
        self.level_var.set("Your profile is gone.")
        self.status_var.set(f"Forgot everything: no profile is left in {self.profile_dir}.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add = parser.add_argument
    add("--profile", type=Path, default=default_profile_dir(), help="default: %(default)s")
    add("--passphrase-env", metavar="VAR", help="take the passphrase from variable VAR")
    add("--level", choices=LEVELS, default="individual", help="default: %(default)s")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the app; returns the exit code."""
    args = parse_args(argv)
    passphrase = os.environ.get(args.passphrase_env) if args.passphrase_env else None
    if args.passphrase_env and not passphrase:
        print(f"desktop_app: ${args.passphrase_env} is empty or unset", file=sys.stderr)
        return 2
    root = tk.Tk(className="OndeviceExample")
    app = DesktopApp(root, args.profile.expanduser(), args.level, passphrase)
    app.start()
    try:
        root.mainloop()
    finally:
        app.worker.stop()
    return app.exit_code


if __name__ == "__main__":
    sys.exit(main())
