"""Durability and isolation of the server stub as a separate process."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ondevice_sync import errors
from ondevice_sync.client import SyncClient
from ondevice_sync.protocol import epoch_of

from .conftest import stored_counts, stored_total


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """``python -m ondevice_sync.server`` on an ephemeral port (real clock, synchronous=FULL).

    Every client here is 127.0.0.1, so the per-address rate limit is off.
    """
    db, ready = tmp_path / "counts.db", tmp_path / "port"
    process = subprocess.Popen(
        [sys.executable, "-m", "ondevice_sync.server", "--k", "8", "--db", str(db), "--port", "0",
         "--rate-limit", "0", "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 20
    while not ready.exists():
        assert process.poll() is None, process.stderr.read() if process.stderr else b""
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield process, f"http://127.0.0.1:{ready.read_text().strip()}", db
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        if process.stderr is not None:
            process.stderr.close()


def test_every_acknowledged_report_survives_sigkill_right_after_the_last_2xx(
    server_process: tuple[subprocess.Popen[bytes], str, Path],
) -> None:
    process, url, db = server_process
    client = SyncClient(base_url=url, k=8)
    epoch = epoch_of(time.time())
    for i in range(60):
        client.send_report(i % 8, epoch)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert stored_total(db) == 60
    assert stored_counts(db) == {(epoch, s): 60 // 8 + (1 if s < 60 % 8 else 0) for s in range(8)}


def test_acknowledged_reports_survive_sigkill_while_many_clients_are_in_flight(
    server_process: tuple[subprocess.Popen[bytes], str, Path],
) -> None:
    process, url, db = server_process
    epoch = epoch_of(time.time())
    lock = threading.Lock()
    acked, attempted = [0], [0]
    stop = threading.Event()

    def run(index: int) -> None:
        client = SyncClient(base_url=url, k=8, timeout=5)
        while not stop.is_set():
            with lock:
                attempted[0] += 1
            try:
                client.send_report(index % 8, epoch)
            except errors.SyncError:
                return
            with lock:
                acked[0] += 1
                if acked[0] == 400:
                    # Kill from the thread that just got the 400th 2xx, while the
                    # other 15 clients' requests are in flight.
                    os.kill(process.pid, signal.SIGKILL)
                    stop.set()

    threads = [threading.Thread(target=run, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    process.wait()
    counted = stored_total(db)
    assert acked[0] >= 400
    assert acked[0] <= counted <= attempted[0]


def test_the_server_modules_never_import_ondevice_or_numpy() -> None:
    code = (
        "import sys, ondevice_sync, ondevice_sync.server, ondevice_sync.client, "
        "ondevice_sync.privacy, "
        "ondevice_sync.protocol, ondevice_sync.errors, "
        "ondevice_sync.ratelimit; "
        "print(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('ondevice', 'numpy')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


def test_server_command_line_refuses_a_k_threshold_below_one(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ondevice_sync.server", "--k", "8", "--db", str(tmp_path / "c.db"),
         "--k-threshold", "0", "--port", "0"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "k_threshold" in result.stdout + result.stderr
    assert not (tmp_path / "c.db").exists()


def test_the_operator_example_runs_and_prints_suppressed_statistics() -> None:
    script = Path(__file__).parents[2] / "examples" / "server_operator.py"
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("not published yet: 425 ") for line in lines)
    totals = [line for line in lines if line.startswith("statistics for ")]
    assert len(totals) == 1
    noisy_total = int(totals[0].split("(noisy total ")[1].split(")")[0])
    assert abs(noisy_total - 3000) <= 6 * math.sqrt(4 * 1.5)  # 6 SD of four cells' noise
    assert sum(line.strip().startswith("segment ") for line in lines) == 4


def test_server_help_lists_the_channel_publication_and_rate_limit_options() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ondevice_sync.server", "--help"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    for flag in ("--epsilon-inf", "--epsilon-1", "--central-epsilon", "--grace",
                 "--rate-limit", "--rate-limit-tracked", "--k", "--db", "--k-threshold",
                 "--epoch-window"):
        assert flag in result.stdout, flag
    assert "--epsilon " not in result.stdout  # the single-layer option is gone
    for flag in ("--ohttp-keys", "--ohttp-relay"):  # the Oblivious HTTP gateway
        assert flag in result.stdout, flag
    assert "OHTTP gateway are never limited here" in " ".join(result.stdout.split())


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (["--rate-limit", "-1"], "rate_limit"),
        (["--grace", "-5"], "grace"),
        (["--central-epsilon", "0"], "central_epsilon"),
        (["--epsilon-1", "inf"], "epsilon_1"),
    ],
)
def test_server_command_line_refuses_bad_new_options(
    tmp_path: Path, flags: list[str], reason: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ondevice_sync.server", "--k", "8", "--db", str(tmp_path / "c.db"),
         "--port", "0", *flags],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert reason in result.stderr
    assert not (tmp_path / "c.db").exists()
