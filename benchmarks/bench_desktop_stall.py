"""Benchmark: how long the desktop example's event loop stalls while the engine works.

Runs ``examples/desktop_app.py`` under a private Xvfb, driven from inside its own process
by ``tests/desktop_runner.py`` (the GUI test's runner), ``--repeats`` times. Each repeat
runs two processes: one creates a profile with a passphrase (``--passphrase-env``, the
default Argon2id parameters), asks for recommendations, opens one (a click and a fresh
list), shows the report and exports (Argon2id again); the next reopens the profile and
forgets it (wipe). A 5 ms ticker on the Tk event loop records the longest gap between
two ticks during each operation: the stall a person would feel.

Baseline in the same run: the same processes with every engine call on the Tk thread
(``--inline``: the runner's ``InlineWorker``), as the example was before it had a worker
thread. Target (the issue): every stall under 50 ms.

First, the question the design rests on: does Argon2id (``cryptography``) release the
GIL? A thread derives a key with the default :class:`~ondevice.Argon2Params` while the
main thread sleeps 5 ms at a time and records the longest gap between wake-ups; if the
derivation held the GIL, the gap would be the whole derivation.

Run: ``.venv/bin/python benchmarks/bench_desktop_stall.py [--repeats 5]`` (about 10 s a
repeat on two cores; needs Xvfb and xdotool).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from desktop_driver import run_app, xvfb

from ondevice import Argon2Params

TARGET_MS = 50.0
PASSPHRASE = "a passphrase for the stall benchmark"
NEW_STEPS = (
    ("start", "open (new)"),
    ("press", "recommend"),
    ("open", "click + recommend"),
    ("press", "report"),
    ("export", "export"),
)
REOPEN_STEPS = (("start", "open (existing)"), ("forget", "forget (wipe)"))


def gil_probe(derivations: int = 3) -> tuple[float, float, float]:
    """(longest gap idle, longest gap while another thread derives, one derivation), in
    seconds, for the default Argon2id parameters."""

    def longest_gap(until: threading.Event | float) -> float:
        last, longest = time.perf_counter(), 0.0
        while not (until.is_set() if isinstance(until, threading.Event) else last > until):
            time.sleep(0.005)
            now = time.perf_counter()
            longest, last = max(longest, now - last), now
        return longest

    idle = longest_gap(time.perf_counter() + 1.0)
    params, done, took = Argon2Params(), threading.Event(), []

    def derive() -> None:
        for _ in range(derivations):
            t0 = time.perf_counter()
            params.derive(b"passphrase", os.urandom(16))
            took.append(time.perf_counter() - t0)
        done.set()

    worker = threading.Thread(target=derive)
    worker.start()
    busy = longest_gap(done)
    worker.join()
    return idle, busy, statistics.median(took)


def one_repeat(display: str, workdir: Path, inline: bool) -> dict[str, dict[str, float]]:
    """The stall and duration of every operation, in ms, for one pair of processes."""
    profile = ["--profile", str(workdir / "profile")]
    new = [
        {"do": "start"},
        {"do": "press", "button": "refresh"},
        {"do": "open", "row": 0, "how": "button"},
        {"do": "press", "button": "report"},
        {"do": "export", "path": str(workdir / "me.export"), "passphrase": "export " * 3},
    ]
    reopen = [{"do": "start"}, {"do": "forget", "answer": True}]
    phases: dict[str, dict[str, float]] = {}
    for name, steps, labels in (("new", new, NEW_STEPS), ("reopen", reopen, REOPEN_STEPS)):
        run = run_app(
            display=display,
            workdir=workdir,
            name=name,
            steps=steps,
            app_args=profile,
            passphrase=PASSPHRASE,
            inline=inline,
        )
        if run.returncode != 0 or run.log.get("errors"):
            raise RuntimeError(f"the app failed: {run.stderr}\n{run.log.get('errors')}")
        logged: dict[str, list[dict[str, Any]]] = {}
        for step in run.log["steps"]:
            logged.setdefault(step["do"], []).append(step)
        for do, label in labels:
            step = logged[do].pop(0)
            phases[label] = {"stall": step["stall_ms"], "ms": step["ms"]}
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    missing = [tool for tool in ("Xvfb", "xdotool") if shutil.which(tool) is None]
    if missing:
        sys.exit(f"needs {', '.join(missing)} (apt: xvfb xdotool)")

    idle, busy, kdf = gil_probe()
    print("Does Argon2id release the GIL? (default parameters: 64 MiB, 3 passes, 4 lanes)")
    print(f"  one derivation: {kdf * 1000:.0f} ms")
    print(f"  longest gap of a 5 ms sleep loop on the main thread: idle {idle * 1000:.1f} ms,")
    print(f"  while another thread derives {busy * 1000:.1f} ms", end="")
    print(" -> released" if busy < kdf / 4 else " -> HELD for the whole derivation")
    print(flush=True)

    results: dict[bool, list[dict[str, dict[str, float]]]] = {False: [], True: []}
    with xvfb() as display:
        for n in range(args.repeats):
            for inline in (False, True):  # interleaved: both see the same machine load
                with tempfile.TemporaryDirectory(prefix="bench-desktop-") as tmp:
                    results[inline].append(one_repeat(display, Path(tmp), inline))
            print(f"  repeat {n + 1}/{args.repeats} done", file=sys.stderr)

    def column(inline: bool, label: str, key: str) -> list[float]:
        return [phases[label][key] for phases in results[inline]]

    print(
        f"Longest stall of the Tk event loop per operation, {args.repeats} runs "
        f"(target < {TARGET_MS:.0f} ms)"
    )
    header = (
        f"{'operation':18} {'worker: median':>14} {'max':>6} {'op took':>8}   "
        f"{'UI thread: median':>17} {'max':>6}   {'< target':>8}"
    )
    print(header)
    print("-" * len(header))
    for label in [label for _, label in NEW_STEPS + REOPEN_STEPS]:
        worker, ui = column(False, label, "stall"), column(True, label, "stall")
        took = statistics.median(column(False, label, "ms"))
        verdict = (
            "yes"
            if max(worker) < TARGET_MS
            else "median"
            if statistics.median(worker) < TARGET_MS
            else "no"
        )
        print(
            f"{label:18} {statistics.median(worker):11.1f} ms {max(worker):6.1f} {took:5.0f} ms   "
            f"{statistics.median(ui):14.1f} ms {max(ui):6.1f}   {verdict:>8}"
        )
    print("(stall and op in ms; 'op took': the operation end to end with the worker, as the")
    print(" person sees it; '< target': every run, or only the median, under the target)")


if __name__ == "__main__":
    main()
