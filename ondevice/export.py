"""The export format: everything stored about a user, with each field's purpose.

An export is a JSON document (``format: "ondevice.export"``, ``version: 1``)::

    {
      "format": "ondevice.export", "version": 1,
      "exported_at": 1764244800.0,          # Unix seconds, by the engine's clock
      "privacy_level": "behavioral",
      "policy": {...},                       # the declarations (Policy.to_dict())
      "purposes": [{"name", "purpose", "retention_days", "collected_from_level"}],
      "users": [{
          "user_id": "alice", "created_at": 1764200000.0,
          "signals": [{"name", "value", "updated_at"}],
          "interactions": [{"item_id", "event", "timestamp", "value", "context"}],
          "activity": [{"day": "2026-11-27", "event": "view", "count": 3}],
          "derived": [{"name", "value_b64", "updated_at"}],
          "blocked_items": [{"item_id", "created_at"}],
          "egress": [{"epoch", "body", "epsilon", "epsilon_1", "created_at", "status",
                      "sent_at", "answer", "attempts", "next_attempt"}],
                                  # every report that left; "epsilon" is the lifetime
                                  # epsilon it spent (a new memo), "epsilon_1" the
                                  # per-report layer's (null for 0.1 reports)
          "report_memos": [{"k", "epsilon_inf", "segment", "memo", "created_at",
                            "used_at"}],   # the noisy draw kept per true segment
          "report_schedule": {"epoch", "due_at"} or null,  # when this week's report
                                                            # may leave
          "privacy_budget": {"epsilon_inf", "epsilon_1", "lifetime_cap",
                             "lifetime_spent", "lifetime_remaining", "period_days",
                             "memos", "when_spent", "reports_in_period"}
      }]
    }

``report_memos`` and ``report_schedule`` are shown, never imported: a memo protects its
user only if it is a genuine random draw made on the device, which a file cannot prove.
A profile that imports an export draws its own memos, and the imported egress log
restores the ledger, so what the exporting device spent still counts against the
lifetime budget; the schedule is drawn afresh.

An *encrypted* export wraps those bytes (``format: "ondevice.export.encrypted"``):
AES-256-GCM under a key derived from the export passphrase with Argon2id; the header
(format, version, KDF parameters) is authenticated as associated data, so changing
any byte of the file is detected.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Mapping
from typing import Any, Final

from cryptography.exceptions import InvalidTag

from .errors import ExportError
from .keys import Argon2Params, canonical, seal, unseal

__all__ = [
    "ENCRYPTED_FORMAT",
    "EXPORT_FORMAT",
    "EXPORT_VERSION",
    "decode_export",
    "encode_export",
    "read_export_file",
]

EXPORT_FORMAT: Final = "ondevice.export"
ENCRYPTED_FORMAT: Final = "ondevice.export.encrypted"
EXPORT_VERSION: Final = 1
#: Largest export file read (a window of 100 interactions per user makes exports small:
#: about 20 kB per user). A larger file is refused before it is read.
MAX_EXPORT_BYTES: Final = 64 * 1024 * 1024
#: Most JSON objects and arrays an export may hold (about 250 per user at a full window),
#: counted before parsing: parsed JSON takes up to ~30x its size in memory, so a file of
#: millions of tiny objects must be refused before it is parsed.
MAX_EXPORT_NODES: Final = 1_000_000


def day_to_iso(day: int) -> str:
    """Day number (days since 1970-01-01) as an ISO date."""
    return (_dt.date(1970, 1, 1) + _dt.timedelta(days=day)).isoformat()


def iso_to_day(text: str) -> int:
    """Inverse of :func:`day_to_iso`; ValueError if malformed."""
    return (_dt.date.fromisoformat(text) - _dt.date(1970, 1, 1)).days


def encode_export(
    data: Mapping[str, Any], *, passphrase: str | bytes | None, kdf: Argon2Params | None = None
) -> bytes:
    """Serialize an export; encrypted when a passphrase is given."""
    plain = json.dumps(data, sort_keys=True, indent=1, ensure_ascii=False).encode("utf-8")
    if passphrase is None:
        return plain
    secret = passphrase.encode("utf-8") if isinstance(passphrase, str) else passphrase
    if not secret:
        raise ExportError("the export passphrase must not be empty")
    params = kdf or Argon2Params()
    header = {"format": ENCRYPTED_FORMAT, "version": EXPORT_VERSION, "kdf": params.to_dict()}
    sealed = seal(secret, params, plain, canonical(header))
    return canonical({**header, "sealed": sealed})


def read_export_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of an export file, refused (ExportError) before reading when larger
    than :data:`MAX_EXPORT_BYTES`."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > MAX_EXPORT_BYTES:
                raise ExportError(f"export file too large (over {MAX_EXPORT_BYTES} bytes)")
            raw = handle.read(MAX_EXPORT_BYTES + 1)
    except OSError as exc:
        raise ExportError(f"cannot read the export {path}: {exc.strerror}") from exc
    except ValueError:  # a path with a NUL byte
        raise ExportError("the export path is not a valid file name") from None
    if len(raw) > MAX_EXPORT_BYTES:  # it grew while we read
        raise ExportError(f"export file too large (over {MAX_EXPORT_BYTES} bytes)")
    return raw


def _parse(raw: bytes | str) -> Any:
    """JSON, bounded: size, number of objects and arrays, and nesting depth."""
    data = raw.encode("utf-8") if isinstance(raw, str) else raw
    if len(data) > MAX_EXPORT_BYTES:
        raise ExportError(f"export file too large (over {MAX_EXPORT_BYTES} bytes)")
    if data.count(b"{") + data.count(b"[") > MAX_EXPORT_NODES:
        raise ExportError(f"malformed export: more than {MAX_EXPORT_NODES} objects and arrays")
    try:
        return json.loads(data)
    except RecursionError:
        raise ExportError("malformed export: nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise ExportError("not an ondevice export (malformed JSON)") from None


def decode_export(raw: bytes, *, passphrase: str | bytes | None) -> dict[str, Any]:
    """Parse (and if encrypted, decrypt and verify) an export; ExportError otherwise."""
    doc = _parse(raw)
    if not isinstance(doc, dict):
        raise ExportError("not an ondevice export")
    if doc.get("format") == ENCRYPTED_FORMAT:
        if passphrase is None:
            raise ExportError("this export is encrypted: give its passphrase")
        secret = passphrase.encode("utf-8") if isinstance(passphrase, str) else passphrase
        _check_version(doc)
        try:
            params = Argon2Params.from_dict(doc["kdf"])
            header = {k: v for k, v in doc.items() if k != "sealed"}
            plain = unseal(secret, params, doc["sealed"], canonical(header))
        except (InvalidTag, ValueError, TypeError, KeyError):
            raise ExportError(
                "cannot decrypt the export: wrong passphrase, or the file was modified"
            ) from None
        doc = _parse(plain)
        if not isinstance(doc, dict):
            raise ExportError("not an ondevice export")
    if doc.get("format") != EXPORT_FORMAT:
        raise ExportError("not an ondevice export (unknown format)")
    _check_version(doc)
    if not isinstance(doc.get("users"), list):
        raise ExportError("malformed export: 'users' must be a list")
    return doc


def _check_version(doc: Mapping[str, Any]) -> None:
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ExportError("malformed export: missing version")
    if version > EXPORT_VERSION:
        raise ExportError(
            f"this export was written by a newer ondevice (format {version}; this version "
            f"reads up to {EXPORT_VERSION})"
        )
