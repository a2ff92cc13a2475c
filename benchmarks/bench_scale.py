"""Catalogs of millions of items: bundle size, open time, memory and recommendation
latency of every privacy level, against the targets, with floors measured in the same run.

Run (from the repository root)::

    .venv/bin/python benchmarks/bench_scale.py                        # 100k and 1M
    .venv/bin/python benchmarks/bench_scale.py --items 10000000       # 10M (synthetic)
    .venv/bin/python benchmarks/bench_scale.py --items 1000000 --profile   # + cProfiles
    .venv/bin/python benchmarks/bench_scale.py --save run.json        # keep every number
    .venv/bin/python benchmarks/bench_scale.py --items 1000000 --full-precision
        # + the same catalog as a full-precision (format 1) bundle, side by side

    # the working tree against the last commit, interleaved in one run:
    mkdir -p /tmp/head && git archive HEAD ondevice | tar -x -C /tmp/head
    .venv/bin/python benchmarks/bench_scale.py --items 100000 --baseline-code /tmp/head

Options: ``--seed`` (0); ``--cache DIR`` (written bundles, reused by later runs, one
per size, seed and version of the bundle code: delete the directory to reclaim the
space, a 10M-item bundle is several GB; default ``$TMPDIR/ondevice-bench-scale``);
``--regenerate``; ``--repeats`` (fresh processes per open measurement; 7 up to 1M
items, 3 above); ``--cold`` (extra loads with the file dropped from the page cache; 1);
``--requests`` (200 per level and process); ``--rounds`` (latency processes per level:
3 with ``--baseline-code``, else 1); ``--window`` (50); ``--blas-threads`` (BLAS
threads in the measuring processes; default: numpy's own); ``--baseline-code DIR``
(see the targets); ``--profile`` (cProfile of one ``load_bundle``, one engine
construction and 50 requests at the behavioral, contextual and individual levels, each
in a fresh process); ``--save FILE`` (every measurement as JSON).

The catalog comes from ``_scale_data.py`` (clustered 64-factor ALS-like items,
Zipf popularity, 20 neighbours per item, real-looking SKUs, titles and categories; see
its docstring), written once with ``write_bundle`` into the cache, keyed by size, seed
and a digest of the bundle reader and writer sources. Everything below goes through the
public API only (``load_bundle``, ``PersonalizationEngine``) and is measured in fresh
subprocesses, so one measurement's memory or caches never leak into the next. What each
number means:

- **bundle file size**: bytes on disk of the signed bundle.
- **open+verify+load, load_bundle**: wall time of ``load_bundle(path, public_key=...)``
  (read, SHA-256 + Ed25519 signature, header, arrays, every validity check) in a fresh
  process whose imports are already done; median of ``--repeats`` processes; the file is
  in the page cache (warm disk, cold process: an app started again). Each measuring
  process first loads a 2,000-item bundle of the same generator, so imports and first-use
  set-up are neither timed nor counted in the RSS.
- **open+verify+load, engine**: the same for ``PersonalizationEngine(profile,
  key=RawKey(bytes(32)), bundle=..., bundle_public_key=...)`` on an existing profile
  (what an app waits for at start: ``load_bundle``, the catalog runtime's id index and
  orders, the downgrade check). ``info`` rows: the constructor without a bundle, the
  floor of any verified open (read the file + SHA-256, 16 MB at a time, same process),
  and ``load_bundle`` after ``posix_fadvise(DONTNEED)`` dropped the file from the page
  cache (best effort: a disk-cold open).
- **RSS added**: ``VmRSS`` from ``/proc/self/status`` after minus before the call,
  split into anonymous (``RssAnon``: private copies, Python objects) and file-backed
  (``RssFile``: mapped file pages), after ``gc.collect()``, with the result still alive;
  ``peak`` is ``VmHWM`` after minus ``VmRSS`` before (the transient high-water mark).
- **get_recommendations p50/p99**: one engine per level on a fresh profile (policy
  ``ondevice.sample.sample_policy()``, which declares the context field ``daypart``),
  one user whose window is 50 interactions from 1-2 clusters (views, clicks, a few
  carts and purchases; the last ten within 20 minutes, the rest over two weeks, with
  dayparts), recorded with ``update_profile`` one by one; then ``--requests`` calls of
  ``get_recommendations(user, {"daypart": "evening"}, k=10)`` (the context is passed at
  every level: an app passes what it has). The first call is timed separately
  (``first``; at ``individual`` it folds in and caches the user vector). A level that
  fell back to a lower one is marked ``INVALID``, with the reason.
- **floor**: ``Y @ x`` (float32, all items, 64 factors) + ``argpartition`` top 10 +
  sorting those 10: what any recommender over these factors must at least do,
  interleaved with the requests in the same process; ``p50/floor`` is each level's p50
  over the floor's p50 in that process. ``Y`` is a float32 copy of the catalog's
  factors made before timing, whatever the bundle stores (int8 codes in format 2).

Targets (printed next to the measurements, nothing asserted):

- 1M items: bundle <= 150 MB, open+verify+load <= 300 ms, RSS added <= 200 MB, every
  level's p99 <= 20 ms.
- 10M items: bundle <= 1.5 GB, open <= 2 s, RSS added <= 2 GB, every level's p99 <= 50 ms.
  Sizes in between: 150 and 200 bytes per item, and the 10M latency targets.
- 100k items and below: no level slower than today. With ``--baseline-code DIR`` (a
  directory holding the ``ondevice`` package to compare with, e.g. the last commit's
  from ``git archive``), every measurement runs for both versions, interleaved process
  by process, each with a bundle its own writer wrote, and the latency in ``--rounds``
  (3) processes per level and version, pooled; a level passes when its p50 is at most
  1.25 x the baseline's p50 of the same run (the same code against itself: within 10%
  with three rounds, up to 25% with one). A saved run from another time is no baseline
  on this machine: its load moves every figure by tens of percent. At the other sizes
  the baseline's figures appear in the notes.

The development machine has two shared, noisy cores: compare ratios within one run.
There, a two-thread BLAS call that follows other work (the floor between requests, the
``individual`` level's ``Y @ x``) often waits milliseconds for its second thread to be
scheduled; ``--blas-threads 1`` runs the workers with one BLAS thread to show how much of
a latency is that wait.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import hashlib
import io
import json
import math
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
LEVELS = ("none", "segment", "behavioral", "contextual", "individual")
CONTEXT = {"daypart": "evening"}
RESULT_MARK = "@@bench_scale-result "
USER = "bench-user"
PROFILED_LEVELS = ("behavioral", "contextual", "individual")  # with --profile
WARM_ITEMS = 2000  # the tiny bundle every worker loads first
MB = 1e6

# -- worker side: each runs in a fresh process -------------------------------------------


def _status() -> dict[str, int]:
    """Memory counters of this process from /proc/self/status, in bytes."""
    wanted = {"VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"}
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in wanted:
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def _rss_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    delta: dict[str, int] = {
        k: after[k] - before[k]
        for k in ("VmRSS", "RssAnon", "RssFile", "RssShmem")
        if k in after and k in before
    }
    if "VmHWM" in after and "VmRSS" in before:
        delta["peak"] = after["VmHWM"] - before["VmRSS"]
    return delta


def _warm(spec: dict[str, Any]) -> None:
    """Import and exercise everything a load uses (on a tiny bundle of the same
    generator and format), so that neither the times nor the RSS deltas include imports
    or first-call set-up."""
    import numpy  # noqa: F401

    import ondevice.levels  # noqa: F401
    from ondevice import PersonalizationEngine  # noqa: F401
    from ondevice.bundle import load_bundle

    load_bundle(spec["warm_path"], public_key=bytes.fromhex(spec["public_key"]))
    gc.collect()


def _drop_from_page_cache(path: str) -> None:
    """Ask the kernel to forget the file's cached pages (clean pages only; best effort)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _read_and_hash(path: str) -> float:
    """Seconds to read the whole file and SHA-256 it, 16 MB at a time (one buffer)."""
    buffer = bytearray(16 << 20)
    view = memoryview(buffer)
    t0 = time.perf_counter()
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while got := f.readinto(buffer):
            h.update(view[:got])
    h.digest()
    return time.perf_counter() - t0


def _engine(spec: dict[str, Any], level: str, *, bundle: bool) -> Any:
    from ondevice import PersonalizationEngine, RawKey
    from ondevice.sample import sample_policy

    return PersonalizationEngine(
        spec["profile"],
        key=RawKey(bytes(32)),
        policy=sample_policy(),
        privacy_level=level,
        bundle=spec["path"] if bundle else None,
        bundle_public_key=bytes.fromhex(spec["public_key"]),
    )


def worker_load(spec: dict[str, Any]) -> dict[str, Any]:
    """Time and measure one ``load_bundle`` in this fresh process."""
    from ondevice.bundle import load_bundle

    _warm(spec)
    if spec.get("drop_cache"):
        _drop_from_page_cache(spec["path"])
    before = _status()
    t0 = time.perf_counter()
    catalog = load_bundle(spec["path"], public_key=bytes.fromhex(spec["public_key"]))
    seconds = time.perf_counter() - t0
    gc.collect()
    rss = _rss_delta(before, _status())
    n = catalog.n_items
    floor = None if spec.get("drop_cache") else _read_and_hash(spec["path"])
    del catalog
    return {"seconds": seconds, "rss": rss, "n_items": n, "read_sha256": floor}


def worker_engine(spec: dict[str, Any]) -> dict[str, Any]:
    """Time and measure one engine construction with the bundle, on an existing profile
    (opened once without the bundle first: SQLCipher and the profile are warm)."""
    _warm(spec)
    t0 = time.perf_counter()
    _engine(spec, "individual", bundle=False).close()
    plain = time.perf_counter() - t0
    gc.collect()
    before = _status()
    t0 = time.perf_counter()
    engine = _engine(spec, "individual", bundle=True)
    seconds = time.perf_counter() - t0
    gc.collect()
    rss = _rss_delta(before, _status())
    engine.close()
    return {"seconds": seconds, "rss": rss, "without_bundle": plain}


def _nearest_rank(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _engine_with_user(spec: dict[str, Any], level: str) -> tuple[Any, int, float]:
    """An engine at ``level`` on a fresh profile holding the sample user's window
    (recorded oldest first with ``update_profile``, as the app would have); the number
    of interactions stored, and the seconds the engine's constructor took."""
    shutil.rmtree(spec["profile"], ignore_errors=True)
    t0 = time.perf_counter()
    engine = _engine(spec, level, bundle=True)
    open_s = time.perf_counter() - t0
    user = spec["user"]
    now = engine.now()
    recorded = 0
    for item, event, age, daypart in reversed(
        list(zip(user["items"], user["events"], user["ages"], user["dayparts"], strict=True))
    ):
        recorded += engine.update_profile(
            USER,
            {
                "item_id": item,
                "event": event,
                "timestamp": now - age,
                "context": {"daypart": daypart},
            },
        )
    return engine, recorded, open_s


def worker_latency(spec: dict[str, Any]) -> dict[str, Any]:
    """One engine at ``spec["level"]`` on a fresh profile; a user's window; timed
    requests interleaved with the numpy floor."""
    import numpy as np

    _warm(spec)
    level = spec["level"]
    engine, recorded, open_s = _engine_with_user(spec, level)
    t0 = time.perf_counter()
    recs = engine.get_recommendations(USER, CONTEXT, k=10)
    first = time.perf_counter() - t0
    catalog = engine.catalog
    assert catalog is not None and catalog.item_factors is not None
    # The floor's matrix is float32 whatever the bundle stores (format 2 keeps int8 codes
    # and a scale per row): one fixed yardstick across formats.
    y = np.ascontiguousarray(catalog.item_factors, dtype=np.float32)
    n = y.shape[0]
    x = np.random.default_rng(1).standard_normal(size=(y.shape[1],), dtype=np.float32)
    x *= np.float32(0.15)

    def floor() -> None:
        scores = y @ x
        top = np.argpartition(scores, n - 10)[n - 10 :]
        top[np.argsort(-scores[top])]

    times: list[float] = []
    floors: list[float] = []
    for r in range(spec["requests"]):
        for which in (0, 1) if r % 2 else (1, 0):
            t0 = time.perf_counter()
            if which:
                recs = engine.get_recommendations(USER, CONTEXT, k=10)
                times.append(time.perf_counter() - t0)
            else:
                floor()
                floors.append(time.perf_counter() - t0)
    rss = _status()
    result = {
        "level": level,
        "answered": recs.level.value,
        "fallbacks": list(recs.fallbacks),
        "n_recs": len(recs.items),
        "recorded": recorded,
        "open": open_s,
        "first": first,
        "p50": statistics.median(times),
        "p99": _nearest_rank(times, 0.99),
        "max": max(times),
        "floor_p50": statistics.median(floors),
        "floor_p99": _nearest_rank(floors, 0.99),
        "rss": rss.get("VmRSS", 0),
        "times": times,
        "floors": floors,
    }
    engine.close()
    return result


def pool_rounds(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One level's latency over several processes: percentiles of all their requests
    together; a fallback in any round is kept."""
    times = [t for r in rounds for t in r["times"]]
    floors = [t for r in rounds for t in r["floors"]]
    worst = next((r for r in rounds if r["answered"] != r["level"]), rounds[0])
    return {
        **worst,
        "rounds": len(rounds),
        "open": statistics.median(r["open"] for r in rounds),
        "first": statistics.median(r["first"] for r in rounds),
        "p50": statistics.median(times),
        "p99": _nearest_rank(times, 0.99),
        "max": max(times),
        "floor_p50": statistics.median(floors),
        "floor_p99": _nearest_rank(floors, 0.99),
        "times": times,
        "floors": floors,
    }


def worker_profile(spec: dict[str, Any]) -> dict[str, Any]:
    """cProfile of one ``load_bundle``, one engine construction with the bundle, or
    ``requests`` calls of ``get_recommendations`` at one level (after the first)."""
    from ondevice.bundle import load_bundle

    _warm(spec)
    profiler = cProfile.Profile()
    what = spec["what"]
    if what == "engine":
        _engine(spec, "individual", bundle=False).close()
        profiler.enable()
        result: Any = _engine(spec, "individual", bundle=True)
        profiler.disable()
        result.close()
    elif what == "requests":
        result, _, _ = _engine_with_user(spec, spec["level"])
        result.get_recommendations(USER, CONTEXT, k=10)
        profiler.enable()
        for _ in range(spec["requests"]):
            result.get_recommendations(USER, CONTEXT, k=10)
        profiler.disable()
        result.close()
    else:
        profiler.enable()
        result = load_bundle(spec["path"], public_key=bytes.fromhex(spec["public_key"]))
        profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(spec.get("lines", 18))
    return {"text": _trim_pstats(out.getvalue())}


def _trim_pstats(text: str) -> str:
    """pstats output without its preamble and with the paths shortened."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if "ncalls" in ln), len(lines))
    keep = [ln for ln in lines[:start] if "function calls" in ln] + lines[start:]
    root = str(HERE.parent) + os.sep
    return "\n".join(ln.replace(root, "").replace(sys.prefix + os.sep, "") for ln in keep)


WORKERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "load": worker_load,
    "engine": worker_engine,
    "latency": worker_latency,
    "profile": worker_profile,
}


def worker_main() -> None:
    spec = json.loads(sys.stdin.read())
    result = WORKERS[spec["kind"]](spec)
    print(RESULT_MARK + json.dumps(result), flush=True)


# -- parent side -------------------------------------------------------------------------


BLAS_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True, slots=True)
class Variant:
    """A version of ondevice to measure: ``current`` is the one this interpreter imports;
    ``baseline`` (``--baseline-code DIR``) puts another source tree first on the path."""

    name: str
    env: dict[str, str]
    source: bool = False
    """Measure the full-precision (format 1) source bundle instead of the compact one."""


def make_variants(args: argparse.Namespace) -> list[Variant]:
    blas = {var: str(args.blas_threads) for var in BLAS_VARS} if args.blas_threads else {}
    variants = [Variant("current", {**os.environ, **blas})]
    if args.baseline_code is not None:
        root = args.baseline_code.resolve()
        if not (root / "ondevice" / "__init__.py").is_file():
            raise SystemExit(f"--baseline-code {root}: no ondevice package there")
        path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
        variants.append(Variant("baseline", {**os.environ, **blas, "PYTHONPATH": path}))
    elif args.full_precision:
        variants.append(Variant("format 1", {**os.environ, **blas}, source=True))
    return variants


def run_worker(
    spec: dict[str, Any], env: dict[str, str], timeout: float = 7200.0
) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; return what it reports."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker"],
        input=json.dumps(spec),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            result: dict[str, Any] = json.loads(line[len(RESULT_MARK) :])
            return result
    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
    raise RuntimeError(f"worker {spec['kind']} failed (exit {proc.returncode})")


def ensure_bundle(
    n: int, seed: int, cache: Path, regenerate: bool, env: dict[str, str], source: bool = False
) -> dict[str, Any]:
    """The cached bundle's sidecar, generating the bundle in a subprocess (with the
    variant's ondevice, one BLAS thread) if needed; ``source``: the full-precision
    (format 1) bundle the compact one is written from."""
    cmd = [sys.executable, str(HERE / "_scale_data.py"), "--items", str(n), "--seed", str(seed)]
    cmd += ["--cache", str(cache), "--json"] + (["--regenerate"] if regenerate else [])
    cmd += ["--source-only"] if source else []
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        check=False,
        env={**env, **dict.fromkeys(BLAS_VARS, "1")},
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise RuntimeError(f"generating {n} items failed")
    meta: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    meta["wall"] = time.perf_counter() - t0
    return meta


@dataclass(frozen=True, slots=True)
class Targets:
    """The targets that apply to one catalog size (None: report only)."""

    bundle_bytes: float | None
    open_s: float | None
    rss_bytes: float | None
    p99_s: float | None


def targets_for(n: int) -> Targets:
    if n <= 100_000:
        return Targets(None, None, None, None)
    if n <= 1_000_000:
        return Targets(150 * MB, 0.300, 200 * MB, 0.020)
    if n >= 10_000_000:
        return Targets(1500 * MB, 2.0, 2000 * MB, 0.050)
    return Targets(150.0 * n, 2.0, 200.0 * n, 0.050)


def measure(
    n: int, args: argparse.Namespace, workdir: Path, variants: Sequence[Variant]
) -> dict[str, Any]:
    """Every measurement of one catalog size, for every variant (interleaved: the
    variants see the same moments of the machine's load)."""
    log = _log
    runs: dict[str, dict[str, Any]] = {}
    specs: dict[str, dict[str, Any]] = {}
    for v in variants:
        log(f"{n:,} items: bundle ({v.name})")
        meta = ensure_bundle(n, args.seed, args.cache, args.regenerate, v.env, v.source)
        warm = ensure_bundle(WARM_ITEMS, args.seed, args.cache, False, v.env)
        specs[v.name] = {
            "path": meta["path"],
            "public_key": meta["public_key"],
            "warm_path": warm["path"],
        }
        runs[v.name] = {"meta": meta, "loads": [], "engines": [], "cold": [], "latency": {}}

    def spec(v: Variant, kind: str, **extra: Any) -> dict[str, Any]:
        return {**specs[v.name], "kind": kind, **extra}

    repeats = args.repeats or (7 if n <= 1_000_000 else 3)
    log(f"{n:,} items: open x{repeats} (fresh processes)")
    for v in variants:
        # Untimed warm-up: creates the profile, records the bundle, fills the page cache.
        run_worker(spec(v, "engine", profile=str(workdir / f"open-{n}-{v.name}")), v.env)
        run_worker(spec(v, "load"), v.env)
    for _ in range(repeats):
        for v in variants:
            runs[v.name]["loads"].append(run_worker(spec(v, "load"), v.env))
            profile = str(workdir / f"open-{n}-{v.name}")
            runs[v.name]["engines"].append(run_worker(spec(v, "engine", profile=profile), v.env))
    for _ in range(args.cold):
        for v in variants:
            runs[v.name]["cold"].append(run_worker(spec(v, "load", drop_cache=True), v.env))
    user = runs[variants[0].name]["meta"]["users"][0]
    window = {k: user[k][: args.window] for k in ("items", "events", "ages", "dayparts")}
    rounds = args.rounds or (3 if len(variants) > 1 else 1)
    for level in LEVELS:
        log(f"{n:,} items: {level} x{args.requests}" + (f" x{rounds} rounds" if rounds > 1 else ""))
        done: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
        for k in range(rounds):
            for v in variants if k % 2 == 0 else variants[::-1]:
                done[v.name].append(
                    run_worker(
                        spec(
                            v,
                            "latency",
                            level=level,
                            profile=str(workdir / f"lat-{n}-{level}-{v.name}"),
                            requests=args.requests,
                            user=window,
                        ),
                        v.env,
                    )
                )
        for v in variants:
            runs[v.name]["latency"][level] = pool_rounds(done[v.name])
    profiles: dict[str, str] = {}
    if args.profile:
        v = variants[0]
        for what in ("load", "engine"):
            log(f"{n:,} items: cProfile {what}")
            profile = str(workdir / f"open-{n}-{v.name}")
            profiles[what] = run_worker(spec(v, "profile", what=what, profile=profile), v.env)[
                "text"
            ]
        for level in PROFILED_LEVELS:
            log(f"{n:,} items: cProfile {level} requests")
            profiles[f"50 get_recommendations at {level}"] = run_worker(
                spec(
                    v,
                    "profile",
                    what="requests",
                    level=level,
                    requests=50,
                    profile=str(workdir / f"prof-{n}-{level}"),
                    user=window,
                    lines=12,
                ),
                v.env,
            )["text"]
    for run in runs.values():
        run["meta"] = {k: val for k, val in run["meta"].items() if k != "users"}
    return {"n_items": n, "variants": runs, "profiles": profiles}


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _verdict(value: float, target: float | None) -> str:
    if target is None:
        return "-"
    return "pass" if value <= target else "FAIL"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def _mb(nbytes: float) -> str:
    return f"{nbytes / MB:,.1f} MB"


def _median(runs: Sequence[dict[str, Any]], key: str, sub: str | None = None) -> float:
    values = [r[key] if sub is None else r[key].get(sub, 0) for r in runs]
    values = [x for x in values if x is not None]
    return float(statistics.median(values)) if values else math.nan


REGRESSION_TOLERANCE = 1.25
"""At 100k items a level passes when its p50 is at most this times the baseline's."""


def render(result: dict[str, Any]) -> str:
    """The table of one size: target, measured, pass/fail, and a note (with the
    baseline's figure from the same run when ``--baseline-code`` was given)."""
    n = result["n_items"]
    cur = result["variants"]["current"]
    base_name = next((k for k in result["variants"] if k != "current"), "baseline")
    base = result["variants"].get(base_name)
    meta = cur["meta"]
    t = targets_for(n)
    rows: list[tuple[str, str, str, str, str]] = []

    def row(metric: str, target: str, measured: str, verdict: str, note: str = "") -> None:
        rows.append((metric, target, measured, verdict, note))

    def vs_base(text: str) -> str:
        return f"; {base_name} {text}" if base is not None else ""

    size = float(meta["size"])
    row(
        "bundle file size",
        "-" if t.bundle_bytes is None else f"<= {_mb(t.bundle_bytes)}",
        _mb(size),
        _verdict(size, t.bundle_bytes),
        f"{size / n:,.0f} B/item" + (vs_base(_mb(base["meta"]["size"])) if base else ""),
    )
    open_target = "-" if t.open_s is None else f"<= {_ms(t.open_s)}"
    for label, key in (("load_bundle", "loads"), ("engine constructor", "engines")):
        secs = [r["seconds"] for r in cur[key]]
        med = statistics.median(secs)
        note = f"median of {len(secs)} processes, range {_ms(min(secs))}-{_ms(max(secs))}"
        if base is not None:
            note += vs_base(_ms(_median(base[key], "seconds")))
        row(f"open+verify+load: {label}", open_target, _ms(med), _verdict(med, t.open_s), note)
    row(
        "  info: engine constructor, no bundle",
        "",
        _ms(_median(cur["engines"], "without_bundle")),
        "",
        "same profile, same process",
    )
    floor_open = _median(cur["loads"], "read_sha256")
    if not math.isnan(floor_open):
        ratio = _median(cur["loads"], "seconds") / floor_open
        row(
            "  info: floor, read file + SHA-256",
            "",
            _ms(floor_open),
            "",
            f"load_bundle = {ratio:.1f} x this floor",
        )
    if cur["cold"]:
        note = f"{len(cur['cold'])} run(s)"
        if base is not None and base["cold"]:
            note += vs_base(_ms(_median(base["cold"], "seconds")))
        row(
            "  info: load_bundle, page cache dropped",
            "",
            _ms(_median(cur["cold"], "seconds")),
            "",
            note,
        )
    rss_target = "-" if t.rss_bytes is None else f"<= {_mb(t.rss_bytes)}"
    for label, key in (("load_bundle", "loads"), ("engine with bundle", "engines")):
        rss = _median(cur[key], "rss", "VmRSS")
        note = (
            f"anon {_mb(_median(cur[key], 'rss', 'RssAnon'))}, "
            f"file {_mb(_median(cur[key], 'rss', 'RssFile'))}; "
            f"peak +{_mb(_median(cur[key], 'rss', 'peak'))}"
        )
        if base is not None:
            note += vs_base(_mb(_median(base[key], "rss", "VmRSS")))
        row(f"RSS added: {label}", rss_target, _mb(rss), _verdict(rss, t.rss_bytes), note)
    p99_target = "-" if t.p99_s is None else f"p99 <= {_ms(t.p99_s)}"
    for level in LEVELS:
        r = cur["latency"][level]
        note = f"p50/floor {r['p50'] / r['floor_p50']:5.2f}; first {_ms(r['first'])}"
        verdict = _verdict(r["p99"], t.p99_s)
        target = p99_target
        if base is not None:
            b = base["latency"][level]
            slower = r["p50"] / b["p50"]
            note += f"; {base_name} {_ms(b['p50'])} / {_ms(b['p99'])}, p50 x{slower:.2f}"
            if t.p99_s is None and base_name == "baseline":
                target = f"p50 <= {REGRESSION_TOLERANCE:.2f} x baseline"
                verdict = "pass" if slower <= REGRESSION_TOLERANCE else "FAIL"
        if r["answered"] != level:
            verdict = "INVALID"
            note += f"; answered at {r['answered']}: {'; '.join(r['fallbacks'])}"
        row(
            f"get_recommendations {level}",
            target,
            f"{_ms(r['p50'])} / {_ms(r['p99'])}",
            verdict,
            note,
        )
    floors = [cur["latency"][lv]["floor_p50"] for lv in LEVELS]
    note = "median over the five level processes"
    if base is not None:
        note += vs_base(_ms(statistics.median(base["latency"][lv]["floor_p50"] for lv in LEVELS)))
    row(
        "  floor: Y @ x + argpartition top 10",
        "",
        f"{_ms(statistics.median(floors))} p50",
        "",
        note,
    )
    opens = [cur["latency"][lv]["open"] for lv in LEVELS]
    row("  info: engine open in latency runs", "", _ms(statistics.median(opens)), "", "median of 5")

    head = [f"{n:,} items (seed {meta['seed']}, {meta['stats']['n_clusters']} clusters)"]
    for name, run in result["variants"].items():
        m = run["meta"]
        gen = m.get("timings", {})
        origin = "cached" if m.get("cached") else "generated in this run"
        phases = ", ".join(f"{k} {v:.1f}" for k, v in gen.items() if k != "total")
        head.append(
            f"{name}: ondevice from {m.get('ondevice', '?')} (bundle format "
            f"{m.get('format_version', '?')}); {Path(m['path']).name}, {origin}; "
            f"generation {gen.get('total', 0):.1f} s = {phases}"
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    titles = ("metric", "target", "measured (p50 / p99)", "result")
    widths = [max(w, len(h)) for w, h in zip(widths, titles, strict=True)]
    lines = [*head, ""]
    lines.append("  ".join(h.ljust(w) for h, w in zip(titles, widths, strict=True)) + "  note")
    lines.append("  ".join("-" * w for w in widths) + "  ----")
    for r in rows:
        cells = "  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True))
        lines.append(cells + "  " + r[4])
    return "\n".join(lines)


def describe_machine() -> str:
    import numpy as np

    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return (
        f"python {sys.version.split()[0]}, numpy {np.__version__}; {os.cpu_count()} cpus, "
        f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main()
        return
    from _scale_data import DEFAULT_CACHE

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", default="100000,1000000", help="comma-separated sizes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--regenerate", action="store_true", help="ignore cached bundles")
    parser.add_argument("--repeats", type=int, default=0, help="open repeats (0: 7, 3 > 1M)")
    parser.add_argument("--cold", type=int, default=1, help="loads with the page cache dropped")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument(
        "--rounds",
        type=int,
        default=0,
        help="latency processes per level and version (0: 3 with --baseline-code, else 1)",
    )
    parser.add_argument("--profile", action="store_true", help="cProfile load, open, requests")
    parser.add_argument(
        "--blas-threads", type=int, default=0, help="BLAS threads in the workers (0: default)"
    )
    parser.add_argument(
        "--baseline-code",
        type=Path,
        help="a directory holding another ondevice package (e.g. from git archive) to "
        "measure in the same run",
    )
    parser.add_argument(
        "--full-precision",
        action="store_true",
        help="also measure the full-precision (format 1) bundle of the same catalog, side "
        "by side (not with --baseline-code)",
    )
    parser.add_argument("--save", type=Path, help="write every measurement here (JSON)")
    args = parser.parse_args()
    if args.full_precision and args.baseline_code is not None:
        parser.error("--full-precision and --baseline-code are one comparison each")
    sizes = [int(s.replace("_", "")) for s in args.items.split(",") if s.strip()]
    variants = make_variants(args)
    blas = args.blas_threads or "default"
    print(f"{describe_machine()}; BLAS threads in workers: {blas}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for n in sizes:
            result = measure(n, args, Path(tmp), variants)
            results.append(result)
            print("\n" + render(result), flush=True)
            labels = {"load": "load_bundle", "engine": "engine constructor with bundle"}
            for what, text in result["profiles"].items():
                label = labels.get(what, what)
                print(f"\ncProfile, {label}, {n:,} items (by own time):\n{text}", flush=True)
    if args.save:
        payload = {"argv": sys.argv[1:], "time": time.time(), "sizes": results}
        args.save.write_text(json.dumps(payload, indent=1, ensure_ascii=False), "utf-8")


if __name__ == "__main__":
    main()
