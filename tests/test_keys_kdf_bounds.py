"""Argon2id parameters are bounded both ways (issue 10, item 5).

- Read from a file (``key.json``, an encrypted export): nothing costlier than what the
  SDK itself would write is derived; a crafted file is refused before any derivation.
- Chosen by a caller: nothing weaker than the floor (OWASP's 19 MiB, 2 passes) is ever
  used to wrap a key or an export, however the parameters were made.

The test process lowers the floor for speed (tests/conftest.py); the floor tests put the
real one back. These tests use only names that exist in every version of ondevice, so
they can be run against an older one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import ondevice.keys
from ondevice import (
    Argon2Params,
    ExportError,
    InvalidInputError,
    Passphrase,
    PersonalizationEngine,
    ProfileUnreadableError,
)
from ondevice.export import decode_export, encode_export

from conftest import FAST_KDF

#: The floor and caps this file pins down (ondevice.keys.KDF_MIN_* / KDF_MAX_*).
FLOOR_KIB, FLOOR_PASSES = 19 * 1024, 2
CAP_KIB, CAP_PASSES, CAP_LANES, CAP_WORK = 256 * 1024, 16, 8, 1024 * 1024

OVER_THE_CAPS = [
    pytest.param(1024 * 1024, 16, 1, id="1 GiB x 16 passes (the old read limit)"),
    pytest.param(CAP_KIB + 1, 1, 1, id="memory over 256 MiB"),
    pytest.param(CAP_KIB, 5, 1, id="256 MiB x 5 passes: over 1 GiB of memory passes"),
    pytest.param(65536, CAP_PASSES + 1, 1, id="17 passes"),
    pytest.param(65536, 3, CAP_LANES + 1, id="9 lanes"),
]


def argon2_dict(memory_kib: int, iterations: int, lanes: int) -> dict[str, Any]:
    return {"name": "argon2id", "memory_kib": memory_kib, "iterations": iterations, "lanes": lanes}


@pytest.fixture
def derivations(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, int]]:
    """Every Argon2id instance made, by its parameters; one over the caps fails the
    test at once instead of spending a minute and a gigabyte."""
    made: list[dict[str, int]] = []
    real = ondevice.keys.Argon2id

    def spy(**kwargs: Any) -> Any:
        made.append({k: v for k, v in kwargs.items() if k != "salt"})
        if kwargs["memory_cost"] > CAP_KIB or kwargs["iterations"] > CAP_PASSES:
            raise AssertionError(f"derived a key with {kwargs['memory_cost']} KiB")
        return real(**kwargs)

    monkeypatch.setattr(ondevice.keys, "Argon2id", spy)
    return made


@pytest.fixture
def real_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ondevice.keys, "_write_floor", (FLOOR_KIB, FLOOR_PASSES), raising=False)


def _passphrase_profile(tmp_path: Path) -> Path:
    path = tmp_path / "p"
    with PersonalizationEngine(path, key=Passphrase("pw", kdf=FAST_KDF)) as engine:
        engine.update_profile("alice", {"item_id": "x", "event": "view"})
    return path


@pytest.mark.parametrize(("memory_kib", "iterations", "lanes"), OVER_THE_CAPS)
def test_a_key_file_asking_for_more_than_the_caps_is_refused_before_any_derivation(
    tmp_path: Path, derivations: list[dict[str, int]], memory_kib: int, iterations: int, lanes: int
) -> None:
    path = _passphrase_profile(tmp_path)
    key_file = path / "key.json"
    doc = json.loads(key_file.read_bytes())
    doc["kdf"] = argon2_dict(memory_kib, iterations, lanes)
    key_file.write_text(json.dumps(doc))
    derivations.clear()
    with pytest.raises(ProfileUnreadableError):
        PersonalizationEngine(path, key=Passphrase("pw", kdf=FAST_KDF))
    assert derivations == []


@pytest.mark.parametrize(("memory_kib", "iterations", "lanes"), OVER_THE_CAPS)
def test_an_encrypted_export_asking_for_more_than_the_caps_is_refused_before_any_derivation(
    derivations: list[dict[str, int]], memory_kib: int, iterations: int, lanes: int
) -> None:
    doc = json.loads(encode_export({"users": []}, passphrase="x", kdf=FAST_KDF))
    doc["kdf"] = argon2_dict(memory_kib, iterations, lanes)
    derivations.clear()
    with pytest.raises(ExportError):
        decode_export(json.dumps(doc).encode(), passphrase="x")
    assert derivations == []


@pytest.mark.parametrize(("memory_kib", "iterations", "lanes"), OVER_THE_CAPS)
def test_the_sdk_never_writes_parameters_it_would_refuse_to_read(
    memory_kib: int, iterations: int, lanes: int
) -> None:
    with pytest.raises(InvalidInputError):
        Argon2Params(memory_kib=memory_kib, iterations=iterations, lanes=lanes)
    with pytest.raises(ValueError):
        Argon2Params.from_dict(argon2_dict(memory_kib, iterations, lanes))


@pytest.mark.parametrize(
    "params",
    [
        Argon2Params(),
        Argon2Params(memory_kib=CAP_KIB, iterations=CAP_WORK // CAP_KIB, lanes=CAP_LANES),
        Argon2Params(memory_kib=CAP_WORK // CAP_PASSES, iterations=CAP_PASSES, lanes=1),
    ],
    ids=["default", "256 MiB x 4 passes x 8 lanes", "64 MiB x 16 passes"],
)
def test_whatever_the_sdk_writes_it_reads_back(params: Argon2Params) -> None:
    assert Argon2Params.from_dict(params.to_dict()) == params


WEAK = [
    pytest.param(8, 1, 1, id="8 KiB, 1 pass"),
    pytest.param(1024, 1, 1, id="1 MiB, 1 pass"),
    pytest.param(FLOOR_KIB, 1, 1, id="19 MiB, 1 pass"),
    pytest.param(FLOOR_KIB - 1, FLOOR_PASSES, 1, id="just under 19 MiB, 2 passes"),
]


@pytest.mark.usefixtures("real_floor")
@pytest.mark.parametrize(("memory_kib", "iterations", "lanes"), WEAK)
def test_caller_chosen_parameters_below_the_floor_are_refused(
    memory_kib: int, iterations: int, lanes: int
) -> None:
    with pytest.raises(InvalidInputError, match="too weak"):
        Argon2Params(memory_kib=memory_kib, iterations=iterations, lanes=lanes)


@pytest.mark.usefixtures("real_floor")
@pytest.mark.parametrize(("memory_kib", "iterations", "lanes"), WEAK)
def test_weak_parameters_read_from_a_file_never_wrap_a_key_or_an_export(
    tmp_path: Path, memory_kib: int, iterations: int, lanes: int
) -> None:
    # from_dict has to accept them (an older key file must still open), so it is the
    # way a caller could get weak parameters past the constructor: no writer takes them.
    weak = Argon2Params.from_dict(argon2_dict(memory_kib, iterations, lanes))
    with pytest.raises(InvalidInputError):
        Passphrase("pw", kdf=weak)
    with pytest.raises(InvalidInputError):
        encode_export({"users": []}, passphrase="x", kdf=weak)
    with pytest.raises(InvalidInputError):
        ondevice.keys.seal(b"pw", weak, b"plaintext", b"")
    assert not (tmp_path / "p").exists()


@pytest.mark.usefixtures("real_floor")
def test_the_floor_and_the_default_are_accepted() -> None:
    floor = Argon2Params(memory_kib=FLOOR_KIB, iterations=FLOOR_PASSES, lanes=1)
    assert Argon2Params.from_dict(floor.to_dict()) == floor
    assert Argon2Params().to_dict() == argon2_dict(65536, 3, 4)


def test_a_key_file_written_with_weaker_parameters_still_opens_and_is_rewrapped_on_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _passphrase_profile(tmp_path)  # written under the lowered test floor
    monkeypatch.setattr(ondevice.keys, "_write_floor", (FLOOR_KIB, FLOOR_PASSES), raising=False)
    floor = Argon2Params(memory_kib=FLOOR_KIB, iterations=FLOOR_PASSES, lanes=1)
    with PersonalizationEngine(path, key=Passphrase("pw")) as engine:
        assert engine.users() == ["alice"]
        engine.change_passphrase("pw2", kdf=floor)
    assert json.loads((path / "key.json").read_bytes())["kdf"] == floor.to_dict()
    with PersonalizationEngine(path, key=Passphrase("pw2")) as engine:
        assert engine.users() == ["alice"]
