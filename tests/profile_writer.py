"""Child process for the concurrency and crash tests: writes to a shared profile.

Usage: python profile_writer.py PROFILE_DIR NAME COUNT
The raw key comes hex-encoded in the environment variable ONDEVICE_TEST_KEY. After
each committed update_profile it prints "committed <n>" and flushes, so the parent
knows exactly what was acknowledged before it kills the process.
"""

from __future__ import annotations

import os
import sys

from ondevice import PersonalizationEngine, Policy, RawKey

MARKER = "CRASH-marker-5512"


def main() -> None:
    path, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    key = RawKey(bytes.fromhex(os.environ["ONDEVICE_TEST_KEY"]))
    engine = PersonalizationEngine(path, key=key, policy=Policy(window=100_000))
    print("ready", flush=True)
    for i in range(count):
        engine.update_profile(
            f"{name}-user-{i % 20}", {"item_id": f"{MARKER}-{name}-{i}", "value": float(i)}
        )
        print(f"committed {i + 1}", flush=True)
    engine.close()


if __name__ == "__main__":
    main()
