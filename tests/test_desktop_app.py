"""examples/desktop_app.py runs for real under a private Xvfb: its own event loop clicks
through the window, xdotool sends one real pointer click, and the app's screenshots,
log, export file and profile directory are checked."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from desktop_driver import AppRun, read_png, require_tools, run_app, xvfb

from ondevice.export import decode_export
from ondevice.sample import sample_policy

pytestmark = pytest.mark.gui

PASSPHRASE = "profile passphrase for the gui test"
EXPORT_PASSPHRASE = "export passphrase for the gui test"


@pytest.fixture(scope="module")
def display() -> Iterator[str]:
    require_tools()
    with xvfb() as name:
        yield name


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("desktop")


@pytest.fixture(scope="module")
def journey(display: str, workdir: Path) -> AppRun:
    """One run of a user's whole journey through the window."""
    steps = [
        {"do": "snapshot", "name": "start"},
        {"do": "screenshot", "path": str(workdir / "start.png")},
        {"do": "open", "row": 2, "how": "double_click"},
        {"do": "snapshot", "name": "after_click"},
        {"do": "not_interested", "row": 0},
        {"do": "snapshot", "name": "after_block"},
        {
            "do": "await_pointer",
            "button": "refresh",
            "ready_file": str(workdir / "x.ready"),
            "timeout": 20,
        },
        {"do": "screenshot", "path": str(workdir / "main.png")},
        {"do": "report"},
        {"do": "screenshot", "path": str(workdir / "report.png"), "window": "report"},
        {"do": "close_report"},
        {"do": "export", "path": str(workdir / "me.export"), "passphrase": EXPORT_PASSPHRASE},
        {"do": "forget", "answer": True},
        {"do": "snapshot", "name": "after_forget"},
        {"do": "screenshot", "path": str(workdir / "forgotten.png")},
    ]
    run = run_app(
        display=display,
        workdir=workdir,
        steps=steps,
        ready_file=workdir / "x.ready",
        passphrase=PASSPHRASE,
    )
    assert run.returncode == 0, run.stderr
    assert run.log["errors"] == [], run.log["errors"]
    return run


def _shot(run: AppRun, name: str) -> dict[str, object]:
    return next(s for s in run.log["screenshots"] if Path(str(s["path"])).name == name)


def _colours(path: Path) -> tuple[int, int, set[bytes]]:
    width, height, rows = read_png(path)
    colours = {row[i : i + 3] for row in rows[::3] for i in range(0, len(row), 9)}
    return width, height, colours


def test_window_draws_a_screenshot_of_its_own_size_that_is_not_blank(journey, workdir):
    for name in ("start.png", "main.png", "report.png", "forgotten.png"):
        shot = _shot(journey, name)
        width, height, colours = _colours(workdir / name)
        assert (width, height) == (shot["width"], shot["height"])
        assert width >= 400 and height >= 300
        assert len(colours) > 8, f"{name} looks blank: {len(colours)} colours"
    # the list emptied after "Forget me": the two pictures of the main window differ
    assert read_png(workdir / "main.png")[2] != read_png(workdir / "forgotten.png")[2]


def test_window_lists_at_least_five_recommendations_each_with_a_why(journey):
    start = journey.log["snapshots"]["start"]
    assert len(start["rows"]) >= 5
    assert all(row["title"].strip() and row["why"].strip() for row in start["rows"])
    assert start["level"] in start["level_line"]


def test_a_double_click_records_a_click_and_changes_the_list(journey):
    opened = next(s for s in journey.log["steps"] if s["do"] == "open")
    start = journey.log["snapshots"]["start"]
    after = journey.log["snapshots"]["after_click"]
    assert opened["item_id"] == start["rows"][2]["item_id"]
    assert [r["item_id"] for r in after["rows"]] != [r["item_id"] for r in start["rows"]]
    assert opened["item_id"] not in [r["item_id"] for r in after["rows"]]
    # one click is enough history for the individual level, and the window says so
    assert after["level"] == "individual"
    assert "individual level" in after["level_line"]
    assert any(opened["title"] in row["why"] for row in after["rows"])


def test_not_interested_hides_the_item(journey):
    blocked = next(s for s in journey.log["steps"] if s["do"] == "not_interested")
    after = journey.log["snapshots"]["after_block"]
    assert blocked["item_id"] == journey.log["snapshots"]["after_click"]["rows"][0]["item_id"]
    assert blocked["item_id"] not in [r["item_id"] for r in after["rows"]]
    assert blocked["title"] in after["status"]


def test_report_window_explains_every_purpose_and_what_is_stored(journey):
    text = journey.log["report_text"]
    for declared in sample_policy().purposes():
        assert declared.name in text
        assert declared.purpose in text
    assert "interactions: 1 " in text
    assert "blocked items: 1" in text
    assert "privacy budget" in text


def test_export_file_is_encrypted_and_holds_the_click(journey, workdir):
    opened = next(s for s in journey.log["steps"] if s["do"] == "open")
    path = Path(journey.log["export_path"])
    assert path == workdir / "me.export"
    raw = path.read_bytes()
    assert opened["title"].encode() not in raw
    assert opened["item_id"].encode() not in raw
    doc = decode_export(raw, passphrase=EXPORT_PASSPHRASE)
    (user,) = doc["users"]
    assert [i["item_id"] for i in user["interactions"]] == [opened["item_id"]]
    assert [d["dialog"] for d in journey.log["dialogs"]][:2] == ["export_path", "passphrase"]


def test_forget_me_leaves_no_profile_behind(journey, workdir):
    after = journey.log["after_forget"]
    assert after["profile_files_left"] == []
    assert after["rows"] == 0
    assert "gone" in after["level_line"]
    profile = workdir / "profile"
    assert not (profile / "profile.db").exists()
    assert not (profile / "key.json").exists()
    assert journey.log["profile_files_left"] == []
    assert any(d["dialog"] == "confirm" for d in journey.log["dialogs"])


def test_a_real_x_pointer_click_reaches_the_button(journey):
    target = journey.log["pointer_target"]
    assert journey.xdotool_clicked
    assert target["window_id"] in journey.found_windows  # xdotool found the real window
    assert journey.log["pointer_received"] is True
    (event,) = [e for e in journey.log["pointer_events"] if e["widget"] == "refresh"]
    assert event["send_event"] is False  # from the X server's input, not SendEvent
    assert (event["x_root"], event["y_root"]) == (target["x"], target["y"])


def test_not_interested_at_the_segment_level_says_why_it_cannot(display, tmp_path):
    steps = [
        {"do": "snapshot", "name": "start"},
        {"do": "not_interested", "row": 0},
        {"do": "snapshot", "name": "after"},
    ]
    run = run_app(
        display=display,
        workdir=tmp_path,
        steps=steps,
        ready_file=None,
        passphrase=PASSPHRASE,
        level="segment",
    )
    assert run.returncode == 0, run.stderr
    errors = [d["text"] for d in run.log["dialogs"] if d["dialog"] == "error"]
    assert len(errors) == 1 and "segment" in errors[0] and "behavioral" in errors[0]
    rows = lambda name: [r["item_id"] for r in run.log["snapshots"][name]["rows"]]  # noqa: E731
    assert rows("after") == rows("start")
    assert (tmp_path / "profile" / "profile.db").exists()  # no "Forget me" here
