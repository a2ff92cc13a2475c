"""Choosing an approximate top-k index for the ``individual`` level (inner product, MIPS).

For ``--items`` synthetic ALS-like item factors (64 dims, 200 Gaussian clusters,
long-tailed popularity-dependent norms; see ``_ann_data.py``) and ``--queries`` user
vectors from the device's own implicit-ALS fold-in, measures in one run:

* the baselines: exact ``Y @ x`` + ``argpartition`` in float32 (also with the package's
  ``ondevice.scoring.top_k``), and exact scoring of per-row int8 factors dequantized in
  blocks of 65,536 rows;
* candidate indexes (``--candidates``, default all): usearch and voyager HNSW with the
  inner-product metric directly and with the MIPS -> cosine transform (an extra
  dimension ``sqrt(M^2 - |y|^2)``, query with 0 there), in float32, float16/E4M3 and
  8-bit storage; ``ivf-np``, an inverted file written here in numpy (k-means
  centroids, the int8 factors stored in cluster order, probe the ``nprobe`` clusters
  whose centroid scores best, score those rows exactly); and faiss-cpu indexes with
  the inner-product metric: ``faiss-ivf-flat`` (``IndexIVFFlat``, float32 lists) and
  ``faiss-ivf-sq8`` (``IndexIVFScalarQuantizer``, ``QT_8bit``: 8 bits per dimension,
  residuals), both with ivf-np's number of lists (``ann_build.default_clusters``),
  trained by faiss on ivf-np's sample of ``64 x nlist`` items with its defaults for
  inner product (spherical k-means, each item in the list whose centroid has the
  largest inner product with it, probes by inner product with the centroids);
  ``-l2km`` variants take ivf-np's clustering instead (the L2 k-means of ``ann_build``,
  each item in the list of its nearest centroid), to separate clustering from storage;
  ``faiss-hnsw-sq8`` / ``faiss-hnsw-flat`` (``IndexHNSWSQ`` / ``IndexHNSWFlat``).

For every candidate: build time (2 threads), serialized size, and, in a fresh child
process that reads the serialized bytes into private anonymous memory first (as
``ondevice.bundle`` does with a verified bundle, at a 64-byte offset as inside a
bundle), the restore-from-that-buffer time (median of 5; usearch both ``view``, no
copy, and ``load``, a copy; voyager ``Index.load`` of an ``io.BytesIO`` over the
buffer; ivf-np: ``np.frombuffer`` views; faiss: ``faiss.deserialize_index`` of the
buffer, a copy, and ``read_index`` through a ``faiss.ZeroCopyIOReader`` over the
buffer, no copy of the vectors or lists), the resident memory the restored index adds
beyond that buffer (steady and peak), and single-query latency (library threads = 1,
BLAS threads = 1) with recall@10 against the exact float32 top 10, sweeping ``ef``
(``nprobe`` for the inverted files) up to the smallest value that reaches ``--target``
recall, then p50/p99 over ``--passes`` passes at that value.

Sizes: ``idx MB`` is the serialized index; ``extra MB`` what it adds to a bundle that
ships the per-row int8 factors anyway (64 MB + 4 MB of scales at 1M items). ivf-np's
blob here holds those factors in cluster order (a bundle stores its catalog in that
order), so its extra is the centroids and offsets alone; an HNSW or faiss index holds
its own copy of the vectors (faiss IVF: float32 or 8-bit codes in its lists, plus an
int64 id per item, 8 bytes), so all of it is extra.

faiss restore: ``faiss.deserialize_index`` first copies the array into a
``std::vector`` and then reads the index out of that into faiss's own memory, so the
RSS it adds is about the index size and the peak about twice that. ``IO_FLAG_MMAP``
(on-disk inverted lists) and ``IO_FLAG_MMAP_IFC`` map a file, from a file name or a
``FILE*`` (bundles are never memory-mapped), but ``read_index`` through a
``faiss.ZeroCopyIOReader(ptr, size)`` (faiss >= 1.11) makes the inverted lists' codes
and ids, the coarse centroids, flat and SQ codes and the HNSW neighbour table views of
the caller's buffer (which must then outlive the index; HNSW levels and offsets, 12
bytes per item, are still copied). The child measures its RSS first, on a clean heap,
keeps it, and checks that it returns the same top 10 as the copy.

``--determinism N`` also builds every candidate twice on the first N items with one
thread and twice with two, and says whether the serialized bytes are identical.

    .venv/bin/python benchmarks/bench_ann_select.py [--items 1000000] [--queries 200]
        [--candidates NAME,...] [--passes 3] [--target 0.95] [--determinism 50000]

Needs ``pip install usearch voyager faiss-cpu==1.15.1`` (not dependencies of the
package); a candidate whose library is missing is reported as a failed build.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import io
import json
import mmap
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ondevice.operator import ann_build

K = 10
EF_SWEEP = [10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048]
NPROBE_SWEEP = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
BLOCK = 65_536
OFFSET_IN_BUNDLE = 64  # the child restores from buf[64:], as an array inside a bundle


# -- candidates ------------------------------------------------------------------------


@dataclass
class Candidate:
    name: str
    lib: str  # usearch | voyager | ivf-np | faiss
    metric: str  # ip | cos-aug (MIPS->cosine transform) | ...
    dtype: str  # storage
    params: dict[str, int] = field(default_factory=dict)

    @property
    def aug(self) -> bool:
        return self.metric.endswith("-aug")


CANDIDATES = [
    Candidate("us-ip-f32-M16", "usearch", "ip", "f32", {"M": 16, "efc": 128}),
    Candidate("us-ip-f16-M16", "usearch", "ip", "f16", {"M": 16, "efc": 128}),
    Candidate("us-ip-i8-M16", "usearch", "ip", "i8", {"M": 16, "efc": 128}),
    Candidate("us-cos-aug-f16-M16", "usearch", "cos-aug", "f16", {"M": 16, "efc": 128}),
    Candidate("us-cos-aug-i8-M16", "usearch", "cos-aug", "i8", {"M": 16, "efc": 128}),
    Candidate("us-cos-aug-i8-M8", "usearch", "cos-aug", "i8", {"M": 8, "efc": 128}),
    Candidate("us-cos-aug-f32-M16", "usearch", "cos-aug", "f32", {"M": 16, "efc": 128}),
    Candidate("us-ip-f16-M8", "usearch", "ip", "f16", {"M": 8, "efc": 128}),
    Candidate("vo-ip-f32-M16", "voyager", "ip", "f32", {"M": 16, "efc": 128}),
    Candidate("vo-ip-e4m3-M16", "voyager", "ip", "e4m3", {"M": 16, "efc": 128}),
    Candidate("vo-ip-f8-M16", "voyager", "ip", "f8", {"M": 16, "efc": 128}),
    Candidate("vo-cos-aug-f8-M16", "voyager", "cos-aug", "f8", {"M": 16, "efc": 128}),
    Candidate("vo-cos-aug-f8-M8", "voyager", "cos-aug", "f8", {"M": 8, "efc": 128}),
    Candidate("vo-ip-f8-M8", "voyager", "ip", "f8", {"M": 8, "efc": 128}),
    Candidate("ivf-np-i8", "ivf-np", "ip", "i8", {"nlist": 0}),  # 0: default_clusters
    # faiss: nlist 0 = ann_build.default_clusters (as ivf-np); l2km 1 = ivf-np's clusters
    Candidate("faiss-ivf-flat", "faiss", "ip", "f32", {"nlist": 0}),
    Candidate("faiss-ivf-sq8", "faiss", "ip", "sq8", {"nlist": 0}),
    Candidate("faiss-ivf-flat-l2km", "faiss", "ip", "f32", {"nlist": 0, "l2km": 1}),
    Candidate("faiss-ivf-sq8-l2km", "faiss", "ip", "sq8", {"nlist": 0, "l2km": 1}),
    Candidate("faiss-hnsw-sq8", "faiss", "ip", "sq8", {"M": 16, "efc": 128}),
    Candidate("faiss-hnsw-flat", "faiss", "ip", "f32", {"M": 16, "efc": 128}),
]
BY_NAME = {c.name: c for c in CANDIDATES}


# -- vectors as each candidate indexes them ---------------------------------------------


def augment(y: np.ndarray, chunk: int = 1_000_000) -> np.ndarray:
    """``[y / M, sqrt(1 - |y/M|^2)]`` with ``M = max |y|``: every row unit length, and
    ``<[q, 0], row> = <q, y> / M``, so cosine / L2 order = inner-product order."""
    norms = np.sqrt(np.einsum("ij,ij->i", y, y, dtype=np.float64))
    big_m = float(norms.max()) * 1.0001
    out = np.empty((y.shape[0], y.shape[1] + 1), dtype=np.float32)
    for a in range(0, y.shape[0], chunk):
        b = min(y.shape[0], a + chunk)
        out[a:b, :-1] = y[a:b] / big_m
        out[a:b, -1] = np.sqrt(np.maximum(0.0, 1.0 - (norms[a:b] / big_m) ** 2))
    return out


def index_vectors(cand: Candidate, y: np.ndarray) -> np.ndarray:
    if cand.aug:
        return augment(y)
    if cand.dtype == "f8":  # voyager fixed point: values in [-1, 1]
        return (y / np.float32(np.abs(y).max() * 1.0001)).astype(np.float32)
    return y


def query_vectors(cand: Candidate, q: np.ndarray) -> np.ndarray:
    if cand.aug:
        out = np.zeros((q.shape[0], q.shape[1] + 1), dtype=np.float32)
        out[:, :-1] = q / np.linalg.norm(q, axis=1, keepdims=True)
        return out
    if cand.dtype in ("f8", "i8", "e4m3"):  # scale is free for ranking; keep in range
        return (q / np.abs(q).max(axis=1, keepdims=True)).astype(np.float32)
    return q.astype(np.float32)


# -- build + serialize (operator side, parent process) ------------------------------------


def build(
    cand: Candidate, vecs: np.ndarray, threads: int, extra: dict[str, Any]
) -> tuple[bytes | bytearray | np.ndarray, float]:
    """Build the index over ``vecs`` (keys 0..n-1); return its serialized bytes (a
    uint8 array for faiss) and the build time (serialization excluded)."""
    n, dim = vecs.shape
    t0 = time.perf_counter()
    if cand.lib == "usearch":
        from usearch.index import Index

        metric = {"ip": "ip", "cos-aug": "cos"}[cand.metric]
        index = Index(
            ndim=dim,
            metric=metric,
            dtype=cand.dtype,
            connectivity=cand.params["M"],
            expansion_add=cand.params["efc"],
        )
        index.add(np.arange(n, dtype=np.uint64), vecs, threads=threads)
        t_build = time.perf_counter() - t0
        blob = index.save()
        del index
    elif cand.lib == "voyager":
        import voyager

        space = {"ip": voyager.Space.InnerProduct, "cos-aug": voyager.Space.Cosine}[cand.metric]
        sdt = {
            "f32": voyager.StorageDataType.Float32,
            "e4m3": voyager.StorageDataType.E4M3,
            "f8": voyager.StorageDataType.Float8,
        }[cand.dtype]
        index = voyager.Index(
            space,
            dim,
            M=cand.params["M"],
            ef_construction=cand.params["efc"],
            random_seed=1,
            max_elements=n,
            storage_data_type=sdt,
        )
        ids = index.add_items(vecs, num_threads=threads)
        if ids[0] != 0 or ids[-1] != n - 1:
            raise RuntimeError("voyager assigned unexpected ids")
        t_build = time.perf_counter() - t0
        blob = index.as_bytes()
        del index
    elif cand.lib == "ivf-np":
        blob = ivf_build(extra["yq"], extra["scale"], vecs, cand.params["nlist"], threads)
        t_build = time.perf_counter() - t0
    elif cand.lib == "faiss":
        import faiss

        index = faiss_build(cand, vecs, threads)
        t_build = time.perf_counter() - t0
        blob = faiss.serialize_index(index)  # uint8 array
        del index
    else:
        raise ValueError(cand.lib)
    return blob, t_build


# -- faiss -----------------------------------------------------------------------------------


def ivf_sample(y: np.ndarray, nlist: int) -> np.ndarray:
    """The k-means training sample of ivf-np (and of the faiss inverted files): ``64 x
    nlist`` distinct rows, in item order."""
    n = y.shape[0]
    rng = np.random.default_rng(7)
    return y[np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))]


def faiss_build(cand: Candidate, y: np.ndarray, threads: int) -> Any:
    """A faiss index over ``y`` (ids 0..n-1) with the inner-product metric.

    Inverted files: ``nlist`` lists (0: ``default_nlist``), trained on ivf-np's sample,
    probed by the inner product of the query with the centroids (``IndexFlatIP``). By
    default faiss's own training (for inner product: spherical k-means, 10 iterations)
    and assignment (each item to the centroid of largest inner product); with ``l2km``
    exactly ivf-np's clustering: its centroids (L2 k-means, 12 iterations) in the
    coarse quantizer and each item in the list of its nearest centroid (L2), through
    ``add_core`` (faiss then trains only the scalar quantizer). ``sq8`` is
    ``QT_8bit`` (per-dimension min/max, on the residuals to the centroid, faiss's
    default). HNSW: ``M`` and ``efConstruction``."""
    import faiss
    from threadpoolctl import threadpool_limits

    n, dim = y.shape
    y = np.ascontiguousarray(y, dtype=np.float32)
    faiss.omp_set_num_threads(threads)
    ip = faiss.METRIC_INNER_PRODUCT
    p = cand.params
    if "nlist" in p:
        nlist = p["nlist"] or default_nlist(n)
        sample = np.ascontiguousarray(ivf_sample(y, nlist))
        quantizer = faiss.IndexFlatIP(dim)
        labels = None
        if p.get("l2km"):
            with threadpool_limits(threads):
                cent = ann_build._kmeans(sample, nlist, np.random.default_rng(11))
                labels = ann_build._assign(y, cent).astype(np.int64)
            quantizer.add(cent)
        if cand.dtype == "f32":
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, ip)
        elif cand.dtype == "sq8":
            qt = faiss.ScalarQuantizer.QT_8bit
            index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, qt, ip)
        else:
            raise ValueError(cand.dtype)
        index.cp.seed = 11
        index.train(sample)  # l2km: the scalar quantizer only
        if labels is None:  # each item to the list whose centroid scores it best (IP)
            index.add(y)  # ids 0..n-1; the wrapper keeps ``quantizer`` alive
        else:  # ivf-np's assignment: the nearest centroid (L2); ids 0..n-1 (None)
            index.add_core(n, faiss.swig_ptr(y), None, faiss.swig_ptr(labels))
        return index
    if cand.dtype == "f32":
        index = faiss.IndexHNSWFlat(dim, p["M"], ip)
    elif cand.dtype == "sq8":
        index = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_8bit, p["M"], ip)
        index.train(y)  # per-dimension min/max over every item
    else:
        raise ValueError(cand.dtype)
    index.hnsw.efConstruction = p["efc"]
    index.add(y)
    return index


# -- ivf-np: an inverted file in numpy ---------------------------------------------------


def default_nlist(n: int) -> int:
    return ann_build.default_clusters(n)


def ivf_build(yq: np.ndarray, scale: np.ndarray, y: np.ndarray, nlist: int, threads: int) -> bytes:
    """Centroids by k-means (L2) on a sample of the float32 factors, every item assigned
    to its nearest centroid; the blob holds the centroids, cluster offsets, the item
    order and the int8 factors + scales *in cluster order* (they replace the bundle's
    factor array: the blob's size is the whole cost)."""
    from threadpoolctl import threadpool_limits

    n = y.shape[0]
    nlist = nlist or default_nlist(n)
    sample = ivf_sample(y, nlist)
    with threadpool_limits(threads):
        # the same k-means (L2, 12 iterations) and assignment the bundle writer uses
        cent = ann_build._kmeans(sample, nlist, np.random.default_rng(11))
        lab = ann_build._assign(y, cent)
    order = np.argsort(lab, kind="stable").astype(np.int32)
    offsets = np.searchsorted(lab[order], np.arange(nlist + 1)).astype(np.int64)
    return pack_arrays(
        {
            "centroids": cent,
            "offsets": offsets,
            "order": order,
            "factors_i8": yq[order],
            "scale": scale[order],
        }
    )


def pack_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    """A minimal container like the bundle's array region: u32 header length, JSON
    header, then each array 64-byte aligned."""
    table, parts, pos = [], [], 0
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        pad = (-pos) % 64
        parts.append(b"\0" * pad)
        pos += pad
        table.append({"name": name, "dtype": a.dtype.str, "shape": a.shape, "offset": pos})
        parts.append(a.tobytes())
        pos += a.nbytes
    head = json.dumps(table).encode()
    head += b" " * ((-(4 + len(head))) % 64)
    return struct.pack("<I", len(head)) + head + b"".join(parts)


def unpack_arrays(buf: np.ndarray) -> dict[str, np.ndarray]:
    """Zero-copy views over ``buf`` (a uint8 array)."""
    (hlen,) = struct.unpack("<I", bytes(buf[:4]))
    table = json.loads(bytes(buf[4 : 4 + hlen]))
    base = 4 + hlen
    out = {}
    for e in table:
        dt = np.dtype(e["dtype"])
        count = int(np.prod(e["shape"])) if e["shape"] else 1
        a = np.frombuffer(buf, dtype=dt, count=count, offset=base + e["offset"])
        out[e["name"]] = a.reshape(e["shape"])
    return out


class IvfIndex:
    def __init__(self, buf: np.ndarray) -> None:
        a = unpack_arrays(buf)
        self.centroids = a["centroids"]
        self.offsets = a["offsets"]
        self.order = a["order"]
        self.yq = a["factors_i8"]
        self.scale = a["scale"]
        self.sizes = np.diff(self.offsets)
        self.nprobe = 8

    def search(self, q: np.ndarray, k: int) -> np.ndarray:
        cs = self.centroids @ q
        nprobe = min(self.nprobe, cs.shape[0])
        probe = np.argpartition(cs, cs.shape[0] - nprobe)[-nprobe:]
        starts = self.offsets[probe]
        lens = self.sizes[probe]
        total = int(lens.sum())
        block = np.empty((total, self.yq.shape[1]), dtype=np.float32)
        sc = np.empty(total, dtype=np.float32)
        pos = 0
        yq, scale = self.yq, self.scale
        for s, m in zip(starts.tolist(), lens.tolist(), strict=True):
            block[pos : pos + m] = yq[s : s + m]
            sc[pos : pos + m] = scale[s : s + m]
            pos += m
        scores = block @ q
        scores *= sc
        kk = min(k, total)
        top = np.argpartition(scores, total - kk)[-kk:]
        top = top[np.argsort(-scores[top], kind="stable")]
        cum = np.cumsum(lens) - lens  # start position of each probed cluster in block
        seg = np.searchsorted(cum, top, side="right") - 1
        rows = starts[seg] + (top - cum[seg])
        return self.order[rows]


# -- restore + query (device side, child process) -----------------------------------------


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e3
    return float("nan")


def reset_hwm() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def private_buffer(path: str) -> np.ndarray:
    """The file's bytes in fresh private anonymous memory at offset 64, read once (as
    ``ondevice.bundle`` reads a bundle's array region); returns the read-only view of
    the index bytes."""
    size = os.path.getsize(path)
    mem = mmap.mmap(-1, size + OFFSET_IN_BUNDLE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arr = np.frombuffer(mem, dtype=np.uint8)
    with open(path, "rb") as f:
        view = memoryview(arr)[OFFSET_IN_BUNDLE:]
        pos = 0
        while pos < size:
            got = f.readinto(view[pos:])
            if not got:
                raise OSError("short read")
            pos += got
    arr.flags.writeable = False
    return arr[OFFSET_IN_BUNDLE:]


def restore(lib: str, buf: np.ndarray, mode: str) -> Any:
    """Restore from the in-memory buffer. usearch modes: ``view`` (no copy, the key ->
    slot table not built: search still returns keys), ``view+keys`` (the default view),
    ``load`` (a copy). voyager: ``Index.load`` of an ``io.BytesIO`` over the buffer (one
    memcpy, then native parsing; a pure-Python reader costs one call per element).
    faiss: ``copy`` (``deserialize_index``) or ``zerocopy`` (``read_index`` through a
    ``ZeroCopyIOReader`` over the buffer)."""
    if lib == "usearch":
        from usearch.index import Index

        if mode == "view":
            return Index.restore(buf, view=True, enable_key_lookups=False)
        return Index.restore(buf, view=(mode == "view+keys"))
    if lib == "voyager":
        import voyager

        if mode == "memfd":  # Linux only: a private anonymous file, loaded natively
            fd = os.memfd_create("voyager-index")
            try:
                mv, pos = memoryview(buf), 0
                while pos < len(mv):
                    pos += os.write(fd, mv[pos:])
                return voyager.Index.load(f"/proc/self/fd/{fd}")
            finally:
                os.close(fd)
        f = io.BytesIO(memoryview(buf))
        try:
            return voyager.Index.load(f)
        finally:
            f.close()
    if lib == "ivf-np":
        return IvfIndex(buf)
    if lib == "faiss":
        import faiss

        if mode == "zerocopy":  # views of ``buf``: it must outlive the index
            reader = faiss.ZeroCopyIOReader(faiss.swig_ptr(buf), buf.size)
            index = faiss.read_index(reader)
            index.referenced_objects = [buf]  # faiss's own keep-alive attribute
            return index
        return faiss.deserialize_index(buf)  # copies buf into a std::vector, then reads
    raise ValueError(lib)


def make_searcher(lib: str, index: Any) -> tuple[Any, Any]:
    """(set_ef(ef), search(q) -> keys) with one thread."""
    if lib == "usearch":

        def set_ef(ef: int) -> None:
            index.expansion_search = ef

        def search(q: np.ndarray) -> np.ndarray:
            return index.search(q, K, threads=1).keys

    elif lib == "voyager":
        box = {"ef": 64}

        def set_ef(ef: int) -> None:
            box["ef"] = ef

        def search(q: np.ndarray) -> np.ndarray:
            return index.query(q, k=K, num_threads=1, query_ef=box["ef"])[0]

    elif lib == "faiss":
        import faiss

        faiss.omp_set_num_threads(1)
        if isinstance(index, faiss.IndexIVF):

            def set_ef(ef: int) -> None:
                index.nprobe = ef

        else:

            def set_ef(ef: int) -> None:
                index.hnsw.efSearch = ef

        def search(q: np.ndarray) -> np.ndarray:
            return index.search(q[None, :], K)[1][0]

    else:

        def set_ef(ef: int) -> None:
            index.nprobe = ef

        def search(q: np.ndarray) -> np.ndarray:
            return index.search(q, K)

    return set_ef, search


def time_queries(search: Any, queries: np.ndarray, gt: np.ndarray, passes: int) -> dict:
    times, hits = [], 0
    for p in range(passes):
        for i in range(queries.shape[0]):
            q = queries[i]
            t0 = time.perf_counter()
            keys = search(q)
            times.append(time.perf_counter() - t0)
            if p == 0:
                hits += len(np.intersect1d(np.asarray(keys, dtype=np.int64), gt[i]))
    t = np.array(times) * 1e3
    return {
        "recall": hits / gt.size,
        "p50": float(np.percentile(t, 50)),
        "p99": float(np.percentile(t, 99)),
    }


def child_main(spec_path: str) -> None:
    from threadpoolctl import threadpool_limits

    with open(spec_path) as f:
        spec = json.load(f)
    lib = spec["lib"]
    queries = np.load(spec["queries"])
    gt = np.load(spec["gt"])
    out: dict[str, Any] = {}
    with threadpool_limits(1):
        buf = private_buffer(spec["index"])
        modes = {
            "usearch": ["view", "view+keys", "load"],
            "voyager": ["load", "memfd"],
            "faiss": ["copy", "zerocopy"],
        }.get(lib, ["load"])
        zc_index = None
        if lib == "faiss":  # the zero-copy restore's memory, before any heap is freed
            import faiss  # first: the library's own pages are not the index's

            faiss.omp_set_num_threads(1)
            gc.collect()
            r0 = rss_mb()
            zc_index = restore(lib, buf, "zerocopy")
            out["rss_added_zc"] = rss_mb() - r0
        # resident memory added by the first restore (+ the sweep's queries below)
        gc.collect()
        rss0 = rss_mb()
        reset_hwm()
        hwm0 = hwm_mb()
        t0 = time.perf_counter()
        index = restore(lib, buf, modes[0])
        t_first = time.perf_counter() - t0
        out["rss_after_restore"] = rss_mb() - rss0
        set_ef, search = make_searcher(lib, index)
        for q in queries[:5]:
            search(q)  # warm-up
        nlist = spec.get("nlist", 0)  # inverted files: sweep nprobe up to nlist
        sweep = NPROBE_SWEEP if nlist else EF_SWEEP
        rows = []
        best = None
        for ef in sweep:
            if nlist and ef > nlist:
                break
            if ef > spec["max_ef"]:
                break
            set_ef(ef)
            r = time_queries(search, queries, gt, 1)
            r["ef"] = ef
            rows.append(r)
            if r["recall"] >= spec["target"]:
                best = ef
                break
        if best is None:
            best = rows[-1]["ef"]
        set_ef(best)
        final = time_queries(search, queries, gt, spec["passes"])
        final["ef"] = best
        out["sweep"] = rows
        out["final"] = final
        out["rss_added"] = rss_mb() - rss0
        out["peak_added"] = hwm_mb() - hwm0
        keys_first = [np.asarray(search(q), dtype=np.int64) for q in queries]
        del index, search, set_ef
        gc.collect()
        # restore times, median of 5, for each mode
        restores: dict[str, list[float]] = {m: [] for m in modes}
        restores[modes[0]].append(t_first)
        for m in modes:
            while len(restores[m]) < 5:
                t0 = time.perf_counter()
                ix = restore(lib, buf, m)
                restores[m].append(time.perf_counter() - t0)
                del ix
                gc.collect()
        out["restore_ms"] = {m: float(np.median(v)) * 1e3 for m, v in restores.items()}
        if lib == "usearch":  # the copy's memory, measured last
            gc.collect()
            r0 = rss_mb()
            ix = restore(lib, buf, "load")
            set_ef2, search2 = make_searcher(lib, ix)
            set_ef2(best)
            for q in queries:
                search2(q)
            out["rss_added_load"] = rss_mb() - r0
        if zc_index is not None:  # the zero-copy index: the same answers as the copy?
            set_ef2, search2 = make_searcher(lib, zc_index)
            set_ef2(best)
            keys_zc = [np.asarray(search2(q), dtype=np.int64) for q in queries]
            out["zc_same"] = all(
                np.array_equal(a, b) for a, b in zip(keys_first, keys_zc, strict=True)
            )
    print("RESULT " + json.dumps(out))


# -- exact baselines (parent) --------------------------------------------------------------


def exact_f32(y: np.ndarray):
    def search(q: np.ndarray) -> np.ndarray:
        s = y @ q
        top = np.argpartition(s, s.shape[0] - K)[-K:]
        return top[np.argsort(-s[top], kind="stable")]

    return search


def exact_f32_topk(y: np.ndarray):
    from ondevice.scoring import top_k

    def search(q: np.ndarray) -> np.ndarray:
        return top_k(y @ q, K)

    return search


def exact_i8(yq: np.ndarray, scale: np.ndarray):
    n = yq.shape[0]
    scores = np.empty(n, dtype=np.float32)
    block = np.empty((BLOCK, yq.shape[1]), dtype=np.float32)

    def search(q: np.ndarray) -> np.ndarray:
        for a in range(0, n, BLOCK):
            b = min(n, a + BLOCK)
            blk = block[: b - a]
            np.copyto(blk, yq[a:b], casting="unsafe")
            np.matmul(blk, q, out=scores[a:b])
        np.multiply(scores, scale, out=scores)
        top = np.argpartition(scores, n - K)[-K:]
        return top[np.argsort(-scores[top], kind="stable")]

    return search


def run_baselines(y, yq, scale, queries, gt, passes) -> list[dict]:
    from threadpoolctl import threadpool_limits

    rows = []
    with threadpool_limits(1):
        for name, search, store, mb in [
            ("exact-f32", exact_f32(y), "f32", y.nbytes / 1e6),
            ("exact-f32+top_k", exact_f32_topk(y), "f32", y.nbytes / 1e6),
            ("exact-i8-blocks", exact_i8(yq, scale), "i8", (yq.nbytes + scale.nbytes) / 1e6),
        ]:
            for q in queries[:3]:
                search(q)
            r = time_queries(search, queries, gt, passes)
            rows.append({"name": name, "store": store, "mb": mb, **r})
    return rows


# -- determinism ----------------------------------------------------------------------------


def determinism(cand: Candidate, y: np.ndarray, n: int) -> str:
    from _ann_data import quantize_int8

    sub = np.ascontiguousarray(y[:n])
    vecs = index_vectors(cand, sub)
    yq, scale = quantize_int8(sub)
    extra = {"yq": yq, "scale": scale}
    out = []
    for threads in (1, 2):
        h = {hashlib.sha256(build(cand, vecs, threads, extra)[0]).hexdigest() for _ in range(2)}
        out.append(f"{threads}t:{'same' if len(h) == 1 else 'DIFFER'}")
    return " ".join(out)


# -- main ------------------------------------------------------------------------------------


def versions() -> str:
    out = [f"python {platform.python_version()}", f"numpy {np.__version__}"]
    for mod in ("usearch", "voyager", "faiss-cpu"):
        try:
            from importlib.metadata import version

            out.append(f"{mod} {version(mod)}")
        except Exception:
            out.append(f"{mod} missing")
    return ", ".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--candidates", default="all", help="comma-separated names, or all")
    ap.add_argument("--passes", type=int, default=3, help="timing passes over the queries")
    ap.add_argument("--exact-passes", type=int, default=0, help="0: passes, 1 above 2M items")
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--build-threads", type=int, default=2)
    ap.add_argument("--query-kind", choices=["foldin", "sum"], default="foldin")
    ap.add_argument("--determinism", type=int, default=0, help="N items; 0: skip")
    ap.add_argument(
        "--nlist",
        type=int,
        default=0,
        help="ivf-np and faiss IVF lists; 0: default_clusters",
    )
    ap.add_argument("--max-ef", type=int, default=2048, help="stop the sweep here")
    ap.add_argument("--save", help="write the results as JSON here (after each candidate)")
    ap.add_argument("--tmp", default=None, help="directory for serialized indexes")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args.child)
        return

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _ann_data import exact_topk, make_items, make_queries, quantize_int8

    names = [c.name for c in CANDIDATES] if args.candidates == "all" else args.candidates.split(",")
    cands = [BY_NAME[n] for n in names]
    print("command:", " ".join([os.path.relpath(sys.executable), *sys.argv]))
    print(
        versions(), f"| cpus {os.cpu_count()} | build threads {args.build_threads}, query threads 1"
    )

    t0 = time.perf_counter()
    items = make_items(args.items)
    y = items.y
    queries = make_queries(items, args.queries, kind=args.query_kind)
    yq, scale = quantize_int8(y)
    t_gen = time.perf_counter() - t0
    t0 = time.perf_counter()
    gt = exact_topk(y, queries, K)
    t_gt = time.perf_counter() - t0
    norms = np.linalg.norm(y, axis=1)
    print(
        f"data: {args.items:,} items x {y.shape[1]} ({t_gen:.1f} s), {args.queries} "
        f"{args.query_kind} queries, ground truth {t_gt:.1f} s; item norm p1/p50/p99/max = "
        + "/".join(f"{v:.2f}" for v in np.percentile(norms, [1, 50, 99, 100]))
        + f"; norm of true top-10 items p50 = {np.median(norms[gt.ravel()]):.2f}"
    )
    i8_mb = (yq.nbytes + scale.nbytes) / 1e6

    exact_passes = args.exact_passes or (args.passes if args.items <= 2_000_000 else 1)
    base = run_baselines(y, yq, scale, queries, gt, exact_passes)

    tmpdir = tempfile.mkdtemp(prefix="ann_select_", dir=args.tmp)
    qpath = os.path.join(tmpdir, "q.npy")
    gtpath = os.path.join(tmpdir, "gt.npy")
    np.save(gtpath, gt)
    results = []
    for cand in cands:
        if cand.params.get("nlist", -1) == 0:  # ivf-np and the faiss inverted files
            cand.params["nlist"] = args.nlist or default_nlist(args.items)
        print(f"... {cand.name}: building", flush=True)
        vecs = index_vectors(cand, y)
        try:
            blob, t_build = build(cand, vecs, args.build_threads, {"yq": yq, "scale": scale})
        except Exception as exc:  # report and go on
            print(f"    {cand.name}: build failed: {exc!r}")
            continue
        del vecs
        ipath = os.path.join(tmpdir, cand.name + ".idx")
        with open(ipath, "wb") as f:
            f.write(memoryview(blob))
        size_mb = len(blob) / 1e6
        digest = hashlib.sha256(blob).hexdigest()[:12]
        del blob
        gc.collect()
        np.save(qpath, query_vectors(cand, queries))
        spec = {
            "lib": cand.lib,
            "index": ipath,
            "queries": qpath,
            "gt": gtpath,
            "target": args.target,
            "passes": args.passes,
            "max_ef": args.max_ef,
            "nlist": cand.params.get("nlist", 0),
        }
        spath = os.path.join(tmpdir, "spec.json")
        with open(spath, "w") as f:
            json.dump(spec, f)
        print(f"    built in {t_build:.1f} s, {size_mb:.1f} MB; measuring", flush=True)
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child", spath],
            capture_output=True,
            text=True,
            env=env,
        )
        os.unlink(ipath)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"    {cand.name}: child failed rc={proc.returncode}: {proc.stderr[-2000:]}")
            continue
        res = json.loads(line[0][7:])
        res.update(cand=asdict(cand), build_s=t_build, size_mb=size_mb, sha=digest)
        # the bundle needs the factors too: int8 factors beside an HNSW index; the
        # ivf-np blob already holds them (in cluster order)
        res["bundle_mb"] = size_mb + (0.0 if cand.lib == "ivf-np" else i8_mb)
        # beyond the int8 factors the bundle ships anyway: ivf-np's centroids + offsets;
        # every other index holds its own copy of the vectors (faiss IVF: + int64 ids)
        if cand.lib == "ivf-np":
            nl = cand.params["nlist"]
            res["extra_mb"] = (nl * y.shape[1] * 4 + (nl + 1) * 8) / 1e6
        else:
            res["extra_mb"] = size_mb
        if args.determinism:
            res["determinism"] = determinism(cand, y, args.determinism)
        results.append(res)
        if args.save:
            with open(args.save, "w") as fh:
                json.dump({"args": vars(args), "baselines": base, "results": results}, fh)
        f = res["final"]
        print(
            f"    ef={f['ef']} recall={f['recall']:.3f} p50={f['p50']:.2f} ms "
            f"p99={f['p99']:.2f} ms restore={res['restore_ms']}",
            flush=True,
        )
    base_end = run_baselines(y, yq, scale, queries, gt, exact_passes)
    shutil.rmtree(tmpdir, ignore_errors=True)
    report(args, base, base_end, results, i8_mb, y.nbytes / 1e6)


def report(args, base, base_end, results, i8_mb, f32_mb) -> None:
    ref = base[0]
    print()
    print(f"## Baselines (exact, 1 BLAS thread), {args.items:,} items; start | end of run")
    print(f"{'baseline':<18}{'store':>6}{'MB':>9}{'p50 ms':>16}{'p99 ms':>16}{'recall@10':>11}")
    for a, b in zip(base, base_end, strict=True):
        print(
            f"{a['name']:<18}{a['store']:>6}{a['mb']:>9.1f}"
            f"{a['p50']:>8.2f} |{b['p50']:>6.2f}{a['p99']:>8.2f} |{b['p99']:>6.2f}"
            f"{a['recall']:>11.3f}"
        )
    print()
    print(
        f"## Candidates: smallest ef (nprobe) reaching recall@10 >= {args.target} "
        f"(or the largest tried); query threads 1; x = ratio to exact-f32 at start "
        f"(p50 {ref['p50']:.2f} ms, p99 {ref['p99']:.2f} ms)"
    )
    hdr = (
        f"{'candidate':<20}{'lib':<8}{'metric':<8}{'store':<6}{'params':<16}{'build s':>8}"
        f"{'idx MB':>8}{'+i8 MB':>8}{'extra MB':>9}{'restore ms':>22}{'RSS+ MB':>9}{'peak+':>7}"
        f"{'ef':>6}{'p50 ms':>8}{'p99 ms':>8}{'recall':>7}{'p50 x':>7}{'p99 x':>7}"
    )
    print(hdr)
    for r in results:
        c = r["cand"]
        p = c["params"]
        params = f"M{p['M']}/efc{p['efc']}" if "M" in p else f"nlist {p['nlist']}"
        if p.get("l2km"):
            params += " l2km"
        rm = r["restore_ms"]
        restore = (
            f"v {rm['view']:.0f}/vk {rm['view+keys']:.0f}/c {rm['load']:.0f}"
            if "view" in rm
            else f"{rm['load']:.0f}/m {rm['memfd']:.0f}"
            if "memfd" in rm
            else f"c {rm['copy']:.0f}/z {rm['zerocopy']:.1f}"
            if "zerocopy" in rm
            else f"{rm['load']:.0f}"
        )
        f = r["final"]
        rss = f"{r['rss_added']:.0f}"
        if "rss_added_load" in r:
            rss += f"/{r['rss_added_load']:.0f}"
        if "rss_added_zc" in r:
            rss += f"/{r['rss_added_zc']:.0f}"
        print(
            f"{c['name']:<20}{c['lib']:<8}{c['metric']:<8}{c['dtype']:<6}{params:<16}"
            f"{r['build_s']:>8.1f}{r['size_mb']:>8.1f}{r['bundle_mb']:>8.1f}"
            f"{r['extra_mb']:>9.1f}{restore:>22}"
            f"{rss:>9}{r['peak_added']:>7.0f}{f['ef']:>6}{f['p50']:>8.2f}{f['p99']:>8.2f}"
            f"{f['recall']:>7.3f}{f['p50'] / ref['p50']:>7.3f}{f['p99'] / ref['p99']:>7.3f}"
        )
    print(
        "idx MB: serialized index; +i8 MB: what the bundle holds for it (HNSW: index + "
        f"per-row int8 factors, {i8_mb:.1f} MB; ivf-np: its blob, which is those factors in "
        "cluster order plus centroids/offsets/order; faiss: index + int8 factors, like "
        "HNSW). extra MB: what the index adds to a bundle that ships the int8 factors "
        "anyway (ivf-np: centroids + offsets, its items being stored in cluster order; "
        "every other index: all of it, a second copy of the vectors, and for faiss IVF an "
        "int64 id per item, 8 bytes). restore: usearch v = Index.restore("
        "buf, view=True, enable_key_lookups=False) (no copy; the queries use this), vk = "
        "the same with the default key lookups, c = Index.restore(buf) (a copy); voyager "
        "Index.load(io.BytesIO(buf)), m = Index.load('/proc/self/fd/N') of a memfd holding "
        "a copy (Linux only); ivf-np np.frombuffer views; faiss c = deserialize_index(buf) "
        "(a copy; the queries use this), z = read_index(ZeroCopyIOReader(buf)) (views of "
        "buf). RSS+: resident memory added beyond the buffer after restore and the sweep "
        "(usearch: view/copy; faiss: copy/zero-copy, the latter right after its restore, "
        "faiss imported first); peak+: peak added (faiss: the copy "
        f"passes through a std::vector first). float32 factors alone: {f32_mb:.1f} MB."
    )
    zc = [r for r in results if "zc_same" in r]
    if zc:
        print(
            "faiss zero-copy restore, same top 10 as the copy on every query: "
            + ", ".join(f"{r['cand']['name']} {'yes' if r['zc_same'] else 'NO'}" for r in zc)
        )
    print()
    print("## Sweeps: ef (nprobe): recall@10 p50/p99 ms, one pass")
    for r in results:
        cells = [f"{s['ef']}: {s['recall']:.3f} {s['p50']:.2f}/{s['p99']:.2f}" for s in r["sweep"]]
        print(f"{r['cand']['name']:<20}" + " | ".join(cells))
    if args.determinism:
        print()
        print(f"## Serialized bytes identical across two builds of {args.determinism:,} items")
        for r in results:
            print(f"{r['cand']['name']:<20}{r['determinism']}")


if __name__ == "__main__":
    main()
