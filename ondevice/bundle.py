"""Verify and load a signed catalog bundle on the device.

The operator writes a bundle with :func:`ondevice.operator.bundle_writer.write_bundle`; the
device loads it with :func:`load_bundle`, which checks the Ed25519 signature against a
pinned public key over every byte of the file *before* it reads the header or any array,
then checks the structure and the catalog's invariants, and only then returns a
:class:`~ondevice.catalog.Catalog`. Anything wrong raises :class:`~ondevice.errors.BundleError`.
This module never imports operator code.

Two format versions are read: 1 (full precision) and 2 (compact, chunk-verified;
described after format 1). File layout, format version 1 (all integers little-endian)::

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

**Format 2** (what the writer writes; see :mod:`ondevice._bundle2` for the encodings)
keeps the prefix (version 2), the header and the aligned array region, and ends with a
chunk table before the signature::

    D + L      32 * C  SHA-256 of each 1 MiB chunk of file[0 : D + L] (C chunks, the last
                       one short)
    end - 64   64      Ed25519 signature over SIGNATURE_CONTEXT_V2 + SHA-256(prefix +
                       chunk table)

The reader checks the signature over the prefix and the table first (a few KB), then
reads the content into private memory chunk by chunk on two threads, checking each chunk
against its digest as it arrives; no byte is used unless every chunk passed. Its header
has no per-item data: ``item_ids``, ``titles`` and ``category_sets`` are replaced by
``category_names`` (``null`` or the distinct category names), ``item_id_prefix`` (the
prefix every id shares, stored once), ``title_block``, ``nbr_packed`` and ``ann`` (each
``null`` or its parameters; left out means ``null``) and these arrays:

- ids: ``item_id_offsets``/``item_id_bytes`` (``<i4`` or ``<i8`` offsets over a UTF-8
  blob of the ids without their shared prefix) and ``item_id_order`` (the permutation
  sorting them by their bytes: ids are found by binary search, checked unique and sorted
  at load);
- titles: ``title_offsets``/``title_bytes`` (the same string table) or, from
  :data:`ondevice._bundle2.LARGE_ITEMS` items, ``title_blocks``/``title_data`` (raw
  deflate blocks of ``title_block`` titles against a shared dictionary,
  :class:`ondevice._codecs.BlockStringTable`, decoded per request);
- categories: ``category_indptr``/``category_indices`` (CSR, ``<u2`` or ``<u4``
  indices into ``category_names``), one row per item or, when category sets repeat, one
  row per distinct set and ``category_set_of`` naming each item's set;
- ``popularity`` and ``popularity_order`` (``<i4``, the most popular items, descending,
  ties by index: all of them or the first :data:`ondevice._bundle2.POPULAR_PREFIX`);
- neighbours: ``nbr_indptr`` (``<i4`` or ``<i8``), ``nbr_indices`` (``<u2`` or ``<u4``)
  and ``nbr_weight_codes`` (``|u1``, one per neighbour) or, from ``LARGE_ITEMS`` items,
  ``nbr_packed_payload``/``nbr_packed_block_bits``/``nbr_packed_row_bits`` (bit-packed
  rows, :class:`ondevice._codecs.PackedNeighbourStore`, decoded per request), with
  ``nbr_weight_table`` (``<f4[256]``, positive, strictly descending);
- ``item_factors`` (``|i1[n, f]``) with ``item_factor_scales`` (``<f4[n]``; factor row
  ``i`` is ``codes[i] * scale[i]``) and ``gram`` (of the dequantized factors);
- with an approximate index (``ann``: ``{"kind": "ivf", "nprobe", "recall_at_10"}``, see
  :mod:`ondevice.ann`) ``ann_centroids`` (``<f4[C, f]``) and ``ann_offsets`` (``<i4`` or
  ``<i8[C + 1]``); the items are then stored in cluster order.

At 1M items of ``benchmarks/bench_scale.py``'s catalog (64 factors, 20 neighbours per
item, shop-like ids and titles) that is 146 MB against format 1's 481 MB
(``docs/scale.md``).

Every float array must hold only finite values (no NaN, no infinity):
:func:`validate_catalog` checks it, and both the writer and the device run it.

**Private memory, never a map of the file.** The file is read, once, into private
anonymous memory (the header into one buffer that is dropped after parsing, the array
region into another), and the signature is checked over *those* bytes; the arrays are
read-only views of the region's buffer, which lives as long as any of them does. No
descriptor or mapping of the file is kept, so nothing done to the file afterwards
(renamed over, deleted, truncated, overwritten in place) can change an array or crash
the process. A memory map could not promise that: a mapped file truncated by anyone
raises SIGBUS at the next access to a page past the new end (with ``MAP_PRIVATE`` too,
even for pages already copied on write), and pages not yet copied show in-place writes.
A file shrinking *while* it is read is refused ("changed size"). The cost is one private
copy of the array region, held for as long as the catalog is used, instead of shared,
reclaimable page cache: 67 MB of a 72 MB bundle (100k items, 64 factors, 50
neighbours), 432 MB of a 456 MB one (1M items, 64 factors, 20 neighbours). A file
larger than half the physical memory is refused before anything is allocated for it.

**Versions.** A bundle's version is its signed ``created_at`` (Unix seconds; the
operator's build stamps the build time). Bundle B is newer than A when
``B.created_at > A.created_at``; two bundles with the same ``created_at`` are the same
version, so only the same content (SHA-256) may share the newest one's. The engine keeps
the :func:`version_record` of the newest bundle a profile accepted in its ``meta`` table
(key :data:`VERSION_META_KEY`) and refuses anything older with :func:`check_version`:
an old bundle, validly signed with the pinned key, cannot be replayed over a newer one.
``PersonalizationEngine.load_bundle(path, allow_downgrade=True)`` is the operator's
escape hatch for an intentional roll-back (the rolled-back bundle becomes the newest);
re-issuing the previous catalog with a fresh ``created_at`` needs none.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import mmap
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ondevice import _bundle2
from ondevice._bundle2 import StringTable
from ondevice._codecs import BlockStringTable, PackedNeighbourStore
from ondevice._fileio import open_regular
from ondevice.ann import IvfIndex
from ondevice.catalog import (
    DECODE_LIMIT,
    AlsParams,
    Catalog,
    CategoryLists,
    CategoryTable,
    Segment,
    SegmentRule,
)
from ondevice.errors import BundleError

__all__ = [
    "ALIGNMENT",
    "FORMAT_VERSION",
    "MAGIC",
    "PREFIX",
    "SIGNATURE_CONTEXT",
    "SIGNATURE_SIZE",
    "VERSION_META_KEY",
    "BundleInfo",
    "check_version",
    "content_hasher",
    "load_bundle",
    "load_bundle_with_info",
    "validate_catalog",
    "verify_bundle",
    "version_record",
]

logger = logging.getLogger(__name__)

MAGIC = b"\x89ODCAT\r\n"
"""The first 8 bytes of every bundle file."""
FORMAT_VERSION = 2
"""The format version the writer writes; this module reads versions 1 and 2."""
READABLE_VERSIONS = (1, 2)
"""Every format version this module reads."""
ALIGNMENT = 64
"""Every array (and the array region) starts at a multiple of this many bytes."""
PREFIX = struct.Struct("<8sHHIQQ")
"""The fixed 32-byte prefix: magic, version, flags, header length, array region start
and length."""
SIGNATURE_SIZE = 64
"""An Ed25519 signature, the last bytes of the file."""
SIGNATURE_CONTEXT = b"ondevice catalog bundle v1 sha256\x00"
"""Format 1: prepended to the content digest in the signed message (domain separation)."""
SIGNATURE_CONTEXT_V2 = b"ondevice catalog bundle v2 chunked sha256\x00"
"""Format 2: prepended to SHA-256(prefix + chunk table) in the signed message."""
VERSION_META_KEY = "newest_bundle"
"""The profile ``meta`` key under which the engine keeps the :func:`version_record` of
the newest bundle it accepted."""

_DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(name) for name in ("<f4", "<i4", "<i8", "|u1", "|i1", "<u2", "<u4")
}
_V1_DTYPES = frozenset({"<f4", "<i4", "<i8"})
MAX_MAGNITUDE = 1e6
"""The largest absolute value of a neighbour weight, an item factor, a centroid entry, ALS's
alpha (regularization: 1e9): finite is not enough, since their products must stay
finite in float32 (a weight of 1e38 is finite, twice it is not)."""
MAX_POPULARITY = 1e15
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

_HEADER_KEYS_V2 = (_HEADER_KEYS - {"item_ids", "titles", "category_sets"}) | {
    "category_names",
    "ann",
    "title_block",
    "nbr_packed",
    "item_id_prefix",
}
_OPTIONAL_V2 = ("ann", "title_block", "nbr_packed", "item_id_prefix")
"""Format 2 header fields that may be left out (meaning ``null``: no index, plain titles,
plain neighbour arrays)."""

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
    path: str | os.PathLike[str], *, public_key: PublicKeyLike, in_memory: bool = True
) -> Catalog:
    """Verify the bundle at ``path`` against the pinned ``public_key`` and return its catalog.

    ``public_key`` is an :class:`Ed25519PublicKey` or its 32 raw bytes. The file is read
    into private memory and the signature is checked over those bytes before any header
    byte or array is used; then the array table and the catalog's invariants (finite
    values included) are checked. The returned arrays are read-only views of that
    private copy: nothing done to the file afterwards can change them or crash the
    process. ``in_memory`` is accepted for compatibility and ignored: a bundle is never
    memory-mapped (a mapped file that is truncated kills the process with SIGBUS, and
    one overwritten in place changes the arrays after the check).

    Raises :class:`BundleError` for an unreadable, truncated, unsigned, wrongly signed,
    tampered, malformed or unsupported bundle, and for a malformed ``public_key``.
    """
    catalog, _ = _load(path, public_key)
    return catalog


def load_bundle_with_info(
    path: str | os.PathLike[str], *, public_key: PublicKeyLike, in_memory: bool = True
) -> tuple[Catalog, BundleInfo]:
    """:func:`load_bundle`, also returning the bundle's :class:`BundleInfo` (its content
    digest identifies the catalog, e.g. for caches derived from it)."""
    return _load(path, public_key)


def verify_bundle(path: str | os.PathLike[str], *, public_key: PublicKeyLike) -> BundleInfo:
    """Run every check :func:`load_bundle` runs, keep nothing, and describe the bundle.

    Raises :class:`BundleError` exactly when :func:`load_bundle` would.
    """
    _, info = _load(path, public_key)
    return info


def _load(path: str | os.PathLike[str], public_key: PublicKeyLike) -> tuple[Catalog, BundleInfo]:
    key = _pinned_key(public_key)
    where = f"catalog bundle {os.fspath(path)!r}"
    raw = _read(path, where, key)
    digest = raw.digest if raw.digest is not None else _verify(raw, key, where)
    header = _parse_header(raw, where)
    try:
        catalog = (
            _build(raw, header, where) if raw.version == 1 else _build_v2(raw, header, where)
        )
    except (ValueError, IndexError, TypeError, OverflowError, MemoryError) as exc:
        # every known lie has its own check above; this net turns one nobody thought
        # of into the error the caller handles, never another exception
        raise BundleError(f"{where}: malformed catalog ({type(exc).__name__}: {exc})") from None
    try:
        validate_catalog(catalog)
    except BundleError as exc:
        raise BundleError(f"{where}: {exc}") from None
    info = BundleInfo(
        format_version=raw.version,
        name=catalog.name,
        created_at=catalog.created_at,
        n_items=catalog.n_items,
        n_factors=0 if catalog.item_factors is None else int(catalog.item_factors.shape[1]),
        n_segments=len(catalog.segments),
        size=raw.size,
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


@dataclass(frozen=True, slots=True)
class _Raw:
    """A bundle file read into private memory: the fixed prefix and the header bytes
    (dropped once parsed), and the array region, whose buffer the arrays share.
    ``digest`` is set when the bytes were verified while being read (format 2)."""

    version: int
    prefix: bytes
    head: _U8
    region: _U8
    signature: bytes
    size: int
    digest: bytes | None = None

    @property
    def fields(self) -> tuple[Any, ...]:
        """magic, version, flags, header length, array region start and length."""
        return PREFIX.unpack(self.prefix)


def _read(path: str | os.PathLike[str], where: str, key: Ed25519PublicKey) -> _Raw:
    """Read the file into private memory, checking only what locates the signature.

    The magic, the version and the two region fields are read before the signature is
    checked, and only to find it (they are signed too). Nothing is memory-mapped: what
    is verified is these private bytes, whatever happens to the file. Format 1 is
    verified afterwards as a whole (:func:`_verify`); format 2 chunk by chunk as it is
    read (:func:`_read_v2`).
    """
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size < PREFIX.size:
                raise BundleError(f"{where}: truncated ({size} bytes, not even a header)")
            prefix = bytes(_read_exactly(f, bytearray(PREFIX.size), where))
            magic, version, _flags, _header_len, data_start, data_len = PREFIX.unpack(prefix)
            if magic != MAGIC:
                raise BundleError(f"{where}: not a catalog bundle (wrong magic bytes)")
            if version not in READABLE_VERSIONS:
                raise BundleError(
                    f"{where}: unsupported bundle format version {version} (this ondevice "
                    f"reads versions {', '.join(map(str, READABLE_VERSIONS))}; a newer "
                    "bundle needs a newer ondevice)"
                )
            if version == 2:
                return _read_v2(f, size, prefix, key, where)
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
                    f"{where}: {size - content_end - SIGNATURE_SIZE} unexpected bytes "
                    "after the signature"
                )
            if data_start < PREFIX.size:
                raise BundleError(f"{where}: the array region does not follow the header")
            _check_fits_in_memory(size, where)
            head = _read_exactly(f, _private_buffer(data_start - PREFIX.size), where)
            region = _read_exactly(f, _private_buffer(data_len), where)
            signature = bytes(_read_exactly(f, bytearray(SIGNATURE_SIZE), where))
    except BundleError:
        raise
    except (OSError, ValueError, MemoryError) as exc:
        raise BundleError(f"{where}: cannot read the file ({exc!r})") from exc
    region.flags.writeable = False
    return _Raw(1, prefix, head, region, signature, size)


def _read_v2(f: Any, size: int, prefix: bytes, key: Ed25519PublicKey, where: str) -> _Raw:
    """Format 2: check the signature over the prefix and the chunk table, then read the
    content into private memory chunk by chunk, each checked against its signed digest
    as it arrives; nothing is returned (so nothing is used) unless every chunk passed."""
    _magic, _version, _flags, _header_len, data_start, data_len = PREFIX.unpack(prefix)
    content_end = data_start + data_len
    table_len = _bundle2.chunk_count(content_end) * _bundle2.DIGEST_SIZE
    expected = content_end + table_len + SIGNATURE_SIZE
    if size == content_end:
        raise BundleError(f"{where}: the bundle is not signed (no chunk table, no signature)")
    if size < expected:
        raise BundleError(f"{where}: truncated ({size} bytes, the header announces {expected})")
    if size > expected:
        raise BundleError(f"{where}: {size - expected} unexpected bytes after the signature")
    if data_start < PREFIX.size:
        raise BundleError(f"{where}: the array region does not follow the header")
    _check_fits_in_memory(size, where)
    f.seek(content_end)
    tail = bytes(_read_exactly(f, bytearray(table_len + SIGNATURE_SIZE), where))
    table, signature = tail[:table_len], tail[table_len:]
    if not any(signature):
        raise BundleError(f"{where}: the bundle is not signed (empty signature)")
    digest = hashlib.sha256(prefix + table).digest()
    try:
        key.verify(signature, SIGNATURE_CONTEXT_V2 + digest)
    except InvalidSignature:
        raise BundleError(
            f"{where}: the signature does not verify against the pinned key "
            "(tampered, corrupted, or signed by another key)"
        ) from None
    buffer = _private_buffer(content_end)
    _read_chunks(f, buffer, table, where)
    if buffer[: PREFIX.size].tobytes() != prefix:
        raise BundleError(f"{where}: the file changed while being read")
    buffer.flags.writeable = False
    return _Raw(
        2, prefix, buffer[PREFIX.size : data_start], buffer[data_start:content_end],
        signature, size, digest,
    )


def _read_chunks(f: Any, buffer: _U8, table: bytes, where: str) -> None:
    """Fill ``buffer`` with the file's first ``buffer.size`` bytes and check every chunk
    against its digest in ``table``, on up to ``VERIFY_THREADS`` threads (positional
    reads and SHA-256 release the GIL); the first failure is raised."""
    chunk, digest_size = _bundle2.CHUNK_SIZE, _bundle2.DIGEST_SIZE
    count = len(table) // digest_size
    fd = f.fileno()
    positional = hasattr(os, "preadv")

    def check(i: int, view: memoryview) -> None:
        if hashlib.sha256(view).digest() != table[i * digest_size : (i + 1) * digest_size]:
            raise BundleError(
                f"{where}: chunk {i} (bytes {i * chunk} to {i * chunk + len(view)}) does "
                "not match its signed digest (tampered or corrupted)"
            )

    def worker(first: int, step: int) -> None:
        for i in range(first, count, step):
            lo = i * chunk
            view = memoryview(buffer[lo : min(lo + chunk, buffer.size)])  # type: ignore[arg-type]
            pos = 0
            while pos < len(view):
                got = os.preadv(fd, [view[pos:]], lo + pos)
                if not got:
                    raise BundleError(f"{where}: the file changed size while being read")
                pos += got
            check(i, view)

    if not positional:  # Windows: one thread, sequential reads
        f.seek(0)
        for i in range(count):
            lo = i * chunk
            view = memoryview(buffer[lo : min(lo + chunk, buffer.size)])  # type: ignore[arg-type]
            _read_exactly(f, view, where)
            check(i, view)
        return
    threads = min(_bundle2.VERIFY_THREADS, count)
    if threads == 1:
        worker(0, 1)
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bundle-verify") as pool:
        futures = [pool.submit(worker, t, threads) for t in range(threads)]
        for future in futures:
            future.result()


def _private_buffer(size: int) -> _U8:
    """``size`` bytes of fresh private anonymous memory, writable until the caller says.

    An anonymous mapping rather than ``np.empty``: numpy asks for transparent huge pages
    for large arrays, and where the kernel then compacts memory synchronously, the first
    write into a few hundred MB takes seconds instead of a fraction of one.
    """
    if size == 0:
        return np.empty(0, dtype=np.uint8)
    if hasattr(mmap, "MAP_ANONYMOUS"):
        memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    else:  # Windows: an anonymous mapping backed by the paging file
        memory = mmap.mmap(-1, size)
    return np.frombuffer(memory, dtype=np.uint8)


def _read_exactly(f: Any, buffer: Any, where: str) -> Any:
    """Fill ``buffer`` from ``f`` (looping over short reads); the file must not end."""
    view = memoryview(buffer).cast("B")
    pos, total = 0, len(view)
    while pos < total:
        got = f.readinto(view[pos:])
        if not got:
            raise BundleError(f"{where}: the file changed size while being read")
        pos += got
    return buffer


def _check_fits_in_memory(size: int, where: str) -> None:
    """Refuse a file larger than half the physical memory before allocating for it:
    such a "bundle" would get the process killed rather than loaded."""
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return  # not knowable here (Windows): rely on the allocation failing
    if physical > 0 and size > physical // 2:
        raise BundleError(
            f"{where}: {size} bytes is more than half of this device's memory "
            f"({physical} bytes); a bundle is read into private memory"
        )


def _verify(raw: _Raw, key: Ed25519PublicKey, where: str) -> bytes:
    """Check the signature over the private copy; return the content digest."""
    if not any(raw.signature):
        raise BundleError(f"{where}: the bundle is not signed (empty signature)")
    hasher = content_hasher()
    hasher.update(raw.prefix)
    hasher.update(raw.head.data)
    hasher.update(raw.region.data)
    digest = hasher.digest()
    try:
        key.verify(raw.signature, SIGNATURE_CONTEXT + digest)
    except InvalidSignature:
        raise BundleError(
            f"{where}: the signature does not verify against the pinned key "
            "(tampered, corrupted, or signed by another key)"
        ) from None
    return digest


def _parse_header(raw: _Raw, where: str) -> dict[str, Any]:
    _, _, flags, header_len, data_start, data_len = raw.fields
    if flags != 0:
        raise BundleError(f"{where}: unknown flags {flags:#x}")
    if header_len == 0 or data_start != _align(PREFIX.size + header_len):
        raise BundleError(f"{where}: the array region does not follow the header")
    if data_len % ALIGNMENT:
        raise BundleError(f"{where}: the array region is not {ALIGNMENT}-byte aligned")
    try:
        header = json.loads(str(raw.head[:header_len].data, "utf-8"))
    except (ValueError, RecursionError) as exc:
        raise BundleError(f"{where}: the header is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise BundleError(f"{where}: the header is not a JSON object")
    keys, wanted = set(header), _HEADER_KEYS if raw.version == 1 else _HEADER_KEYS_V2
    if raw.version == 2:
        for name in _OPTIONAL_V2:
            if name not in keys:
                header[name] = None
                keys.add(name)
    if keys != wanted:
        missing, unknown = sorted(wanted - keys), sorted(keys - wanted)
        raise BundleError(f"{where}: header keys missing {missing}, unknown {unknown}")
    return header


def _build(raw: _Raw, header: dict[str, Any], where: str) -> Catalog:
    """Turn a verified header and array region into a Catalog (structure checks only)."""
    arrays = _Arrays(raw.region, _array_table(header["arrays"], raw.region.size, where,
                                              _V1_DTYPES), where)
    specs = arrays.specs

    def array(name: str, dtype: str, ndim: int) -> npt.NDArray[Any]:
        return arrays.get(name, (dtype,), (None,) * ndim)

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

    catalog = Catalog(
        item_ids=item_ids,
        titles=titles,
        popularity=array("popularity", "<f4", 1),
        nbr_indptr=array("nbr_indptr", "<i8", 1),
        nbr_indices=array("nbr_indices", "<i4", 1),
        nbr_weights=array("nbr_weights", "<f4", 1),
        segments=tuple(segments),
        segment_rules=_rules(header["segment_rules"], where),
        default_segment=_int(header["default_segment"], "default_segment", where),
        categories=categories,
        item_factors=array("item_factors", "<f4", 2) if "item_factors" in specs else None,
        gram=array("gram", "<f4", 2) if "gram" in specs else None,
        als=_als(header["als"], where),
        name=_str(header["name"], "name", where),
        created_at=_float(header["created_at"], "created_at", where),
        extra=_extra(header["extra"], where),
    )
    if arrays.unused:
        raise BundleError(f"{where}: arrays {sorted(arrays.unused)} are not used by the catalog")
    return catalog


_OFFSETS = ("<i4", "<i8")
_NARROW = ("<u2", "<u4")


class _Arrays:
    """The verified array region of a format 2 bundle, by name: each array is checked
    against the dtypes and shape its field allows, and every listed array must be used."""

    def __init__(self, region: _U8, specs: dict[str, _ArraySpec], where: str) -> None:
        self.region, self.specs, self.where = region, specs, where
        self.unused = set(specs)

    def get(
        self, name: str, dtypes: Sequence[str], shape: tuple[int | None, ...]
    ) -> npt.NDArray[Any]:
        spec = self.specs.get(name)
        if spec is None:
            raise BundleError(f"{self.where}: array {name!r} is missing from the array table")
        if spec.dtype.str not in dtypes or len(spec.shape) != len(shape) or any(
            want is not None and got != want for got, want in zip(spec.shape, shape, strict=True)
        ):
            wanted = "/".join(dtypes) + str(["n" if d is None else d for d in shape])
            raise BundleError(
                f"{self.where}: array {name!r} must be {wanted}, "
                f"not {spec.dtype.str}{list(spec.shape)}"
            )
        self.unused.discard(name)
        view = self.region[spec.offset : spec.offset + spec.length].view(spec.dtype)
        view = view.reshape(spec.shape)
        if not spec.dtype.isnative:
            view = view.astype(spec.dtype.newbyteorder("="))
            view.flags.writeable = False
        return view

    def has(self, name: str) -> bool:
        return name in self.specs


def _check_offsets(offsets: npt.NDArray[Any], end: int, what: str) -> None:
    # every value in [0, end] first: then np.diff cannot wrap around
    if offsets[0] != 0 or int(offsets[-1]) != end or int(offsets.min()) < 0 or (
        int(offsets.max()) > end
    ):
        raise BundleError(f"{what} must start at 0, end at {end} and stay between them")
    if offsets.size > 1 and (np.diff(offsets) < 0).any():
        raise BundleError(f"{what} is not monotone (non-decreasing)")


def _build_v2(raw: _Raw, header: dict[str, Any], where: str) -> Catalog:
    """Turn a verified format 2 header and array region into a Catalog."""
    arrays = _Arrays(raw.region, _array_table(header["arrays"], raw.region.size, where, _DTYPES),
                     where)
    n = _int(header["n_items"], "n_items", where)
    if n < 0:
        raise BundleError(f"{where}: n_items must not be negative")

    def strings(prefix: str, *, ordered: bool, shared: str = "") -> StringTable:
        offsets = arrays.get(f"{prefix}_offsets", _OFFSETS, (n + 1,))
        blob = arrays.get(f"{prefix}_bytes", ("|u1",), (None,))
        order = arrays.get(f"{prefix}_order", ("<i4",), (n,)) if ordered else None
        return StringTable(offsets, blob, order=order, what=f"{where}: {prefix}s", prefix=shared)

    shared = header["item_id_prefix"]
    item_ids = strings(
        "item_id",
        ordered=True,
        shared="" if shared is None else _str(shared, "item_id_prefix", where),
    )
    titles: Sequence[str]
    if header["title_block"] is None:
        titles = strings("title", ordered=False)
    else:
        block = _int(header["title_block"], "title_block", where)
        if not 1 <= block <= 1 << 16:
            raise BundleError(f"{where}: title_block must be between 1 and 65536")
        titles = _Titles(
            arrays.get("title_blocks", _OFFSETS, (None,)),
            arrays.get("title_data", ("|u1",), (None,)),
            count=n,
            block=block,
        )

    categories, category_table = None, None
    if header["category_names"] is not None:
        names = _str_tuple(header["category_names"], "category_names", where)
        set_of = None
        if arrays.has("category_set_of"):  # rows are the distinct category sets
            set_of = arrays.get("category_set_of", _NARROW, (n,))
            indptr = arrays.get("category_indptr", _OFFSETS, (None,))
            if indptr.size < 1 or (n and int(set_of.max()) >= indptr.size - 1):
                raise BundleError(f"{where}: a category set index is out of range")
        else:
            indptr = arrays.get("category_indptr", _OFFSETS, (n + 1,))
        indices = arrays.get("category_indices", _NARROW, (None,))
        _check_offsets(indptr, indices.size, f"{where}: category_indptr")
        if indices.size and int(indices.max()) >= len(names):
            raise BundleError(f"{where}: a category index is out of range")
        category_table = CategoryTable(names, indptr, indices, set_of)
        categories = CategoryLists(category_table)

    popularity = arrays.get("popularity", ("<f4",), (n,))
    _check_finite(popularity, "popularity")
    order = arrays.get("popularity_order", ("<i4",), (None,))  # the head, or all of it
    if not min(n, _bundle2.POPULAR_PREFIX) <= order.size <= n:
        raise BundleError(
            f"{where}: popularity_order must list between {min(n, _bundle2.POPULAR_PREFIX)} "
            f"and {n} items"
        )
    if n:
        _check_popular_prefix(popularity, order, where)

    table = arrays.get("nbr_weight_table", ("<f4",), (_bundle2.WEIGHT_CODES,))
    _bundle2.check_weight_table(table, where)
    store = None
    if header["nbr_packed"] is None:
        nbr_indptr = arrays.get("nbr_indptr", _OFFSETS, (n + 1,))
        nbr_indices = arrays.get("nbr_indices", _NARROW, (None,))
        codes = arrays.get("nbr_weight_codes", ("|u1",), (nbr_indices.size,))
        _check_offsets(nbr_indptr, nbr_indices.size, f"{where}: nbr_indptr")
        if nbr_indices.size and int(nbr_indices.max()) >= n:
            raise BundleError(f"{where}: a neighbour index is out of range [0, {n})")
    else:  # bit-packed rows, decoded per request (each row checked as it is decoded)
        params = _object(header["nbr_packed"], "nbr_packed", where, None)
        packed = {
            "payload": arrays.get("nbr_packed_payload", ("|u1",), (None,)),
            "block_bits": arrays.get("nbr_packed_block_bits", ("<i8",), (None,)),
            "row_bits": arrays.get("nbr_packed_row_bits", ("<u2", "<u4"), (n,)),
        }
        try:
            store = PackedNeighbourStore(
                packed, {k: _int(v, f"nbr_packed {k}", where) for k, v in params.items()}, n
            )
        except ValueError as exc:
            raise BundleError(f"{where}: {exc}") from None
        nbr_indptr = np.zeros(n + 1, dtype=np.int64)
        nbr_indices = np.zeros(0, dtype=np.uint32)
        codes = np.zeros(0, dtype=np.uint8)

    item_factors = gram = factor_scales = None
    codes_y_shape = None
    if arrays.has("item_factors"):
        codes_y = arrays.get("item_factors", ("|i1",), (n, None))
        codes_y_shape = codes_y.shape
        scales = arrays.get("item_factor_scales", ("<f4",), (n,))
        _check_finite(scales, "item_factor_scales")
        if (scales < 0).any() or (scales > MAX_MAGNITUDE / 127).any():
            raise BundleError(
                f"{where}: item_factor_scales must be between 0 and {MAX_MAGNITUDE / 127:.3g}"
            )
        if codes_y.size <= DECODE_LIMIT:  # small: float32 scores fastest
            item_factors = _bundle2.dequantize_rows(codes_y, scales)
        else:  # large: a quarter of the memory, scored in blocks
            item_factors, factor_scales = codes_y, scales
        gram = arrays.get("gram", ("<f4",), (codes_y.shape[1], codes_y.shape[1]))
    small = codes.size <= DECODE_LIMIT and store is None
    ann = _ann(header["ann"], arrays, n, None if codes_y_shape is None else codes_y_shape[1], where)

    segments = []
    for entry in _list(header["segments"], "segments", where):
        seg = _object(
            entry, "a segment", where, {"id", "name", "panel_users", "top_items", "centroid"}
        )
        centroid = seg["centroid"]
        segments.append(
            Segment(
                id=_int(seg["id"], "a segment id", where),
                name=_str(seg["name"], "a segment name", where),
                panel_users=_int(seg["panel_users"], "panel_users", where),
                top_items=arrays.get(
                    _str(seg["top_items"], "a segment's top_items", where), ("<i4",), (None,)
                ),
                centroid=None
                if centroid is None
                else arrays.get(_str(centroid, "a centroid", where), ("<f4",), (None,)),
            )
        )
    catalog = Catalog(
        item_ids=item_ids,
        titles=titles,
        popularity=popularity,
        nbr_indptr=nbr_indptr.astype(np.int64),
        nbr_indices=nbr_indices.astype(np.int32) if small else nbr_indices,
        nbr_weights=table[codes] if small else codes,
        segments=tuple(segments),
        segment_rules=_rules(header["segment_rules"], where),
        default_segment=_int(header["default_segment"], "default_segment", where),
        categories=categories,
        item_factors=item_factors,
        gram=gram,
        als=_als(header["als"], where),
        name=_str(header["name"], "name", where),
        created_at=_float(header["created_at"], "created_at", where),
        extra=_extra(header["extra"], where),
        popularity_order=order,
        category_table=category_table,
        item_factor_scales=factor_scales,
        nbr_weight_table=None if small else table,
        ann=ann,
        nbr_store=store,
    )
    if arrays.unused:
        raise BundleError(f"{where}: arrays {sorted(arrays.unused)} are not used by the catalog")
    return catalog


def _check_popular_prefix(
    popularity: npt.NDArray[np.float32], order: npt.NDArray[np.int32], where: str
) -> None:
    """``order`` is the head of the popularity ranking: distinct items, popularity
    descending (ties by lower index), and no item left out ranks above its last entry."""
    n = popularity.shape[0]
    if int(order.min()) < 0 or int(order.max()) >= n:
        raise BundleError(f"{where}: popularity_order holds an item out of range")
    listed = np.zeros(n, dtype=np.bool_)
    listed[order] = True
    if int(listed.sum()) != order.size:
        raise BundleError(f"{where}: popularity_order lists an item twice")
    pop = popularity[order]
    falls = pop[1:] < pop[:-1]
    ties = (pop[1:] == pop[:-1]) & (order[1:] > order[:-1])
    if not (falls | ties).all():
        raise BundleError(f"{where}: popularity_order does not sort by popularity (ties by index)")
    if order.size < n:  # masks over the catalog, no index array of its size
        last, last_pop = int(order[-1]), pop[-1]
        unlisted = ~listed
        if (unlisted & (popularity > last_pop)).any() or (
            unlisted[:last] & (popularity[:last] == last_pop)
        ).any():
            raise BundleError(f"{where}: an item left out of popularity_order ranks above it")


class _Titles(BlockStringTable):
    """A bundle's block-compressed titles: a block that does not decode raises
    :class:`BundleError` (the signed file holds nonsense), not a bare ValueError."""

    __slots__ = ()

    def _decode(self, b: int) -> tuple[str, ...]:
        try:
            return super()._decode(b)
        except ValueError as exc:
            raise BundleError(f"the catalog's titles are corrupt: {exc}") from None


def _ann(
    value: object, arrays: _Arrays, n: int, n_factors: int | None, where: str
) -> IvfIndex | None:
    """The approximate index of a format 2 header (``null`` or its settings), checked
    against its arrays: offsets from 0 to ``n``, non-decreasing; finite, bounded
    centroids of the factors' width; ``nprobe`` between 1 and the cluster count."""
    if value is None:
        return None
    entry = _object(value, "ann", where, {"kind", "nprobe", "recall_at_10"})
    if entry["kind"] != "ivf":
        raise BundleError(f"{where}: unknown approximate index kind {entry['kind']!r}")
    if n_factors is None:
        raise BundleError(f"{where}: an approximate index needs item factors")
    centroids = arrays.get("ann_centroids", ("<f4",), (None, n_factors))
    offsets = arrays.get("ann_offsets", _OFFSETS, (centroids.shape[0] + 1,))
    _check_finite(centroids, "ann_centroids")
    _check_bounded(centroids, "ann_centroids", MAX_MAGNITUDE)
    _check_offsets(offsets, n, f"{where}: ann_offsets")
    nprobe = _int(entry["nprobe"], "ann nprobe", where)
    if not 1 <= nprobe <= centroids.shape[0]:
        raise BundleError(f"{where}: ann nprobe must be between 1 and {centroids.shape[0]}")
    recall = _float(entry["recall_at_10"], "ann recall_at_10", where)
    if not 0.0 <= recall <= 1.0:
        raise BundleError(f"{where}: ann recall_at_10 must be between 0 and 1")
    return IvfIndex(
        centroids=centroids, offsets=offsets.astype(np.int64), nprobe=nprobe, recall=recall
    )


def _rules(value: object, where: str) -> tuple[SegmentRule, ...]:
    rules = []
    for entry in _list(value, "segment_rules", where):
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
    return tuple(rules)


def _als(value: object, where: str) -> AlsParams | None:
    if value is None:
        return None
    obj = _object(value, "als", where, {"factors", "regularization", "alpha"})
    return AlsParams(
        factors=_int(obj["factors"], "als.factors", where),
        regularization=_float(obj["regularization"], "als.regularization", where),
        alpha=_float(obj["alpha"], "als.alpha", where),
    )


def _extra(value: object, where: str) -> dict[str, str]:
    extra = _object(value, "extra", where, None)
    return {
        _str(k, "an extra key", where): _str(v, "an extra value", where)
        for k, v in extra.items()
    }


def _array_table(
    entries: object, data_len: int, where: str, dtypes: Iterable[str]
) -> dict[str, _ArraySpec]:
    allowed = frozenset(dtypes)
    specs: dict[str, _ArraySpec] = {}
    for entry in _list(entries, "arrays", where):
        obj = _object(
            entry, "an array entry", where, {"name", "dtype", "shape", "offset", "length"}
        )
        name = _str(obj["name"], "an array name", where)
        if name in specs:
            raise BundleError(f"{where}: array {name!r} is listed twice")
        dtype_name = obj["dtype"]
        if not isinstance(dtype_name, str) or dtype_name not in allowed:
            raise BundleError(f"{where}: array {name!r} has unsupported dtype {dtype_name!r}")
        dtype = _DTYPES[dtype_name]
        shape = tuple(
            _int(d, f"a dimension of {name!r}", where)
            for d in _list(obj["shape"], f"the shape of {name!r}", where)
        )
        offset = _int(obj["offset"], f"the offset of {name!r}", where)
        length = _int(obj["length"], f"the length of {name!r}", where)
        # no dimension can exceed the region's bytes (a zero-length array could
        # otherwise declare [0, 2**62] and fail later, outside these checks)
        if len(shape) not in (1, 2) or any(d < 0 or d > max(data_len, 1) for d in shape):
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
    to something that exists, and every float array (popularity, neighbour weights,
    factors, Gram matrix, centroids) holds only finite values: a NaN or an infinity
    would turn into NaN scores on the device. The writer and the device run this same
    function, so neither can accept what the other refuses.
    """
    n = catalog.n_items
    # String and category tables were checked when they were built (structure, UTF-8);
    # a table's ids are unique because the writer checked them before signing.
    if not isinstance(catalog.item_ids, StringTable):
        if not _only(catalog.item_ids, str):
            raise BundleError("item ids must be strings")
        if len(set(catalog.item_ids)) != n:
            raise BundleError("item ids are not unique")
    if len(catalog.titles) != n or (
        not isinstance(catalog.titles, (StringTable, BlockStringTable))
        and not _only(catalog.titles, str)
    ):
        raise BundleError(f"titles must be {n} strings, one per item")
    categories = catalog.categories
    if categories is not None and (
        len(categories) != n
        or (
            not isinstance(categories, CategoryLists)
            and (
                not _only(categories, tuple)
                or not _only(itertools.chain.from_iterable(set(categories)), str)
            )
        )
    ):
        raise BundleError(f"categories must be None or {n} tuples of strings, one per item")
    _check_array(catalog.popularity, "popularity", np.float32, (n,))
    _check_array(catalog.nbr_indptr, "nbr_indptr", np.int64, (n + 1,))
    narrow = isinstance(catalog.nbr_indices, np.ndarray) and catalog.nbr_indices.dtype in (
        np.uint16, np.uint32
    )
    _check_array(
        catalog.nbr_indices, "nbr_indices", catalog.nbr_indices.dtype.type if narrow else np.int32,
        (None,),
    )
    n_edges = int(catalog.nbr_indices.shape[0])
    _check_finite(catalog.popularity, "popularity")
    _check_bounded(catalog.popularity, "popularity", MAX_POPULARITY)
    if catalog.nbr_weight_table is None:
        _check_array(catalog.nbr_weights, "nbr_weights", np.float32, (n_edges,))
        _check_finite(catalog.nbr_weights, "nbr_weights")
        _check_bounded(catalog.nbr_weights, "nbr_weights", MAX_MAGNITUDE)
    else:
        _check_array(catalog.nbr_weights, "nbr_weights (codes)", np.uint8, (n_edges,))
        _check_array(catalog.nbr_weight_table, "nbr_weight_table", np.float32, (None,))
        _bundle2.check_weight_table(catalog.nbr_weight_table, "nbr_weight_table")
        _check_bounded(catalog.nbr_weight_table, "nbr_weight_table", MAX_MAGNITUDE)
    indptr = catalog.nbr_indptr
    if indptr[0] != 0 or indptr[-1] != n_edges:
        raise BundleError(
            f"nbr_indptr must start at 0 and end at the number of neighbours ({n_edges})"
        )
    # with encoded rows the CSR fields are empty placeholders: nothing to scan at 10M items
    if catalog.nbr_store is None and n > 0 and np.any(indptr[1:] < indptr[:-1]):
        raise BundleError("nbr_indptr is not monotone (non-decreasing)")
    if n_edges and (int(catalog.nbr_indices.min()) < 0 or int(catalog.nbr_indices.max()) >= n):
        raise BundleError(f"a neighbour index is out of range [0, {n})")
    if catalog.nbr_store is not None and (
        len(catalog.nbr_store) != n or n_edges or catalog.nbr_weight_table is None
    ):
        raise BundleError(
            f"encoded neighbour rows need {n} rows, empty CSR arrays and a weight table"
        )

    factors, gram = catalog.item_factors, catalog.gram
    if (factors is None) != (gram is None):
        raise BundleError("item_factors and gram must be both present or both None")
    n_factors = 0
    if factors is not None and gram is not None:
        scales = catalog.item_factor_scales
        kind = np.float32 if scales is None else np.int8
        _check_array(factors, "item_factors", kind, (n, None))
        n_factors = int(factors.shape[1])
        if n_factors < 1:
            raise BundleError("item_factors must have at least one factor")
        _check_array(gram, "gram", np.float32, (n_factors, n_factors))
        if scales is None:
            _check_finite(factors, "item_factors")
            _check_bounded(factors, "item_factors", MAX_MAGNITUDE)
        else:
            _check_array(scales, "item_factor_scales", np.float32, (n,))
            _check_finite(scales, "item_factor_scales")
        _check_finite(gram, "gram")
        if catalog.als is None or catalog.als.factors != n_factors:
            raise BundleError(
                f"item factors need AlsParams with factors={n_factors} (the device folds in "
                "with the same parameters)"
            )
    if catalog.als is not None and not (
        type(catalog.als.factors) is int
        and catalog.als.factors >= 1
        and 0 <= catalog.als.regularization <= 1e9
        and 0 <= catalog.als.alpha <= MAX_MAGNITUDE
    ):
        raise BundleError(
            "als parameters must be a positive int, a regularization in [0, 1e9] and an "
            f"alpha in [0, {MAX_MAGNITUDE:g}]"
        )

    if catalog.ann is not None:
        index = catalog.ann
        if factors is None:
            raise BundleError("an approximate index needs item factors")
        _check_array(index.centroids, "ann centroids", np.float32, (None, n_factors))
        _check_finite(index.centroids, "ann centroids")
        _check_bounded(index.centroids, "ann centroids", MAX_MAGNITUDE)
        clusters = int(index.centroids.shape[0])
        if clusters < 1:
            raise BundleError("an approximate index needs at least one cluster")
        _check_array(index.offsets, "ann offsets", np.int64, (clusters + 1,))
        _check_offsets(index.offsets, n, "ann offsets")
        if type(index.nprobe) is not int or not 1 <= index.nprobe <= clusters:
            raise BundleError(f"ann nprobe must be an int between 1 and {clusters}")

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
            _check_finite(seg.centroid, f"segment {seg.id} centroid")
            _check_bounded(seg.centroid, f"segment {seg.id} centroid", MAX_MAGNITUDE)
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


_FINITE_CHUNK = 1 << 18
"""Elements per step of :func:`_check_finite` (a 256 KiB scratch mask, not one per element
of a 256 MB factor matrix)."""


def _check_finite(array: npt.NDArray[np.float32], what: str) -> None:
    """Every value of ``array`` is finite (no NaN, no infinity), checked in chunks."""
    flat = array.reshape(-1)
    mask = np.empty(min(flat.size, _FINITE_CHUNK), dtype=np.bool_)
    for start in range(0, flat.size, _FINITE_CHUNK):
        chunk = flat[start : start + _FINITE_CHUNK]
        out = mask[: chunk.size]
        np.isfinite(chunk, out=out)
        if not out.all():
            bad = start + int(np.argmin(out))
            raise BundleError(f"{what} holds NaN or infinite values (first at flat index {bad})")


def _check_bounded(array: npt.NDArray[np.float32], what: str, bound: float) -> None:
    """Every value of a finite ``array`` lies in ``[-bound, bound]``."""
    if array.size and float(np.abs(array).max()) > bound:
        raise BundleError(f"{what} holds values beyond +/-{bound:g} (products would overflow)")


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


# --- versions: which bundle is newer ------------------------------------------------------


def version_record(info: BundleInfo) -> str:
    """What a profile keeps about the newest bundle it accepted (a small JSON object:
    ``created_at``, ``sha256``, ``name``), for :func:`check_version`."""
    return json.dumps(
        {"created_at": info.created_at, "sha256": info.sha256, "name": info.name},
        sort_keys=True,
        allow_nan=False,
    )


def check_version(info: BundleInfo, newest: str | None, *, where: str = "catalog bundle") -> None:
    """Refuse a verified bundle that is not at least as new as ``newest``.

    ``newest`` is the :func:`version_record` of the newest bundle accepted so far, or
    None when none was. A bundle's version is its signed ``created_at``: the bundle is
    accepted when its ``created_at`` is later than the newest one's, or equal with the
    same content digest (the same bundle loaded again). Anything else, an older bundle
    or a different one claiming the same moment, raises :class:`BundleError`: an old
    bundle validly signed with the pinned key cannot be replayed over a newer one.
    """
    if newest is None:
        return
    try:
        record = json.loads(newest)
        mark = float(record["created_at"])
        mark_sha, mark_name = str(record["sha256"]), str(record["name"])
    except (ValueError, TypeError, KeyError) as exc:
        raise BundleError(
            f"{where}: the profile's record of the newest accepted bundle is unreadable "
            f"({exc!r}); loading with allow_downgrade=True replaces it"
        ) from None
    created = info.created_at
    if created > mark or (created == mark and info.sha256 == mark_sha):
        return
    what = "older than" if created < mark else "a different bundle with the same created_at as"
    raise BundleError(
        f"{where}: {info.name!r} created at {_when(created)} is {what} the newest bundle "
        f"this profile accepted ({mark_name!r}, created at {_when(mark)}, sha256 "
        f"{mark_sha[:16]}...): refused as a downgrade. Publish bundles with a later "
        "created_at; an operator rolling back on purpose loads with allow_downgrade=True"
    )


def _when(timestamp: float) -> str:
    try:
        stamp = datetime.fromtimestamp(timestamp, tz=UTC).isoformat(timespec="microseconds")
    except (ValueError, OverflowError, OSError):
        return repr(timestamp)
    return f"{stamp} ({timestamp!r})"
