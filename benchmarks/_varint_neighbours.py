"""LEB128 varint neighbour rows: the encoding bit-packed rows replaced, kept as a
baseline for ``bench_codecs.py`` (not part of the package).

Each CSR row is kept in its original order as varints: the entry count, then one varint
per entry holding the zig-zag delta of the target from the previous target (the row's
own item for the first) shifted left by ``code_bits``, or'ed with the zig-zag delta of
its weight code from the previous code when that fits in ``code_bits`` bits, else an
escape value whose code follows the row's entries as one more varint.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

from ondevice._codecs import RowReader, _check_offsets, _narrow_offsets, _unzigzag, _zigzag

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]

DEFAULT_CODE_BITS: Final = 2
"""Bits of each neighbour entry's varint that carry its code delta (2 measured smallest
on the 1M synthetic catalog in cluster order; see ``benchmarks/bench_codecs.py``)."""
MAX_VARINT_BYTES: Final = 8
"""Longest varint a decoder accepts (56 bits: exact in int64 arithmetic)."""


def _varint_lengths(values: U64) -> I64:
    """Bytes of each value as an LEB128 varint (1..10)."""
    lengths = np.ones(values.shape, dtype=np.int64)
    for k in range(1, 10):
        lengths += values >= np.uint64(1 << (7 * k))
    return lengths


def _write_varints(values: U64) -> tuple[U8, I64]:
    """All ``values`` as consecutive LEB128 varints, and each one's length."""
    lengths = _varint_lengths(values)
    ends = np.cumsum(lengths)
    out = np.empty(int(ends[-1]) if ends.size else 0, dtype=np.uint8)
    starts = ends - lengths
    rest = values.copy()
    for k in range(int(lengths.max()) if lengths.size else 0):
        live = np.flatnonzero(lengths > k)
        byte = (rest[live] & np.uint64(0x7F)).astype(np.uint8)
        byte[lengths[live] > k + 1] |= 0x80
        out[starts[live] + k] = byte
        rest >>= np.uint64(7)
    return out, lengths


def _read_varints(data: U8) -> tuple[U64, I64, I64]:
    """Parse ``data`` (which must end a varint) into ``(values, first_byte, byte_varint)``:
    each varint's value and first byte, and for each byte the varint it belongs to.
    ValueError for a varint longer than :data:`MAX_VARINT_BYTES` or a truncated end."""
    if data.size == 0:
        return np.empty(0, np.uint64), np.empty(0, np.int64), np.empty(0, np.int64)
    last = data < 0x80
    if not bool(last[-1]):
        raise ValueError("neighbours: a varint is truncated")
    ends = np.flatnonzero(last)
    firsts = np.empty(ends.shape, dtype=np.int64)
    firsts[0] = 0
    firsts[1:] = ends[:-1] + 1
    if int((ends - firsts).max()) >= MAX_VARINT_BYTES:
        raise ValueError(f"neighbours: a varint is longer than {MAX_VARINT_BYTES} bytes")
    byte_varint: I64 = np.cumsum(last, dtype=np.int64) - last  # varint of each byte
    shift = (np.arange(data.size, dtype=np.int64) - firsts[byte_varint]) * 7
    contrib = (data & 0x7F).astype(np.uint64) << shift.astype(np.uint64)
    values: U64 = np.add.reduceat(contrib, firsts)
    return values, firsts, byte_varint


# --- neighbour lists ------------------------------------------------------------------


def encode_neighbours(
    indptr: npt.NDArray[np.integer],
    indices: npt.NDArray[np.integer],
    codes: U8,
    *,
    code_bits: int = DEFAULT_CODE_BITS,
) -> tuple[npt.NDArray[np.integer], U8]:
    """``(row_offsets, payload)`` for :class:`NeighbourStore`: row ``i`` is
    ``payload[row_offsets[i]:row_offsets[i + 1]]`` (int32 offsets, int64 past 2 GiB).

    A row is LEB128 varints: its entry count ``k``; ``k`` entries, in the row's order,
    each ``zigzag(target - previous_target) << code_bits | f`` (the previous target of
    the first is the row's own item index), with ``f = zigzag(code - previous_code)``
    (0 before the first) when that is below ``2**code_bits - 1``, else ``f`` is that
    escape value; then one varint per escaped entry, in order: its code. Rows keep their
    order exactly; codes are opaque bytes (the encoding is smallest when they change
    little along a row). Raises ValueError for malformed CSR input.
    """
    if not 1 <= code_bits <= 8:
        raise ValueError("code_bits must be 1..8")
    ptr = np.asarray(indptr).astype(np.int64)
    idx = np.asarray(indices).astype(np.int64)
    cds = np.asarray(codes)
    if ptr.ndim != 1 or ptr.size < 1 or int(ptr[0]) != 0 or int(ptr[-1]) != idx.size:
        raise ValueError("neighbours: indptr must start at 0 and end at len(indices)")
    if idx.shape != cds.shape or cds.dtype != np.uint8:
        raise ValueError("neighbours: codes must be uint8, one per index")
    if ptr.size > 1 and bool((np.diff(ptr) < 0).any()):
        raise ValueError("neighbours: indptr must be monotone")
    n = ptr.size - 1
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError("neighbours: an index is out of range")
    counts = np.diff(ptr)
    row_of = np.repeat(np.arange(n, dtype=np.int64), counts)
    first = np.zeros(idx.size, dtype=np.bool_)
    first[ptr[:-1][counts > 0]] = True
    prev = np.empty_like(idx)
    prev[1:] = idx[:-1]
    prev[first] = row_of[first]
    code = cds.astype(np.int64)
    prev_code = np.empty_like(code)
    prev_code[1:] = code[:-1]
    prev_code[first] = 0
    escape = (1 << code_bits) - 1
    field = _zigzag(code - prev_code)
    escaped = field >= np.uint64(escape)
    field[escaped] = np.uint64(escape)
    entry = (_zigzag(idx - prev) << np.uint64(code_bits)) | field
    n_escaped = np.bincount(row_of[escaped], minlength=n).astype(np.int64)
    per_row = 1 + counts + n_escaped
    row_start = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(per_row, out=row_start[1:])
    values = np.empty(int(row_start[-1]), dtype=np.uint64)
    values[row_start[:-1]] = counts.astype(np.uint64)
    local = np.arange(idx.size, dtype=np.int64) - ptr[:-1][row_of]
    values[row_start[:-1][row_of] + 1 + local] = entry
    esc_rows = row_of[escaped]
    esc_rank = np.arange(esc_rows.size, dtype=np.int64) - np.searchsorted(esc_rows, esc_rows)
    values[row_start[:-1][esc_rows] + 1 + counts[esc_rows] + esc_rank] = code[escaped].astype(
        np.uint64
    )
    payload, lengths = _write_varints(values)
    byte_ends = np.concatenate(([0], np.cumsum(lengths)))
    row_offsets = byte_ends[row_start]
    return _narrow_offsets(row_offsets), payload


class NeighbourStore(RowReader):
    """Neighbour lists of ``n_items`` items over :func:`encode_neighbours` output.

    Construction checks the offsets (``O(n)``: 1-D integers, ``n_items + 1`` of them,
    from 0, monotone, to the payload's end). Rows are checked as they are decoded:
    :meth:`gather` raises :class:`ValueError` when a requested row is empty or does not
    end a varint, holds a varint over :data:`MAX_VARINT_BYTES`, a count that disagrees
    with its varints, a target outside ``[0, n_items)`` or a code outside ``0..255``.
    :meth:`validate` decodes every row. Nothing is cached; the store is immutable and
    safe to share between threads.
    """

    __slots__ = ("_code_bits", "_n", "_offsets", "_payload")

    def __init__(
        self,
        row_offsets: npt.NDArray[np.integer],
        payload: U8,
        n_items: int,
        *,
        code_bits: int = DEFAULT_CODE_BITS,
    ) -> None:
        if not 1 <= code_bits <= 8 or n_items < 0:
            raise ValueError("code_bits must be 1..8 and n_items >= 0")
        if not isinstance(payload, np.ndarray) or payload.ndim != 1 or payload.dtype != np.uint8:
            raise ValueError("neighbours: the payload must be a 1-D uint8 array")
        offsets = _check_offsets(row_offsets, int(payload.shape[0]), "neighbours")
        if offsets.shape[0] != n_items + 1:
            raise ValueError(f"neighbours: {n_items} items need {n_items + 1} row offsets")
        self._offsets = offsets
        self._payload = payload
        self._n = int(n_items)
        self._code_bits = int(code_bits)

    def __len__(self) -> int:
        return self._n

    @property
    def nbytes(self) -> int:
        """Bytes of the encoded arrays."""
        return int(self._offsets.nbytes + self._payload.nbytes)

    def _decode_rows(self, items: I64) -> tuple[I64, I64, U8]:
        m = items.size
        starts = self._offsets[items]
        lens = self._offsets[items + 1] - starts
        if m == 0:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.uint8)
        if bool((lens <= 0).any()):
            raise ValueError("neighbours: a row is empty (it must hold its count)")
        byte_start = np.zeros(m + 1, dtype=np.int64)
        np.cumsum(lens, out=byte_start[1:])
        total = int(byte_start[-1])
        where = np.repeat(starts - byte_start[:-1], lens) + np.arange(total, dtype=np.int64)
        data = self._payload[where]
        if bool((data[byte_start[1:] - 1] >= 0x80).any()):
            raise ValueError("neighbours: a row does not end with a complete varint")
        values, _, byte_varint = _read_varints(data)
        first_var = byte_varint[byte_start[:-1]]
        n_var = byte_varint[byte_start[1:] - 1] - first_var + 1
        counts_u = values[first_var]
        if bool((counts_u >= np.uint64(n_var.max())).any()):
            raise ValueError("neighbours: a row's count exceeds its varints")
        counts = counts_u.astype(np.int64)
        n_esc = n_var - 1 - counts
        if bool((n_esc < 0).any()):
            raise ValueError("neighbours: a row's count exceeds its varints")
        var_owner = np.repeat(np.arange(m, dtype=np.int64), n_var)
        local = np.arange(values.size, dtype=np.int64) - first_var[var_owner]
        row_k = counts[var_owner]
        is_entry = (local >= 1) & (local <= row_k)
        is_escape = local > row_k
        entries = values[is_entry]
        owner = var_owner[is_entry]
        bits = np.uint64(self._code_bits)
        escape = np.uint64((1 << self._code_bits) - 1)
        field = entries & escape
        escaped = field == escape
        per_row_escaped = np.bincount(owner[escaped], minlength=m)
        if not np.array_equal(per_row_escaped, n_esc):
            raise ValueError("neighbours: a row's escaped codes do not match its entries")
        # targets: a running sum of the deltas within each row, from the row's own item
        delta = _unzigzag(entries >> bits)
        entry_start = np.zeros(m + 1, dtype=np.int64)
        np.cumsum(counts, out=entry_start[1:])
        running = np.zeros(entries.size + 1, dtype=np.int64)
        np.cumsum(delta, out=running[1:])
        targets = items[owner] + running[1:] - running[entry_start[:-1]][owner]
        if targets.size and (int(targets.min()) < 0 or int(targets.max()) >= self._n):
            raise ValueError("neighbours: a target is outside the catalog")
        # codes: a running sum of the code deltas, restarting at each row and escape
        cdelta = _unzigzag(field)
        cdelta[escaped] = 0
        restart = escaped.copy()
        restart[entry_start[:-1][counts > 0]] = True
        base = np.zeros(entries.size, dtype=np.int64)
        esc_codes = values[is_escape]
        if bool((esc_codes > np.uint64(255)).any()):
            raise ValueError("neighbours: an escaped code is over 255")
        base[escaped] = esc_codes.astype(np.int64)
        seg = np.cumsum(restart) - 1
        heads = np.flatnonzero(restart)
        csum = np.zeros(entries.size + 1, dtype=np.int64)
        np.cumsum(cdelta, out=csum[1:])
        codes = base[heads][seg] + csum[1:] - csum[heads][seg]
        if codes.size and (int(codes.min()) < 0 or int(codes.max()) > 255):
            raise ValueError("neighbours: a code is outside 0..255")
        return owner, targets, codes.astype(np.uint8)
