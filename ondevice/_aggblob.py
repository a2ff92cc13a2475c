"""The stored form of the segment level's taste sums, in 30-day buckets. Internal.

Each bucket holds the factor-space sums of the interactions of one 30-day span:
``S = sum y_i``, ``D = sum alpha r_i w_i y_i`` and ``A = sum alpha r_i w_i y_i y_i^T``
(float32). Buckets let retention work on sums: a bucket is dropped as soon as its
*start* is older than the retention period, so no contribution outlives retention (some
leave up to 30 days early). This module is numpy-free so the store can trim buckets
without loading numpy.

Layout: ``b"ODAG3"``, the catalog digest (32 bytes), the last update time (float64),
``f`` and the number of buckets (uint16 each), then per bucket its first day (int32,
days since 1970-01-01) and ``2 f + f * f`` float32 values.
"""

from __future__ import annotations

import struct
from typing import Final

__all__ = ["MAGIC", "Bucket", "pack", "trim", "unpack"]

MAGIC: Final = b"ODAG3"
SPAN_DAYS: Final = 30
_HEAD: Final = struct.Struct("<5s32sdHH")
_DAY: Final = struct.Struct("<i")

#: (first day, raw float32 bytes of S, D and A).
Bucket = tuple[int, bytes]


def bucket_day(day: int) -> int:
    """The first day of the 30-day span holding ``day``."""
    return (day // SPAN_DAYS) * SPAN_DAYS


def pack(digest: bytes, last: float, f: int, buckets: list[Bucket]) -> bytes:
    """Serialize buckets (oldest first)."""
    head = _HEAD.pack(MAGIC, digest, last, f, len(buckets))
    return head + b"".join(_DAY.pack(day) + raw for day, raw in buckets)


def unpack(blob: bytes) -> tuple[bytes, float, int, list[Bucket]] | None:
    """``(digest, last, f, buckets)`` or None for anything malformed."""
    if len(blob) < _HEAD.size or not blob.startswith(MAGIC):
        return None
    _, digest, last, f, n = _HEAD.unpack_from(blob)
    width = 4 * (2 * f + f * f)
    if f == 0 or len(blob) != _HEAD.size + n * (_DAY.size + width):
        return None
    buckets: list[Bucket] = []
    off = _HEAD.size
    for _ in range(n):
        (day,) = _DAY.unpack_from(blob, off)
        off += _DAY.size
        buckets.append((day, blob[off : off + width]))
        off += width
    return digest, last, f, buckets


def trim(blob: bytes, cutoff_day: int) -> bytes | None:
    """The blob without buckets that start before ``cutoff_day``; None if none is left
    (or the blob is malformed)."""
    parsed = unpack(blob)
    if parsed is None:
        return None
    digest, last, f, buckets = parsed
    kept = [b for b in buckets if b[0] >= cutoff_day]
    if not kept:
        return None
    return blob if len(kept) == len(buckets) else pack(digest, last, f, kept)
