"""Verify and load a signed catalog bundle on the device.

The operator writes a bundle with :func:`ondevice.operator.bundle_writer.write_bundle`; the
device loads it with :func:`load_bundle`, which checks the Ed25519 signature against a
pinned public key over every byte of the file *before* it reads the header or any array,
then checks the structure and the catalog's invariants, and only then returns a
:class:`~ondevice.catalog.Catalog`. Anything wrong raises :class:`~ondevice.errors.BundleError`.
This module never imports operator code.

File layout, format version 1 (all integers little-endian)::

    offset     size  field
    0          8     magic  b"\\x89ODCAT\\r\\n"
    8          2     format version (u16) = 1
    10         2     flags (u16) = 0, reserved
    12         4     H: header length in bytes (u32)
    16         8     D: start of the array region (u64) = 32 + H rounded up to 64
    24         8     L: length of the array region (u64), a multiple of 64
    32         H     header: UTF-8 JSON (see below)
    32 + H     ...   zero padding up to D
    D          L     arrays: raw little-endian C-order bytes, each starting at D + offset
                     with offset % 64 == 0, zero padding between them
    D + L      64    Ed25519 signature (the last 64 bytes of the file)

The signature is over ``SIGNATURE_CONTEXT + SHA-256(file[0 : D + L])``: the digest covers
the fixed prefix, the header, the padding and every array. SHA-256 is the content hash
because it is the fastest of SHA-256, SHA-512 and BLAKE2b wherever the CPU has SHA
instructions (x86 SHA-NI, ARMv8 crypto extensions), about twice BLAKE2b's speed here.

The JSON header holds ``name``, ``created_at``, ``extra``, ``n_items``, ``item_ids``,
``titles``, ``category_sets`` (``null``, or the distinct category lists; item ``i`` has
the categories ``category_sets[category_set_index[i]]``),
``default_segment``, ``segments`` (``id``, ``name``, ``panel_users`` and the *names* of
their ``top_items`` and ``centroid`` arrays), ``segment_rules`` (``segment``, ``when``),
``als`` (``null`` or ``factors``, ``regularization``, ``alpha``) and ``arrays``: the array
table, one entry per array with ``name``, ``dtype`` (``"<f4"``, ``"<i4"`` or ``"<i8"``),
``shape``, ``offset`` (from ``D``) and ``length`` (bytes). Array names: ``popularity``,
``nbr_indptr``, ``nbr_indices``, ``nbr_weights``, optional ``category_set_index``
(``<i4[n]``, with ``category_sets``), ``item_factors`` and ``gram``,
and ``segments/<k>/top_items``, ``segments/<k>/centroid`` for the k-th segment.

Arrays come back as read-only views of a private memory map of the file (or of one
in-memory copy with ``in_memory=True``): the map lives as long as any array does, and no
open file blocks replacing or deleting the bundle file. The bytes that were hashed are
the bytes the arrays read, so renaming another file over the path between the check and
the use changes nothing. A writer of the *same inode* could still change mapped pages
after the check: the operator tool always replaces bundles by rename, and
``in_memory=True`` closes that gap at the cost of one copy of the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import mmap
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ondevice.catalog import AlsParams, Catalog, Segment, SegmentRule
from ondevice.errors import BundleError

__all__ = [
    "ALIGNMENT",
    "FORMAT_VERSION",
    "MAGIC",
    "PREFIX",
    "SIGNATURE_CONTEXT",
    "SIGNATURE_SIZE",
    "BundleInfo",
    "content_hasher",
    "load_bundle",
    "load_bundle_with_info",
    "validate_catalog",
    "verify_bundle",
]

logger = logging.getLogger(__name__)

MAGIC = b"\x89ODCAT\r\n"
"""The first 8 bytes of every bundle file."""
FORMAT_VERSION = 1
"""The only format version this module reads and the writer writes."""
ALIGNMENT = 64
"""Every array (and the array region) starts at a multiple of this many bytes."""
PREFIX = struct.Struct("<8sHHIQQ")
"""The fixed 32-byte prefix: magic, version, flags, header length, array region start
and length."""
SIGNATURE_SIZE = 64
"""An Ed25519 signature, the last bytes of the file."""
SIGNATURE_CONTEXT = b"ondevice catalog bundle v1 sha256\x00"
"""Prepended to the content digest in the signed message (domain separation)."""

_DTYPES: dict[str, np.dtype[Any]] = {
    "<f4": np.dtype("<f4"),
    "<i4": np.dtype("<i4"),
    "<i8": np.dtype("<i8"),
}
_HEADER_KEYS = frozenset(
    {
        "name",
        "created_at",
        "extra",
        "n_items",
        "item_ids",
        "titles",
        "category_sets",
        "default_segment",
        "segments",
        "segment_rules",
        "als",
        "arrays",
    }
)

PublicKeyLike = bytes | Ed25519PublicKey
_U8 = npt.NDArray[np.uint8]


def content_hasher() -> hashlib._Hash:
    """A fresh hash object for a bundle's signed content (SHA-256)."""
    return hashlib.sha256()


@dataclass(frozen=True, slots=True)
class BundleInfo:
    """What a verified bundle is: its format, size and the digest it was signed over."""

    format_version: int
    name: str
    created_at: float
    n_items: int
    n_factors: int
    n_segments: int
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class _ArraySpec:
    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    offset: int
    length: int


def load_bundle(
    path: str | os.PathLike[str], *, public_key: PublicKeyLike, in_memory: bool = False
) -> Catalog:
    """Verify the bundle at ``path`` against the pinned ``public_key`` and return its catalog.

    ``public_key`` is an :class:`Ed25519PublicKey` or its 32 raw bytes. The signature is
    checked over the whole file before any header byte or array is used; then the array
    table and the catalog's invariants are checked. The returned arrays are read-only.
    With ``in_memory=True`` the file is read into one private buffer instead of mapped.

    Raises :class:`BundleError` for an unreadable, truncated, unsigned, wrongly signed,
    tampered, malformed or unsupported bundle, and for a malformed ``public_key``.
    """
    catalog, _ = _load(path, public_key, in_memory=in_memory)
    return catalog


def load_bundle_with_info(
    path: str | os.PathLike[str], *, public_key: PublicKeyLike, in_memory: bool = False
) -> tuple[Catalog, BundleInfo]:
    """:func:`load_bundle`, also returning the bundle's :class:`BundleInfo` (its content
    digest identifies the catalog, e.g. for caches derived from it)."""
    return _load(path, public_key, in_memory=in_memory)


def verify_bundle(path: str | os.PathLike[str], *, public_key: PublicKeyLike) -> BundleInfo:
    """Run every check :func:`load_bundle` runs, keep nothing, and describe the bundle.

    Raises :class:`BundleError` exactly when :func:`load_bundle` would.
    """
    _, info = _load(path, public_key, in_memory=False)
    return info


def _load(
    path: str | os.PathLike[str], public_key: PublicKeyLike, *, in_memory: bool
) -> tuple[Catalog, BundleInfo]:
    key = _pinned_key(public_key)
    where = f"catalog bundle {os.fspath(path)!r}"
    raw = _read(path, where, in_memory=in_memory)
    header_len, data_start, data_len, digest = _verify(raw, key, where)
    header = _parse_header(raw, header_len, where)
    catalog = _build(raw, header, data_start, data_len, where)
    try:
        validate_catalog(catalog)
    except BundleError as exc:
        raise BundleError(f"{where}: {exc}") from None
    info = BundleInfo(
        format_version=FORMAT_VERSION,
        name=catalog.name,
        created_at=catalog.created_at,
        n_items=catalog.n_items,
        n_factors=0 if catalog.item_factors is None else int(catalog.item_factors.shape[1]),
        n_segments=len(catalog.segments),
        size=int(raw.shape[0]),
        sha256=digest.hex(),
    )
    logger.debug("loaded %s: %d items, sha256 %s", where, info.n_items, info.sha256)
    return catalog, info


def _pinned_key(public_key: PublicKeyLike) -> Ed25519PublicKey:
    if isinstance(public_key, Ed25519PublicKey):
        return public_key
    if isinstance(public_key, bytes) and len(public_key) == 32:
        try:
            return Ed25519PublicKey.from_public_bytes(public_key)
        except ValueError as exc:
            raise BundleError("the pinned public key is not a valid Ed25519 key") from exc
    raise BundleError("the pinned public key must be an Ed25519PublicKey or its 32 raw bytes")


def _read(path: str | os.PathLike[str], where: str, *, in_memory: bool) -> _U8:
    """The whole file as a read-only uint8 array (a view of a memory map, or a copy)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < PREFIX.size:
                raise BundleError(f"{where}: truncated ({size} bytes, not even a header)")
            if in_memory:
                buf = np.empty(size, dtype=np.uint8)
                got = f.readinto(buf.data)
                if got != size:
                    raise BundleError(f"{where}: the file changed size while being read")
                buf.flags.writeable = False
                return buf
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except BundleError:
        raise
    except (OSError, ValueError) as exc:
        raise BundleError(f"{where}: cannot read the file ({exc})") from exc
    if hasattr(mmap, "MADV_WILLNEED"):  # start reading ahead now if the cache is cold
        with contextlib.suppress(OSError):
            mapped.madvise(mmap.MADV_WILLNEED)
    return np.frombuffer(mapped, dtype=np.uint8)


def _verify(raw: _U8, key: Ed25519PublicKey, where: str) -> tuple[int, int, int, bytes]:
    """Check magic, version and signature; return header length, array region, digest.

    Only the magic, the version and the two region fields are read before the
    signature is checked, and only to find the signature; all of them are signed.
    """
    size = int(raw.shape[0])
    magic, version, _flags, header_len, data_start, data_len = PREFIX.unpack_from(raw.data, 0)
    if magic != MAGIC:
        raise BundleError(f"{where}: not a catalog bundle (wrong magic bytes)")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{where}: unsupported bundle format version {version} "
            f"(this ondevice reads version {FORMAT_VERSION})"
        )
    content_end = data_start + data_len
    if size == content_end:
        raise BundleError(f"{where}: the bundle is not signed (no signature)")
    if size < content_end + SIGNATURE_SIZE:
        raise BundleError(
            f"{where}: truncated ({size} bytes, the header announces "
            f"{content_end + SIGNATURE_SIZE})"
        )
    if size > content_end + SIGNATURE_SIZE:
        raise BundleError(
            f"{where}: {size - content_end - SIGNATURE_SIZE} unexpected bytes after the signature"
        )
    signature = raw[content_end:].tobytes()
    if not any(signature):
        raise BundleError(f"{where}: the bundle is not signed (empty signature)")
    hasher = content_hasher()
    hasher.update(raw[:content_end].data)
    digest = hasher.digest()
    try:
        key.verify(signature, SIGNATURE_CONTEXT + digest)
    except InvalidSignature:
        raise BundleError(
            f"{where}: the signature does not verify against the pinned key "
            "(tampered, corrupted, or signed by another key)"
        ) from None
    return header_len, data_start, data_len, digest


def _parse_header(raw: _U8, header_len: int, where: str) -> dict[str, Any]:
    _, _, flags, _, data_start, data_len = PREFIX.unpack_from(raw.data, 0)
    if flags != 0:
        raise BundleError(f"{where}: unknown flags {flags:#x}")
    if header_len == 0 or data_start != _align(PREFIX.size + header_len):
        raise BundleError(f"{where}: the array region does not follow the header")
    if data_len % ALIGNMENT:
        raise BundleError(f"{where}: the array region is not {ALIGNMENT}-byte aligned")
    try:
        header = json.loads(raw[PREFIX.size : PREFIX.size + header_len].tobytes().decode())
    except (ValueError, RecursionError) as exc:
        raise BundleError(f"{where}: the header is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise BundleError(f"{where}: the header is not a JSON object")
    keys = set(header)
    if keys != _HEADER_KEYS:
        missing, unknown = sorted(_HEADER_KEYS - keys), sorted(keys - _HEADER_KEYS)
        raise BundleError(f"{where}: header keys missing {missing}, unknown {unknown}")
    return header


def _build(raw: _U8, header: dict[str, Any], data_start: int, data_len: int, where: str) -> Catalog:
    """Turn a verified header and array region into a Catalog (structure checks only)."""
    specs = _array_table(header["arrays"], data_len, where)
    unused = set(specs)

    def array(name: str, dtype: str, ndim: int) -> npt.NDArray[Any]:
        spec = specs.get(name)
        if spec is None:
            raise BundleError(f"{where}: array {name!r} is missing from the array table")
        if spec.dtype != _DTYPES[dtype] or len(spec.shape) != ndim:
            raise BundleError(
                f"{where}: array {name!r} must be {ndim}-D {dtype}, "
                f"not {len(spec.shape)}-D {spec.dtype.str}"
            )
        unused.discard(name)
        start = data_start + spec.offset
        view = raw[start : start + spec.length].view(spec.dtype).reshape(spec.shape)
        if not spec.dtype.isnative:
            view = view.astype(spec.dtype.newbyteorder("="))
            view.flags.writeable = False
        return view

    def optional_array(name: object, dtype: str, ndim: int) -> npt.NDArray[Any] | None:
        if name is None:
            return None
        return array(_str(name, "an array name", where), dtype, ndim)

    n_items = _int(header["n_items"], "n_items", where)
    item_ids = _str_tuple(header["item_ids"], "item_ids", where)
    titles = _str_tuple(header["titles"], "titles", where)
    if len(item_ids) != n_items:
        raise BundleError(f"{where}: n_items is {n_items} but there are {len(item_ids)} ids")
    categories = None
    if header["category_sets"] is not None:
        sets = [
            _str_tuple(c, "a category set", where)
            for c in _list(header["category_sets"], "category_sets", where)
        ]
        index = array("category_set_index", "<i4", 1)
        if index.shape[0] != n_items:
            raise BundleError(f"{where}: category_set_index must have {n_items} entries")
        if index.size and (int(index.min()) < 0 or int(index.max()) >= len(sets)):
            raise BundleError(f"{where}: a category set index is out of range")
        categories = tuple(map(sets.__getitem__, index.tolist()))

    segments = []
    for entry in _list(header["segments"], "segments", where):
        seg = _object(
            entry, "a segment", where, {"id", "name", "panel_users", "top_items", "centroid"}
        )
        top_name = _str(seg["top_items"], "a segment's top_items", where)
        segments.append(
            Segment(
                id=_int(seg["id"], "a segment id", where),
                name=_str(seg["name"], "a segment name", where),
                panel_users=_int(seg["panel_users"], "panel_users", where),
                top_items=array(top_name, "<i4", 1),
                centroid=optional_array(seg["centroid"], "<f4", 1),
            )
        )
    rules = []
    for entry in _list(header["segment_rules"], "segment_rules", where):
        rule = _object(entry, "a segment rule", where, {"segment", "when"})
        when = _object(rule["when"], "a rule's when", where, None)
        rules.append(
            SegmentRule(
                segment=_int(rule["segment"], "a rule's segment", where),
                when={
                    _str(k, "a signal name", where): _str_tuple(v, "signal values", where)
                    for k, v in when.items()
                },
            )
        )
    als_raw = header["als"]
    als = None
    if als_raw is not None:
        als_obj = _object(als_raw, "als", where, {"factors", "regularization", "alpha"})
        als = AlsParams(
            factors=_int(als_obj["factors"], "als.factors", where),
            regularization=_float(als_obj["regularization"], "als.regularization", where),
            alpha=_float(als_obj["alpha"], "als.alpha", where),
        )
    extra = _object(header["extra"], "extra", where, None)

    catalog = Catalog(
        item_ids=item_ids,
        titles=titles,
        popularity=array("popularity", "<f4", 1),
        nbr_indptr=array("nbr_indptr", "<i8", 1),
        nbr_indices=array("nbr_indices", "<i4", 1),
        nbr_weights=array("nbr_weights", "<f4", 1),
        segments=tuple(segments),
        segment_rules=tuple(rules),
        default_segment=_int(header["default_segment"], "default_segment", where),
        categories=categories,
        item_factors=array("item_factors", "<f4", 2) if "item_factors" in specs else None,
        gram=array("gram", "<f4", 2) if "gram" in specs else None,
        als=als,
        name=_str(header["name"], "name", where),
        created_at=_float(header["created_at"], "created_at", where),
        extra={
            _str(k, "an extra key", where): _str(v, "an extra value", where)
            for k, v in extra.items()
        },
    )
    if unused:
        raise BundleError(f"{where}: arrays {sorted(unused)} are not used by the catalog")
    return catalog


def _array_table(entries: object, data_len: int, where: str) -> dict[str, _ArraySpec]:
    specs: dict[str, _ArraySpec] = {}
    for entry in _list(entries, "arrays", where):
        obj = _object(
            entry, "an array entry", where, {"name", "dtype", "shape", "offset", "length"}
        )
        name = _str(obj["name"], "an array name", where)
        if name in specs:
            raise BundleError(f"{where}: array {name!r} is listed twice")
        dtype_name = obj["dtype"]
        if not isinstance(dtype_name, str) or dtype_name not in _DTYPES:
            raise BundleError(f"{where}: array {name!r} has unsupported dtype {dtype_name!r}")
        dtype = _DTYPES[dtype_name]
        shape = tuple(
            _int(d, f"a dimension of {name!r}", where)
            for d in _list(obj["shape"], f"the shape of {name!r}", where)
        )
        offset = _int(obj["offset"], f"the offset of {name!r}", where)
        length = _int(obj["length"], f"the length of {name!r}", where)
        if len(shape) not in (1, 2) or any(d < 0 for d in shape):
            raise BundleError(f"{where}: array {name!r} has an invalid shape {list(shape)}")
        if length != math.prod(shape) * dtype.itemsize:
            raise BundleError(
                f"{where}: array {name!r} has length {length}, but shape {list(shape)} "
                f"of {dtype_name} needs {math.prod(shape) * dtype.itemsize}"
            )
        if offset < 0 or offset % ALIGNMENT or offset + length > data_len:
            raise BundleError(
                f"{where}: array {name!r} at offset {offset} (+{length} bytes) is misaligned "
                f"or outside the {data_len}-byte array region"
            )
        specs[name] = _ArraySpec(name, dtype, shape, offset, length)
    end = 0
    for spec in sorted(specs.values(), key=lambda s: s.offset):
        if spec.offset < end:
            raise BundleError(f"{where}: array {spec.name!r} overlaps the previous array")
        end = spec.offset + spec.length
    return specs


def validate_catalog(catalog: Catalog) -> None:
    """Check a catalog's structural invariants; raise :class:`BundleError` on the first
    broken one.

    Lengths agree with ``n_items``, dtypes and shapes follow the :mod:`ondevice.catalog`
    contract, ids are unique, the neighbour CSR is well formed with indices in range,
    factors and Gram matrix come together with matching ``als.factors``, segment ids are
    unique and every rule, the default segment, every top item and every centroid refer
    to something that exists.
    """
    n = catalog.n_items
    if not _only(catalog.item_ids, str):
        raise BundleError("item ids must be strings")
    if len(set(catalog.item_ids)) != n:
        raise BundleError("item ids are not unique")
    if len(catalog.titles) != n or not _only(catalog.titles, str):
        raise BundleError(f"titles must be {n} strings, one per item")
    categories = catalog.categories
    if categories is not None and (
        len(categories) != n
        or not _only(categories, tuple)
        or not _only(itertools.chain.from_iterable(set(categories)), str)
    ):
        raise BundleError(f"categories must be None or {n} tuples of strings, one per item")
    _check_array(catalog.popularity, "popularity", np.float32, (n,))
    _check_array(catalog.nbr_indptr, "nbr_indptr", np.int64, (n + 1,))
    _check_array(catalog.nbr_indices, "nbr_indices", np.int32, (None,))
    n_edges = int(catalog.nbr_indices.shape[0])
    _check_array(catalog.nbr_weights, "nbr_weights", np.float32, (n_edges,))
    indptr = catalog.nbr_indptr
    if indptr[0] != 0 or indptr[-1] != n_edges:
        raise BundleError(
            f"nbr_indptr must start at 0 and end at the number of neighbours ({n_edges})"
        )
    if n > 0 and np.any(indptr[1:] < indptr[:-1]):
        raise BundleError("nbr_indptr is not monotone (non-decreasing)")
    if n_edges and (int(catalog.nbr_indices.min()) < 0 or int(catalog.nbr_indices.max()) >= n):
        raise BundleError(f"a neighbour index is out of range [0, {n})")

    factors, gram = catalog.item_factors, catalog.gram
    if (factors is None) != (gram is None):
        raise BundleError("item_factors and gram must be both present or both None")
    n_factors = 0
    if factors is not None and gram is not None:
        _check_array(factors, "item_factors", np.float32, (n, None))
        n_factors = int(factors.shape[1])
        if n_factors < 1:
            raise BundleError("item_factors must have at least one factor")
        _check_array(factors, "item_factors", np.float32, (n, n_factors))
        _check_array(gram, "gram", np.float32, (n_factors, n_factors))
        if catalog.als is None or catalog.als.factors != n_factors:
            raise BundleError(
                f"item factors need AlsParams with factors={n_factors} (the device folds in "
                "with the same parameters)"
            )
    if catalog.als is not None and not (
        type(catalog.als.factors) is int
        and catalog.als.factors >= 1
        and math.isfinite(catalog.als.regularization)
        and math.isfinite(catalog.als.alpha)
    ):
        raise BundleError("als parameters must be a positive int and finite numbers")

    seg_ids = [s.id for s in catalog.segments]
    if not _only(seg_ids, int) or len(set(seg_ids)) != len(seg_ids):
        raise BundleError("segment ids must be unique integers")
    for seg in catalog.segments:
        if (
            not isinstance(seg.name, str)
            or type(seg.panel_users) is not int
            or (seg.panel_users < 0)
        ):
            raise BundleError(f"segment {seg.id}: bad name or panel_users")
        top = seg.top_items
        _check_array(top, f"segment {seg.id} top_items", np.int32, (None,))
        if top.size and (int(top.min()) < 0 or int(top.max()) >= n):
            raise BundleError(f"segment {seg.id}: a top item is out of range [0, {n})")
        if seg.centroid is not None:
            if factors is None:
                raise BundleError(f"segment {seg.id} has a centroid but there are no factors")
            _check_array(seg.centroid, f"segment {seg.id} centroid", np.float32, (n_factors,))
    known = set(seg_ids)
    if catalog.segments and catalog.default_segment not in known:
        raise BundleError(f"default_segment {catalog.default_segment} is not a segment id")
    for rule in catalog.segment_rules:
        if rule.segment not in known:
            raise BundleError(f"a segment rule points at unknown segment {rule.segment}")
        if not isinstance(rule.when, Mapping) or not all(
            isinstance(k, str)
            and isinstance(v, Sequence)
            and not isinstance(v, str)
            and all(isinstance(x, str) for x in v)
            for k, v in rule.when.items()
        ):
            raise BundleError("a segment rule's when must map signal names to string lists")
    created_at = catalog.created_at
    if (
        not isinstance(catalog.name, str)
        or type(created_at) not in (int, float)
        or not math.isfinite(created_at)
    ):
        raise BundleError("name must be a string and created_at a finite number")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in catalog.extra.items()):
        raise BundleError("extra must map strings to strings")


def _check_array(
    value: object, what: str, dtype: type[np.generic], shape: tuple[int | None, ...]
) -> None:
    """``value`` is an ndarray of ``dtype`` and ``shape`` (``None``: any length)."""
    if (
        isinstance(value, np.ndarray)
        and value.dtype == np.dtype(dtype)
        and len(value.shape) == len(shape)
        and all(want is None or got == want for got, want in zip(value.shape, shape, strict=True))
    ):
        return
    got = (
        f"{value.dtype}{list(value.shape)}"
        if isinstance(value, np.ndarray)
        else type(value).__name__
    )
    wanted = ["n" if d is None else d for d in shape]
    raise BundleError(f"{what} must be {np.dtype(dtype)}{wanted}, got {got}")


def _only(values: Iterable[object], kind: type) -> bool:
    """Every value is exactly of type ``kind`` (checked at C speed)."""
    return set(map(type, values)) <= {kind}


def _align(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


# --- typed accessors for the parsed JSON header ------------------------------------------


def _int(value: object, what: str, where: str) -> int:
    if type(value) is not int:
        raise BundleError(f"{where}: {what} must be an integer")
    return value


def _float(value: object, what: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BundleError(f"{where}: {what} must be a finite number")
    if not math.isfinite(value):
        raise BundleError(f"{where}: {what} must be a finite number")
    return float(value)


def _str(value: object, what: str, where: str) -> str:
    if type(value) is not str:
        raise BundleError(f"{where}: {what} must be a string")
    return value


def _list(value: object, what: str, where: str) -> list[Any]:
    if type(value) is not list:
        raise BundleError(f"{where}: {what} must be a list")
    return value


def _str_tuple(value: object, what: str, where: str) -> tuple[str, ...]:
    items = _list(value, what, where)
    if not _only(items, str):
        raise BundleError(f"{where}: {what} must be a list of strings")
    return tuple(items)


def _object(value: object, what: str, where: str, keys: set[str] | None) -> dict[str, Any]:
    if type(value) is not dict:
        raise BundleError(f"{where}: {what} must be a JSON object")
    if keys is not None and set(value) != keys:
        raise BundleError(f"{where}: {what} must have exactly the keys {sorted(keys)}")
    return value
