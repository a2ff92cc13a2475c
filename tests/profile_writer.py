"""Child process for the concurrency and crash tests: writes to a shared profile.

Usage: python profile_writer.py PROFILE_DIR NAME COUNT [WINDOW BASE_TS PARITY]
The raw key comes hex-encoded in the environment variable ONDEVICE_TEST_KEY. After
each committed update_profile it prints "committed <n>" and flushes, so the parent
knows exactly what was acknowledged before it kills the process.

With WINDOW, BASE_TS and PARITY, every write goes to one user, "shared", with the
timestamp BASE_TS + 2 * i + PARITY, into a window of WINDOW, and the writer waits for a
line on stdin before each write: the parent decides how two writers interleave.
"""

from __future__ import annotations

import os
import sys

from ondevice import PersonalizationEngine, Policy, RawKey

MARKER = "CRASH-marker-5512"


def main() -> None:
    path, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    shared = len(sys.argv) > 4
    window = int(sys.argv[4]) if shared else 100_000
    key = RawKey(bytes.fromhex(os.environ["ONDEVICE_TEST_KEY"]))
    engine = PersonalizationEngine(path, key=key, policy=Policy(window=window))
    print("ready", flush=True)
    if shared:
        base, parity = float(sys.argv[5]), int(sys.argv[6])
    for i in range(count):
        if shared:
            sys.stdin.readline()
            engine.update_profile(
                "shared", {"item_id": f"{name}-{i}", "timestamp": base + 2 * i + parity}
            )
        else:
            engine.update_profile(
                f"{name}-user-{i % 20}", {"item_id": f"{MARKER}-{name}-{i}", "value": float(i)}
            )
        print(f"committed {i + 1}", flush=True)
    engine.close()


if __name__ == "__main__":
    main()
