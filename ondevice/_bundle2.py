"""The compact encodings of bundle format version 2, shared by the writer and the reader.

Format 2 keeps format 1's container (prefix, JSON header, 64-byte aligned array region,
Ed25519 signature) and changes three things:

- **No per-item data in the header.** Item ids, titles and category lists are string
  tables: an offset array over one UTF-8 blob (:class:`StringTable`), decoded one string
  at a time when used. Ids are found by binary search through ``item_id_order`` (the
  permutation that sorts them by their UTF-8 bytes), so opening a catalog never builds a
  dictionary of every id.
- **Compact arrays.** Item factors are int8 with one float32 scale per item
  (:func:`quantize_rows`); neighbour weights are one byte each, an index into a signed
  256-entry table of weights (:func:`encode_weights`); neighbour and category indices
  take the narrowest unsigned type their range allows.
- **Chunked verification.** The signature covers a table of SHA-256 digests, one per
  :data:`CHUNK_SIZE` bytes of everything before the table. The device reads the file
  into private memory chunk by chunk, on as many threads as :data:`VERIFY_THREADS`,
  checks each chunk against the table as it arrives, and uses no byte before every
  chunk has passed.
"""

from __future__ import annotations

import bisect
import itertools
import math
import operator
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, NamedTuple, overload

import numpy as np
import numpy.typing as npt

from ondevice.errors import BundleError

CHUNK_SIZE: Final = 1 << 20
"""Bytes per verified chunk (the last one may be shorter)."""
DIGEST_SIZE: Final = 32
"""SHA-256 digest bytes per chunk in the chunk table."""
VERIFY_THREADS: Final = 2
"""Threads that read and hash chunks (``hashlib`` and ``os.preadv`` release the GIL)."""
WEIGHT_CODES: Final = 256
"""Entries in a weight table: one byte per neighbour weight."""
WEIGHT_STEP: Final = 1.0 / 32.0
"""Log-spacing of the writer's weight table: code ``q`` is ``w_max * exp(-q * step)``, a
relative error of at most ``exp(step / 2) - 1`` (1.6%) down to ``w_max * 3.4e-4``."""

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]


def narrow_unsigned(limit: int) -> np.dtype[Any]:
    """The narrowest little-endian unsigned dtype that holds ``0 .. limit - 1``."""
    for dtype in ("<u2", "<u4"):
        if limit <= np.iinfo(np.dtype(dtype)).max + 1:
            return np.dtype(dtype)
    return np.dtype("<u8")


def narrow_offsets(total: int) -> np.dtype[Any]:
    """The dtype of an offset array whose last entry is ``total``: int32 or int64 (signed,
    so that arithmetic with numpy's default int64 stays integral)."""
    return np.dtype("<i4") if total < 2**31 else np.dtype("<i8")


# --- item factors ---------------------------------------------------------------


def quantize_rows(factors: npt.NDArray[np.floating]) -> tuple[npt.NDArray[np.int8], F32]:
    """int8 codes and one scale per row: ``row ~= codes * scale``, with ``scale =
    max|row| / 127``, so each component is off by at most ``scale / 2``."""
    n = factors.shape[0]
    codes = np.empty(factors.shape, dtype=np.int8)
    scale = np.empty(n, dtype=np.float32)
    for lo in range(0, n, 1 << 16):  # row blocks: float64 scratch stays small at 10M rows
        y = np.asarray(factors[lo : lo + (1 << 16)], dtype=np.float64)
        peak = np.abs(y).max(axis=1) if y.size else np.zeros(y.shape[0])
        scale[lo : lo + (1 << 16)] = (peak / 127.0).astype(np.float32)
        s = scale[lo : lo + (1 << 16)]
        safe = np.where(s > 0, s.astype(np.float64), 1.0)
        codes[lo : lo + (1 << 16)] = np.clip(np.rint(y / safe[:, None]), -127, 127)
    return codes, scale


def dequantize_rows(codes: npt.NDArray[np.int8], scale: F32) -> F32:
    """The float32 factors that ``codes`` and ``scale`` stand for."""
    out: F32 = codes.astype(np.float32)
    out *= scale[:, None]
    return out


# --- neighbour weights ----------------------------------------------------------


def weight_table(w_max: float, step: float = WEIGHT_STEP) -> F32:
    """The writer's 256 weights: ``w_max * exp(-q * step)``, strictly descending."""
    table: F32 = (w_max * np.exp(-np.arange(WEIGHT_CODES) * step)).astype(np.float32)
    return table


def encode_weights(weights: npt.NDArray[np.floating]) -> tuple[U8, F32]:
    """One byte per weight (the nearest entry of :func:`weight_table` in log space) and the
    table. The table spans the weights actually present: from the largest down to the
    smallest positive one in 255 equal log steps, never coarser than
    :data:`WEIGHT_STEP` (at most 1.6% off; 0.8% for weights spanning 4 e-folds, as
    co-occurrence cosines do). Weights must be finite and not negative; the largest maps
    to code 0 exactly, and zero (which no writer of neighbour lists should emit) to the
    smallest entry."""
    w = np.asarray(weights)
    if w.size == 0 or float(w.max()) <= 0:
        return np.zeros(w.size, np.uint8), weight_table(1.0)
    w_max = float(w.max())
    w_min = float(np.min(w, where=w > 0, initial=w_max))
    step = min(WEIGHT_STEP, max(math.log(w_max / w_min) / (WEIGHT_CODES - 1), 1e-6))
    table = weight_table(w_max, step)
    if not (np.diff(table) < 0).all():  # float32 rounding merged entries: the fixed grid
        step = WEIGHT_STEP
        table = weight_table(w_max, step)
    codes = np.empty(w.size, dtype=np.uint8)
    for lo in range(0, w.size, 1 << 24):  # bounded scratch: 200M weights at 10M items
        with np.errstate(divide="ignore"):  # a zero weight takes the smallest code
            q = np.rint(np.log(w_max / w[lo : lo + (1 << 24)]) / step)
        codes[lo : lo + (1 << 24)] = np.clip(q, 0, WEIGHT_CODES - 1)
    return codes, table


def check_weight_table(table: F32, where: str) -> None:
    """A decoding table must be 256 finite, positive, strictly descending weights."""
    if table.shape != (WEIGHT_CODES,) or not np.isfinite(table).all():
        raise BundleError(f"{where}: the weight table must hold {WEIGHT_CODES} finite numbers")
    if not (table > 0).all() or not (np.diff(table) < 0).all():
        raise BundleError(f"{where}: the weight table must be positive and strictly descending")


# --- string tables --------------------------------------------------------------


def encode_strings(strings: Sequence[str]) -> tuple[npt.NDArray[np.integer], U8]:
    """``(offsets[n + 1], utf8_blob)``: string ``i`` is ``blob[offsets[i]:offsets[i+1]]``."""
    try:
        encoded = [s.encode("utf-8") for s in strings]
    except UnicodeEncodeError as exc:
        raise BundleError(
            f"strings must be encodable as UTF-8 (no lone surrogates): {exc}"
        ) from None
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    return offsets.astype(narrow_offsets(int(offsets[-1]))), blob


def common_prefix(strings: Sequence[str]) -> str:
    """The longest prefix every string shares (``""`` for none or no strings)."""
    if not strings:
        return ""
    lo, hi = min(strings), max(strings)  # the prefix of the extremes is everyone's
    n = 0
    while n < min(len(lo), len(hi)) and lo[n] == hi[n]:
        n += 1
    return lo[:n]


def byte_order(strings: Sequence[str]) -> npt.NDArray[np.int32]:
    """The permutation that sorts ``strings`` by their UTF-8 bytes (code point order)."""
    return np.asarray(sorted(range(len(strings)), key=strings.__getitem__), dtype=np.int32)


class StringTable(Sequence[str]):
    """A read-only sequence of strings over an offset array and one UTF-8 blob.

    Strings are decoded when indexed, never all at once. Construction checks that the
    offsets are monotone and inside the blob, that the blob is valid UTF-8 and that no
    string starts inside a multi-byte character, so indexing never fails.
    With an ``order`` (the permutation sorting the strings by their bytes),
    :meth:`find` locates a string in ``O(log n)``. ``prefix`` is the part every string
    shares, stored once (ids such as ``sku-...``): string ``i`` is ``prefix`` followed
    by its bytes in the blob.
    """

    __slots__ = ("_blob", "_memo", "_offsets", "_order", "_prefix", "_raw")

    def __init__(
        self,
        offsets: npt.NDArray[np.integer],
        blob: U8,
        *,
        order: npt.NDArray[np.integer] | None = None,
        what: str = "strings",
        prefix: str = "",
    ) -> None:
        n = offsets.shape[0] - 1
        if offsets.ndim != 1 or n < 0 or (n >= 0 and offsets[0] != 0):
            raise BundleError(f"{what}: the offsets must start at 0")
        if (
            int(offsets[-1]) != blob.shape[0]
            or int(offsets.min()) < 0
            or int(offsets.max()) > blob.shape[0]  # all in range first: diff cannot wrap
            or (n > 0 and (np.diff(offsets) < 0).any())
        ):
            raise BundleError(f"{what}: the offsets must be monotone and end at the blob's end")
        raw = blob.tobytes()  # kept: slicing bytes is 3x faster than slicing the array
        if blob.size and int(blob.max()) >= 0x80:  # ASCII (ids, mostly) is UTF-8 as it is
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                raise BundleError(f"{what}: the strings are not valid UTF-8") from None
            starts = offsets[:-1][np.diff(offsets) > 0]
            if starts.size and ((blob[starts] & 0xC0) == 0x80).any():
                raise BundleError(f"{what}: a string starts inside a multi-byte character")
        if order is not None:
            # Strings strictly increasing in ``order`` are distinct, so its n in-range
            # values are too: a permutation. The one-pass permutation check (0.1 s at 10M
            # items) only runs to name what failed.
            in_range = order.shape == (n,) and (
                n == 0 or (int(order.min()) >= 0 and int(order.max()) < n)
            )
            if not in_range or not strictly_increasing(offsets, blob, order):
                if not is_permutation(order, n):
                    raise BundleError(f"{what}: the sort order is not a permutation")
                raise BundleError(f"{what}: not unique, or not sorted by their bytes")
        self._offsets = offsets
        self._blob = blob
        self._raw = raw
        self._order = order
        #: strings decoded lately, by index: a request shows the same popular items'
        #: ids and titles again and again (bounded; cleared whole when full)
        self._memo: dict[int, str] = {}
        try:
            self._prefix = prefix.encode("utf-8")
        except UnicodeEncodeError:
            raise BundleError(f"{what}: the shared prefix is not unicode text") from None

    def __len__(self) -> int:
        return int(self._offsets.shape[0]) - 1

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = operator.index(index)
        memo = self._memo
        found = memo.get(i)
        if found is None:
            found = (self._prefix + self._bytes(i)).decode("utf-8")
            if len(memo) >= _STRING_MEMO:
                memo.clear()
            memo[i] = found
        return found

    def _bytes(self, index: int) -> bytes:
        n = self._offsets.shape[0] - 1
        i = operator.index(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"string {index} of {n}")
        offsets = self._offsets  # .item: a Python int, no numpy scalar (2x faster)
        return self._raw[offsets.item(i) : offsets.item(i + 1)]

    def __iter__(self) -> Iterator[str]:
        # a block of offsets at a time, decoded without the per-index checks of
        # __getitem__: 100k ids in about 40 ms instead of 200 (ItemIndex builds its
        # dictionary this way at every open)
        raw, prefix, n = self._raw, self._prefix, len(self)
        for lo in range(0, n, _ITER_BLOCK):
            off = self._offsets[lo : min(lo + _ITER_BLOCK, n) + 1].tolist()
            yield from [(prefix + raw[a:b]).decode("utf-8") for a, b in itertools.pairwise(off)]

    def find(self, value: str) -> int | None:
        """The index of ``value``, or None; needs the sort ``order``."""
        if self._order is None:
            raise TypeError("this string table has no sort order")
        try:
            key = value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: no stored string can equal it
            return None
        if not key.startswith(self._prefix):
            return None
        key = key[len(self._prefix) :]
        order = self._order
        pos = bisect.bisect_left(range(len(self)), key, key=lambda j: self._bytes(int(order[j])))
        if pos < len(self):
            found = int(order[pos])
            if self._bytes(found) == key:
                return found
        return None

    @property
    def nbytes(self) -> int:
        """Bytes held by the blob and the offsets (and the order)."""
        extra = len(self._prefix) + (0 if self._order is None else int(self._order.nbytes))
        extra += len(self._raw)
        return int(self._blob.nbytes + self._offsets.nbytes) + extra


_STRING_MEMO = 1 << 12
"""Decoded strings a :class:`StringTable` remembers (by index) before it starts over."""
_ITER_BLOCK = 1 << 14
"""Strings decoded at a time when a :class:`StringTable` is iterated."""

POPULAR_PREFIX = 1 << 16
"""A format 2 bundle ships the head of the popularity ranking, at most this many items
(every ranking falls back on it; no request excludes 65,536 items)."""

LARGE_ITEMS = 1 << 18
"""From this many items (262,144) the writer stores titles as deflated blocks and
neighbour lists as bit-packed rows (:mod:`ondevice._codecs`): a third of the bytes, decoded
per request. Smaller catalogs keep the plain tables, decoded at load in milliseconds."""

INDEX_DICT_LIMIT = 1 << 18
"""Catalogs of at most this many items get a dictionary of every id (built in tens of ms,
a lookup in well under a microsecond); larger format 2 catalogs are searched in their
sorted id table instead, with the ids looked up recently remembered."""
_MEMO_SIZE = 1 << 16


class ItemIndex:
    """Item id to catalog index: a dictionary for format 1 and catalogs up to
    :data:`INDEX_DICT_LIMIT` items; above that, a binary search over the sorted string
    table of format 2 (no per-id object for millions of ids) with a bounded memo of the
    ids looked up lately (a user's window is looked up at every request)."""

    __slots__ = ("_map", "_memo", "_table")

    def __init__(self, ids: Sequence[str]) -> None:
        self._table: StringTable | None = None
        if isinstance(ids, StringTable) and ids._order is not None and len(ids) > INDEX_DICT_LIMIT:
            self._table = ids
        self._map = None if self._table is not None else {s: i for i, s in enumerate(ids)}
        self._memo: dict[str, int | None] = {}

    def get(self, item_id: str, default: int | None = None) -> int | None:
        """The index of ``item_id``, or ``default``."""
        if self._map is not None:
            return self._map.get(item_id, default)
        assert self._table is not None
        if not isinstance(item_id, str):
            return default
        try:
            found = self._memo[item_id]
        except KeyError:
            found = self._table.find(item_id)
            if len(self._memo) >= _MEMO_SIZE:
                self._memo.clear()
            self._memo[item_id] = found
        return default if found is None else found

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, str) and self.get(item_id) is not None

    def __getitem__(self, item_id: str) -> int:
        found = self.get(item_id)
        if found is None:
            raise KeyError(item_id)
        return found


def is_permutation(order: npt.NDArray[np.integer], n: int) -> bool:
    """``order`` holds each of ``0 .. n - 1`` exactly once (values checked for range
    before they index anything, so a hostile value never sizes an allocation).

    ``n`` values in range that mark all ``n`` slots of a one-byte table are a permutation
    (no slot is left for a repeat); the table is marked a block of values at a time, so
    no index array of the catalog's size is ever copied (10M items: 10 MB of scratch)."""
    if order.shape != (n,):
        return False
    if n == 0:
        return True
    if int(order.min()) < 0 or int(order.max()) >= n:
        return False
    seen = np.zeros(n, dtype=np.bool_)
    for lo in range(0, n, _SCATTER_BLOCK):
        seen[order[lo : lo + _SCATTER_BLOCK]] = True
    return bool(seen.all())


_SCATTER_BLOCK = 1 << 20
"""Values marked at a time by :func:`is_permutation`."""


_PAIR_BLOCK = 1 << 14
"""Strings or adjacent pairs handled at a time by :func:`strictly_increasing`: scratch of
128 KB per array, which stays in the CPU caches and, freed by a worker thread, is not
kept by its allocator (1 << 16 kept 6 MB more after a 1M-item open, no faster)."""
_EIGHT = (~np.uint64(0)) << (np.uint64(8) * (np.uint64(8) - np.arange(9, dtype=np.uint64)))
_EIGHT[0] = 0  # a shift by 64 is undefined: no byte kept
_EIGHT[8] = ~np.uint64(0)
"""``_EIGHT[k]`` keeps the ``k`` high (first) bytes of a big-endian word, ``k`` in 0..8."""


class _Blob(NamedTuple):
    """A string table's bytes read as words: ``words[k]`` is the (unaligned, big-endian)
    word at blob byte ``k`` for ``k < split`` (a zero-copy strided view),
    ``tail[k - split]`` the zero-padded one for the last few bytes."""

    offsets: npt.NDArray[np.integer]
    size: int
    words: npt.NDArray[np.uint64]
    tail: npt.NDArray[np.uint64]
    split: int

    @classmethod
    def of(cls, offsets: npt.NDArray[np.integer], blob: U8) -> _Blob:
        size = int(blob.size)
        split = max(size - 7, 0)
        if split:
            base = np.ascontiguousarray(blob)
            rows = np.lib.stride_tricks.as_strided(base, shape=(split, 8), strides=(1, 1))
            words: npt.NDArray[np.uint64] = rows.view(">u8")[:, 0]
        else:
            words = np.empty(0, dtype=np.uint64)
        padded = np.zeros(16, dtype=np.uint8)
        padded[: size - split] = blob[split:]
        tail = np.lib.stride_tricks.as_strided(padded, shape=(9, 8), strides=(1, 1))
        tail_words: npt.NDArray[np.uint64] = tail.view(">u8")[:, 0].astype(np.uint64)
        return cls(offsets, size, words, tail_words, split)

    def word(
        self, starts: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64], pos: int
    ) -> npt.NDArray[np.uint64]:
        """Bytes ``pos .. pos + 7`` of each string as one big-endian word (zeros past its
        end): one gather per string, no per-byte work."""
        at = starts + pos
        near_end = at >= self.split
        if near_end.any():
            got = np.empty(at.shape, dtype=np.uint64)
            far = ~near_end
            got[far] = self.words[at[far]]
            got[near_end] = self.tail[np.minimum(at[near_end] - self.split, self.tail.size - 1)]
        else:
            got = self.words[at].astype(np.uint64)
        keep = lengths - pos
        np.maximum(keep, 0, out=keep)
        np.minimum(keep, 8, out=keep)
        got &= _EIGHT[keep]
        return got

    def bounds(
        self, which: npt.NDArray[np.integer] | slice
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """:func:`_bounds` of the strings ``which``."""
        return _bounds(self.offsets, which, self.size)


def _bounds(
    offsets: npt.NDArray[np.integer], which: npt.NDArray[np.integer] | slice, size: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Start and length of the strings ``which`` (clipped into the blob: never a read out
    of bounds, whatever the offsets)."""
    if isinstance(which, slice):
        lo, hi = offsets[which], offsets[which.start + 1 : which.stop + 1]
    else:
        lo, hi = offsets[which], offsets[which + 1]
    starts = lo.astype(np.int64)
    np.maximum(starts, 0, out=starts)
    np.minimum(starts, size, out=starts)
    ends = hi.astype(np.int64)
    np.minimum(ends, size, out=ends)
    ends -= starts
    np.maximum(ends, 0, out=ends)
    return starts, ends


def strictly_increasing(
    offsets: npt.NDArray[np.integer], blob: U8, order: npt.NDArray[np.integer]
) -> bool:
    """Whether the strings ``blob[offsets[i]:offsets[i+1]]`` taken in ``order`` strictly
    increase by their bytes: the ids are sorted (so :meth:`StringTable.find` works) and
    unique.

    Vectorized. First, in storage order (sequential reads), each string's first sixteen
    bytes (eight when no string is longer) become big-endian words (gathers from an
    unaligned strided view of the blob, masked past the string's end) and its length is
    kept in one byte (capped at 255). Then, in blocks of :data:`_PAIR_BLOCK`, the words
    are taken in ``order`` (one random read per string) and adjacent ones compared; only
    the pairs tied on all of them with both strings longer go on, eight bytes at a time,
    from the blob. Each pass splits its strings between :data:`VERIFY_THREADS` threads
    (numpy releases the GIL in every step): 10M ids of at most 8 bytes take about 0.4 s
    in a fresh process. Memory: 9 or 17 bytes per string plus per-block scratch. Expects what
    :class:`StringTable` checks first: ``offsets`` monotone and inside the blob, ``order``
    indexes of ``offsets[:-1]`` (no read outside the blob happens regardless).
    """
    if order.size < 2:
        return True
    text = _Blob.of(offsets, blob)
    n = int(offsets.shape[0]) - 1
    # strings of at most 8 bytes (short ids) need only the first word
    width = 2 if n > 0 and int(np.diff(offsets).max()) > 8 else 1
    keys = np.empty((max(n, 0), width), dtype=np.uint64)
    short = np.empty(max(n, 0), dtype=np.uint8)  # min(length, 255)

    def fill(first: int, last: int) -> bool:
        for lo in range(first, last, _PAIR_BLOCK):
            hi = min(lo + _PAIR_BLOCK, last)
            starts, lengths = text.bounds(slice(lo, hi))
            for col in range(width):
                keys[lo:hi, col] = text.word(starts, lengths, 8 * col)
            np.minimum(lengths, 255, out=lengths)
            short[lo:hi] = lengths
        return True

    rows = keys.view(np.dtype((np.void, 8 * width))).reshape(-1)  # one item per string

    def pairs(first: int, last: int) -> bool:
        """Pairs ``(order[j], order[j + 1])`` for ``j`` in ``first .. last - 1``."""
        for lo in range(first, last, _PAIR_BLOCK):
            o = order[lo : min(lo + _PAIR_BLOCK, last) + 1]
            if not _pairs_increasing(text, rows, short, o):
                return False
        return True

    return _split(fill, n) and _split(pairs, order.size - 1)


def _split(work: Callable[[int, int], bool], n: int) -> bool:
    """``work`` over ``0 .. n`` cut into :data:`VERIFY_THREADS` contiguous parts (whole
    :data:`_PAIR_BLOCK` blocks), run on as many threads; whether every part said True."""
    per = -(-n // VERIFY_THREADS // _PAIR_BLOCK) * _PAIR_BLOCK
    parts = [(lo, min(lo + per, n)) for lo in range(0, n, per)] if per else []
    if len(parts) < 2:
        return all(work(lo, hi) for lo, hi in parts)
    with ThreadPoolExecutor(max_workers=len(parts), thread_name_prefix="bundle-ids") as pool:
        done = [pool.submit(work, lo, hi) for lo, hi in parts]
        return all([d.result() for d in done])


def _pairs_increasing(
    text: _Blob, rows: npt.NDArray[np.void], short: U8, o: npt.NDArray[np.integer]
) -> bool:
    """Whether the strings ``o[0], o[1], ...`` strictly increase: their keys (see
    :func:`strictly_increasing`) first, then the blob for the pairs tied on them."""
    # one column when no string is longer than 8 bytes: every pair tied on it has ended
    k = np.take(rows, o).view(np.uint64).reshape(-1, rows.itemsize // 8)
    wa, wb = k[:-1, 0], k[1:, 0]
    if (wa > wb).any():
        return False
    tied = np.flatnonzero(wa == wb)
    if not tied.size:
        return True
    for pos in (0, 8):
        if pos:  # compare the second words of the pairs tied on the first
            wa, wb = k[tied, 1], k[tied + 1, 1]
            if (wa > wb).any():
                return False
            tied = tied[wa == wb]
        la = short[o[tied]].astype(np.int64)
        lb = short[o[tied + 1]].astype(np.int64)
        # tied words where a string ended: the shorter must be first; equal: a dup
        ended = (la <= pos + 8) | (lb <= pos + 8)
        if (la[ended] >= lb[ended]).any():
            return False
        tied = tied[~ended]
        if not tied.size:
            return True
    return _tail_increasing(text, o, tied)


def _tail_increasing(
    text: _Blob, o: npt.NDArray[np.integer], tied: npt.NDArray[np.intp]
) -> bool:
    """For the pairs ``(o[t], o[t + 1])`` whose first sixteen bytes tie and which both go
    on: whether each first string is below the second, comparing from byte 16 on."""
    sa, la = text.bounds(o[tied].astype(np.int64))
    sb, lb = text.bounds(o[tied + 1].astype(np.int64))
    pos = 16
    while sa.size:
        wa = text.word(sa, la, pos)
        wb = text.word(sb, lb, pos)
        if (wa > wb).any():
            return False
        tied_here = wa == wb
        ended = tied_here & ((la - pos <= 8) | (lb - pos <= 8))
        if (la[ended] >= lb[ended]).any():
            return False
        go_on = tied_here & ~ended
        sa, sb, la, lb = sa[go_on], sb[go_on], la[go_on], lb[go_on]
        pos += 8
    return True


def chunk_count(content_len: int) -> int:
    """How many :data:`CHUNK_SIZE` chunks cover ``content_len`` bytes."""
    return max(1, math.ceil(content_len / CHUNK_SIZE))
