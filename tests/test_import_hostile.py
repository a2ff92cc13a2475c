"""Issue 10, item 4: hostile imports get a clear ExportError (or another OndeviceError)
and write nothing; a stored vector can never break a recommendation; and 10,000
generated import documents never escape the error tree nor half-write."""

from __future__ import annotations

import base64
import copy
import json
import math
import subprocess
import sys
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ondevice import ExportError, OndeviceError, PersonalizationEngine
from ondevice.export import MAX_EXPORT_BYTES
from ondevice.store import Store

from conftest import T0
from planted import HISTORY


def _rows(engine: PersonalizationEngine) -> dict[str, int]:
    with engine._store.read() as conn:
        return Store.count_rows(conn)


@pytest.fixture
def source(open_engine) -> PersonalizationEngine:
    engine = open_engine("individual")
    for n, item in enumerate(HISTORY):
        engine.update_profile(
            "u", {"item_id": item, "event": "purchase", "timestamp": T0 - 60 + n,
                  "context": {"daypart": "morning"}}
        )
    engine.set_signals("u", {"plan": "pro"})
    engine.block_item("u", "i3")
    engine.get_recommendations("u", k=3)  # caches the user vector
    return engine


def _refused(engine: PersonalizationEngine, document: Any) -> ExportError:
    before = _rows(engine)
    with pytest.raises(ExportError) as caught:
        engine.import_profile(document)
    assert _rows(engine) == before
    return caught.value


def test_far_future_times_are_refused(open_engine, source):
    target = open_engine("individual")
    export = source.export_profile("u")
    for path in (
        ("signals", 0, "updated_at"),
        ("blocked_items", 0, "created_at"),
        ("derived", 0, "updated_at"),
        ("created_at",),
    ):
        bad = copy.deepcopy(export)
        node = bad["users"][0]
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = 1e300
        assert "not a time up to now" in str(_refused(target, bad))
        node[path[-1]] = math.nan
        _refused(target, json.loads(json.dumps(bad, allow_nan=True)))


def test_a_user_vector_of_the_wrong_length_is_dropped_and_folded_again(open_engine, source):
    export = source.export_profile("u")
    (vector,) = [d for d in export["users"][0]["derived"] if d["name"] == "user_vector"]
    blob = base64.b64decode(vector["value_b64"])
    vector["value_b64"] = base64.b64encode(blob + b"\x00\x00\x80\x3f").decode()  # one more
    target = open_engine("individual")
    target.import_profile(export)
    expected = source.get_recommendations("u", k=5).item_ids
    assert target.get_recommendations("u", k=5).item_ids == expected  # no numpy error
    nan = base64.b64encode(blob[:-4] + b"\x00\x00\xc0\x7f").decode()  # a NaN component
    vector["value_b64"] = nan
    target.import_profile(export)
    assert target.get_recommendations("u", k=5).item_ids == expected


def test_deep_nesting_is_an_export_error_in_the_library_and_the_cli(
    open_engine, tmp_path, raw_key
):
    target = open_engine("behavioral")
    deep = b'{"format":"ondevice.export","version":1,"users":' + b"[" * 200_000 + b"]" * 200_000
    deep += b"}"
    with pytest.raises(ExportError, match="nested too deeply"):
        target.import_profile(deep)
    path = tmp_path / "deep.json"
    path.write_bytes(deep)
    target.close()
    result = subprocess.run(
        [sys.executable, "-m", "ondevice", "import", str(target.path), str(path),
         "--raw-key-env", "K"],
        env={"K": raw_key.hex(), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 1
    assert result.stderr == "ondevice: error: malformed export: nested too deeply\n"


def test_a_huge_activity_count_is_refused(open_engine, source):
    export = source.export_profile("u")
    export["users"][0]["activity"] = [{"day": "2026-11-20", "event": "view", "count": 2**70}]
    _refused(open_engine("segment"), export)


def test_millions_of_empty_users_are_refused_before_they_are_parsed(open_engine):
    target = open_engine("behavioral")
    body = b'{"format":"ondevice.export","version":1,"users":[' + b"{}," * 13_000_000
    body = body[:-1] + b"]}"  # 39 MB
    tracemalloc.start()
    try:
        with pytest.raises(ExportError, match="objects and arrays"):
            target.import_profile(body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * 1024 * 1024  # parsing it would take about a gigabyte


def test_a_file_over_the_limit_is_refused_without_being_read(open_engine, tmp_path):
    target = open_engine("behavioral")
    path = tmp_path / "big.json"
    with path.open("wb") as handle:
        handle.truncate(MAX_EXPORT_BYTES + 1)  # sparse: costs no disk
    tracemalloc.start()
    try:
        with pytest.raises(ExportError, match="too large"):
            target.import_profile(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


# -- 10,000 generated documents --------------------------------------------------------

_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
_json = st.recursive(
    _json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            out += _paths(value, (*prefix, index))
    return out


@pytest.fixture(scope="module")
def valid_export(tmp_path_factory, bundles, signer) -> dict[str, Any]:
    from ondevice import RawKey
    from ondevice.operator.bundle_writer import public_key_bytes

    from planted import POLICY

    with PersonalizationEngine(
        tmp_path_factory.mktemp("fuzz-source") / "p",
        key=RawKey(bytes(32)),
        privacy_level="individual",
        policy=POLICY,
        clock=lambda: T0,
        bundle=bundles["full"],
        bundle_public_key=public_key_bytes(signer),
    ) as engine:
        for n, item in enumerate(HISTORY):
            engine.update_profile(
                "u", {"item_id": item, "event": "purchase", "timestamp": T0 - 60 + n,
                      "context": {"daypart": "morning"}}
            )
        engine.set_signals("u", {"plan": "pro"})
        engine.block_item("u", "i3")
        engine.get_recommendations("u", k=3)
        return engine.export_profile("u")


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory, bundles, signer):
    from ondevice import RawKey
    from ondevice.operator.bundle_writer import public_key_bytes

    from planted import POLICY

    engine = PersonalizationEngine(
        tmp_path_factory.mktemp("fuzz-target") / "p",
        key=RawKey(bytes(32)),
        privacy_level="individual",
        policy=POLICY,
        clock=lambda: T0,
        bundle=bundles["full"],
        bundle_public_key=public_key_bytes(signer),
    )
    yield engine
    engine.close()


@settings(
    max_examples=10_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,
)
@given(data=st.data())
def test_ten_thousand_generated_imports_never_escape_the_error_tree_nor_half_write(
    data, valid_export, fuzz_target
):
    document = copy.deepcopy(valid_export)
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        paths = _paths(document)
        path = data.draw(st.sampled_from(paths))
        value = data.draw(_json)
        if not path:
            document = value
            break
        node = document
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    before = _rows(fuzz_target)
    try:
        imported = fuzz_target.import_profile(document)
    except OndeviceError:
        assert _rows(fuzz_target) == before  # refused: nothing written
        return
    # Accepted: it was a valid export after all (each import replaces its users); the
    # profile still answers for them.
    for user_id in imported:
        fuzz_target.get_recommendations(user_id, k=3)
