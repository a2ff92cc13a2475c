"""The stored form of the segment level's taste sums, in 30-day buckets. Internal.

Each bucket holds the factor-space sums of the interactions of one span of days (30, or
half the retention period if that is shorter): ``S = sum w_i y_i``, ``D = sum alpha r_i
w_i y_i`` and ``A = sum alpha r_i w_i y_i y_i^T`` (float32). Buckets let retention work
on sums: a bucket is dropped as soon as its *start* is older than the retention period,
so no contribution outlives retention (some leave up to one span early). This module is
numpy-free so the store can trim buckets without loading numpy.

Layout: ``b"ODAG4"``, the catalog digest (32 bytes), the last update time (float64),
``f``, the span in days and the number of buckets (uint16 each), then per bucket its
first day (int32, days since 1970-01-01) and ``2 f + f * f`` float32 values.
"""

from __future__ import annotations

import struct
from typing import Final

__all__ = ["MAGIC", "Bucket", "pack", "trim", "unpack"]

MAGIC: Final = b"ODAG4"
MAX_SPAN_DAYS: Final = 30
_HEAD: Final = struct.Struct("<5s32sdHHH")
_DAY: Final = struct.Struct("<i")

#: (first day, raw float32 bytes of S, D and A).
Bucket = tuple[int, bytes]


def span_days(retention_days: float) -> int:
    """Bucket length: 30 days, or half the retention period if that is shorter, so
    the current bucket never starts before the retention cutoff."""
    return max(1, min(MAX_SPAN_DAYS, int(retention_days // 2)))


def bucket_day(day: int, span: int) -> int:
    """The first day of the span holding ``day``."""
    return (day // span) * span


def pack(digest: bytes, last: float, f: int, span: int, buckets: list[Bucket]) -> bytes:
    """Serialize buckets (oldest first)."""
    head = _HEAD.pack(MAGIC, digest, last, f, span, len(buckets))
    return head + b"".join(_DAY.pack(day) + raw for day, raw in buckets)


def unpack(blob: bytes) -> tuple[bytes, float, int, int, list[Bucket]] | None:
    """``(digest, last, f, span, buckets)`` or None for anything malformed."""
    if len(blob) < _HEAD.size or not blob.startswith(MAGIC):
        return None
    _, digest, last, f, span, n = _HEAD.unpack_from(blob)
    width = 4 * (2 * f + f * f)
    if f == 0 or span == 0 or len(blob) != _HEAD.size + n * (_DAY.size + width):
        return None
    buckets: list[Bucket] = []
    off = _HEAD.size
    for _ in range(n):
        (day,) = _DAY.unpack_from(blob, off)
        off += _DAY.size
        buckets.append((day, blob[off : off + width]))
        off += width
    return digest, last, f, span, buckets


def trim(blob: bytes, cutoff_day: int) -> bytes | None:
    """The blob without buckets that start before ``cutoff_day``; None if none is left
    (or the blob is malformed)."""
    parsed = unpack(blob)
    if parsed is None:
        return None
    digest, last, f, span, buckets = parsed
    kept = [b for b in buckets if b[0] >= cutoff_day]
    if not kept:
        return None
    return blob if len(kept) == len(buckets) else pack(digest, last, f, span, kept)
