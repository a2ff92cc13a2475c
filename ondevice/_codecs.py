"""Compact, randomly accessible encodings for large catalogs (building blocks of a bundle).

Two codecs, both pure functions over numpy arrays plus a reader class that works on
zero-copy views of a verified bundle buffer:

- **Block-compressed strings** (:func:`encode_block_strings`, :class:`BlockStringTable`):
  strings are grouped ``block`` at a time; each group is joined with the byte ``0xFF``
  (which never occurs in UTF-8) and compressed with raw deflate (``zlib``, no header or
  checksum: the bundle is signed) against a shared preset dictionary (a sample of the
  strings themselves, at most 32 KiB), so that small groups still compress well. Reading
  a string inflates its group (a few microseconds for 16 titles) into a small,
  bounded, thread-safe LRU cache of decoded groups.
- **Neighbour lists** (:func:`encode_neighbours_packed`, :class:`PackedNeighbourStore`):
  each CSR row bit-packed in its original order (per-row target widths, unary code
  steps); :meth:`PackedNeighbourStore.gather` decodes many rows at once, vectorized in
  numpy. (The LEB128 varint rows they replaced are kept as a baseline in
  ``benchmarks/_varint_neighbours.py``.)

Every decoder treats its bytes as hostile: malformed input raises :class:`ValueError`
(the bundle reader turns it into its own error), never another exception, and no read
goes outside the arrays given.
"""

from __future__ import annotations

import operator
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Final, overload

import numpy as np
import numpy.typing as npt

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]

SEPARATOR: Final = 0xFF
"""The byte between the strings of a block (never part of valid UTF-8)."""
ZDICT_MAX: Final = 32 * 1024
"""Largest preset dictionary (deflate's window)."""
DEFAULT_BLOCK: Final = 16
"""Strings per compressed block: 16 titles inflate in under 10 us (see the benchmark)."""
DEFAULT_LEVEL: Final = 9
DEFAULT_CACHE_BLOCKS: Final = 256
"""Decoded blocks kept by a :class:`BlockStringTable` (a few hundred KiB for titles)."""
MAX_BLOCK_BYTES: Final = 1 << 20
"""The most a block may inflate to (16 titles of 64 KiB): the writer refuses more, the
reader stops inflating there, so a signed deflate bomb costs at most this per block."""
CACHE_BYTES: Final = 8 << 20
"""The most inflated bytes a :class:`BlockStringTable` keeps cached."""


def _narrow_offsets(offsets: I64) -> npt.NDArray[np.integer]:
    """int32 offsets when the last fits, else int64."""
    return offsets.astype(np.int32) if int(offsets[-1]) < 2**31 else offsets


def _check_offsets(offsets: npt.NDArray[np.integer], size: int, what: str) -> I64:
    """``offsets`` as int64 after checking: 1-D, starts at 0, monotone, ends at ``size``."""
    if not isinstance(offsets, np.ndarray) or offsets.ndim != 1 or offsets.shape[0] < 1:
        raise ValueError(f"{what}: the offsets must be a non-empty 1-D array")
    if offsets.dtype.kind not in "iu":
        raise ValueError(f"{what}: the offsets must be integers")
    if offsets.dtype.kind == "u" and offsets.dtype.itemsize == 8 and int(offsets.max()) >= 2**63:
        raise ValueError(f"{what}: an offset is out of range")
    off = offsets.astype(np.int64)
    if int(off[0]) != 0 or int(off[-1]) != size:
        raise ValueError(f"{what}: the offsets must start at 0 and end at {size}")
    if off.shape[0] > 1 and bool((np.diff(off) < 0).any()):
        raise ValueError(f"{what}: the offsets must be monotone")
    return off


# --- block-compressed strings -----------------------------------------------------


def _sample_dictionary(encoded: Sequence[bytes], size: int) -> bytes:
    """A preset dictionary: strings taken at an even stride, joined by the separator,
    the last ``size`` bytes (deflate prefers near matches: the end of the dictionary)."""
    if size <= 0 or not encoded:
        return b""
    total = sum(map(len, encoded)) + len(encoded)
    stride = max(1, total // size)
    picked = [encoded[i] for i in range(0, len(encoded), stride)]
    joined = bytes([SEPARATOR]).join(picked)
    return joined[-size:]


def encode_block_strings(
    strings: Sequence[str],
    block: int = DEFAULT_BLOCK,
    *,
    level: int = DEFAULT_LEVEL,
    dict_size: int | None = None,
) -> tuple[npt.NDArray[np.integer], U8]:
    """``(block_offsets, data)`` for :class:`BlockStringTable`.

    ``data[block_offsets[0]:block_offsets[1]]`` is the preset dictionary (raw bytes, may
    be empty); block ``b`` (strings ``b * block`` up to ``(b + 1) * block``) is the raw
    deflate stream ``data[block_offsets[b + 1]:block_offsets[b + 2]]`` of those strings'
    UTF-8 joined by ``0xFF``. So ``block_offsets`` has ``ceil(n / block) + 2`` entries
    (int32, or int64 past 2 GiB). The reader needs ``n`` and ``block`` besides the two
    arrays. ``dict_size`` defaults to ``min(32 KiB, raw bytes / 16)``; 0 disables it.
    Raises ValueError for a string that is not encodable as UTF-8 (a lone surrogate) or
    a bad ``block`` / ``level``.
    """
    if block < 1:
        raise ValueError("block must be at least 1")
    if not 0 <= level <= 9:
        raise ValueError("level must be 0..9")
    try:
        encoded = [s.encode("utf-8") for s in strings]
    except UnicodeEncodeError as exc:
        raise ValueError(f"strings must be encodable as UTF-8: {exc}") from None
    raw_total = sum(map(len, encoded))
    if dict_size is None:
        dict_size = min(ZDICT_MAX, raw_total // 16)
    if not 0 <= dict_size <= ZDICT_MAX:
        raise ValueError(f"dict_size must be 0..{ZDICT_MAX}")
    zdict = _sample_dictionary(encoded, dict_size)
    parts: list[bytes] = [zdict]
    sep = bytes([SEPARATOR])
    for lo in range(0, len(encoded), block):
        if zdict:
            comp = zlib.compressobj(level, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, zdict)
        else:
            comp = zlib.compressobj(level, zlib.DEFLATED, -15, 9)
        joined = sep.join(encoded[lo : lo + block])
        if len(joined) > MAX_BLOCK_BYTES:
            raise ValueError(
                f"strings {lo}..{lo + block - 1} take {len(joined)} bytes together, over "
                f"{MAX_BLOCK_BYTES} (a title of tens of KiB is not a title)"
            )
        parts.append(comp.compress(joined) + comp.flush())
    lengths = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    data = np.frombuffer(b"".join(parts), dtype=np.uint8)
    return _narrow_offsets(offsets), data


class BlockStringTable(Sequence[str]):
    """A read-only sequence of ``count`` strings over :func:`encode_block_strings` output.

    Construction checks only the cheap structure (``O(blocks)``): the offsets are 1-D
    integers, start at 0, are monotone, end at ``data``'s end, number
    ``ceil(count / block) + 2``, and the dictionary is at most 32 KiB. A block's content
    is checked when it is first decoded: a stream that does not inflate, is truncated
    or has trailing bytes, inflates past ``max_block_bytes``, splits into the wrong
    number of strings or holds invalid UTF-8 raises :class:`ValueError` from that access
    (and from every later access of the block: failures are not cached).
    :meth:`validate` decodes every block (for install time or tests).

    Decoded blocks are kept in an LRU cache of at most ``cache_blocks`` blocks, guarded
    by a lock (inflating happens outside the lock; two threads may both decode a block,
    harmlessly). The arrays may be read-only views of a bundle buffer: they are never
    copied or written.
    """

    __slots__ = (
        "_block",
        "_cache",
        "_cache_blocks",
        "_cache_sizes",
        "_cached_bytes",
        "_count",
        "_data",
        "_lock",
        "_max_block_bytes",
        "_offsets",
        "_zdict",
    )

    def __init__(
        self,
        block_offsets: npt.NDArray[np.integer],
        data: U8,
        *,
        count: int,
        block: int = DEFAULT_BLOCK,
        cache_blocks: int = DEFAULT_CACHE_BLOCKS,
        max_block_bytes: int = MAX_BLOCK_BYTES,
    ) -> None:
        if block < 1 or count < 0 or cache_blocks < 1 or max_block_bytes < 1:
            raise ValueError("block, cache_blocks and max_block_bytes must be positive, count >= 0")
        if not isinstance(data, np.ndarray) or data.ndim != 1 or data.dtype != np.uint8:
            raise ValueError("block strings: the data must be a 1-D uint8 array")
        offsets = _check_offsets(block_offsets, int(data.shape[0]), "block strings")
        n_blocks = -(-count // block)
        if offsets.shape[0] != n_blocks + 2:
            raise ValueError(
                f"block strings: {count} strings in blocks of {block} need "
                f"{n_blocks + 2} offsets, not {offsets.shape[0]}"
            )
        if int(offsets[1]) > ZDICT_MAX:
            raise ValueError("block strings: the dictionary is larger than 32 KiB")
        self._offsets = offsets
        self._data = data
        self._count = int(count)
        self._block = int(block)
        self._zdict = data[: int(offsets[1])].tobytes()
        self._cache: OrderedDict[int, tuple[str, ...]] = OrderedDict()
        self._cache_sizes: dict[int, int] = {}
        self._cached_bytes = 0
        self._cache_blocks = int(cache_blocks)
        self._max_block_bytes = int(max_block_bytes)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._count

    @property
    def block(self) -> int:
        """Strings per block."""
        return self._block

    @property
    def nbytes(self) -> int:
        """Bytes of the encoded arrays (not counting the cache)."""
        return int(self._offsets.nbytes + self._data.nbytes)

    def cached_blocks(self) -> int:
        """How many decoded blocks the cache holds now (at most ``cache_blocks``)."""
        with self._lock:
            return len(self._cache)

    def _expected(self, b: int) -> int:
        return min(self._block, self._count - b * self._block)

    def _decode(self, b: int) -> tuple[str, ...]:
        """Block ``b`` inflated, split and decoded (not cached); ValueError if corrupt."""
        lo, hi = int(self._offsets[b + 1]), int(self._offsets[b + 2])
        stream = self._data[lo:hi].tobytes()
        try:
            if self._zdict:
                inflater = zlib.decompressobj(-15, zdict=self._zdict)
            else:
                inflater = zlib.decompressobj(-15)
            raw = inflater.decompress(stream, self._max_block_bytes + 1)
        except zlib.error as exc:
            raise ValueError(f"block strings: block {b} does not inflate: {exc}") from None
        if len(raw) > self._max_block_bytes:
            raise ValueError(
                f"block strings: block {b} inflates past {self._max_block_bytes} bytes"
            )
        if not inflater.eof or inflater.unused_data or inflater.unconsumed_tail:
            raise ValueError(f"block strings: block {b} is truncated or has trailing bytes")
        parts = raw.split(bytes([SEPARATOR]))
        if len(parts) != self._expected(b):
            raise ValueError(
                f"block strings: block {b} holds {len(parts)} strings, not {self._expected(b)}"
            )
        try:
            return tuple(p.decode("utf-8") for p in parts)
        except UnicodeDecodeError:
            raise ValueError(f"block strings: block {b} is not valid UTF-8") from None

    def _get_block(self, b: int) -> tuple[str, ...]:
        with self._lock:
            hit = self._cache.get(b)
            if hit is not None:
                self._cache.move_to_end(b)
                return hit
        decoded = self._decode(b)
        size = sum(map(len, decoded))
        with self._lock:
            if b not in self._cache:
                self._cache[b] = decoded
                self._cache_sizes[b] = size
                self._cached_bytes += size
            self._cache.move_to_end(b)
            while len(self._cache) > 1 and (
                len(self._cache) > self._cache_blocks or self._cached_bytes > CACHE_BYTES
            ):
                old, _ = self._cache.popitem(last=False)
                self._cached_bytes -= self._cache_sizes.pop(old)
        return decoded

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._count))]
        i = int(index)
        if i < 0:
            i += self._count
        if not 0 <= i < self._count:
            raise IndexError(f"string {index} of {self._count}")
        b, k = divmod(i, self._block)
        return self._get_block(b)[k]

    def get_many(self, indices: Sequence[int] | npt.NDArray[np.integer]) -> list[str]:
        """The strings at ``indices`` (each block looked up once per call)."""
        blocks: dict[int, tuple[str, ...]] = {}
        out: list[str] = []
        for index in indices:
            i = int(index)
            if i < 0:
                i += self._count
            if not 0 <= i < self._count:
                raise IndexError(f"string {index} of {self._count}")
            b, k = divmod(i, self._block)
            got = blocks.get(b)
            if got is None:
                got = blocks[b] = self._get_block(b)
            out.append(got[k])
        return out

    def __iter__(self) -> Iterator[str]:
        for b in range(-(-self._count // self._block)):
            yield from self._decode(b)  # a full scan bypasses (and keeps) the cache

    def validate(self) -> None:
        """Decode every block (without caching); ValueError at the first corrupt one."""
        for b in range(-(-self._count // self._block)):
            self._decode(b)


# --- zig-zag ----------------------------------------------------------------------


def _zigzag(values: I64) -> U64:
    """Signed to unsigned: 0, -1, 1, -2, ... -> 0, 1, 2, 3, ..."""
    v = values.astype(np.int64)
    out: U64 = ((v << np.int64(1)) ^ (v >> np.int64(63))).view(np.uint64)
    return out


def _unzigzag(values: U64) -> I64:
    """The inverse of :func:`_zigzag` (for values below 2**63)."""
    v = values.astype(np.uint64)
    out: I64 = (v >> np.uint64(1)).view(np.int64) ^ -(v & np.uint64(1)).view(np.int64)
    return out


# --- bit-packed neighbour lists ---------------------------------------------------------

PACKED_FORMAT: Final = 1
"""The ``format`` parameter of :func:`encode_neighbours_packed` output."""
PACKED_BLOCK_ROWS: Final = 64
"""Rows per block of the two-level row offsets (a block's start bit as int64, each row's
start relative to its block as uint16, or uint32 when a block spans 64 KiB bits)."""
MAX_PACKED_BLOCK_ROWS: Final = 1 << 16
MAX_TARGET_WIDTH: Final = 40
"""Widest zig-zag target offset a packed row may use (catalogs below 2**39 items)."""
MAX_COUNT_BITS: Final = 32
MAX_ROW_ENTRIES: Final = 4096
"""The most neighbours one packed row may hold (the builder keeps 20 to 100): a signed
row claiming millions of one-bit entries would otherwise cost a request gigabytes."""
MAX_WIDTH_BITS: Final = 6
_PACKED_PARAMS: Final = frozenset({"format", "block_rows", "count_bits", "width_bits"})


def _bit_length(values: U64) -> I64:
    """Bits of each value (0 for 0); exact below 2**53."""
    return np.frexp(values.astype(np.float64))[1].astype(np.int64)


def _segment_cumsum_excl(values: I64, seg_start: I64, owner: I64) -> I64:
    """Exclusive running sum of ``values`` within consecutive segments (``owner`` sorted;
    ``seg_start[s]`` the first index of segment ``s``)."""
    run = np.zeros(values.size + 1, dtype=np.int64)
    np.cumsum(values, out=run[1:])
    out: I64 = run[:-1] - run[seg_start][owner]
    return out


def encode_neighbours_packed(
    indptr: npt.NDArray[np.integer],
    indices: npt.NDArray[np.integer],
    codes: U8,
    *,
    block_rows: int = PACKED_BLOCK_ROWS,
    chunk_rows: int = 1 << 20,
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """``(arrays, params)`` for :class:`PackedNeighbourStore`: a bit-packed encoding of
    the rows of a CSR neighbour graph (in their original order exactly,
    codes opaque bytes), about a third smaller on clustered catalogs.

    ``arrays``: ``payload`` (uint8, a bit stream, LSB first, plus 8 zero bytes of
    padding), ``block_bits`` (int64, ``ceil(n / block_rows) + 1``: the start bit of each
    block of ``block_rows`` rows, then the stream's length in bits) and ``row_bits``
    (uint16, or uint32 when a block spans 2**16 bits or more: each row's start bit
    relative to its block's). ``params``: ``format`` (1), ``block_rows``,
    ``count_bits`` (bits of a row's count) and ``width_bits`` (bits of a width field).

    A row with ``k`` entries is: ``k`` in ``count_bits`` bits; if ``k > 0``: ``tmode``
    (1 bit), ``ws`` (``width_bits``), if ``tmode`` ``wb`` (``width_bits``), ``cmode``
    (1 bit), if not ``cmode`` the first code (8 bits); if ``tmode`` one flag bit per
    entry (1: wide); each entry's ``zigzag(target - item)`` in ``ws`` bits (``wb`` for a
    flagged one); then the codes: with ``cmode`` 8 bits each, else (codes
    non-decreasing along the row) for each entry after the first its increase in unary
    (that many 0 bits, then a 1). A row ends exactly where its last field ends.
    Raises ValueError for malformed CSR input or a catalog of 2**39 items or more.
    """
    if not 1 <= block_rows <= MAX_PACKED_BLOCK_ROWS:
        raise ValueError(f"block_rows must be 1..{MAX_PACKED_BLOCK_ROWS}")
    ptr = np.asarray(indptr).astype(np.int64)
    idx = np.asarray(indices)
    cds = np.asarray(codes)
    if idx.size and idx.dtype.kind not in "iu":
        raise ValueError("neighbours: indices must be integers")
    if ptr.ndim != 1 or ptr.size < 1 or int(ptr[0]) != 0 or int(ptr[-1]) != idx.size:
        raise ValueError("neighbours: indptr must start at 0 and end at len(indices)")
    if idx.shape != cds.shape or cds.dtype != np.uint8:
        raise ValueError("neighbours: codes must be uint8, one per index")
    if ptr.size > 1 and bool((np.diff(ptr) < 0).any()):
        raise ValueError("neighbours: indptr must be monotone")
    n = ptr.size - 1
    if n >= 1 << (MAX_TARGET_WIDTH - 1):
        raise ValueError("neighbours: too many items for the packed encoding")
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError("neighbours: an index is out of range")
    counts = np.diff(ptr)
    if n and int(counts.max()) > MAX_ROW_ENTRIES:
        raise ValueError(f"neighbours: a row has more than {MAX_ROW_ENTRIES} entries")
    count_bits = int(_bit_length(np.array([counts.max() if n else 0], np.uint64))[0])
    step = max(block_rows, (chunk_rows // block_rows) * block_rows)
    chunks = [(lo, min(n, lo + step)) for lo in range(0, n, step)] or [(0, 0)]
    b_max = 0
    for lo, hi in chunks:  # the widest target offset decides the width field's bits
        part = idx[int(ptr[lo]) : int(ptr[hi])].astype(np.int64)
        if part.size:
            rows = np.repeat(np.arange(lo, hi, dtype=np.int64), counts[lo:hi])
            b_max = max(b_max, int(_bit_length(_zigzag(part - rows)).max()))
    width_bits = max(1, int(_bit_length(np.array([b_max], np.uint64))[0]))
    pieces: list[tuple[int, U64, int]] = []
    block_parts: list[I64] = []
    rel_parts: list[I64] = []
    bit_base = 0
    for lo, hi in chunks:
        a, b = int(ptr[lo]), int(ptr[hi])
        words_c, total_c, block_c, rel_c = _encode_packed_rows(
            ptr[lo : hi + 1] - a,
            idx[a:b].astype(np.int64),
            cds[a:b],
            lo,
            count_bits,
            width_bits,
            block_rows,
        )
        pieces.append((bit_base, words_c, total_c))
        block_parts.append(block_c + bit_base)
        rel_parts.append(rel_c)
        bit_base += total_c
    total = bit_base
    n_bytes = (total >> 3) + 8
    words = np.zeros(n_bytes // 8 + 4, dtype=np.uint64)
    for base, words_c, total_c in pieces:
        _or_bits(words, words_c[: (total_c >> 6) + 1], base)
    payload = words.astype("<u8").view(np.uint8)[:n_bytes].copy()
    block_bits = np.concatenate([*block_parts, np.array([total], np.int64)])
    rel = np.concatenate(rel_parts) if rel_parts else np.zeros(0, np.int64)
    if rel.size and int(rel.max()) >= 1 << 32:
        raise ValueError("neighbours: a block of rows spans 2**32 bits or more")
    row_bits = (
        rel.astype(np.uint16)
        if (rel.size == 0 or int(rel.max()) < 1 << 16)
        else rel.astype(np.uint32)
    )
    arrays: dict[str, np.ndarray] = {
        "payload": payload,
        "block_bits": block_bits,
        "row_bits": row_bits,
    }
    params = {
        "format": PACKED_FORMAT,
        "block_rows": int(block_rows),
        "count_bits": count_bits,
        "width_bits": width_bits,
    }
    return arrays, params


def _or_bits(dst: U64, src: U64, offset: int) -> None:
    """OR the bit stream ``src`` (LSB first in each word) into ``dst`` at bit ``offset``."""
    k, sh = offset >> 6, offset & 63
    m = src.size
    if sh == 0:
        dst[k : k + m] |= src
        return
    dst[k : k + m] |= src << np.uint64(sh)
    dst[k + 1 : k + 1 + m] |= src >> np.uint64(64 - sh)


def _encode_packed_rows(
    ptr: I64,
    idx: I64,
    cds: U8,
    row_base: int,
    count_bits: int,
    width_bits: int,
    block_rows: int,
) -> tuple[U64, int, I64, I64]:
    """Rows ``row_base ..`` (``ptr`` rebased to 0, ``row_base`` a multiple of
    ``block_rows``) as a bit stream from bit 0: ``(words, total bits, block starts,
    row starts relative to their block)``."""
    n = ptr.size - 1
    counts = np.diff(ptr)
    row_of = np.repeat(np.arange(n, dtype=np.int64), counts)
    local = np.arange(idx.size, dtype=np.int64) - ptr[:-1][row_of]
    nonempty = counts > 0
    heads = ptr[:-1][nonempty]  # first entry of each non-empty row
    z = _zigzag(idx - (row_of + row_base))
    b = _bit_length(z)
    # targets: one width (tmode 0) or two with a flag per entry (tmode 1), per row the
    # cheapest; the narrow width is best at one of the row's own bit lengths
    wmax = np.zeros(n, dtype=np.int64)
    tmode = np.zeros(n, dtype=np.int64)
    ws = np.zeros(n, dtype=np.int64)
    if idx.size:
        wmax[nonempty] = np.maximum.reduceat(b, heads)
        sorted_b = np.sort(row_of * 64 + b) & 63  # each row's bit lengths, ascending
        k_e = counts[row_of]
        cost = (local + 1) * sorted_b + (k_e - local - 1) * wmax[row_of]
        best = np.minimum.reduceat(cost * 64 + sorted_b, heads)
        two_cost = counts[nonempty] + width_bits + (best >> 6)
        one_cost = counts[nonempty] * wmax[nonempty]
        use_two = two_cost < one_cost
        tmode[nonempty] = use_two
        ws[nonempty] = np.where(use_two, best & 63, wmax[nonempty])
    wide = (b > ws[row_of]) if idx.size else np.zeros(0, np.bool_)
    width = np.where(wide, wmax[row_of], ws[row_of])
    # codes: unary increases when non-decreasing and no longer than 8 bits each
    code = cds.astype(np.int64)
    first_code = np.zeros(n, dtype=np.int64)
    first_code[nonempty] = code[heads]
    step = np.zeros(idx.size, dtype=np.int64)
    if idx.size > 1:
        step[1:] = code[1:] - code[:-1]
    step[heads] = 0
    cmode = np.zeros(n, dtype=np.int64)
    unary_len = np.zeros(n, dtype=np.int64)
    if idx.size:
        falls = np.bincount(row_of[step < 0], minlength=n)
        last_code = code[ptr[1:][nonempty] - 1]
        unary_len[nonempty] = counts[nonempty] - 1 + last_code - code[heads]
        cmode = (nonempty & ((falls > 0) | (8 + unary_len > 8 * counts))).astype(np.int64)
    # row lengths and starts
    hdr_len = np.where(
        nonempty, count_bits + 2 + width_bits * (1 + tmode) + 8 * (1 - cmode), count_bits
    )
    sum_w = np.bincount(row_of, weights=width, minlength=n).astype(np.int64)
    code_len = np.where(cmode == 1, 8 * counts, unary_len)
    row_len = hdr_len + tmode * counts + sum_w + code_len
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(row_len, out=starts[1:])
    total = int(starts[-1])
    # the header of each row as one field (at most 54 bits)
    hv = counts.astype(np.uint64)
    sh = np.full(n, count_bits, dtype=np.int64)
    for val, w, on in (
        (tmode, 1, nonempty),
        (ws, width_bits, nonempty),
        (wmax, width_bits, nonempty & (tmode == 1)),
        (cmode, 1, nonempty),
        (first_code, 8, nonempty & (cmode == 0)),
    ):
        hv |= np.where(on, val, 0).astype(np.uint64) << sh.astype(np.uint64)
        sh += np.where(on, w, 0)
    flag_start = starts[:-1] + hdr_len
    value_start = flag_start + tmode * counts
    code_start = value_start + sum_w
    pos_parts = [starts[:-1]]
    val_parts = [hv]
    wid_parts = [hdr_len]
    flagged = np.flatnonzero(wide)
    pos_parts.append(flag_start[row_of[flagged]] + local[flagged])
    val_parts.append(np.ones(flagged.size, np.uint64))
    wid_parts.append(np.ones(flagged.size, np.int64))
    ent_pos = value_start[row_of] + _segment_cumsum_excl(width, ptr[:-1], row_of)
    nz = np.flatnonzero(z)
    pos_parts.append(ent_pos[nz])
    val_parts.append(z[nz])
    wid_parts.append(width[nz])
    raw = cmode[row_of] == 1
    unary = ~raw & (local > 0)
    ones_end = np.zeros(idx.size, dtype=np.int64)
    step1 = np.where(unary, step + 1, 0)
    ones_end = code_start[row_of] + _segment_cumsum_excl(step1, ptr[:-1], row_of) + step1 - 1
    u_at = np.flatnonzero(unary)
    pos_parts.append(ones_end[u_at])
    val_parts.append(np.ones(u_at.size, np.uint64))
    wid_parts.append(np.ones(u_at.size, np.int64))
    r_at = np.flatnonzero(raw & (code > 0))
    pos_parts.append(code_start[row_of[r_at]] + 8 * local[r_at])
    val_parts.append(code[r_at].astype(np.uint64))
    wid_parts.append(np.full(r_at.size, 8, np.int64))
    pos = np.concatenate(pos_parts)
    vals = np.concatenate(val_parts)
    wids = np.concatenate(wid_parts)
    keep = vals != 0
    pos, vals, wids = pos[keep], vals[keep], wids[keep]
    n_bytes = (total >> 3) + 8
    words = np.zeros(n_bytes // 8 + 2, dtype=np.uint64)
    off = (pos & 63).astype(np.uint64)
    np.bitwise_or.at(words, pos >> 6, vals << off)
    spill = np.flatnonzero((pos & 63) + wids > 64)
    np.bitwise_or.at(words, (pos[spill] >> 6) + 1, vals[spill] >> (np.uint64(64) - off[spill]))
    n_blocks = -(-n // block_rows)
    block_bits = np.asarray(starts[:-1][::block_rows], dtype=np.int64)[:n_blocks]
    rel = starts[:-1] - np.repeat(block_bits, block_rows)[:n]
    return words, total, block_bits, rel


def _as_int_param(params: Mapping[str, int], key: str, lo: int, hi: int) -> int:
    try:
        value = operator.index(params[key])
    except (KeyError, TypeError):
        raise ValueError(f"neighbours: parameter {key!r} is missing or not an integer") from None
    if not lo <= value <= hi:
        raise ValueError(f"neighbours: parameter {key!r} must be {lo}..{hi}, not {value}")
    return int(value)


def _check_items(items: npt.NDArray[np.integer] | Sequence[int], n: int) -> I64:
    it = np.asarray(items)
    if it.ndim != 1 or (it.size and it.dtype.kind not in "iu"):
        raise IndexError("items must be a 1-D array of integers")
    if it.size and it.dtype.kind == "u" and int(it.max()) >= n:
        raise IndexError(f"an item is outside [0, {n})")
    it = it.astype(np.int64)
    if it.size and (int(it.min()) < 0 or int(it.max()) >= n):
        raise IndexError(f"an item is outside [0, {n})")
    return it


class RowReader:
    """The reader API neighbour-row codecs share over their ``_decode_rows`` (the
    bit-packed store here, the varint baseline in ``benchmarks/_varint_neighbours.py``):
    ``_n`` rows, each decoded to ``(targets, codes)``."""

    __slots__ = ()
    _n: int

    def _decode_rows(self, items: I64) -> tuple[I64, I64, U8]:
        raise NotImplementedError

    def gather(self, items: npt.NDArray[np.integer] | Sequence[int]) -> tuple[I64, I64, U8]:
        """``(owner, targets, codes)`` of the rows of ``items``, concatenated: for each
        requested item in turn its row in its original order; ``owner[j]`` is the position
        in ``items`` of entry ``j``'s row. IndexError for an item outside ``[0, n)``,
        ValueError for a corrupt row."""
        return self._decode_rows(_check_items(items, self._n))

    def row(self, item: int) -> tuple[I64, U8]:
        """``(targets, codes)`` of one item's row, in its original order."""
        _, targets, codes = self.gather(np.array([item], dtype=np.int64))
        return targets, codes

    def validate(self, chunk: int = 1 << 16) -> None:
        """Decode every row, ``chunk`` rows at a time; ValueError at a corrupt one."""
        for lo in range(0, self._n, chunk):
            self._decode_rows(np.arange(lo, min(lo + chunk, self._n), dtype=np.int64))



class PackedNeighbourStore(RowReader):
    """Neighbour lists of ``n_items`` items over :func:`encode_neighbours_packed` output,
    with the reader API of the varint baseline in ``benchmarks/_varint_neighbours.py``.

    Construction checks the parameters (known keys, each in its range) and the cheap
    structure in ``O(n)``: the payload is 1-D uint8 and exactly 8 bytes longer than the
    stream, the block starts run from 0, monotone, to the stream's length, every block's
    first row starts at its block and row starts never decrease. Rows are checked as they
    are decoded: a header or field that runs past its row, a width over
    :data:`MAX_TARGET_WIDTH`, a count the row's bits cannot hold, a unary code section
    with the wrong number of ones or trailing zeros, a code over 255 or a target outside
    ``[0, n_items)`` raises :class:`ValueError`. Every read stays inside the arrays
    (fields are read as 8-byte windows, never past the padding). Immutable; thread-safe.
    """

    __slots__ = ("_base", "_block", "_cb", "_n", "_payload", "_rel", "_total", "_wb", "_windows")

    def __init__(
        self, arrays: Mapping[str, np.ndarray], params: Mapping[str, int], n_items: int
    ) -> None:
        n_items = operator.index(n_items)
        if n_items < 0 or n_items >= 1 << (MAX_TARGET_WIDTH - 1):
            raise ValueError("neighbours: n_items is out of range")
        if set(params) != _PACKED_PARAMS:
            raise ValueError(f"neighbours: the parameters must be {sorted(_PACKED_PARAMS)}")
        _as_int_param(params, "format", PACKED_FORMAT, PACKED_FORMAT)
        block = _as_int_param(params, "block_rows", 1, MAX_PACKED_BLOCK_ROWS)
        cb = _as_int_param(params, "count_bits", 0, MAX_COUNT_BITS)
        wb = _as_int_param(params, "width_bits", 1, MAX_WIDTH_BITS)
        if set(arrays) != {"payload", "block_bits", "row_bits"}:
            raise ValueError("neighbours: the arrays must be payload, block_bits and row_bits")
        payload, base, rel = arrays["payload"], arrays["block_bits"], arrays["row_bits"]
        if not isinstance(payload, np.ndarray) or payload.ndim != 1 or payload.dtype != np.uint8:
            raise ValueError("neighbours: the payload must be a 1-D uint8 array")
        if payload.size < 8:
            raise ValueError("neighbours: the payload is shorter than its padding")
        if (
            not isinstance(rel, np.ndarray)
            or rel.ndim != 1
            or rel.dtype
            not in (
                np.dtype(np.uint16),
                np.dtype(np.uint32),
            )
        ):
            raise ValueError("neighbours: row_bits must be a 1-D uint16 or uint32 array")
        if rel.shape[0] != n_items:
            raise ValueError(f"neighbours: {n_items} items need {n_items} row starts")
        if not isinstance(base, np.ndarray) or base.ndim != 1 or base.dtype.kind not in "iu":
            raise ValueError("neighbours: block_bits must be a 1-D integer array")
        n_blocks = -(-n_items // block)
        if base.shape[0] != n_blocks + 1:
            raise ValueError(f"neighbours: {n_blocks} blocks need {n_blocks + 1} block starts")
        if base.dtype == np.uint64 and int(base.max()) >= 2**62:
            raise ValueError("neighbours: a block start is out of range")
        base64 = base.astype(np.int64, copy=False)
        total = int(base64[-1])
        if int(base64[0]) != 0 or total < 0 or (total >> 3) + 8 != payload.size:
            raise ValueError("neighbours: the block starts must run from 0 to the stream's end")
        if n_blocks and bool((base64[1:] < base64[:-1]).any()):
            raise ValueError("neighbours: the block starts must be monotone")
        if n_items:
            if bool(rel[::block].any()):
                raise ValueError("neighbours: a block's first row must start at the block")
            starts = np.repeat(base64[:-1], block)[:n_items] + rel
            if bool((starts[1:] < starts[:-1]).any()) or int(starts[-1]) > total:
                raise ValueError("neighbours: the row starts must be monotone")
            # a block's last row must end at the next block's start or later (implied above)
        self._payload = np.ascontiguousarray(payload)
        self._windows: U64 = np.ndarray(
            (self._payload.size - 7,), dtype="<u8", buffer=self._payload, strides=(1,)
        )
        self._base = base64
        self._rel = rel
        self._total = total
        self._block = block
        self._cb = cb
        self._wb = wb
        self._n = int(n_items)

    def __len__(self) -> int:
        return self._n

    @property
    def nbytes(self) -> int:
        """Bytes of the encoded arrays."""
        return int(self._payload.nbytes + self._base.nbytes + self._rel.nbytes)

    def _bits(self, pos: I64, width: I64 | int) -> U64:
        """The ``width``-bit fields at bit positions ``pos`` (each ``pos`` at most the
        stream's length, ``width`` at most 57)."""
        w = np.asarray(width, dtype=np.uint64)
        got: U64 = (self._windows[pos >> 3] >> (pos & 7).astype(np.uint64)) & (
            (np.uint64(1) << w) - np.uint64(1)
        )
        return got

    def _decode_rows(self, items: I64) -> tuple[I64, I64, U8]:
        m = items.size
        if m == 0:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.uint8)
        n, blk, cb, wbits = self._n, self._block, self._cb, self._wb
        start = self._base[items // blk] + self._rel[items]
        nxt = items + 1
        end = np.where(
            nxt < n,
            self._base[np.minimum(nxt, n - 1) // blk] + self._rel[np.minimum(nxt, n - 1)],
            self._total,
        )
        length = end - start
        head = self._windows[start >> 3] >> (start & 7).astype(np.uint64)
        cbu, wbu = np.uint64(cb), np.uint64(wbits)
        wmask = np.uint64((1 << wbits) - 1)
        count = (head & np.uint64((1 << cb) - 1)).astype(np.int64)
        full = count > 0
        tm = ((head >> cbu) & np.uint64(1)).astype(np.int64) * full
        ws = ((head >> (cbu + np.uint64(1))) & wmask).astype(np.int64)
        wb = np.where(tm == 1, ((head >> (cbu + np.uint64(1) + wbu)) & wmask).astype(np.int64), ws)
        p = (cb + 1 + wbits * (1 + tm)).astype(np.uint64)
        cm = ((head >> p) & np.uint64(1)).astype(np.int64)
        first = ((head >> (p + np.uint64(1))) & np.uint64(255)).astype(np.int64)
        hdr = np.where(full, p.astype(np.int64) + 1 + 8 * (1 - cm), cb)
        if bool((hdr > length).any()):
            raise ValueError("neighbours: a row is shorter than its header")
        if bool((~full & (length != cb)).any()):
            raise ValueError("neighbours: an empty row has bits after its count")
        if bool((count > MAX_ROW_ENTRIES).any()):
            raise ValueError(f"neighbours: a row has more than {MAX_ROW_ENTRIES} entries")
        # widest legal row: flags, 40-bit targets, 8-bit codes, or unary steps (<= 255 + k)
        if bool((length > hdr + count * (2 + MAX_TARGET_WIDTH + 8) + 256).any()):
            raise ValueError("neighbours: a row is longer than its entries can be")
        if bool((ws > MAX_TARGET_WIDTH).any() or (wb > MAX_TARGET_WIDTH).any()):
            raise ValueError(f"neighbours: a target width is over {MAX_TARGET_WIDTH}")
        if bool((count > length - hdr + 1).any()):
            raise ValueError("neighbours: a row's count exceeds its bits")
        flag_start = start + hdr
        value_start = flag_start + tm * count
        if bool((value_start > end).any()):
            raise ValueError("neighbours: a row's flags run past its end")
        total = int(count.sum())
        row_first = np.zeros(m + 1, dtype=np.int64)
        np.cumsum(count, out=row_first[1:])
        owner = np.repeat(np.arange(m, dtype=np.int64), count)
        local = np.arange(total, dtype=np.int64) - row_first[:-1][owner]
        width = ws[owner]
        flagged_rows = tm[owner] == 1
        if bool(flagged_rows.any()):
            fe = np.flatnonzero(flagged_rows)
            fpos = flag_start[owner[fe]] + local[fe]
            flag = self._bits(fpos, 1).astype(np.bool_)
            width[fe[flag]] = wb[owner[fe[flag]]]
        run = np.zeros(total + 1, dtype=np.int64)
        np.cumsum(width, out=run[1:])
        value_end = value_start + run[row_first[1:]] - run[row_first[:-1]]
        if bool((value_end > end).any()):
            raise ValueError("neighbours: a row's targets run past its end")
        vpos = value_start[owner] + run[:-1] - run[row_first[:-1]][owner]
        targets = items[owner] + _unzigzag(self._bits(vpos, width))
        if total and (int(targets.min()) < 0 or int(targets.max()) >= n):
            raise ValueError("neighbours: a target is outside the catalog")
        # codes
        code_len = end - value_end
        codes = np.empty(total, dtype=np.int64)
        raw_row = full & (cm == 1)
        if bool(raw_row.any()):
            if bool((code_len[raw_row] != 8 * count[raw_row]).any()):
                raise ValueError("neighbours: a row's raw codes do not fill its end")
            re = np.flatnonzero(raw_row[owner])
            codes[re] = self._bits(value_end[owner[re]] + 8 * local[re], 8).astype(np.int64)
        un_row = full & (cm == 0)
        if bool(un_row.any()):
            ur = np.flatnonzero(un_row)
            lens = code_len[ur]
            if bool((lens < count[ur] - 1).any()):
                raise ValueError("neighbours: a row's unary codes are too short")
            bit_first = np.zeros(ur.size + 1, dtype=np.int64)
            np.cumsum(lens, out=bit_first[1:])
            nb = int(bit_first[-1])
            bit_owner = np.repeat(np.arange(ur.size, dtype=np.int64), lens)
            bpos = (
                value_end[ur][bit_owner] + np.arange(nb, dtype=np.int64) - bit_first[:-1][bit_owner]
            )
            bits = (self._payload[bpos >> 3] >> (bpos & 7).astype(np.uint8)) & 1
            ones = np.flatnonzero(bits)
            per_row = np.bincount(bit_owner[ones], minlength=ur.size)
            if not np.array_equal(per_row, count[ur] - 1):
                raise ValueError("neighbours: a row's unary codes do not match its count")
            nonempty = lens > 0
            if bool((bits[bit_first[1:][nonempty] - 1] == 0).any()):
                raise ValueError("neighbours: a row's unary codes end with zeros")
            ue = np.flatnonzero(un_row[owner])
            codes[ue] = first[owner[ue]]
            later = ue[local[ue] > 0]  # in entry order, as the ones are
            one_owner = bit_owner[ones]
            rel_pos = ones - bit_first[:-1][one_owner]
            rank = np.arange(ones.size, dtype=np.int64) - np.searchsorted(one_owner, one_owner)
            codes[later] = first[ur][one_owner] + rel_pos - rank
        if total and int(codes.max()) > 255:
            raise ValueError("neighbours: a code is over 255")
        return owner, targets, codes.astype(np.uint8)
