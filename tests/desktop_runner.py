"""Drives examples/desktop_app.py from inside its own process, for the GUI test and the
stall benchmark.

Started by :func:`desktop_driver.run_app` as ``python desktop_runner.py --script STEPS
--log LOG [--inline] [--secret-service DIR] -- APP_ARGS...``. It builds the app as the
example's ``main()`` does, but answers its dialogs from the script
(:class:`ScriptedDialogs`); with ``--inline`` every engine call runs on the Tk thread
(:class:`InlineWorker`, the baseline the worker thread is measured against). Each step
invokes the real widgets, then waits until the engine's work is done and the window
has been updated; a 5 ms ticker on the Tk event loop (:class:`StallMeter`) measures how
long the loop stalled meanwhile. Screenshots of the app's windows come from the X server
through ``mss``. Everything observed is written to ``LOG`` as JSON; the test process
makes the assertions.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import tkinter as tk
import traceback
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import mss
import mss.tools

from ondevice import profile_key_provider

APP = Path(__file__).resolve().parent.parent / "examples" / "desktop_app.py"
PROFILE_FILES = ("profile.db", "key.json")
#: mss 10.2 deprecates the factory ``mss.mss`` for the class ``mss.MSS`` (absent from 9.x).
SCREEN: Any = getattr(mss, "MSS", None) or mss.mss


def load_app_module() -> Any:
    """The example, imported from its file (``examples/`` is not a package)."""
    spec = importlib.util.spec_from_file_location("desktop_app", APP)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["desktop_app"] = module
    spec.loader.exec_module(module)
    return module


desktop_app = load_app_module()


class ScriptedDialogs(desktop_app.Dialogs):
    """The app's dialogs, answered from queues filled by the script; every question is
    recorded. An unexpected question is answered "cancel" (None / False)."""

    def __init__(self, root: tk.Misc) -> None:
        super().__init__(root)
        self.answers: dict[str, list[Any]] = {}
        self.asked: list[dict[str, str]] = []

    def queue(self, kind: str, *answers: Any) -> None:
        self.answers.setdefault(kind, []).extend(answers)

    def _answer(self, kind: str, text: str) -> Any:
        self.asked.append({"dialog": kind, "text": text})
        queued = self.answers.get(kind)
        return queued.pop(0) if queued else None

    def ask_passphrase(self, prompt: str) -> str | None:
        return self._answer("passphrase", prompt)

    def ask_export_path(self) -> str | None:
        return self._answer("export_path", "Export my data")

    def confirm(self, title: str, question: str) -> bool:
        return bool(self._answer("confirm", f"{title}: {question}"))

    def error(self, title: str, message: str) -> None:
        self._answer("error", f"{title}: {message}")


class InlineWorker(desktop_app.EngineWorker):
    """The baseline: the same worker API, but every job runs at once on the Tk thread,
    as the app did before it had a worker thread."""

    def run(self, job: Callable[[], Any], done: Any, failed: Any = None) -> None:
        self.pending += 1
        self._execute(job, done, failed or self.on_error)


class StallMeter:
    """Ticks every ``interval_ms`` on the Tk event loop and keeps every gap between two
    ticks: a gap much longer than the interval is the event loop stalling."""

    def __init__(self, root: tk.Misc, interval_ms: int = 5) -> None:
        self.root, self.interval_ms = root, interval_ms
        self.gaps: list[tuple[float, float]] = []
        self.last = time.perf_counter()
        root.after(interval_ms, self._tick)

    def _tick(self) -> None:
        now = time.perf_counter()
        self.gaps.append((self.last, now))
        self.last = now
        self.root.after(self.interval_ms, self._tick)

    def longest(self, start: float, end: float) -> float:
        """The longest stretch of [start, end] with no tick, in seconds (a gap that began
        before ``start`` counts from ``start``)."""
        gaps = [*self.gaps, (self.last, end)]
        return max(
            (min(b, end) - max(a, start) for a, b in gaps if b > start and a < end), default=0.0
        )


#: Screenshots taken, written as PNG once the event loop has ended (encoding one takes
#: tens of milliseconds, which must not count as a stall of the step that took it).
SHOTS: list[tuple[bytes, tuple[int, int], Path]] = []


def grab(window: tk.Misc, path: Path) -> dict[str, Any]:
    """The pixels of ``window`` as the X server shows them (mss), to be written to
    ``path``; returns where and how large."""
    window.update_idletasks()
    x, y = window.winfo_rootx(), window.winfo_rooty()
    width, height = window.winfo_width(), window.winfo_height()
    with SCREEN() as screen:
        shot = screen.grab({"left": x, "top": y, "width": width, "height": height})
    SHOTS.append((shot.rgb, shot.size, path))
    return {"path": str(path), "x": x, "y": y, "width": shot.width, "height": shot.height}


class Runner:
    """Runs the script's steps one after the other on the Tk event loop."""

    def __init__(
        self, app: Any, dialogs: ScriptedDialogs, steps: list[dict[str, Any]], secret_service: bool
    ) -> None:
        self.app, self.dialogs, self.steps = app, dialogs, steps
        self.root: tk.Tk = app.root
        self.secret_service = secret_service
        self.meter = StallMeter(self.root)
        self.index = 0
        self.until: Callable[[], bool] = lambda: True  # what the current step waits for
        self.closed = False
        self.root.bind("<Destroy>", self._destroyed, add="+")
        self.log: dict[str, Any] = {
            "profile_dir": str(app.profile_dir),
            "steps": [],
            "snapshots": {},
            "screenshots": {},
            "errors": [],
            "inspections": {},
        }
        self.root.report_callback_exception = self._callback_error

    def _destroyed(self, event: tk.Event[Any]) -> None:
        if event.widget is self.root:
            self.closed = True

    def _callback_error(self, exc: type[BaseException], value: BaseException, tb: Any) -> None:
        traceback.print_exception(exc, value, tb)
        self.log["errors"].append(f"{exc.__name__}: {value}")

    # -- sequencing ---------------------------------------------------------------------

    def start(self) -> None:
        self.root.after(100, self._next)

    def _next(self) -> None:
        if self.closed:
            return
        if self.index >= len(self.steps):
            self.app.quit()
            return
        step = self.steps[self.index]
        self.index += 1
        self.until = lambda: True
        self.root.update_idletasks()
        t0 = time.perf_counter()
        try:
            record = getattr(self, f"do_{step['do']}")(step) or {}
        except Exception as exc:  # the script failed: record it and stop
            traceback.print_exc()
            self.log["errors"].append(f"{step['do']}: {type(exc).__name__}: {exc}")
            self.app.quit(1)
            return
        entry = {"do": step["do"], **record}
        self.log["steps"].append(entry)

        def finished() -> None:
            if self.closed:
                return
            t1 = time.perf_counter()
            entry["ms"] = round((t1 - t0) * 1000, 2)
            entry["stall_ms"] = round(self.meter.longest(t0, t1) * 1000, 2)
            entry["status"] = self.app.status_var.get()
            self.root.after(int(step.get("pause_ms", 20)), self._next)

        self.when_idle(finished)

    def when_idle(self, then: Callable[[], None]) -> None:
        """Call ``then`` once no engine job is pending, the step has what it waits for,
        and the window is redrawn."""
        if self.closed:
            return
        if self.app.worker.pending or not self.until():
            self.root.after(2, self.when_idle, then)
            return
        self.root.update_idletasks()
        then()

    # -- what the window shows ----------------------------------------------------------

    def rows(self) -> list[dict[str, str]]:
        tree = self.app.tree
        return [
            {"item_id": iid, "title": str(tree.set(iid, "title")), "why": str(tree.set(iid, "why"))}
            for iid in tree.get_children()
        ]

    def select(self, row: int) -> str:
        tree = self.app.tree
        iid = str(tree.get_children()[row])
        tree.focus_set()
        tree.selection_set(iid)
        tree.focus(iid)
        tree.see(iid)
        self.root.update()  # delivers <<TreeviewSelect>> as a real selection does
        return iid

    def profile_state(self) -> dict[str, Any]:
        directory = self.app.profile_dir
        state: dict[str, Any] = {
            "files": [n for n in PROFILE_FILES if (directory / n).exists()],
            "key_provider": profile_key_provider(directory),
        }
        if self.secret_service:
            from keychain_env import secret_tool_items

            state["keychain_items"] = secret_tool_items(desktop_app.APP_NAME)
        return state

    # -- steps ----------------------------------------------------------------------------

    def do_answer(self, step: dict[str, Any]) -> dict[str, Any]:
        """Queue answers to dialogs of one kind."""
        self.dialogs.queue(step["kind"], *step["values"])
        return {}

    def do_start(self, step: dict[str, Any]) -> dict[str, Any]:
        """Open the profile as main() does; optionally screenshot the window while the
        engine is still busy opening."""
        self.app.start()
        if "busy_screenshot" in step:
            shots = self.log["screenshots"]

            def shoot() -> None:
                busy = bool(self.app.worker.pending)
                shot = grab(self.root, Path(step["busy_screenshot"]))
                enabled = [n for n, b in self.app.buttons.items() if not b.instate(["disabled"])]
                status = self.app.status_var.get()
                shot.update(busy=busy, status=status, rows=len(self.rows()), enabled=enabled)
                shots["busy"] = shot

            self.until = lambda: "busy" in shots
            self.root.after(int(step.get("busy_after_ms", 60)), shoot)
        return {}

    def do_snapshot(self, step: dict[str, Any]) -> dict[str, Any]:
        self.log["snapshots"][step["name"]] = {
            "rows": self.rows(),
            "level_line": self.app.level_var.get(),
            "status": self.app.status_var.get(),
            "enabled": {n: not b.instate(["disabled"]) for n, b in self.app.buttons.items()},
        }
        return {"name": step["name"]}

    def do_open(self, step: dict[str, Any]) -> dict[str, Any]:
        tree = self.app.tree
        iid = self.select(int(step.get("row", 0)))
        how = step.get("how", "double_click")
        if how == "double_click":
            # Two presses and releases in quick succession at the row: Tk itself turns them
            # into <Double-Button-1> (event_generate cannot send "Double").
            box = tree.bbox(iid, "title")
            assert isinstance(box, tuple), "the row is not visible"
            x, y, w, h = box
            for n, kind in enumerate(("ButtonPress", "ButtonRelease") * 2):
                tree.event_generate(
                    f"<{kind}-1>", when="now", x=x + w // 2, y=y + h // 2, time=1000 + 20 * n
                )
        elif how == "return":
            tree.event_generate("<Return>")
        else:
            self.app.buttons["open"].invoke()
        return {"item_id": iid, "title": str(tree.set(iid, "title")), "how": how}

    def do_not_interested(self, step: dict[str, Any]) -> dict[str, Any]:
        iid = self.select(int(step.get("row", 0)))
        title = str(self.app.tree.set(iid, "title"))
        self.app.buttons["not_interested"].invoke()
        return {"item_id": iid, "title": title}

    def do_press(self, step: dict[str, Any]) -> dict[str, Any]:
        """Press a button by name (``refresh``, ``report``...)."""
        self.app.buttons[step["button"]].invoke()
        return {"button": step["button"]}

    def do_read_report(self, step: dict[str, Any]) -> dict[str, Any]:
        self.log["report_text"] = self.app.report.get("1.0", "end") if self.app.report else ""
        return {}

    def do_close_report(self, step: dict[str, Any]) -> dict[str, Any]:
        self.root.nametowidget("report_window.close").invoke()
        return {}

    def do_export(self, step: dict[str, Any]) -> dict[str, Any]:
        """Press "Export my data" and answer its dialogs (the passphrase twice)."""
        confirm = step.get("confirm", step["passphrase"])
        self.dialogs.queue("export_path", step["path"])
        self.dialogs.queue("passphrase", step["passphrase"], confirm)
        self.app.buttons["export"].invoke()
        return {"path": step["path"]}

    def do_forget(self, step: dict[str, Any]) -> dict[str, Any]:
        self.dialogs.queue("confirm", bool(step.get("answer", True)))
        self.app.buttons["forget"].invoke()
        return {}

    def do_inspect(self, step: dict[str, Any]) -> dict[str, Any]:
        """Record the profile's files, its kind of key and (with a Secret Service) the
        keychain entries the app made."""
        self.log["inspections"][step["name"]] = self.profile_state()
        return {}

    def do_screenshot(self, step: dict[str, Any]) -> dict[str, Any]:
        window = self.root if step.get("window", "main") == "main" else self.app.report
        assert window is not None, "no such window"
        window = window.winfo_toplevel()
        window.update()
        time.sleep(0.05)  # let the X server finish drawing
        window.update()
        self.log["screenshots"][step["name"]] = grab(window, Path(step["path"]))
        return {}

    def do_await_pointer(self, step: dict[str, Any]) -> dict[str, Any]:
        """Announce a button's screen position in ``ready_file`` and wait for a real
        button release from the X server (xdotool, run by the test, clicks it)."""
        name = step["button"]
        button = self.app.buttons[name]
        received: list[dict[str, Any]] = []
        button.bind(
            "<ButtonRelease-1>",
            lambda e: received.append(
                {"send_event": bool(e.send_event), "x_root": e.x_root, "y_root": e.y_root}
            ),
            add="+",
        )
        self.root.update()
        target = {
            "button": name,
            "x": button.winfo_rootx() + button.winfo_width() // 2,
            "y": button.winfo_rooty() + button.winfo_height() // 2,
            "window": {
                "x": self.root.winfo_rootx(),
                "y": self.root.winfo_rooty(),
                "width": self.root.winfo_width(),
                "height": self.root.winfo_height(),
            },
            "title": self.root.title(),
        }
        ready = Path(step["ready_file"])
        ready.with_suffix(".tmp").write_text(json.dumps(target))
        ready.with_suffix(".tmp").replace(ready)
        self.log["pointer"] = {"target": target, "events": received}
        deadline = time.monotonic() + float(step.get("timeout", 20))
        self.until = lambda: bool(received) or time.monotonic() > deadline
        return {}


@contextmanager
def maybe_secret_service(root: str | None) -> Iterator[None]:
    """With ``--secret-service DIR``: a private gnome-keyring on this D-Bus session."""
    if root is None:
        yield
        return
    from keychain_env import secret_service

    with secret_service(Path(root)):
        yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--script", type=Path, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--inline", action="store_true", help="engine calls on the Tk thread")
    parser.add_argument("--secret-service", metavar="DIR")
    parser.add_argument("app_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    app_args = desktop_app.parse_args([a for a in args.app_args if a != "--"])
    steps = json.loads(args.script.read_text())
    with ExitStack() as stack:
        stack.enter_context(maybe_secret_service(args.secret_service))
        passphrase = None
        if app_args.passphrase_env:
            import os

            passphrase = os.environ[app_args.passphrase_env]
        root = tk.Tk(className="OndeviceExample")
        dialogs = ScriptedDialogs(root)
        app = desktop_app.DesktopApp(
            root,
            app_args.profile.expanduser(),
            app_args.level,
            passphrase,
            dialogs=dialogs,
            worker=InlineWorker if args.inline else desktop_app.EngineWorker,
        )
        runner = Runner(app, dialogs, steps, secret_service=args.secret_service is not None)
        runner.start()
        try:
            root.mainloop()
        finally:
            app.worker.stop()
        log = runner.log
        for rgb, size, path in SHOTS:
            mss.tools.to_png(rgb, size, output=str(path))
        log.update(exit_code=app.exit_code, dialogs=dialogs.asked, finished=runner.profile_state())
        args.log.write_text(json.dumps(log, indent=2, ensure_ascii=False))
    return app.exit_code or (1 if log["errors"] else 0)


if __name__ == "__main__":
    sys.exit(main())
