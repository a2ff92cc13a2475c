"""Write and sign catalog bundles (operator side; the device never imports this module).

The file layout is documented in :mod:`ondevice.bundle`, which reads it. A typical run::

    key = generate_signing_key()          # once; keep it secret, ship public_key_bytes(key)
    write_bundle(catalog, "catalog.odb", private_key=key)

:func:`write_bundle` checks the catalog with the same invariants the device checks
(:func:`ondevice.bundle.validate_catalog`, finite values included), plus a few only the
operator can afford (neighbours sorted by weight, Gram matrix equal to ``Y.T @ Y``), so
that a bundle it writes is a bundle the device accepts.
The file is written next to its destination under a temporary name, flushed to disk,
then renamed over the destination: a device never sees a half-written bundle (and a
device that loaded the previous one keeps its private copy of it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from ondevice import _bundle2, _codecs
from ondevice.bundle import (
    ALIGNMENT,
    FORMAT_VERSION,
    MAGIC,
    PREFIX,
    SIGNATURE_CONTEXT,
    SIGNATURE_CONTEXT_V2,
    BundleInfo,
    content_hasher,
    validate_catalog,
)
from ondevice.catalog import Catalog
from ondevice.errors import BundleError
from ondevice.scoring import category_index

from . import ann_build

__all__ = [
    "generate_signing_key",
    "private_key_bytes",
    "public_key_bytes",
    "signing_key_from_bytes",
    "write_bundle",
]

logger = logging.getLogger(__name__)

_GRAM_RTOL = 1e-3
_ZEROS = bytes(ALIGNMENT)


def generate_signing_key() -> Ed25519PrivateKey:
    """A new random Ed25519 signing key for bundles."""
    return Ed25519PrivateKey.generate()


def public_key_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of the public key to pin on devices (from either half of the pair)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_key_bytes(key: Ed25519PrivateKey) -> bytes:
    """The 32 raw secret bytes of a signing key, to store it (keep them secret)."""
    return key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def signing_key_from_bytes(raw: bytes) -> Ed25519PrivateKey:
    """The signing key whose 32 raw secret bytes are ``raw``."""
    if not isinstance(raw, bytes) or len(raw) != 32:
        raise BundleError("an Ed25519 signing key is exactly 32 raw bytes")
    return Ed25519PrivateKey.from_private_bytes(raw)


@dataclass(frozen=True, slots=True)
class _Planned:
    name: str
    array: npt.NDArray[Any]
    offset: int


def write_bundle(
    catalog: Catalog,
    path: str | os.PathLike[str],
    *,
    private_key: Ed25519PrivateKey | bytes,
    format_version: int = FORMAT_VERSION,
    ann: int | Literal["auto", "off"] = "auto",
) -> BundleInfo:
    """Write ``catalog`` to ``path`` as a bundle signed with ``private_key``; atomically.

    ``private_key`` is an :class:`Ed25519PrivateKey` or its 32 raw bytes.
    ``format_version`` 2 (the default) writes the compact format: int8 item factors with
    a scale per item (the Gram matrix is recomputed from the quantized factors, so the
    device's fold-in is exact against what it scores with), one byte per neighbour
    weight, string tables; 1 writes the full-precision format older devices read.

    ``ann`` adds an approximate top-k index (:class:`ondevice.ann.IvfIndex`, format 2
    only): ``"auto"`` (the default) for catalogs with item factors and at least
    :data:`~ondevice.operator.ann_build.AUTO_MIN_ITEMS` items, ``"off"`` never, a number
    to force one with that many clusters. With an index the items are written **in
    cluster order** (a loaded catalog lists them in that order; ids, not positions, are
    their identity) and ``nprobe`` is calibrated to recall@10 >= 0.97
    (:func:`~ondevice.operator.ann_build.build_ivf`).

    Returns what :func:`ondevice.bundle.verify_bundle` would report for the new file.

    Raises :class:`BundleError` if the catalog breaks an invariant (nothing is written)
    or if the file cannot be written (the destination is left as it was).
    """
    key = (
        private_key
        if isinstance(private_key, Ed25519PrivateKey)
        else (signing_key_from_bytes(private_key))
    )
    if format_version not in (1, 2):
        raise BundleError(f"format_version must be 1 or 2, not {format_version!r}")
    validate_catalog(catalog)
    _check_values(catalog)
    named = isinstance(ann, str) and ann in ("auto", "off")
    clusters = isinstance(ann, int) and not isinstance(ann, bool) and ann >= 1
    if not (named or clusters):
        raise BundleError(f"ann must be 'auto', 'off' or a positive cluster count, not {ann!r}")
    if ann == "off" and catalog.ann is not None:  # keep the order, drop the index
        catalog = replace(catalog, ann=None)
    if clusters and format_version == 1:
        raise BundleError("format 1 bundles cannot hold an approximate index")
    if format_version == 2 and catalog.ann is None:
        if clusters:
            catalog = ann_build.build_ivf(catalog, clusters=int(ann))
        elif (
            ann == "auto"
            and catalog.item_factors is not None
            and catalog.n_items >= ann_build.AUTO_MIN_ITEMS
        ):
            catalog = ann_build.build_ivf(catalog)

    if format_version == 1:
        category_sets, category_set_index = _category_sets(catalog)
        planned, region_len = _plan(catalog, category_set_index)
        header = _header(catalog, planned, category_sets)
    else:
        planned, region_len, header = _plan_v2(catalog)
    data_start = _align(PREFIX.size + len(header))
    prefix = PREFIX.pack(MAGIC, format_version, 0, len(header), data_start, region_len)

    dest = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    except OSError as exc:
        raise BundleError(f"cannot write bundle {str(dest)!r}: {exc}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            hasher: Any = content_hasher() if format_version == 1 else _ChunkHasher()
            _emit(f, hasher, prefix)
            _emit(f, hasher, header)
            _emit(f, hasher, _ZEROS[: data_start - PREFIX.size - len(header)])
            pos = 0
            for item in planned:
                _emit(f, hasher, _ZEROS[: item.offset - pos])
                _emit(f, hasher, item.array.reshape(-1).view(np.uint8).data)
                pos = item.offset + item.array.nbytes
            _emit(f, hasher, _ZEROS[: region_len - pos])
            if format_version == 1:
                digest = hasher.digest()
                f.write(key.sign(SIGNATURE_CONTEXT + digest))
                trailer = 0
            else:
                table = hasher.table()
                f.write(table)
                digest = hashlib.sha256(prefix + table).digest()
                f.write(key.sign(SIGNATURE_CONTEXT_V2 + digest))
                trailer = len(table)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, dest)
    except OSError as exc:
        _remove_quietly(tmp_name)
        raise BundleError(f"cannot write bundle {str(dest)!r}: {exc}") from exc
    except BaseException:
        _remove_quietly(tmp_name)
        raise
    _fsync_dir(dest.parent)
    size = data_start + region_len + trailer + 64
    logger.info("wrote bundle %s: %d items, %d bytes", dest, catalog.n_items, size)
    factors = catalog.item_factors
    return BundleInfo(
        format_version=format_version,
        name=catalog.name,
        created_at=float(catalog.created_at),
        n_items=catalog.n_items,
        n_factors=0 if factors is None else int(factors.shape[1]),
        n_segments=len(catalog.segments),
        size=size,
        sha256=digest.hex(),
    )


def _category_sets(
    catalog: Catalog,
) -> tuple[list[tuple[str, ...]] | None, npt.NDArray[np.int32] | None]:
    """The distinct category tuples, in order of first use, and each item's index."""
    if catalog.categories is None:
        return None, None
    numbering: dict[tuple[str, ...], int] = {}
    index = np.fromiter(
        (numbering.setdefault(c, len(numbering)) for c in catalog.categories),
        dtype=np.int32,
        count=catalog.n_items,
    )
    return list(numbering), index


def _plan(
    catalog: Catalog, category_index: npt.NDArray[np.int32] | None
) -> tuple[list[_Planned], int]:
    """Every array in file order, little-endian and C-contiguous, with aligned offsets."""
    indptr, indices, weights = catalog.neighbours_csr()
    named: list[tuple[str, npt.NDArray[Any]]] = [
        ("popularity", catalog.popularity),
        ("nbr_indptr", indptr),
        ("nbr_indices", indices),
        ("nbr_weights", weights),
    ]
    if category_index is not None:
        named.append(("category_set_index", category_index))
    factors = catalog.decoded_factors()
    if factors is not None and catalog.gram is not None:
        named += [("item_factors", factors), ("gram", catalog.gram)]
    for k, seg in enumerate(catalog.segments):
        named.append((f"segments/{k}/top_items", seg.top_items))
        if seg.centroid is not None:
            named.append((f"segments/{k}/centroid", seg.centroid))
    return _layout(named)


class _ChunkHasher:
    """SHA-256 of every ``CHUNK_SIZE`` bytes written, for format 2's chunk table."""

    def __init__(self) -> None:
        self._digests: list[bytes] = []
        self._current = hashlib.sha256()
        self._filled = 0

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            take = min(len(view), _bundle2.CHUNK_SIZE - self._filled)
            self._current.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == _bundle2.CHUNK_SIZE:
                self._digests.append(self._current.digest())
                self._current, self._filled = hashlib.sha256(), 0

    def table(self) -> bytes:
        """The digests of all chunks, the last (short) one included."""
        if self._filled or not self._digests:
            self._digests.append(self._current.digest())
            self._current, self._filled = hashlib.sha256(), 0
        return b"".join(self._digests)


def _plan_v2(catalog: Catalog) -> tuple[list[_Planned], int, bytes]:
    """Format 2: every array in its compact encoding, and the header that lists them."""
    n = catalog.n_items
    named: list[tuple[str, npt.NDArray[Any]]] = []
    large = n >= _bundle2.LARGE_ITEMS
    ids, titles = list(catalog.item_ids), list(catalog.titles)
    id_prefix = _bundle2.common_prefix(ids)
    offsets, blob = _bundle2.encode_strings([i[len(id_prefix) :] for i in ids])
    named += [("item_id_offsets", offsets), ("item_id_bytes", blob)]
    if large:
        try:
            blocks, data = _codecs.encode_block_strings(titles)
        except ValueError as exc:
            raise BundleError(f"titles: {exc}") from None
        named += [("title_blocks", blocks), ("title_data", data)]
    else:
        offsets, blob = _bundle2.encode_strings(titles)
        named += [("title_offsets", offsets), ("title_bytes", blob)]
    named.append(("item_id_order", _bundle2.byte_order(ids)))
    category_names: list[str] | None = None
    if catalog.categories is not None:
        sets, set_of = _category_sets(catalog)
        assert sets is not None and set_of is not None
        by_set = 2 * len(sets) <= n  # few distinct sets (a real catalog): one row each
        names, indptr, indices = category_index(sets if by_set else catalog.categories,
                                                len(sets) if by_set else n)
        category_names = list(names)
        if by_set:
            named.append(
                ("category_set_of", set_of.astype(_bundle2.narrow_unsigned(max(len(sets), 1))))
            )
        named += [
            ("category_indptr", indptr.astype(_bundle2.narrow_offsets(int(indptr[-1])))),
            ("category_indices", indices.astype(_bundle2.narrow_unsigned(max(len(names), 1)))),
        ]
    pop = np.asarray(catalog.popularity, dtype=np.float32)
    order = np.lexsort((np.arange(n), -pop.astype(np.float64))).astype(np.int32)
    indptr, indices, weights = catalog.neighbours_csr()
    codes, table = _bundle2.encode_weights(weights)
    edges = int(indices.shape[0])
    named += [("popularity", pop), ("popularity_order", order[: _bundle2.POPULAR_PREFIX])]
    packed_params: dict[str, int] | None = None
    if large:
        try:
            packed, packed_params = _codecs.encode_neighbours_packed(indptr, indices, codes)
        except ValueError as exc:
            raise BundleError(str(exc)) from None
        named += [(f"nbr_packed_{name}", array) for name, array in sorted(packed.items())]
    else:
        named += [
            ("nbr_indptr", indptr.astype(_bundle2.narrow_offsets(edges))),
            ("nbr_indices", indices.astype(_bundle2.narrow_unsigned(max(n, 1)))),
            ("nbr_weight_codes", codes),
        ]
    named.append(("nbr_weight_table", table))
    factors = catalog.decoded_factors()
    if factors is not None and catalog.gram is not None:
        q, scales = _bundle2.quantize_rows(factors)
        named += [
            ("item_factors", q),
            ("item_factor_scales", scales),
            ("gram", _gram(q, scales).astype(np.float32)),
        ]
    for k, seg in enumerate(catalog.segments):
        named.append((f"segments/{k}/top_items", seg.top_items))
        if seg.centroid is not None:
            named.append((f"segments/{k}/centroid", seg.centroid))
    if catalog.ann is not None:
        named += [
            ("ann_centroids", catalog.ann.centroids.astype(np.float32)),
            ("ann_offsets", catalog.ann.offsets.astype(_bundle2.narrow_offsets(n))),
        ]
    planned, offset = _layout(named)
    header = _header(
        catalog,
        planned,
        None,
        version=2,
        category_names=category_names,
        id_prefix=id_prefix or None,
        title_block=_codecs.DEFAULT_BLOCK if large else None,
        nbr_packed=packed_params,
    )
    return planned, offset, header


def _layout(named: list[tuple[str, npt.NDArray[Any]]]) -> tuple[list[_Planned], int]:
    planned = []
    offset = 0
    for name, array in named:
        little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        planned.append(_Planned(name, little, offset))
        offset = _align(offset + little.nbytes)
    return planned, offset


def _header(
    catalog: Catalog,
    planned: list[_Planned],
    category_sets: list[tuple[str, ...]] | None,
    *,
    version: int = 1,
    category_names: list[str] | None = None,
    id_prefix: str | None = None,
    title_block: int | None = None,
    nbr_packed: dict[str, int] | None = None,
) -> bytes:
    segments = [
        {
            "id": seg.id,
            "name": seg.name,
            "panel_users": seg.panel_users,
            "top_items": f"segments/{k}/top_items",
            "centroid": None if seg.centroid is None else f"segments/{k}/centroid",
        }
        for k, seg in enumerate(catalog.segments)
    ]
    als = catalog.als
    header = {
        "name": catalog.name,
        "created_at": float(catalog.created_at),
        "extra": dict(catalog.extra),
        "n_items": catalog.n_items,
        "default_segment": catalog.default_segment,
        "segments": segments,
        "segment_rules": [
            {"segment": r.segment, "when": {k: list(v) for k, v in r.when.items()}}
            for r in catalog.segment_rules
        ],
        "als": None
        if als is None
        else {
            "factors": als.factors,
            "regularization": float(als.regularization),
            "alpha": float(als.alpha),
        },
        "arrays": [
            {
                "name": p.name,
                "dtype": p.array.dtype.str,
                "shape": list(p.array.shape),
                "offset": p.offset,
                "length": p.array.nbytes,
            }
            for p in planned
        ],
    }
    if version == 1:
        header["item_ids"] = list(catalog.item_ids)
        header["titles"] = list(catalog.titles)
        header["category_sets"] = (
            None if category_sets is None else [list(c) for c in category_sets]
        )
    else:
        header["category_names"] = category_names
        header["item_id_prefix"] = id_prefix
        header["title_block"] = title_block
        header["nbr_packed"] = nbr_packed
        index = catalog.ann
        header["ann"] = (
            None
            if index is None
            else {"kind": "ivf", "nprobe": index.nprobe, "recall_at_10": float(index.recall)}
        )
    return json.dumps(header, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode(
        "utf-8"
    )


def _check_values(catalog: Catalog) -> None:
    """Invariants too costly for every device load: sorted neighbour weights, and a Gram
    matrix that really is ``Y.T @ Y``. (Finite values are checked by
    :func:`~ondevice.bundle.validate_catalog`, on both sides.)"""
    indptr, _, weights = catalog.neighbours_csr()
    rises = np.flatnonzero(weights[1:] > weights[:-1]) + 1
    if rises.size and not np.isin(rises, indptr).all():
        raise BundleError("each item's neighbours must be sorted by weight, descending")
    factors, gram = catalog.decoded_factors(), catalog.gram
    if factors is not None and gram is not None:
        expected = _gram(factors)
        scale = max(float(np.abs(expected).max()), 1e-12)
        if float(np.abs(gram - expected).max()) > _GRAM_RTOL * scale:
            raise BundleError("gram is not item_factors.T @ item_factors")


def _gram(
    factors: npt.NDArray[Any], scales: npt.NDArray[np.float32] | None = None, block: int = 1 << 16
) -> npt.NDArray[np.float64]:
    """``Y.T @ Y`` in float64, ``block`` rows at a time (10M items x 64 factors would be
    a 5 GB float64 copy at once); ``Y`` is ``factors`` or, with ``scales``, the dequantized
    int8 codes."""
    f = factors.shape[1]
    out = np.zeros((f, f), dtype=np.float64)
    for lo in range(0, factors.shape[0], block):
        part = factors[lo : lo + block]
        if scales is not None:  # the float32 rows the device scores with
            part = _bundle2.dequantize_rows(part, scales[lo : lo + block])
        rows = part.astype(np.float64)
        out += rows.T @ rows
    return out


def _emit(f: BinaryIO, hasher: Any, data: bytes | memoryview) -> None:
    f.write(data)
    hasher.update(data)


def _align(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


def _remove_quietly(name: str) -> None:
    try:
        os.unlink(name)
    except OSError:
        logger.warning("could not remove temporary bundle file %s", name)


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        logger.debug("fsync of directory %s failed", directory)
    finally:
        os.close(dir_fd)
