"""Issue 10, item 9: the engine must not depend on a bundle file it already verified.

Truncating a memory-mapped file kills the process with SIGBUS at the next access;
overwriting it in place changes what the arrays read. Each case runs in a child
process, so a SIGBUS fails the test instead of killing pytest. The child loads the
bundle (through the engine at several levels, and with :func:`ondevice.bundle.load_bundle`),
answers, changes the *same inode* under it, answers again, and reports whether every
answer and every array stayed what was verified.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import ondevice

TESTS = Path(__file__).resolve().parent
SOURCE = Path(ondevice.__file__).resolve().parents[1]  # the child imports this same ondevice

CHILD = r"""
import dataclasses, json, os, sys
from pathlib import Path

import numpy as np

from ondevice import PersonalizationEngine, RawKey
from ondevice.bundle import load_bundle
from ondevice.operator.bundle_writer import generate_signing_key, public_key_bytes, write_bundle
from planted import HISTORY, N, POLICY, planted_catalog

work, mode = Path(sys.argv[1]), sys.argv[2]
key = generate_signing_key()
pinned = public_key_bytes(key)
bundle = work / "catalog.bundle"
catalog = planted_catalog()
write_bundle(catalog, bundle, private_key=key)

# Another validly signed bundle with the very same layout and size, other content:
# neighbours and factor rows shifted by one cluster, popularity reversed.
other = dataclasses.replace(
    catalog,
    popularity=catalog.popularity[::-1].copy(),
    nbr_indices=((catalog.nbr_indices + 10) % N).astype(np.int32),
    item_factors=np.roll(catalog.item_factors, 10, axis=0),
)
write_bundle(other, work / "other.bundle", private_key=key)
other_bytes = (work / "other.bundle").read_bytes()
assert len(other_bytes) == bundle.stat().st_size and other_bytes != bundle.read_bytes()

LEVELS = ("segment", "behavioral", "contextual", "individual")
engines = {}
for level in LEVELS:
    engine = PersonalizationEngine(
        work / f"profile-{level}", key=RawKey(os.urandom(32)), privacy_level=level,
        policy=POLICY, bundle=bundle, bundle_public_key=pinned,
    )
    for n, item in enumerate(HISTORY):
        engine.update_profile(
            "u", {"item_id": item, "event": "click", "timestamp": engine.now() - 600 + n,
                  "context": {"daypart": "am"}},
        )
    engines[level] = engine
library = load_bundle(bundle, public_key=pinned)

def answers():
    return {
        level: [
            (r.item_id, round(r.score, 6))
            for r in e.get_recommendations("u", {"daypart": "am"}, k=8, current_item="i12")
        ]
        for level, e in engines.items()
    }

def arrays(c):
    return [c.popularity, c.nbr_indptr, c.nbr_indices, c.nbr_weights, c.item_factors, c.gram,
            *(s.top_items for s in c.segments), *(s.centroid for s in c.segments)]

def sums(c):
    return [float(np.asarray(a, dtype=np.float64).sum()) for a in arrays(c)]

before = answers()
before_sums = sums(library)
assert list(library.item_ids) == list(catalog.item_ids)  # the content written (format 2)
inode = bundle.stat().st_ino

if mode == "truncate":
    os.truncate(bundle, 0)
elif mode == "truncate-arrays":
    os.truncate(bundle, bundle.stat().st_size // 2)
elif mode == "overwrite":
    with open(bundle, "r+b") as f:
        f.write(other_bytes)
elif mode == "garbage":
    with open(bundle, "r+b") as f:
        f.write(b"\xff" * len(other_bytes))
else:
    raise SystemExit(f"unknown mode {mode}")
assert bundle.stat().st_ino == inode  # the same file, changed in place

after = answers()
problems = [f"{level}: {before[level]} became {after[level]}"
            for level in LEVELS if after[level] != before[level]]
for level, e in engines.items():
    if sums(e.catalog) != before_sums:
        problems.append(f"{level}: the engine's arrays changed")
if sums(library) != before_sums:
    problems.append("load_bundle's arrays changed")
print(json.dumps({"before": before, "problems": problems}))
sys.exit(1 if problems else 0)
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["truncate", "truncate-arrays", "overwrite", "garbage"])
def test_answers_come_from_the_verified_content_whatever_happens_to_the_file(
    tmp_path: Path, mode: str
) -> None:
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), mode],
        cwd=TESTS,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(SOURCE)])},
        capture_output=True,
        text=True,
        timeout=300,
    )
    if child.returncode < 0:
        name = signal.Signals(-child.returncode).name
        pytest.fail(f"the child was killed by {name} after the bundle file was changed")
    assert child.returncode == 0, child.stdout[-2000:] + child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["problems"] == []
    # The answers were real ones (every level answered with items), not empty lists.
    assert all(len(items) == 8 for items in report["before"].values()), report["before"]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps")
def test_a_loaded_bundle_holds_no_mapping_and_no_descriptor_of_the_file(tmp_path: Path) -> None:
    from ondevice.bundle import load_bundle
    from ondevice.operator.bundle_writer import (
        generate_signing_key,
        public_key_bytes,
        write_bundle,
    )

    from planted import planted_catalog

    key = generate_signing_key()
    path = tmp_path / "catalog.bundle"
    write_bundle(planted_catalog(), path, private_key=key)
    catalog = load_bundle(path, public_key=public_key_bytes(key))
    assert str(path) not in Path("/proc/self/maps").read_text()
    fds = Path("/proc/self/fd")
    if fds.exists():
        targets = []
        for fd in fds.iterdir():
            try:
                targets.append(os.readlink(fd))
            except OSError:
                continue
        assert str(path) not in targets
    assert catalog.popularity.flags.writeable is False


class _Trickle:
    """A file that hands out at most 3 bytes per read, then ends after ``limit`` bytes."""

    def __init__(self, data: bytes, limit: int) -> None:
        self.data, self.pos, self.limit = data, 0, limit

    def readinto(self, view: memoryview) -> int:
        n = min(3, len(view), self.limit - self.pos)
        view[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


def test_reading_survives_short_reads_and_refuses_a_file_that_shrinks() -> None:
    from ondevice.bundle import _read_exactly
    from ondevice.errors import BundleError

    data = bytes(range(200))
    assert bytes(_read_exactly(_Trickle(data, 200), bytearray(200), "b")) == data
    with pytest.raises(BundleError, match="changed size while being read"):
        _read_exactly(_Trickle(data, 150), bytearray(200), "b")


def test_a_file_too_large_for_private_memory_is_refused_before_allocating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ondevice import bundle
    from ondevice.errors import BundleError
    from ondevice.operator.bundle_writer import (
        generate_signing_key,
        public_key_bytes,
        write_bundle,
    )

    from planted import planted_catalog

    key = generate_signing_key()
    path = tmp_path / "catalog.bundle"
    write_bundle(planted_catalog(), path, private_key=key)
    size = path.stat().st_size
    pages = {"SC_PHYS_PAGES": size // 4096, "SC_PAGE_SIZE": 4096}  # RAM < twice the file
    monkeypatch.setattr(os, "sysconf", lambda name: pages[name])
    allocated: list[int] = []
    monkeypatch.setattr(bundle, "_private_buffer", lambda n: allocated.append(n))
    with pytest.raises(BundleError, match="more than half of this device's memory"):
        bundle.load_bundle(path, public_key=public_key_bytes(key))
    assert allocated == []
