"""Sizes and timings of ``ondevice._codecs`` and of the id-order check, on a real bundle.

Prints, with baselines measured in the same run: the old and new
``strictly_increasing`` on the item ids; block-compressed titles and ids (size, encode
time, full decode, random single access from a cold cache) against the plain
``StringTable``; compact neighbour lists in the bundle's item order and in cluster order
(size against plain 3- and 4-byte indices plus one code byte, gather of 50 random items)
against a numpy CSR fancy-index gather. Medians throughout (the machine is shared)::

    .venv/bin/python benchmarks/bench_codecs.py [--bundle PATH --public-key HEX]
    .venv/bin/python benchmarks/bench_codecs.py --packed-only [--npz PATH]

The varint against bit-packed neighbour comparison (:func:`encode_neighbours_packed`)
runs first, on ``--npz`` (``indptr``, ``indices``, ``codes``; default
``/tmp/nbr1m_clustered.npz``, skipped when missing).

Without ``--bundle``, the cached 1M-item bundle of ``bench_scale.py`` is used when
present, else a 100k-item synthetic catalog is generated (``_scale_data.py``). Cluster
order needs the generator's labels, so it is measured only for its bundles (file names
``scale-n<N>-s<SEED>-...``).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _scale_data
from _varint_neighbours import NeighbourStore, encode_neighbours

from ondevice import _bundle2
from ondevice._codecs import (
    BlockStringTable,
    PackedNeighbourStore,
    encode_block_strings,
    encode_neighbours_packed,
)
from ondevice.bundle import load_bundle

DEFAULT_BUNDLE, _ = _scale_data.cache_paths(1_000_000, 0, _scale_data.DEFAULT_CACHE)
"""``bench_scale.py``'s cached 1M-item bundle for the current bundle code, if written."""
DEFAULT_KEY = _scale_data.public_key(0).hex()

DEFAULT_NPZ = Path("/tmp/nbr1m_clustered.npz")

I64 = npt.NDArray[np.int64]


def _median(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _old_strictly_increasing(
    offsets: npt.NDArray[np.integer], blob: npt.NDArray[np.uint8], order: npt.NDArray[np.integer]
) -> bool:
    """The check as it was before (per pair, 2-D byte gathers): the baseline."""
    eight = np.arange(8, dtype=np.int64)

    def word(blob: Any, last: int, starts: I64, lengths: I64, pos: int) -> Any:
        idx = starts[:, None] + (pos + eight)
        got = blob[np.minimum(idx, last)]
        got[idx >= (starts + lengths)[:, None]] = 0
        return got.view(">u8").ravel()

    if order.size < 2:
        return True
    o = order.astype(np.int64)
    starts = offsets.astype(np.int64)
    lengths = np.diff(starts)
    last = max(int(blob.size) - 1, 0)
    padded = blob if blob.size else np.zeros(1, np.uint8)
    for lo in range(0, o.size - 1, 1 << 18):
        hi = min(lo + (1 << 18), o.size - 1)
        a, b = o[lo:hi], o[lo + 1 : hi + 1]
        sa, sb, la, lb = starts[a], starts[b], lengths[a], lengths[b]
        pos = 0
        while sa.size:
            wa, wb = word(padded, last, sa, la, pos), word(padded, last, sb, lb, pos)
            if (wa > wb).any():
                return False
            tied = wa == wb
            ended = tied & ((la - pos <= 8) | (lb - pos <= 8))
            if (la[ended] >= lb[ended]).any():
                return False
            go_on = tied & ~ended
            sa, sb, la, lb = sa[go_on], sb[go_on], la[go_on], lb[go_on]
            pos += 8
    return True


def bench_order_check(ids: Any, repeat: int) -> None:
    offsets, blob, order = ids._offsets, ids._blob, ids._order
    if order is None:
        print("ids have no sort order: skipped")
        return
    assert _old_strictly_increasing(offsets, blob, order)
    assert _bundle2.strictly_increasing(offsets, blob, order)
    old = new = 0.0
    olds, news = [], []
    for _ in range(repeat):  # interleaved: both see the same machine load
        olds.append(_median(lambda: _old_strictly_increasing(offsets, blob, order), 1))
        news.append(_median(lambda: _bundle2.strictly_increasing(offsets, blob, order), 1))
    old, new = statistics.median(olds), statistics.median(news)
    print(f"\n== strictly_increasing on {order.size:,} ids (median of {repeat}, interleaved)")
    print(f"old {old * 1e3:8.1f} ms   new {new * 1e3:8.1f} ms   speed-up {old / new:4.1f}x")


def bench_strings(name: str, table: Any, block: int, samples: int) -> None:
    n = len(table)
    raw_bytes = int(table._blob.nbytes + table._offsets.nbytes)
    strings = [table[i] for i in range(n)]
    t0 = time.perf_counter()
    offsets, data = encode_block_strings(strings, block)
    t_enc = time.perf_counter() - t0
    packed = BlockStringTable(offsets, data, count=n, block=block, cache_blocks=1)
    size = int(offsets.nbytes + data.nbytes)
    t0 = time.perf_counter()
    packed.validate()
    t_full = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    picks = rng.integers(0, n, samples)
    cold, plain = [], []
    for i in picks.tolist():  # cache of one block: a random pick is (almost) always a miss
        t0 = time.perf_counter()
        packed[i]
        cold.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        table[i]
        plain.append(time.perf_counter() - t0)
    assert all(packed[i] == strings[i] for i in picks[:200].tolist())
    print(
        f"{name:6s} block {block:3d}: {size / 1e6:7.2f} MB vs plain {raw_bytes / 1e6:7.2f} MB "
        f"({raw_bytes / size:4.2f}x; dict {int(offsets[1]) / 1024:.0f} KiB)  encode {t_enc:5.1f} s"
        f"  full decode {t_full:5.2f} s  random access (cold) median "
        f"{statistics.median(cold) * 1e6:5.1f} us p90 {np.percentile(cold, 90) * 1e6:5.1f} us"
        f"  [plain {statistics.median(plain) * 1e6:4.1f} us]"
    )


def _reorder(
    indptr: I64, indices: npt.NDArray[np.integer], codes: npt.NDArray[np.uint8], perm: I64
) -> tuple[I64, I64, npt.NDArray[np.uint8]]:
    """The CSR with item ``perm[r]`` stored as row ``r`` (targets renumbered)."""
    n = perm.size
    inverse = np.empty(n, dtype=np.int64)
    inverse[perm] = np.arange(n, dtype=np.int64)
    lens = np.diff(indptr)[perm]
    new_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lens, out=new_ptr[1:])
    src = np.repeat(indptr[:-1][perm] - new_ptr[:-1], lens) + np.arange(int(new_ptr[-1]))
    return new_ptr, inverse[indices[src]], codes[src]


def _csr_gather(
    indptr: I64, indices: npt.NDArray[np.integer], codes: npt.NDArray[np.uint8], items: I64
) -> tuple[I64, Any, Any]:
    starts = indptr[items]
    lens = indptr[items + 1] - starts
    ends = np.cumsum(lens)
    pos = np.repeat(starts - (ends - lens), lens) + np.arange(int(ends[-1]) if ends.size else 0)
    return np.repeat(np.arange(items.size), lens), indices[pos], codes[pos]


def bench_neighbours(
    label: str,
    indptr: I64,
    indices: npt.NDArray[np.integer],
    codes: npt.NDArray[np.uint8],
    code_bits: int,
    repeat: int,
) -> None:
    n, entries = indptr.size - 1, int(indptr[-1])
    t0 = time.perf_counter()
    offsets, payload = encode_neighbours(indptr, indices, codes, code_bits=code_bits)
    t_enc = time.perf_counter() - t0
    store = NeighbourStore(offsets, payload, n, code_bits=code_bits)
    plain3 = entries * 4 + (n + 1) * 4  # 3-byte index + code byte, int32 indptr
    plain4 = entries * 5 + (n + 1) * 4
    size = int(payload.nbytes + offsets.nbytes)
    rng = np.random.default_rng(2)
    batches = [rng.integers(0, n, 50) for _ in range(repeat)]
    for items in batches[:20]:
        got = store.gather(items)
        want = _csr_gather(indptr, indices, codes, items)
        assert all(np.array_equal(got[k], want[k]) for k in range(3))
    ours, csr = [], []
    for items in batches:
        t0 = time.perf_counter()
        store.gather(items)
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _csr_gather(indptr, indices, codes, items)
        csr.append(time.perf_counter() - t0)
    t_ours, t_csr = statistics.median(ours), statistics.median(csr)
    t0 = time.perf_counter()
    store.validate()
    t_all = time.perf_counter() - t0
    print(
        f"{label:22s} bits {code_bits}: payload {payload.nbytes / 1e6:6.2f} MB "
        f"+ offsets {offsets.nbytes / 1e6:4.1f} MB = {size / 1e6:6.2f} MB "
        f"({payload.nbytes / entries:4.2f} B/entry) vs plain 3-byte {plain3 / 1e6:6.1f} MB "
        f"({plain3 / size:4.2f}x), 4-byte {plain4 / 1e6:6.1f} MB ({plain4 / size:4.2f}x); "
        f"encode {t_enc:4.1f} s, decode all {t_all:4.1f} s; gather 50 items median "
        f"{t_ours * 1e6:5.0f} us [CSR fancy index {t_csr * 1e6:4.0f} us]"
    )


def _gather_times(store: Any, n: int, repeat: int) -> tuple[float, float]:
    rng = np.random.default_rng(3)
    times = []
    for _ in range(repeat):
        items = rng.integers(0, n, 50)
        t0 = time.perf_counter()
        store.gather(items)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), float(np.percentile(times, 90))


def bench_packed(path: Path, repeat: int) -> None:
    """Varint against bit-packed neighbour lists on an ``.npz`` of ``indptr``,
    ``indices`` and ``codes`` (same run, same machine load)."""
    data = np.load(path)
    indptr = data["indptr"].astype(np.int64)
    indices, codes = data["indices"], data["codes"].astype(np.uint8)
    n, entries = indptr.size - 1, int(indptr[-1])
    print(
        f"\n== neighbour lists: varint vs bit-packed on {path} ({n:,} items, {entries:,} entries)"
    )
    t0 = time.perf_counter()
    offsets, payload = encode_neighbours(indptr, indices, codes)
    t_enc_v = time.perf_counter() - t0
    t0 = time.perf_counter()
    arrays, params = encode_neighbours_packed(indptr, indices, codes)
    t_enc_p = time.perf_counter() - t0
    ctor_v = _median(lambda: NeighbourStore(offsets, payload, n), 7)
    ctor_p = _median(lambda: PackedNeighbourStore(arrays, params, n), 7)
    varint = NeighbourStore(offsets, payload, n)
    packed = PackedNeighbourStore(arrays, params, n)
    rng = np.random.default_rng(2)
    for items in [rng.integers(0, n, 50) for _ in range(20)]:
        want = _csr_gather(indptr, indices, codes, items)
        for store in (varint, packed):
            got = store.gather(items)
            assert all(np.array_equal(got[k], want[k]) for k in range(3))
    g_v, g_p = [], []
    for _ in range(5):  # interleaved rounds: both see the same load
        g_v.append(_gather_times(varint, n, repeat // 5))
        g_p.append(_gather_times(packed, n, repeat // 5))
    t0 = time.perf_counter()
    varint.validate()
    val_v = time.perf_counter() - t0
    t0 = time.perf_counter()
    packed.validate()
    val_p = time.perf_counter() - t0
    sizes = {k: v.nbytes for k, v in arrays.items()}
    print(
        f"params {params}; arrays "
        + ", ".join(f"{k} {arrays[k].dtype} {sizes[k] / 1e6:.2f} MB" for k in arrays)
    )
    for name, pay_b, off_b, t_enc, ctor, g, val in (
        ("varint", payload.nbytes, offsets.nbytes, t_enc_v, ctor_v, g_v, val_v),
        (
            "packed",
            sizes["payload"],
            sizes["block_bits"] + sizes["row_bits"],
            t_enc_p,
            ctor_p,
            g_p,
            val_p,
        ),
    ):
        med = statistics.median(x[0] for x in g)
        p90 = statistics.median(x[1] for x in g)
        print(
            f"{name:7s} payload {pay_b / 1e6:6.2f} MB ({pay_b * 8 / entries:5.2f} bits/entry) "
            f"+ offsets {off_b / 1e6:5.2f} MB = {(pay_b + off_b) / 1e6:6.2f} MB; encode "
            f"{t_enc:5.1f} s; construct {ctor * 1e3:6.2f} ms; gather 50 items median "
            f"{med * 1e6:5.0f} us p90 {p90 * 1e6:5.0f} us; validate all {val:5.1f} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--public-key", default=None, help="hex of the raw Ed25519 key")
    parser.add_argument("--repeat", type=int, default=7, help="runs of the order check")
    parser.add_argument("--samples", type=int, default=3000, help="random string reads")
    parser.add_argument("--gathers", type=int, default=2000, help="neighbour gathers")
    parser.add_argument("--block", type=int, nargs="*", default=[16])
    parser.add_argument("--code-bits", type=int, nargs="*", default=[2])
    parser.add_argument(
        "--npz",
        type=Path,
        default=DEFAULT_NPZ,
        help="indptr/indices/codes for the varint vs bit-packed comparison",
    )
    parser.add_argument("--packed-only", action="store_true", help="only that comparison")
    args = parser.parse_args()

    if args.npz is not None and args.npz.exists():
        bench_packed(args.npz, args.gathers)
    else:
        print(f"{args.npz}: not found, varint vs bit-packed comparison skipped")
    if args.packed_only:
        return

    path, key = args.bundle, args.public_key
    if path is None and DEFAULT_BUNDLE.exists():
        path, key = DEFAULT_BUNDLE, key or DEFAULT_KEY
    if path is None:
        meta = _scale_data.ensure_bundle(100_000, 0, _scale_data.DEFAULT_CACHE)
        path, key = Path(meta["path"]), meta["public_key"]
    if key is None:
        parser.error("--public-key is required with --bundle")
    t0 = time.perf_counter()
    catalog = load_bundle(path, public_key=bytes.fromhex(key))
    print(f"{path}: {len(catalog.item_ids):,} items, loaded in {time.perf_counter() - t0:.1f} s")

    bench_order_check(catalog.item_ids, args.repeat)

    print("\n== block-compressed strings (raw deflate, level 9, preset dictionary)")
    for block in args.block:
        bench_strings("titles", catalog.titles, block, args.samples)
    bench_strings("ids", catalog.item_ids, args.block[0], args.samples)

    print("\n== neighbour lists")
    indptr = np.asarray(catalog.nbr_indptr, dtype=np.int64)
    indices, weights = catalog.nbr_indices, np.asarray(catalog.nbr_weights)
    if weights.dtype != np.uint8:
        print("neighbour weights are not one-byte codes (format 1?): skipped")
        return
    codes: npt.NDArray[np.uint8] = weights.astype(np.uint8)
    for bits in args.code_bits:
        bench_neighbours("bundle (random) order", indptr, indices, codes, bits, args.gathers)
    m = re.match(r"scale-n(\d+)-s(\d+)-", path.name)
    if m and int(m.group(1)) == indptr.size - 1:
        n, seed = int(m.group(1)), int(m.group(2))
        labels = _scale_data.make_labels(n, seed, _scale_data.make_layout(n, seed))
        perm = np.argsort(labels, kind="stable").astype(np.int64)
        c_ptr, c_idx, c_codes = _reorder(indptr, indices, codes, perm)
        for bits in args.code_bits:
            bench_neighbours("cluster order", c_ptr, c_idx, c_codes, bits, args.gathers)
    else:
        print("cluster order: needs a bundle of benchmarks/_scale_data.py (labels)")


if __name__ == "__main__":
    main()
