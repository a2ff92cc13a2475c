"""Device-side segment assignment.

A user's segment is found in this order:

1. the catalog's rules over the user's declared signals, in order: the first rule whose
   every named signal takes one of the listed values wins;
2. else, if the user has a folded-in vector (computed from aggregates, see
   :func:`ondevice.scoring.fold_in_aggregates`) and the catalog has behaviour
   segments, the segment whose centroid has the highest cosine with it (ties: the lower
   segment id);
3. else ``catalog.default_segment``.

Pure functions over the catalog; nothing is stored and nothing leaves the device here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from ondevice.catalog import Catalog, Segment, SegmentRule

__all__ = ["assign_segment", "match_rules", "nearest_centroid", "segment_by_id"]


def match_rules(rules: Sequence[SegmentRule], signals: Mapping[str, str] | None) -> int | None:
    """The segment of the first rule the declared ``signals`` satisfy, or ``None``."""
    if not signals:
        return None
    for rule in rules:
        if all(name in signals and signals[name] in allowed for name, allowed in rule.when.items()):
            return rule.segment
    return None


def nearest_centroid(
    segments: Sequence[Segment], user_vector: npt.NDArray[np.floating] | None
) -> int | None:
    """The id of the segment whose centroid has the highest cosine with
    ``user_vector``; ``None`` if there is no centroid or the vector is zero/non-finite."""
    if user_vector is None:
        return None
    x = np.asarray(user_vector, dtype=np.float64).ravel()
    norm = float(np.linalg.norm(x))
    if not np.isfinite(norm) or norm == 0.0:
        return None
    best_id: int | None = None
    best = -np.inf
    for seg in sorted(segments, key=lambda s: s.id):
        if seg.centroid is None or seg.centroid.shape[0] != x.shape[0]:
            continue
        c = seg.centroid.astype(np.float64)
        cn = float(np.linalg.norm(c))
        if cn == 0.0:
            continue
        cos = float(x @ c) / (norm * cn)
        if cos > best:
            best, best_id = cos, seg.id
    return best_id


def segment_by_id(catalog: Catalog, segment_id: int) -> Segment | None:
    """The catalog's segment with that id, or ``None``."""
    for seg in catalog.segments:
        if seg.id == segment_id:
            return seg
    return None


def assign_segment(
    catalog: Catalog,
    *,
    signals: Mapping[str, str] | None = None,
    user_vector: npt.NDArray[np.floating] | None = None,
) -> int:
    """The user's segment id: rules first, then nearest centroid, then the default."""
    known = {seg.id for seg in catalog.segments}
    by_rule = match_rules(catalog.segment_rules, signals)
    if by_rule is not None and by_rule in known:
        return by_rule
    by_centroid = nearest_centroid(catalog.segments, user_vector)
    if by_centroid is not None:
        return by_centroid
    return catalog.default_segment
