"""Tests of ``ondevice._codecs`` and of ``_bundle2.strictly_increasing`` (against plain
Python references, over generated cases, and against hostile bytes)."""

from __future__ import annotations

import contextlib
import itertools
import threading
import zlib
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ondevice import _bundle2, _codecs
from ondevice._bundle2 import strictly_increasing
from ondevice._codecs import (
    BlockStringTable,
    PackedNeighbourStore,
    encode_block_strings,
    encode_neighbours_packed,
)

# --- strictly_increasing ----------------------------------------------------------


def _pack(strings: Sequence[bytes]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
    offsets = np.zeros(len(strings) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in strings], out=offsets[1:])
    blob = np.frombuffer(b"".join(strings), dtype=np.uint8)
    return offsets, blob


def _reference(strings: Sequence[bytes], order: Sequence[int]) -> bool:
    s = [strings[i] for i in order]
    return all(a < b for a, b in itertools.pairwise(s))


_PREFIXES = [b"", b"sku-", b"0123456789abcdef", b"0123456789abcdefXYZ", "é日".encode()]
_piece = st.binary(max_size=20) | st.text(max_size=6).map(
    lambda t: t.encode("utf-8", "surrogatepass")
)
_string = st.builds(lambda p, s: p + s, st.sampled_from(_PREFIXES), _piece) | st.binary(
    max_size=3, min_size=0
).map(lambda b: b.replace(b"\x01", b"\x00"))


@st.composite
def _cases(draw: st.DrawFn) -> tuple[list[bytes], list[int]]:
    strings: list[bytes] = draw(st.lists(_string, max_size=40))
    add_dup: bool = draw(st.booleans())
    add_prefix: bool = draw(st.booleans())
    if strings and add_dup:
        strings.append(draw(st.sampled_from(strings)))  # a duplicate
    if strings and add_prefix:  # a string and a prefix/extension of it
        base = draw(st.sampled_from(strings))
        strings.append(base + draw(st.sampled_from([b"\x00", b"a", b"\xff", b"x" * 17])))
        strings.append(base[: draw(st.integers(0, len(base)))])
    order = sorted(range(len(strings)), key=strings.__getitem__)
    how = draw(st.sampled_from(["sorted", "shuffled", "swap"]))
    if how == "shuffled":
        order = draw(st.permutations(order))
    elif how == "swap" and len(order) >= 2:
        i = draw(st.integers(0, len(order) - 2))
        order[i], order[i + 1] = order[i + 1], order[i]
    return strings, order


@settings(max_examples=600, deadline=None)
@given(_cases(), st.sampled_from([1, 2, 3, 1 << 16]))
def test_strictly_increasing_matches_reference(
    case: tuple[list[bytes], list[int]], block: int
) -> None:
    strings, order = case
    offsets, blob = _pack(strings)
    saved = _bundle2._PAIR_BLOCK
    _bundle2._PAIR_BLOCK = block  # small blocks exercise the block edges
    try:
        for off in (offsets, offsets.astype(np.int32)):
            got = strictly_increasing(off, blob, np.asarray(order, dtype=np.int32))
            assert got == _reference(strings, order)
    finally:
        _bundle2._PAIR_BLOCK = saved


def test_strictly_increasing_unique_sorted_long_shared_prefixes() -> None:
    prefix = b"p" * 40
    strings = sorted({prefix + bytes([a, b]) for a in range(0, 256, 5) for b in range(0, 256, 7)})
    strings = [prefix[:10], prefix, *strings]
    offsets, blob = _pack(strings)
    order = np.arange(len(strings), dtype=np.int64)
    assert strictly_increasing(offsets, blob, order)
    dup = [*strings[:5], strings[4], *strings[5:]]
    o2, b2 = _pack(dup)
    assert not strictly_increasing(o2, b2, np.arange(len(dup)))
    rev = np.arange(len(strings))[::-1].copy()
    assert not strictly_increasing(offsets, blob, rev)


def test_strictly_increasing_trivial_and_empty_strings() -> None:
    offsets, blob = _pack([])
    assert strictly_increasing(offsets, blob, np.empty(0, np.int32))
    offsets, blob = _pack([b""])
    assert strictly_increasing(offsets, blob, np.zeros(1, np.int32))
    offsets, blob = _pack([b"", b""])
    assert not strictly_increasing(offsets, blob, np.arange(2))
    offsets, blob = _pack([b"", b"\x00"])
    assert strictly_increasing(offsets, blob, np.arange(2))
    assert not strictly_increasing(offsets, blob, np.arange(2)[::-1].copy())


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(-2, 12), max_size=12),
    st.integers(0, 12),
    st.sampled_from([1, 3, 1 << 20]),
)
def test_is_permutation_matches_reference(values: list[int], n: int, block: int) -> None:
    saved = _bundle2._SCATTER_BLOCK
    _bundle2._SCATTER_BLOCK = block  # small blocks: a repeat across two blocks
    try:
        for dtype in (np.int32, np.int64):
            got = _bundle2.is_permutation(np.asarray(values, dtype=dtype), n)
            assert got == (sorted(values) == list(range(n)))
    finally:
        _bundle2._SCATTER_BLOCK = saved


# --- block-compressed strings ----------------------------------------------------

_text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=30)


@settings(max_examples=200, deadline=None)
@given(st.lists(_text, max_size=60), st.integers(1, 9), st.sampled_from([None, 0, 64]))
def test_block_strings_round_trip(strings: list[str], block: int, dict_size: int | None) -> None:
    offsets, data = encode_block_strings(strings, block, dict_size=dict_size)
    table = BlockStringTable(offsets, data, count=len(strings), block=block, cache_blocks=2)
    assert len(table) == len(strings)
    assert list(table) == strings
    assert [table[i] for i in range(len(strings))][::-1] == strings[::-1]
    assert table[:] == strings
    if strings:
        assert table[-1] == strings[-1]
        assert table.get_many([len(strings) - 1, 0, 0]) == [strings[-1], strings[0], strings[0]]
    assert table.cached_blocks() <= 2
    table.validate()
    with pytest.raises(IndexError):
        table[len(strings)]


def test_block_strings_realistic_and_bounded_cache() -> None:
    strings = [f"Brand {i % 7} item {i} crème {'日本' * (i % 3)}" for i in range(5000)]
    strings[17] = ""
    offsets, data = encode_block_strings(strings, 16)
    assert data.nbytes < len("".join(strings).encode()) / 2
    table = BlockStringTable(offsets, data, count=len(strings), block=16, cache_blocks=8)
    rng = np.random.default_rng(0)
    for i in rng.integers(0, len(strings), 2000):
        assert table[int(i)] == strings[int(i)]
        assert table.cached_blocks() <= 8


def test_block_strings_concurrent_reads() -> None:
    strings = [f"title {i} {'é' * (i % 5)}" for i in range(3000)]
    offsets, data = encode_block_strings(strings, 8)
    table = BlockStringTable(offsets, data, count=len(strings), block=8, cache_blocks=4)
    errors: list[str] = []

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for i in rng.integers(0, len(strings), 3000):
            if table[int(i)] != strings[int(i)]:
                errors.append(f"{i}")

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert table.cached_blocks() <= 4


def test_block_strings_rejects_bad_structure() -> None:
    strings = ["a", "bb", "ccc", "dddd", "eeeee"]
    offsets, data = encode_block_strings(strings, 2, dict_size=0)
    with pytest.raises(ValueError):
        BlockStringTable(offsets, data, count=7, block=2)  # 4 blocks, not 3
    with pytest.raises(ValueError):
        BlockStringTable(offsets, data, count=5, block=1)
    bad = offsets.copy()
    bad[2], bad[3] = bad[3], bad[2]
    with pytest.raises(ValueError):
        BlockStringTable(bad, data, count=5, block=2)
    with pytest.raises(ValueError):
        BlockStringTable(offsets, data[:-1], count=5, block=2)
    with pytest.raises(ValueError):
        encode_block_strings(["\ud800"])
    # a block decoding to the wrong number of strings
    other_offsets, other_data = encode_block_strings(["a", "b", "c"], 3, dict_size=0)
    table = BlockStringTable(other_offsets, other_data, count=2, block=2)
    with pytest.raises(ValueError, match="holds 3 strings"):
        table[0]
    with pytest.raises(ValueError):
        table.validate()


def _hostile_variants(data: bytes) -> list[bytes]:
    out = []
    for i in range(len(data)):
        for x in (0x01, 0x80, 0xFF, 0x10):
            b = bytearray(data)
            b[i] ^= x
            out.append(bytes(b))
        b = bytearray(data)
        b[i] = 0
        out.append(bytes(b))
    out.extend(data[:k] for k in range(len(data)))
    out.extend(data + bytes([x]) for x in (0, 0x80, 0xFF))
    return out


def test_block_strings_hostile_bytes() -> None:
    strings = ["", "héllo", "日本語", "x" * 20, "a", "b", "zz"]
    for dict_size in (0, 16):
        offsets, data = encode_block_strings(strings, 3, dict_size=dict_size)
        ok = raised = 0
        for variant in _hostile_variants(data.tobytes()):
            arr = np.frombuffer(variant, dtype=np.uint8)
            off = offsets.astype(np.int64).copy()
            off[-1] = arr.size  # keep the structure consistent: only the last block moves
            if off[-1] < off[-2]:
                with pytest.raises(ValueError):
                    BlockStringTable(off, arr, count=len(strings), block=3)
                continue
            table = BlockStringTable(off, arr, count=len(strings), block=3)
            try:
                table.validate()
                got = list(table)
                assert len(got) == len(strings) and all(isinstance(s, str) for s in got)
                ok += 1
            except ValueError:
                raised += 1
            for i in range(len(strings)):  # per access: a string or ValueError
                with contextlib.suppress(ValueError):
                    assert isinstance(table[i], str)
        assert raised > 0


# --- neighbour lists ---------------------------------------------------------------


def _random_csr(
    rng: np.random.Generator, n: int, max_k: int, *, monotone_codes: bool
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
    counts = rng.integers(0, max_k + 1, n)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    indices = rng.integers(0, n, int(indptr[-1])) if n else np.empty(0, np.int64)
    codes = rng.integers(0, 256, indices.size).astype(np.uint8)
    if monotone_codes:
        for i in range(n):
            codes[indptr[i] : indptr[i + 1]].sort()
    return indptr, indices, codes


def _check_gather(
    store: PackedNeighbourStore,
    indptr: npt.NDArray[np.int64],
    indices: npt.NDArray[np.integer],
    codes: npt.NDArray[np.uint8],
    items: npt.NDArray[np.int64],
) -> None:
    owner, targets, got_codes = store.gather(items)
    sel = (
        np.concatenate([np.arange(indptr[i], indptr[i + 1]) for i in items])
        if items.size
        else np.empty(0, np.int64)
    ).astype(np.int64)
    assert np.array_equal(targets, indices[sel].astype(np.int64))
    assert np.array_equal(got_codes, codes[sel])
    assert got_codes.dtype == np.uint8 and targets.dtype == np.int64
    assert np.array_equal(owner, np.repeat(np.arange(items.size), np.diff(indptr)[items]))


# --- bit-packed neighbour lists ------------------------------------------------------


def _packed_store(
    indptr: npt.NDArray[np.int64],
    indices: npt.NDArray[np.integer],
    codes: npt.NDArray[np.uint8],
    block_rows: int = 64,
) -> PackedNeighbourStore:
    arrays, params = encode_neighbours_packed(indptr, indices, codes, block_rows=block_rows)
    for a in arrays.values():
        assert a.ndim == 1 and a.dtype.byteorder in "<=|"
    assert arrays["payload"].dtype == np.uint8 and arrays["block_bits"].dtype == np.int64
    assert arrays["row_bits"].dtype in (np.uint16, np.uint32)
    assert all(isinstance(v, int) for v in params.values())
    return PackedNeighbourStore(arrays, params, indptr.size - 1)


@settings(max_examples=150, deadline=None)
@given(
    st.integers(0, 70),
    st.integers(0, 25),
    st.sampled_from(["random", "monotone", "equal", "mostly"]),
    st.sampled_from([1, 3, 64]),
    st.integers(0, 2**32 - 1),
)
def test_packed_round_trip(n: int, max_k: int, how: str, block_rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    indptr, indices, codes = _random_csr(rng, n, max_k, monotone_codes=how != "random")
    if how == "equal":
        codes[:] = rng.integers(0, 256)
    elif how == "mostly" and codes.size:  # monotone rows with a few falls
        codes[rng.random(codes.size) < 0.05] = 0
    store = _packed_store(indptr, indices, codes, block_rows)
    assert len(store) == n
    store.validate(chunk=7)
    items = rng.integers(0, n, 40) if n else np.empty(0, np.int64)  # duplicates likely
    _check_gather(store, indptr, indices, codes, items)
    _check_gather(store, indptr, indices, codes, np.arange(n, dtype=np.int64))
    _check_gather(store, indptr, indices, codes, np.empty(0, np.int64))
    for i in range(min(n, 5)):
        t, c = store.row(i)
        assert np.array_equal(t, indices[indptr[i] : indptr[i + 1]])
        assert np.array_equal(c, codes[indptr[i] : indptr[i + 1]])


def test_packed_clustered_rows_and_long_rows() -> None:
    rng = np.random.default_rng(5)
    n = 3000
    counts = rng.integers(0, 21, n)
    counts[[7, 8, 9, 10, 11, 12, 100, 2999]] = [1000] * 6 + [1, 999]  # a block over 2**16 bits
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    own = np.repeat(np.arange(n), counts)
    near = np.clip(own + rng.integers(-300, 300, own.size), 0, n - 1)
    far = rng.integers(0, n, own.size)
    indices = np.where(rng.random(own.size) < 0.7, near, far).astype(np.int32)
    codes = rng.integers(0, 40, indices.size).astype(np.uint8)
    for i in range(n):
        codes[indptr[i] : indptr[i + 1]].sort()
    arrays, params = encode_neighbours_packed(indptr, indices, codes)
    assert arrays["row_bits"].dtype == np.uint32
    store = PackedNeighbourStore(arrays, params, n)
    _check_gather(store, indptr, indices, codes, np.arange(n, dtype=np.int64))
    _check_gather(store, indptr, indices, codes, rng.integers(0, n, 50))
    assert store.nbytes < 5 * indices.size  # smaller than u4 indices + a code byte


def test_packed_single_item_and_empty() -> None:
    for indptr, indices in (([0, 1], [0]), ([0, 0], []), ([0], []), ([0, 0, 2], [1, 0])):
        ip = np.asarray(indptr, dtype=np.int64)
        ind = np.asarray(indices, dtype=np.int64)
        cd = np.full(ind.size, 200, dtype=np.uint8)
        store = _packed_store(ip, ind, cd)
        store.validate()
        _check_gather(store, ip, ind, cd, np.arange(ip.size - 1, dtype=np.int64))
        with pytest.raises(IndexError):
            store.gather(np.array([ip.size - 1 + 1]))
        with pytest.raises(IndexError):
            store.gather(np.array([-1]))
        with pytest.raises(IndexError):
            store.gather(np.array([[0]]))


def test_packed_more_than_2_24_items() -> None:
    n = (1 << 24) + 5
    rows = np.array([0, 3, n - 1, n - 2], dtype=np.int64)
    counts = np.zeros(n, dtype=np.int64)
    counts[rows] = [3, 2, 4, 1]
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    indices = np.array([n - 1, 0, 1 << 24, 5, n - 3, 0, n - 1, 1, 2, 7], dtype=np.uint32)
    codes = np.array([0, 1, 255, 3, 3, 9, 0, 0, 128, 1], dtype=np.uint8)
    store = _packed_store(indptr, indices, codes)
    _check_gather(store, indptr, indices, codes, np.concatenate((rows, rows[::-1], [1, 2])))


def test_packed_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        encode_neighbours_packed(np.array([0, 2]), np.array([0, 1]), np.zeros(2, np.uint8))
    with pytest.raises(ValueError):
        encode_neighbours_packed(np.array([0, 1]), np.array([0]), np.zeros(2, np.uint8))
    with pytest.raises(ValueError):
        encode_neighbours_packed(np.array([0, 2, 1]), np.array([0]), np.zeros(1, np.uint8))
    with pytest.raises(ValueError):
        encode_neighbours_packed(
            np.array([0, 1]), np.array([0]), np.zeros(1, np.uint8), block_rows=0
        )
    rng = np.random.default_rng(4)
    indptr, indices, codes = _random_csr(rng, 10, 5, monotone_codes=True)
    arrays, params = encode_neighbours_packed(indptr, indices, codes, block_rows=4)
    PackedNeighbourStore(arrays, params, 10)

    def bad(
        arr: dict[str, np.ndarray] | None = None, par: dict[str, object] | None = None, n: int = 10
    ) -> None:
        with pytest.raises(ValueError):
            PackedNeighbourStore(arr or arrays, par or params, n)  # type: ignore[arg-type]

    bad(n=11)
    bad(n=-1)
    bad(n=1 << 40)
    for key, values in {
        "format": [0, 2],
        "block_rows": [0, 3, 5, -1, 1 << 20],
        "count_bits": [-1, 33, 1 << 62],
        "width_bits": [0, 7, 64],
    }.items():
        for v in values:
            bad(par={**params, key: v})
    bad(par={**params, "format": 1.0})
    bad(par={**params, "extra": 1})
    bad(par={k: v for k, v in params.items() if k != "count_bits"})
    bad(arr={**arrays, "extra": np.zeros(1)})
    bad(arr={k: v for k, v in arrays.items() if k != "row_bits"})
    bad(arr={**arrays, "payload": arrays["payload"][:-1]})
    bad(arr={**arrays, "payload": np.concatenate((arrays["payload"], [0]))})
    bad(arr={**arrays, "payload": arrays["payload"].astype(np.int8)})
    bad(arr={**arrays, "row_bits": arrays["row_bits"].astype(np.int64)})
    bad(arr={**arrays, "row_bits": arrays["row_bits"][:-1]})
    bad(arr={**arrays, "block_bits": arrays["block_bits"][:-1]})
    bad(arr={**arrays, "block_bits": arrays["block_bits"].astype(np.float64)})
    bad(arr={**arrays, "block_bits": arrays["block_bits"][::-1].copy()})
    bad(arr={**arrays, "block_bits": arrays["block_bits"].astype(np.uint64) | np.uint64(1 << 63)})
    rb = arrays["row_bits"].copy()
    rb[0] = 1  # the first row of a block must start at the block
    bad(arr={**arrays, "row_bits": rb})
    rb = arrays["row_bits"].copy()
    rb[1], rb[2] = rb[2], rb[1] + 1000  # not monotone / past the stream
    bad(arr={**arrays, "row_bits": rb})


def _packed_outcome(store_args: tuple, n: int, outcomes: dict[str, int]) -> None:
    try:
        store = PackedNeighbourStore(*store_args)
    except ValueError:
        outcomes["error"] += 1
        return
    for items in (np.arange(n), np.array([n - 1, 0, 0]), np.array([2])):
        try:
            owner, targets, got = store.gather(items)
        except ValueError:
            outcomes["error"] += 1
            continue
        assert owner.size == targets.size == got.size
        assert targets.size == 0 or (targets.min() >= 0 and targets.max() < n)
        assert got.dtype == np.uint8
        outcomes["ok"] += 1
    with contextlib.suppress(ValueError):
        store.validate(chunk=2)


def test_packed_hostile_bytes() -> None:
    rng = np.random.default_rng(3)
    n = 6
    indptr, indices, codes = _random_csr(rng, n, 5, monotone_codes=True)
    codes[0] = 250
    codes[indptr[3]] = 255  # row 3 (if not empty) falls: raw codes
    arrays, params = encode_neighbours_packed(indptr, indices, codes, block_rows=4)
    raw = arrays["payload"].tobytes()
    outcomes = {"ok": 0, "error": 0}
    for variant in _hostile_variants(raw):
        arr = np.frombuffer(variant, dtype=np.uint8)
        _packed_outcome(({**arrays, "payload": arr}, params, n), n, outcomes)
    for _ in range(300):  # random bytes and random row boundaries and parameters
        size = int(rng.integers(0, 24))
        total = 8 * size + int(rng.integers(0, 8))
        pay = rng.integers(0, 256, size + 8).astype(np.uint8)
        cuts = np.sort(rng.integers(0, total + 1, n - 1))
        starts = np.concatenate(([0], cuts))
        block_rows = int(rng.integers(1, 8))
        base = np.concatenate((starts[::block_rows], [total])).astype(np.int64)
        rel = (starts - np.repeat(base[:-1], block_rows)[:n]).astype(np.uint32)
        par = {
            "format": 1,
            "block_rows": block_rows,
            "count_bits": int(rng.integers(0, 33)),
            "width_bits": int(rng.integers(1, 7)),
        }
        arrs = {"payload": pay, "block_bits": base, "row_bits": rel}
        _packed_outcome((arrs, par, n), n, outcomes)
    for cb in range(0, 33):  # every count and width size over the real stream
        for wb in range(1, 7):
            _packed_outcome(
                (arrays, {**params, "count_bits": cb, "width_bits": wb}, n), n, outcomes
            )
    assert outcomes["ok"] > 0 and outcomes["error"] > 0


def test_packed_construction_is_cheap() -> None:
    import time

    n = 1 << 21
    block_rows = 64
    arrays = {
        "payload": np.zeros(8, np.uint8),
        "block_bits": np.zeros(-(-n // block_rows) + 1, np.int64),
        "row_bits": np.zeros(n, np.uint16),
    }
    params = {"format": 1, "block_rows": block_rows, "count_bits": 0, "width_bits": 5}
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        store = PackedNeighbourStore(arrays, params, n)
        times.append(time.perf_counter() - t0)
    assert sorted(times)[2] < 0.25  # ~10 ms here; generous for a shared machine
    owner, targets, codes = store.gather(np.array([0, n - 1, 5]))
    assert owner.size == targets.size == codes.size == 0
    # a hostile count cannot make a row larger than its bits
    arrays["payload"] = np.full(16, 0xFF, np.uint8)
    arrays["block_bits"][-1] = 64
    params["count_bits"] = 32
    store = PackedNeighbourStore(arrays, params, n)
    with pytest.raises(ValueError):
        store.gather(np.array([n - 1]))


# --- regressions from the attack session ------------------------------------------------


def _bits_to_payload(bits: np.ndarray) -> np.ndarray:
    payload = np.zeros((bits.size >> 3) + 8, np.uint8)
    packed = np.packbits(bits.astype(np.uint8), bitorder="little")
    payload[: packed.size] = packed
    return payload


def test_a_packed_row_claiming_too_many_entries_is_refused_before_decoding() -> None:
    # row 0: count K in 32 bits, target width 0 (the item itself), unary code steps of
    # 0: one bit per entry, so a 1 MB file could claim 8M entries (GBs per request)
    n, k, cb, wb = 4, 100_000, 32, 6
    hdr = cb + 1 + wb + 1 + 8
    row0 = hdr + (k - 1)
    total = row0 + (n - 1) * cb
    bits = np.zeros(total, np.uint8)
    bits[:cb] = [(k >> j) & 1 for j in range(cb)]
    bits[hdr:row0] = 1
    starts = np.concatenate([[0], row0 + np.arange(n - 1, dtype=np.int64) * cb])
    arrays = {
        "payload": _bits_to_payload(bits),
        "block_bits": np.array([0, total], np.int64),
        "row_bits": starts.astype(np.uint32),
    }
    params = {"format": 1, "block_rows": 64, "count_bits": cb, "width_bits": wb}
    store = _codecs.PackedNeighbourStore(arrays, params, n)
    with pytest.raises(ValueError, match="more than 4096 entries"):
        store.gather(np.array([0]))
    with pytest.raises(ValueError, match="more than 4096"):
        _codecs.encode_neighbours_packed(
            np.array([0, 5000, 5000]), np.ones(5000, np.int64), np.zeros(5000, np.uint8)
        )


def test_rows_read_as_empty_under_a_lying_count_width_are_refused() -> None:
    indptr = np.array([0, 3, 5, 5, 8])
    indices = np.array([1, 2, 3, 0, 3, 0, 1, 2])
    codes = np.array([0, 1, 1, 4, 9, 2, 2, 3], np.uint8)
    arrays, params = _codecs.encode_neighbours_packed(indptr, indices, codes)
    for lie in range(params["count_bits"]):  # fewer count bits: rows look empty or short
        store = _codecs.PackedNeighbourStore(arrays, {**params, "count_bits": lie}, 4)
        with pytest.raises(ValueError):
            store.validate()
    zeros = {**arrays, "payload": np.zeros_like(arrays["payload"])}
    with pytest.raises(ValueError):
        _codecs.PackedNeighbourStore(zeros, params, 4).validate()


def test_a_title_block_cannot_inflate_past_the_limit_and_the_cache_is_bounded() -> None:
    with pytest.raises(ValueError, match="over"):
        _codecs.encode_block_strings(["x" * (_codecs.MAX_BLOCK_BYTES // 2 + 1)] * 2, block=2)
    big = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = big.compress(b"a" * (_codecs.MAX_BLOCK_BYTES + 10)) + big.flush()
    data = np.frombuffer(bomb, np.uint8)
    table = _codecs.BlockStringTable(
        np.array([0, 0, data.size], np.int64), data.copy(), count=1, block=1
    )
    with pytest.raises(ValueError, match="inflates past"):
        table[0]
    # many large legitimate blocks: the cache keeps at most CACHE_BYTES of them
    titles = [f"t{i:05d}" + "y" * 60_000 for i in range(400)]
    offsets, blob = _codecs.encode_block_strings(titles, block=1)
    table = _codecs.BlockStringTable(offsets, blob, count=400, block=1)
    assert [table[i] for i in range(400)] == titles
    assert 0 < table.cached_blocks() * 60_000 <= _codecs.CACHE_BYTES


def test_packed_encoding_in_chunks_of_rows_is_the_one_stream() -> None:
    # 10M-item catalogs are encoded a million rows at a time: the chunks' bit streams,
    # joined at arbitrary bit offsets, must be exactly the stream of one pass
    rng = np.random.default_rng(5)
    n = 1_000
    counts = rng.integers(0, 25, size=n)
    counts[::97] = 0
    indptr = np.concatenate([[0], np.cumsum(counts)])
    indices = (np.repeat(np.arange(n), counts) + rng.integers(-300, 300, indptr[-1])) % n
    codes = np.sort(rng.integers(0, 256, indptr[-1]).astype(np.uint8))
    codes[rng.random(codes.size) < 0.05] = 7  # some rows with falling codes (raw mode)
    whole, p_whole = encode_neighbours_packed(indptr, indices, codes, chunk_rows=1 << 20)
    for chunk_rows in (64, 128, 320):
        parts, p_parts = encode_neighbours_packed(indptr, indices, codes, chunk_rows=chunk_rows)
        assert p_parts == p_whole
        for name in ("payload", "block_bits", "row_bits"):
            np.testing.assert_array_equal(parts[name], whole[name], err_msg=name)
    store = PackedNeighbourStore(whole, p_whole, n)
    _, targets, got = store.gather(np.arange(n))
    np.testing.assert_array_equal(targets, indices)
    np.testing.assert_array_equal(got, codes)
