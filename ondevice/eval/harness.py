"""The offline evaluation: what each personalization level is worth, measured.

Protocol:

- binary implicit feedback; every interaction counts once;
- full ranking over all catalog items, the user's training items excluded;
- 5-fold **user** cross-validation: each fold's users are the *device* users, the other
  users the *panel* whose full histories alone build the catalog;
- per device user, a chronological holdout: ``loo`` (the last interaction) and ``t20``
  (the last 20%); the rest is the user's on-device history;
- metrics per user, averaged with standard errors: HR@10, NDCG@10, Recall@20
  (``hits / min(20, |test|)``), plus catalog coverage of the top-10 lists, lift over the
  ``none`` level, what each level reads and the time per user;
- hyper-parameters are chosen per fold and protocol on an **inner validation split** of
  the device users' training data (the same holdout applied to it), never on test items;
- in the same run and split, centralized references trained on everyone's training
  data (panel + device users): EASE, ALS and each level's own method;
- per :class:`Encoding` beyond full precision (by default ``compact``: bundle format 2,
  int8 item factors and one-byte neighbour weights), each fold's device catalog is
  written as a signed bundle with :func:`~ondevice.operator.bundle_writer.write_bundle`,
  read back with :func:`~ondevice.bundle.load_bundle`, and the device levels are
  measured again on what the device would load, with the hyper-parameters chosen at
  full precision (no ALS is retrained), so the two encodings can be compared user by
  user.

The device levels are scored with the functions of :mod:`ondevice.scoring` and
:mod:`ondevice.segments` against a real :class:`~ondevice.catalog.Catalog`, so the
table measures the product's code.
"""

from __future__ import annotations

import functools
import logging
import math
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from itertools import product
from pathlib import Path
from queue import Empty
from typing import Any, TypeVar, cast

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ondevice import scoring
from ondevice.bundle import load_bundle
from ondevice.catalog import AlsParams, Catalog
from ondevice.errors import InvalidInputError
from ondevice.eval.references import ease_fit, ease_rank
from ondevice.operator.build import (
    ALS_CG_STEPS,
    BuildSettings,
    Csr,
    Progress,
    interaction_matrix,
    item_neighbours,
    item_popularity,
    make_segments,
    single_threaded_blas,
    train_als,
)
from ondevice.operator.bundle_writer import generate_signing_key, public_key_bytes, write_bundle
from ondevice.segments import assign_segment, segment_by_id
from ondevice.synthetic import SyntheticData

__all__ = [
    "COMPACT",
    "ENCODINGS",
    "FULL",
    "Dataset",
    "Encoding",
    "EncodingDelta",
    "EvalResult",
    "EvalSettings",
    "LevelResult",
    "daypart",
    "evaluate",
    "from_synthetic",
    "holdout_size",
    "usable_cpus",
    "user_metrics",
]

log = logging.getLogger(__name__)

I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Dataset:
    """Interactions per user in chronological order, plus item and user metadata."""

    name: str
    n_items: int
    sequences: tuple[I64, ...]
    times: tuple[I64, ...]
    item_ids: tuple[str, ...]
    titles: tuple[str, ...]
    categories: tuple[tuple[str, ...], ...] | None
    signals: tuple[Mapping[str, str], ...]
    rule_signals: tuple[str, ...] = ()

    @property
    def n_users(self) -> int:
        """How many users."""
        return len(self.sequences)

    @classmethod
    def from_arrays(
        cls,
        name: str,
        users: npt.NDArray[np.integer],
        items: npt.NDArray[np.integer],
        times: npt.NDArray[np.integer],
        *,
        n_users: int,
        n_items: int,
        item_ids: Sequence[str] | None = None,
        titles: Sequence[str] | None = None,
        categories: Sequence[Sequence[str]] | None = None,
        signals: Sequence[Mapping[str, str]] | None = None,
        rule_signals: Sequence[str] = (),
    ) -> Dataset:
        """Group rows per user, ordered by time (stable: ties keep input order), with
        repeated (user, item) pairs reduced to their first occurrence."""
        u = np.asarray(users, dtype=np.int64)
        i = np.asarray(items, dtype=np.int64)
        t = np.asarray(times, dtype=np.int64)
        order = np.lexsort((t, u))  # stable: by user, then time, then input order
        u, i, t = u[order], i[order], t[order]
        bounds = np.searchsorted(u, np.arange(n_users + 1))
        seqs, tms = [], []
        for r in range(n_users):
            si, st = i[bounds[r] : bounds[r + 1]], t[bounds[r] : bounds[r + 1]]
            _, first = np.unique(si, return_index=True)
            keep = np.sort(first)
            seqs.append(si[keep])
            tms.append(st[keep])
        ids = tuple(item_ids) if item_ids is not None else tuple(str(j) for j in range(n_items))
        return cls(
            name=name,
            n_items=n_items,
            sequences=tuple(seqs),
            times=tuple(tms),
            item_ids=ids,
            titles=tuple(titles) if titles is not None else ids,
            categories=None if categories is None else tuple(tuple(c) for c in categories),
            signals=tuple(signals) if signals is not None else tuple({} for _ in range(n_users)),
            rule_signals=tuple(rule_signals),
        )


def from_synthetic(data: SyntheticData, *, name: str = "synthetic") -> Dataset:
    """A :class:`Dataset` from :func:`ondevice.synthetic.generate` output."""
    return Dataset.from_arrays(
        name,
        data.users,
        data.items,
        data.times,
        n_users=data.n_users,
        n_items=data.n_items,
        item_ids=data.item_ids,
        categories=data.categories,
        signals=[data.signals[f"u{u}"] for u in range(data.n_users)],
        rule_signals=("plan",),
    )


@dataclass(frozen=True, slots=True)
class Encoding:
    """How the device catalog reaches the device in one measured variant.

    ``format_version`` ``None`` measures the catalog as built in memory (float32
    everything: what a format 1, full-precision, bundle carries unchanged). Otherwise the
    fold's catalog goes through the real bundle path: ``write_bundle(catalog, path,
    private_key=..., format_version=format_version, **dict(write_options))`` into a
    temporary file, then :func:`~ondevice.bundle.load_bundle`, and the device levels are
    measured on the loaded catalog. Whatever the bundle format does to a catalog
    (quantization, a Gram matrix recomputed from the quantized factors, an item order
    of its own) is therefore what gets measured.

    ``write_options`` is the hook for variants of the format: extra keyword arguments
    of ``write_bundle`` as ``(name, value)`` pairs, e.g. a third encoding
    ``Encoding("compact+ann", "compact + ANN index", 2, (("ann", 64),))``. A loaded
    catalog whose items come in another order (an approximate index writes them in
    cluster order) is measured by item id: the users' items are renumbered into it.
    """

    name: str
    label: str
    format_version: int | None = 2
    write_options: tuple[tuple[str, object], ...] = ()
    only: str | None = None
    """A diagnostic: ``"factors"`` measures the catalog as built with only the loaded
    item factors and Gram matrix put in, ``"weights"`` with only the loaded neighbour
    weights; ``None`` (the default) measures the loaded catalog as it is."""

    @property
    def in_memory(self) -> bool:
        """Whether this is the catalog as built (no bundle round trip)."""
        return self.format_version is None


FULL = Encoding("full", "full precision", None)
"""The catalog as built: float32 factors and weights (equal to a format 1 bundle's)."""
COMPACT = Encoding("compact", "compact (format 2)", 2)
"""Bundle format 2 as :func:`write_bundle` writes it by default: int8 item factors with
a scale per item, neighbour weights as one-byte codes into a log table."""
COMPACT_FACTORS = Encoding("compact-factors", "format 2 factors only", 2, only="factors")
"""Diagnostic: full precision but for the item factors (and Gram matrix) of format 2."""
COMPACT_WEIGHTS = Encoding("compact-weights", "format 2 weights only", 2, only="weights")
"""Diagnostic: full precision but for the neighbour weights of format 2."""
COMPACT_ANN = Encoding("compact+ann", "compact + approximate index", 2, (("ann", 32),))
"""Format 2 with an approximate index forced (32 clusters, ``nprobe`` calibrated by the
writer): the individual level scores only the clusters it probes, as on a device with
millions of items (``ann="auto"`` builds none for a catalog this small)."""
ENCODINGS: Mapping[str, Encoding] = {
    e.name: e for e in (FULL, COMPACT, COMPACT_FACTORS, COMPACT_WEIGHTS, COMPACT_ANN)
}
"""The encodings ``python -m ondevice.eval --encodings`` knows by name."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EvalSettings:
    """The protocol's knobs and the hyper-parameter grids searched on validation."""

    folds: int = 5
    protocols: tuple[str, ...] = ("loo", "t20")
    cutoff: int = 10
    recall_cutoff: int = 20
    seed: int = 0
    factors: int = 64
    als_iterations: int = 8
    als_cg_steps: int = ALS_CG_STEPS
    """Conjugate-gradient steps of the ALS training (0: exact solves); see
    :data:`ondevice.operator.build.ALS_CG_STEPS`."""
    als_threads: int = 0
    """Threads of each ALS training (0: every core)."""
    als_grid: tuple[tuple[float, float], ...] = ((2.0, 2.0), (10.0, 5.0), (30.0, 10.0))
    """(regularization, alpha) pairs."""
    ease_grid: tuple[float, ...] = (100.0, 300.0, 1000.0)
    neighbours: int = 100
    half_life_grid: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0)
    """Neighbour recency half-lives (positions)."""
    foldin_half_life_grid: tuple[float, ...] = (5.0, 10.0, 20.0, math.inf)
    """Recency half-lives of the individual level's fold-in (positions)."""
    segment_half_life_grid: tuple[float, ...] = (5.0, 10.0, 30.0, math.inf)
    """Recency half-lives of the segment level's decayed aggregates (positions)."""
    flat_window: int = 100
    window: int = 1000
    fusion_weight_grid: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    fusion_c_grid: tuple[float, ...] = (5.0, 60.0)
    fusion_depth: int = 100
    session_gap: float = 3600.0
    session_boost_grid: tuple[float, ...] = (0.0, 1.0, 3.0)
    context_strength_grid: tuple[float, ...] = (0.0, 0.5, 1.0)
    segments: int = 10
    min_segment_users: int = 50
    shrinkage_grid: tuple[float, ...] = (0.0, 20.0, 100.0)
    rule_signals: tuple[str, ...] | None = None
    """Declared signals crossed into rule segments; ``None``: the dataset's default."""
    encodings: tuple[Encoding, ...] = (FULL, COMPACT)
    """The catalog encodings the device levels are measured under, :data:`FULL` first:
    full precision is the reference the others are compared with, and the
    hyper-parameters chosen on validation at full precision are reused for the others
    (the comparison is of the encoding alone). Add an :class:`Encoding` with
    ``write_options`` to measure a variant of the bundle format."""

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise InvalidInputError("need at least 2 folds")
        if not self.encodings or self.encodings[0] != FULL:
            raise InvalidInputError(
                "encodings must start with full precision (the reference the others are "
                "compared with, and the one the hyper-parameters are chosen on)"
            )
        names = [e.name for e in self.encodings]
        if len(set(names)) != len(names):
            raise InvalidInputError(f"encoding names repeat: {names}")
        if any(e.in_memory for e in self.encodings[1:]):
            raise InvalidInputError("only the first encoding may be the in-memory catalog")
        if self.als_cg_steps < 0 or self.als_threads < 0:
            raise InvalidInputError("als_cg_steps and als_threads must be >= 0")
        bad = set(self.protocols) - {"loo", "t20"}
        if bad or not self.protocols:
            raise InvalidInputError(f"unknown protocol(s): {sorted(bad)}")


def _solver_text(cg_steps: int) -> str:
    return "exact solves" if cg_steps == 0 else f"{cg_steps} conjugate-gradient steps per row"


@dataclass(frozen=True, slots=True)
class LevelResult:
    """One row of the table: a level (or reference) under one protocol."""

    key: str
    label: str
    group: str
    reads: str
    hr: float
    hr_se: float
    ndcg: float
    ndcg_se: float
    recall: float
    recall_se: float
    coverage: float
    ms_per_user: float
    users: int


ENCODING_TOLERANCE = 0.01
"""The largest relative change of a level's NDCG@10 under another encoding, against full
precision, that counts as "within" (1%)."""


@dataclass(frozen=True, slots=True)
class EncodingDelta:
    """One device level's NDCG@10 under one encoding next to full precision, on the same
    users, folds and hyper-parameters."""

    protocol: str
    key: str
    label: str
    encoding: str
    reference: float
    """NDCG@10 at full precision."""
    reference_se: float
    measured: float
    """NDCG@10 under ``encoding``."""
    measured_se: float
    diff_se: float
    """Standard error of the per-user difference ``measured - reference`` (paired: the
    same users and targets), the noise to judge the difference by."""

    @property
    def change(self) -> float:
        """Relative change ``measured / reference - 1`` (NaN if the reference is 0)."""
        return self.measured / self.reference - 1.0 if self.reference > 0 else math.nan

    @property
    def change_se(self) -> float:
        """:attr:`diff_se` relative to the reference."""
        return self.diff_se / self.reference if self.reference > 0 else math.nan

    def within(self, tolerance: float = ENCODING_TOLERANCE) -> bool:
        """Whether ``|change| <= tolerance`` (an unchanged zero counts as within)."""
        if self.reference <= 0:
            return self.measured == self.reference
        return abs(self.change) <= tolerance + 1e-12


@dataclass(frozen=True, slots=True)
class EvalResult:
    """Every row of every protocol, the chosen hyper-parameters and the run time."""

    dataset: str
    n_users: int
    n_items: int
    settings: EvalSettings
    rows: Mapping[str, tuple[LevelResult, ...]]
    chosen: Mapping[str, tuple[Mapping[str, object], ...]]
    segment_counts: Mapping[str, tuple[int, ...]]
    seconds: float
    command: str = ""
    cpu_seconds: float = 0.0
    """CPU time of the run, worker processes included."""
    jobs: int = 1
    encoded: Mapping[str, Mapping[str, tuple[LevelResult, ...]]] = field(default_factory=dict)
    """Per protocol and encoding other than full precision: the device rows measured on
    the catalog as loaded from that encoding's bundle (``rows`` holds full precision)."""
    deltas: tuple[EncodingDelta, ...] = ()
    """Each device row of ``encoded`` next to its full-precision row."""
    encoding_stats: Mapping[str, Mapping[str, tuple[Mapping[str, float], ...]]] = field(
        default_factory=dict
    )
    """Per protocol and encoding, per fold: how far the loaded catalog is from the one
    built (see :func:`_encoding_stats`)."""

    def row(self, protocol: str, key: str) -> LevelResult:
        """The row of ``key`` under ``protocol``."""
        for r in self.rows[protocol]:
            if r.key == key:
                return r
        raise KeyError(key)

    def targets(self) -> list[tuple[str, str, float, float, bool]]:
        """The quality targets the table is checked against, each an NDCG@10 ratio with
        the least it must reach: on-device fold-in / central ALS (0.97), the best
        on-device level / the better of central EASE and ALS (1.5 LOO, 1.2 T20),
        segment / none (1.25 LOO, 1.4 T20; also as served), every level / none (1), and
        whether the levels rank in their order. Each as ``(protocol, target, measured,
        required, met)``."""
        out: list[tuple[str, str, float, float, bool]] = []
        need_best = {"loo": 1.5, "t20": 1.2}
        need_seg = {"loo": 1.25, "t20": 1.4}
        device = ("none", "segment", "behavioral", "contextual", "foldin", "individual")
        for p in self.rows:
            nd = {r.key: r.ndcg for r in self.rows[p]}
            if "central_als" in nd:
                out.append(
                    (
                        p,
                        "fold-in / central ALS",
                        nd["foldin"] / nd["central_als"],
                        0.97,
                        nd["foldin"] >= 0.97 * nd["central_als"],
                    )
                )
                best = max(nd[k] for k in device)
                ref = max(nd["central_als"], nd["central_ease"])
                out.append(
                    (
                        p,
                        "best on-device / max(EASE, ALS)",
                        best / ref,
                        need_best[p],
                        best >= need_best[p] * ref,
                    )
                )
            out.append(
                (
                    p,
                    "segment / none",
                    nd["segment"] / nd["none"],
                    need_seg[p],
                    nd["segment"] >= need_seg[p] * nd["none"],
                )
            )
            if "segment_served" in nd:
                out.append(
                    (
                        p,
                        "segment / none, both as served (no seen exclusion)",
                        nd["segment_served"] / nd["none_served"],
                        need_seg[p],
                        nd["segment_served"] >= need_seg[p] * nd["none_served"],
                    )
                )
            worst = min(nd[k] for k in device if k != "none")
            out.append((p, "min level / none", worst / nd["none"], 1.0, worst >= nd["none"]))
            chain = (
                nd["none"] < nd["segment"] < nd["behavioral"]
                and nd["behavioral"] <= nd["contextual"]
                and nd["behavioral"] <= nd["individual"]
            )
            out.append(
                (
                    p,
                    "none < segment < behavioral <= contextual, individual",
                    float(chain),
                    1.0,
                    chain,
                )
            )
        return out

    def to_markdown(self) -> str:
        """The result as markdown: one table per protocol, then targets and choices."""
        s = self.settings
        lines = [f"# What each level is worth: {self.dataset}", ""]
        if self.command:
            lines += [f"Command: `{self.command}`", ""]
        lines += [
            f"{self.n_users} users, {self.n_items} items; binary implicit feedback; full "
            f"ranking over all items (training items excluded); {s.folds}-fold user "
            f"cross-validation (device users = the fold, the catalog from the other users "
            f"only); hyper-parameters chosen per fold on an inner validation split of the "
            f"training data. Mean over users, ± one standard error.",
            "",
            f"ALS: {s.factors} factors, {s.als_iterations} iterations trained by `implicit` "
            f"({_solver_text(s.als_cg_steps)}), then one exact user step. Run time "
            f"{self.seconds:.0f} s wall, {self.cpu_seconds:.0f} s CPU "
            f"({'one process' if self.jobs == 1 else f'{self.jobs} worker processes'}).",
            "",
        ]
        for p in self.rows:
            title = {"loo": "leave last one out (LOO)", "t20": "last 20% held out (T20)"}[p]
            none = self.row(p, "none").ndcg
            lines += [
                f"## {title}",
                "",
                "| level | reads | HR@10 | NDCG@10 | Recall@20 | coverage | "
                "lift (NDCG) | ms/user (mean) |",
                "|---|---|---|---|---|---|---|---|",
            ]
            group = ""
            for r in self.rows[p]:
                if r.group != group:
                    group = r.group
                    lines.append(f"| **{group}** | | | | | | | |")
                lift = r.ndcg / none if none > 0 else float("nan")
                lines.append(
                    f"| {r.label} | {r.reads} | {r.hr:.3f} ± {r.hr_se:.3f} | "
                    f"{r.ndcg:.3f} ± {r.ndcg_se:.3f} | {r.recall:.3f} ± {r.recall_se:.3f} | "
                    f"{r.coverage:.1%} | {lift:.2f}x | {r.ms_per_user:.2f} |"
                )
            lines.append("")
        lines += self._encodings_markdown()
        lines += [
            "## Quality targets (NDCG@10 ratios)",
            "",
            "Each ratio divides the NDCG@10 of one row above by another's (the order "
            "check is 1 when none < segment < behavioral <= contextual, individual holds); "
            "the target is the least the project accepts.",
            "",
            "| protocol | ratio | measured | target | met |",
            "|---|---|---|---|---|",
        ]
        for p, name, got, need, ok in self.targets():
            lines.append(f"| {p} | {name} | {got:.3f} | {need:.2f} | {'yes' if ok else 'NO'} |")
        lines += ["", "## Segments and hyper-parameters chosen on validation", ""]
        for p in self.chosen:
            counts = ", ".join(str(c) for c in self.segment_counts.get(p, ()))
            lines.append(f"- {p}: behaviour segments per fold: {counts}")
            for f, ch in enumerate(self.chosen[p]):
                desc = ", ".join(f"{k}={v}" for k, v in ch.items())
                lines.append(f"  - fold {f}: {desc}")
        lines.append("")
        return "\n".join(lines)

    def delta(self, protocol: str, key: str, encoding: str) -> EncodingDelta:
        """The comparison of ``key`` under ``encoding`` with full precision."""
        for d in self.deltas:
            if (d.protocol, d.key, d.encoding) == (protocol, key, encoding):
                return d
        raise KeyError((protocol, key, encoding))

    def _encodings_markdown(self) -> list[str]:
        """The side-by-side section: each device level's NDCG@10 under every encoding."""
        others = [e for e in self.settings.encodings if not e.in_memory]
        if not others:
            return []
        tol = f"{ENCODING_TOLERANCE:.0%}"
        lines = [
            "## Full precision and compact bundles side by side",
            "",
            "NDCG@10 of each device level with the catalog as built (full precision: "
            "float32 factors and weights, what a format 1 bundle carries unchanged) and as "
            "the device loads it from a signed bundle of each other encoding ("
            + "; ".join(
                f"{e.label}: `write_bundle(..., format_version={e.format_version}"
                + "".join(f", {k}={v!r}" for k, v in e.write_options)
                + ")`, then `load_bundle`"
                + ("" if e.only is None else f", only its {_PARTS[e.only]} used")
                for e in others
            )
            + "). Same users, folds and hyper-parameters (chosen on validation at full "
            "precision); only the catalog's encoding differs. Change: the encoding's "
            "NDCG@10 / full precision's - 1; ± its standard error, from the per-user "
            "differences (paired), relative to full precision. "
            f"Within {tol}: |change| <= {tol}.",
            "",
        ]
        for p in self.rows:
            title = {"loo": "leave last one out (LOO)", "t20": "last 20% held out (T20)"}[p]
            head = "| level | NDCG@10 full precision |"
            rule = "|---|---|"
            for e in others:
                head += f" NDCG@10 {e.label} | change | ± SE (paired) | within {tol} |"
                rule += "---|---|---|---|"
            lines += [f"### {title}", "", head, rule]
            for r in self.rows[p]:
                if not r.group.startswith("on the device"):
                    continue
                cells = f"| {r.label} | {r.ndcg:.4f} ± {r.ndcg_se:.4f} |"
                for e in others:
                    d = self.delta(p, r.key, e.name)
                    cells += (
                        f" {d.measured:.4f} ± {d.measured_se:.4f} | {d.change:+.2%} | "
                        f"± {d.change_se:.2%} | {'yes' if d.within() else 'NO'} |"
                    )
                lines.append(cells)
            lines.append("")
        lines += ["What each bundle changed in the catalog (mean over folds):", ""]
        for p in self.rows:
            for e in others:
                st = self.encoding_stats.get(p, {}).get(e.name, ())
                if not st:
                    continue

                def mean(k: str, st: tuple[Mapping[str, float], ...] = st) -> float:
                    return float(np.mean([x[k] for x in st]))

                weights = (
                    "neighbour weights not compared (the items were reordered)"
                    if math.isnan(mean("weights_changed"))
                    else f"neighbour weights changed in {mean('weights_changed'):.1%} of "
                    f"entries, largest relative error {mean('weights_max_rel_error'):.2e}"
                )
                lines.append(
                    f"- {p}, {e.label}: item factors changed in "
                    f"{mean('factors_changed'):.1%} of their entries, relative error "
                    f"||Y' - Y|| / ||Y|| {mean('factors_rel_error'):.2e}; {weights}; "
                    f"Gram matrix relative error "
                    f"{mean('gram_rel_error'):.2e}; kept as int8 and codes in memory: "
                    f"{_yes_no(mean('kept_compact'))} (if not, the loader decoded them to "
                    f"float32: the quantized values); items reordered by the bundle: "
                    f"{_yes_no(mean('reordered'))}; approximate index: "
                    f"{_yes_no(mean('ann'))}."
                )
        lines.append("")
        return lines


_PARTS = {"factors": "item factors and Gram matrix", "weights": "neighbour weights"}
"""What a diagnostic :attr:`Encoding.only` takes from the loaded bundle."""


def _yes_no(fraction: float) -> str:
    """'yes', 'no' or the share of folds where it held."""
    if fraction >= 1.0:
        return "yes"
    if fraction <= 0.0:
        return "no"
    return f"in {fraction:.0%} of folds"


def holdout_size(n: int, protocol: str) -> int:
    """How many of a user's ``n`` interactions the protocol holds out (at least one)."""
    if protocol == "loo":
        return 1 if n > 1 else 0
    if protocol == "t20":
        return min(max(1, round(0.2 * n)), n - 1) if n > 1 else 0
    raise InvalidInputError(f"unknown protocol {protocol!r}")


def user_metrics(
    ranking: npt.NDArray[np.integer],
    targets: npt.NDArray[np.integer],
    *,
    cutoff: int = 10,
    recall_cutoff: int = 20,
) -> tuple[float, float, float]:
    """``(HR@cutoff, NDCG@cutoff, Recall@recall_cutoff)`` of one ranking, binary
    relevance; recall is ``hits / min(recall_cutoff, |targets|)``."""
    tset = set(np.asarray(targets, dtype=np.int64).ravel().tolist())
    if not tset:
        raise InvalidInputError("no target items")
    r = np.asarray(ranking, dtype=np.int64)[: max(cutoff, recall_cutoff)].tolist()
    hits = [i in tset for i in r]
    hr = float(any(hits[:cutoff]))
    dcg = sum(1.0 / math.log2(p + 2) for p, h in enumerate(hits[:cutoff]) if h)
    idcg = sum(1.0 / math.log2(p + 2) for p in range(min(len(tset), cutoff)))
    rec = sum(hits[:recall_cutoff]) / min(recall_cutoff, len(tset))
    return hr, dcg / idcg, float(rec)


def daypart(ts: float) -> str:
    """The declared context used for ML data: the part of the (UTC) day."""
    h = int(ts // 3600) % 24
    return ("night", "morning", "afternoon", "evening")[h // 6]


@dataclass(frozen=True, slots=True)
class _View:
    """What a device user brings to one ranking request."""

    row: int
    window: I64  # newest first
    times: I64  # newest first
    seen: I64
    targets: I64
    now: float
    signals: Mapping[str, str]
    memo: dict[tuple[object, ...], tuple[object, object]] | None = None
    """Validation views only: per-user intermediate results (a user vector, neighbour
    scores, context affinities) shared by the candidates of one search that do not change
    them. Test views have none, so their times per user count every step."""


def _memo(v: _View, anchor: object, parts: tuple[object, ...], make: Callable[[], T]) -> T:
    """``make()``, remembered in the validation view ``v`` under ``parts`` for the array
    ``anchor`` it was computed from (kept alive with the entry, so its ``id`` cannot be
    reused while the entry exists)."""
    if v.memo is None:
        return make()
    key = (id(anchor), *parts)
    hit = v.memo.get(key)
    if hit is not None and hit[0] is anchor:
        return cast(T, hit[1])
    value = make()
    v.memo[key] = (anchor, value)
    return value


def _views(
    data: Dataset, users: Sequence[int], protocol: str, window: int, inner: bool
) -> list[_View]:
    out = []
    for u in users:
        seq, tm = data.sequences[u], data.times[u]
        n_test = holdout_size(seq.size, protocol)
        if n_test == 0:
            continue
        train, ttrain = seq[:-n_test], tm[:-n_test]
        test, ttest = seq[-n_test:], tm[-n_test:]
        if inner:
            n_val = holdout_size(train.size, protocol)
            if n_val == 0:
                continue
            train, ttrain, test, ttest = (
                train[:-n_val],
                ttrain[:-n_val],
                train[-n_val:],
                ttrain[-n_val:],
            )
        out.append(
            _View(
                row=u,
                window=train[::-1][:window].copy(),
                times=ttrain[::-1][:window].copy(),
                seen=train.copy(),
                targets=test.copy(),
                now=float(ttest[0]),
                signals=data.signals[u],
                memo={} if inner else None,
            )
        )
    return out


@dataclass
class _Acc:
    """Per-user metrics of one level across folds."""

    hr: list[float] = field(default_factory=list)
    ndcg: list[float] = field(default_factory=list)
    recall: list[float] = field(default_factory=list)
    ms: list[float] = field(default_factory=list)
    covered: set[int] = field(default_factory=set)

    def extend(self, other: _Acc) -> None:
        """Append ``other``'s users after this one's."""
        self.hr.extend(other.hr)
        self.ndcg.extend(other.ndcg)
        self.recall.extend(other.recall)
        self.ms.extend(other.ms)
        self.covered.update(other.covered)


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the fold workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


Ranker = Callable[[_View], npt.NDArray[np.integer]]


def _mean_ndcg(views: Sequence[_View], rank: Ranker, s: EvalSettings) -> float:
    if not views:
        return 0.0
    total = 0.0
    for v in views:
        total += user_metrics(rank(v), v.targets, cutoff=s.cutoff, recall_cutoff=s.recall_cutoff)[1]
    return total / len(views)


def _run(views: Sequence[_View], rank: Ranker, acc: _Acc, s: EvalSettings) -> None:
    depth = max(s.cutoff, s.recall_cutoff)
    for v in views:
        t0 = time.perf_counter()
        r = rank(v)
        acc.ms.append((time.perf_counter() - t0) * 1000.0)
        hr, nd, rc = user_metrics(
            r[:depth], v.targets, cutoff=s.cutoff, recall_cutoff=s.recall_cutoff
        )
        acc.hr.append(hr)
        acc.ndcg.append(nd)
        acc.recall.append(rc)
        acc.covered.update(int(i) for i in r[: s.cutoff])


@dataclass(frozen=True, slots=True)
class _Model:
    """What the device gets for one fold: a catalog and its derived lookup arrays."""

    catalog: Catalog
    pop_order: I32
    cat_indptr: I64
    cat_indices: I32
    user_factors: F32 | None = None  # central ALS only: each user's trained vector


def _catalog(
    data: Dataset,
    x: Csr,
    *,
    nbr: tuple[I64, I32, F32],
    y: F32 | None,
    reg: float,
    alpha: float,
    s: EvalSettings,
) -> Catalog:
    gram = None if y is None else (y.astype(np.float64).T @ y).astype(np.float32)
    return Catalog(
        item_ids=data.item_ids,
        titles=data.titles,
        popularity=item_popularity(x),
        nbr_indptr=nbr[0],
        nbr_indices=nbr[1],
        nbr_weights=nbr[2],
        categories=data.categories,
        item_factors=y,
        gram=gram,
        als=None if y is None else AlsParams(factors=s.factors, regularization=reg, alpha=alpha),
        name=data.name,
    )


def _model(cat: Catalog, user_factors: F32 | None = None) -> _Model:
    n = cat.n_items
    order = np.lexsort((np.arange(n), -cat.popularity.astype(np.float64))).astype(np.int32)
    _, ip, ix = scoring.category_index(cat.categories, n)
    return _Model(
        catalog=cat, pop_order=order, cat_indptr=ip, cat_indices=ix, user_factors=user_factors
    )


def _decoded(cat: Catalog) -> Catalog:
    """``cat`` with arrays a format 2 bundle kept compact (int8 factors with scales,
    one-byte weight codes: large catalogs) decoded to float32: the same values, in the
    form the harness's rankers read. A small catalog is decoded by the loader already."""
    if cat.item_factor_scales is not None:
        cat = replace(cat, item_factors=cat.decoded_factors(), item_factor_scales=None)
    if cat.nbr_weight_table is not None:
        cat = replace(
            cat,
            nbr_weights=cat.decoded_weights(),
            nbr_weight_table=None,
            nbr_indices=np.asarray(cat.nbr_indices, dtype=np.int32),
        )
    return cat


def _measured(built: Catalog, loaded: Catalog, enc: Encoding) -> Catalog:
    """The catalog ``enc`` measures: ``loaded`` decoded, or for a diagnostic encoding
    ``built`` with only the loaded factors and Gram matrix, or only the loaded neighbour
    weights, put in."""
    dec = _decoded(loaded)
    if enc.only is None:
        return dec
    if _renumbering(built, loaded) is not None:
        raise InvalidInputError(f"encoding {enc.name!r} needs a bundle that keeps the item order")
    if enc.only == "factors":
        return replace(built, item_factors=dec.item_factors, gram=dec.gram)
    if enc.only == "weights":
        if not np.array_equal(dec.nbr_indices, built.nbr_indices):
            raise InvalidInputError("the bundle changed the neighbour lists")
        return replace(built, nbr_weights=dec.nbr_weights)
    raise InvalidInputError(f"unknown part {enc.only!r} of encoding {enc.name!r}")


def _through_bundle(cat: Catalog, enc: Encoding, path: Path, key: Ed25519PrivateKey) -> Catalog:
    """``cat`` written as ``enc``'s signed bundle at ``path`` and loaded back, as a
    device loads it (the file is removed afterwards)."""
    assert enc.format_version is not None
    write_bundle(
        cat,
        path,
        private_key=key,
        format_version=enc.format_version,
        **dict(enc.write_options),  # type: ignore[arg-type]
    )
    try:
        return load_bundle(path, public_key=public_key_bytes(key))
    finally:
        path.unlink(missing_ok=True)


def _renumbering(built: Catalog, loaded: Catalog) -> I64 | None:
    """For each item of ``built`` its index in ``loaded`` (matched by id), or ``None``
    when the bundle kept the order."""
    ids = list(loaded.item_ids)
    if ids == list(built.item_ids):
        return None
    where = {item: i for i, item in enumerate(ids)}
    try:
        return np.asarray([where[item] for item in built.item_ids], dtype=np.int64)
    except KeyError as exc:
        raise InvalidInputError(f"the bundle lost item {exc.args[0]!r}") from exc


def _renumbered(views: Sequence[_View], order: I64 | None) -> list[_View]:
    """``views`` with every item index moved to a loaded catalog's numbering."""
    if order is None:
        return list(views)
    return [
        replace(v, window=order[v.window], seen=order[v.seen], targets=order[v.targets])
        for v in views
    ]


def _rel(a: npt.NDArray[np.floating], b: npt.NDArray[np.floating]) -> float:
    """``||a - b|| / ||b||`` in float64 (0 for two zero arrays)."""
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    den = float(np.linalg.norm(b64))
    num = float(np.linalg.norm(a64 - b64))
    return num / den if den > 0 else num


def _encoding_stats(built: Catalog, loaded: Catalog, order: I64 | None) -> dict[str, float]:
    """How far the catalog a device loads is from the one built: the share of factor and
    neighbour-weight entries that changed, their relative errors, the Gram matrix's
    relative error, whether arrays stayed compact in memory, whether the items were
    reordered and whether an approximate index came with them. Weight errors are NaN
    when the items were reordered (the lists are not compared then)."""
    out: dict[str, float] = {
        "kept_compact": float(
            loaded.item_factor_scales is not None or loaded.nbr_weight_table is not None
        ),
        "reordered": float(order is not None),
        "ann": float(getattr(loaded, "ann", None) is not None),
    }
    y, y_l = built.item_factors, loaded.decoded_factors()
    if y is not None and y_l is not None:
        y_l = y_l if order is None else y_l[order]
        out["factors_changed"] = float(np.mean(y_l != y))
        out["factors_rel_error"] = _rel(y_l, y)
    if built.gram is not None and loaded.gram is not None:
        out["gram_rel_error"] = _rel(loaded.gram, built.gram)
    if order is None:
        w, w_l = built.decoded_weights(), loaded.decoded_weights()
        out["weights_changed"] = float(np.mean(w_l != w)) if w.size else 0.0
        nz = w != 0
        out["weights_max_rel_error"] = (
            float(np.max(np.abs(w_l[nz].astype(np.float64) - w[nz]) / np.abs(w[nz])))
            if nz.any()
            else 0.0
        )
    else:
        out["weights_changed"] = out["weights_max_rel_error"] = math.nan
    return out


# ---- the device levels, each a thin call into ondevice.scoring / ondevice.segments ----


def _rank_none(m: _Model, depth: int, *, exclude_seen: bool = True) -> Ranker:
    # On the device, levels none and segment keep no item ids, so they cannot exclude
    # what the user has seen: the device rows are measured that way (exclude_seen=False).
    pop = m.catalog.popularity
    return lambda v: scoring.popularity_ranking(
        pop, depth, exclude=v.seen if exclude_seen else None
    )


def _segment_vector(cat: Catalog, v: _View, half_life: float) -> F32:
    """The segment level's user vector: it keeps only recency-decayed aggregates
    ``b`` (f) and ``A`` (f x f) and solves against the catalog's Gram matrix."""
    assert cat.item_factors is not None and cat.gram is not None and cat.als is not None
    w = scoring.decay_weights(v.window.size, half_life)
    b, a = scoring.aggregates(cat.item_factors, v.window, alpha=cat.als.alpha, weights=w)
    return scoring.fold_in_aggregates(cat.gram, b, a, regularization=cat.als.regularization)


def _neighbours(m: _Model, v: _View, half_life: float, max_window: int | None = None) -> F32:
    """The decayed neighbour scores of the user's window (remembered in validation)."""
    cat = m.catalog
    return _memo(
        v,
        cat.nbr_indptr,
        ("neighbours", half_life, max_window),
        lambda: scoring.neighbour_scores(
            cat.nbr_indptr,
            cat.nbr_indices,
            cat.nbr_weights,
            v.window,
            n_items=cat.n_items,
            half_life=half_life,
            max_window=max_window,
        ),
    )


def _rank_segment(
    m: _Model,
    depth: int,
    *,
    behaviour: bool,
    half_life: float = math.inf,
    exclude_seen: bool = True,
) -> Ranker:
    cat = m.catalog

    def rank(v: _View) -> I32:
        seen = v.seen if exclude_seen else None
        vec = None
        if behaviour and cat.item_factors is not None and cat.gram is not None and cat.als:
            vec = _memo(
                v,
                cat.item_factors,
                ("aggregates", half_life, cat.als.alpha, cat.als.regularization),
                lambda: _segment_vector(cat, v, half_life),
            )
        sid = assign_segment(cat, signals=None if behaviour else v.signals, user_vector=vec)
        seg = segment_by_id(cat, sid)
        if seg is None:
            return scoring.popularity_ranking(cat.popularity, depth, exclude=seen)
        return scoring.segment_ranking(
            seg.top_items, depth, n_items=cat.n_items, exclude=seen, fallback=m.pop_order
        )

    return rank


def _rank_behavioral(
    m: _Model, depth: int, half_life: float, max_window: int | None = None
) -> Ranker:
    def rank(v: _View) -> I32:
        sc = _neighbours(m, v, half_life, max_window)
        return scoring.rank_sparse(sc, depth, exclude=v.seen, fallback=m.pop_order)

    return rank


def _affinity(m: _Model, v: _View) -> dict[str, F32]:
    n_cat = int(m.cat_indices.max()) + 1 if m.cat_indices.size else 0
    return _memo(
        v,
        m.cat_indices,
        ("affinity",),
        lambda: scoring.context_affinity(
            m.cat_indptr, m.cat_indices, n_cat, v.window, [daypart(float(t)) for t in v.times]
        ),
    )


def _rank_contextual(
    m: _Model, depth: int, half_life: float, boost: float, strength: float, gap: float
) -> Ranker:
    cat = m.catalog

    def rank(v: _View) -> I32:
        aff = _affinity(m, v) if strength != 0.0 else None
        sc = scoring.contextual_scores(
            cat.nbr_indptr,
            cat.nbr_indices,
            cat.nbr_weights,
            v.window,
            v.times,
            n_items=cat.n_items,
            now=v.now,
            half_life=half_life,
            session_gap=gap,
            session_boost=boost,
            cat_indptr=m.cat_indptr,
            cat_indices=m.cat_indices,
            affinity=aff,
            context=daypart(v.now),
            strength=strength,
        )
        return scoring.rank_sparse(sc, depth, exclude=v.seen, fallback=m.pop_order)

    return rank


def _user_vector(m: _Model, v: _View, half_life: float) -> F32:
    cat = m.catalog
    if m.user_factors is not None and math.isinf(half_life):
        row: F32 = m.user_factors[v.row]  # central ALS: the user's own trained vector
        return row
    assert cat.item_factors is not None and cat.gram is not None and cat.als is not None
    als = cat.als
    y, gram = cat.item_factors, cat.gram

    def solve() -> F32:
        w = None if math.isinf(half_life) else scoring.decay_weights(v.window.size, half_life)
        return scoring.fold_in(
            y, gram, v.window, weights=w, regularization=als.regularization, alpha=als.alpha
        )

    return _memo(v, y, ("fold-in", half_life, als.alpha, als.regularization), solve)


def _rank_individual(
    m: _Model,
    depth: int,
    half_life: float,
    weight: float,
    c: float,
    fusion_depth: int,
    foldin_half_life: float = math.inf,
) -> Ranker:
    cat = m.catalog
    assert cat.item_factors is not None

    def rank(v: _View) -> I32:
        x = _user_vector(m, v, foldin_half_life)
        nb = _neighbours(m, v, half_life) if weight != 0.0 else None
        assert cat.item_factors is not None
        candidates = scores = None
        if cat.ann is not None:  # as the device's level: only the probed clusters
            want = max(fusion_depth, depth) + int(np.asarray(v.seen).size)
            candidates = cat.ann.candidates(cat.ann.probe(x, want))
            scores = cat.scores_of(candidates, x)
        return scoring.individual_ranking(
            cat.item_factors,
            x,
            nb,
            depth,
            exclude=v.seen,
            depth=fusion_depth,
            neighbour_weight=weight,
            c=c,
            scores=scores,
            candidates=candidates,
        )

    return rank


def _rank_ease(b: F32, depth: int) -> Ranker:
    return lambda v: scoring.top_k(ease_rank(b, v.seen), depth, exclude=v.seen)


_LEVELS: tuple[tuple[str, str, str, str], ...] = (
    ("none", "none: global popularity", "on the device (panel catalog)", "nothing (bundle only)"),
    (
        "segment_rules",
        "segment: declared signals ({rules})",
        "on the device (panel catalog)",
        "declared signals",
    ),
    (
        "segment",
        "segment: behaviour (nearest centroid)",
        "on the device (panel catalog)",
        "decayed factor aggregates b (f), A (f x f); no item IDs",
    ),
    (
        "none_served",
        "none, as served (no item ids kept: seen items not excluded)",
        "on the device (panel catalog)",
        "nothing (bundle only)",
    ),
    (
        "segment_served",
        "segment: behaviour, as served (seen items not excluded)",
        "on the device (panel catalog)",
        "decayed factor aggregates; no item IDs",
    ),
    (
        "flat100",
        "behavioral: item-item, flat last 100",
        "on the device (panel catalog)",
        "last 100 item IDs",
    ),
    (
        "behavioral",
        "behavioral: recency-decayed neighbours",
        "on the device (panel catalog)",
        "item-ID window",
    ),
    (
        "contextual",
        "contextual: + session and daypart affinity",
        "on the device (panel catalog)",
        "window + timestamps + declared context",
    ),
    (
        "foldin",
        "individual: ALS fold-in alone",
        "on the device (panel catalog)",
        "window + user vector",
    ),
    (
        "individual",
        "individual: recency-weighted fold-in ⊕ decayed neighbours (RRF)",
        "on the device (panel catalog)",
        "window + user vector",
    ),
    ("central_ease", "EASE", "central (everyone's training data)", "all users' histories"),
    ("central_als", "ALS", "central (everyone's training data)", "all users' histories"),
    ("central_none", "popularity", "central (everyone's training data)", "all users' histories"),
    (
        "central_segment",
        "behaviour segments",
        "central (everyone's training data)",
        "all users' histories",
    ),
    (
        "central_behavioral",
        "recency-decayed neighbours",
        "central (everyone's training data)",
        "all users' histories",
    ),
    (
        "central_contextual",
        "contextual",
        "central (everyone's training data)",
        "all users' histories",
    ),
    (
        "central_individual",
        "recency-weighted fold-in ⊕ decayed neighbours",
        "central (everyone's training data)",
        "all users' histories",
    ),
)
_DEVICE_KEYS: tuple[str, ...] = tuple(
    key for key, _, group, _ in _LEVELS if group.startswith("on the device")
)
"""The rows measured on the device's catalog (under every encoding)."""


def _als_grid(x: Csr, s: EvalSettings) -> dict[tuple[float, float], tuple[F32, F32]]:
    """Implicit ALS trained once per (regularization, alpha) of the tuning grid."""
    return {
        c: train_als(
            x,
            factors=s.factors,
            regularization=c[0],
            alpha=c[1],
            iterations=s.als_iterations,
            seed=s.seed,
            threads=s.als_threads,
            cg_steps=s.als_cg_steps,
        )
        for c in s.als_grid
    }


def _matrix(data: Dataset, rows: Mapping[int, I64]) -> Csr:
    users = np.concatenate([np.full(v.size, u, dtype=np.int64) for u, v in rows.items()])
    items = np.concatenate(list(rows.values()))
    return interaction_matrix(users, items, data.n_users, data.n_items)


def _best(
    views: Sequence[_View], candidates: Sequence[T], make: Callable[[T], Ranker], s: EvalSettings
) -> T:
    """The candidate with the best mean validation NDCG (the first one on ties)."""
    best, best_val = candidates[0], -1.0
    for c in candidates:
        val = _mean_ndcg(views, make(c), s)
        if val > best_val + 1e-12:
            best, best_val = c, val
    return best


@dataclass(frozen=True, slots=True)
class _Panel:
    """One fold's panel: its rows, matrix, neighbours and ALS models per grid point."""

    rows: Mapping[int, I64]
    x: Csr
    nbr: tuple[I64, I32, F32]
    als: Mapping[tuple[float, float], tuple[F32, F32]]


def _with_segments(
    model: _Model,
    x: Csr,
    user_factors: F32 | None,
    signals: Sequence[Mapping[str, str] | None],
    *,
    shrinkage: float,
    behaviour: bool,
    rules: tuple[str, ...],
    s: EvalSettings,
) -> _Model:
    """``model`` with behaviour segments (k-means over ``user_factors``) or declared-
    signal rule segments, built by the operator code from the rows of ``x``."""
    bs = BuildSettings(
        factors=s.factors,
        min_segment_users=s.min_segment_users,
        segments=s.segments if behaviour else 0,
        rule_signals=() if behaviour else rules,
        shrinkage=shrinkage,
        seed=s.seed,
    )
    segs, srules, default = make_segments(
        x, user_factors if behaviour else None, signals, settings=bs
    )
    cat = replace(
        model.catalog, segments=tuple(segs), segment_rules=tuple(srules), default_segment=default
    )
    return replace(model, catalog=cat)


def _device_levels(
    test: Sequence[_View],
    mod: _Model,
    seg_b: _Model,
    seg_r: _Model | None,
    ch: Mapping[str, Any],
    a: Mapping[str, _Acc],
    s: EvalSettings,
) -> None:
    """Measure every device level on ``test`` with the hyper-parameters ``ch`` chosen on
    validation: ``mod`` is the fold's catalog, ``seg_b`` it with behaviour segments,
    ``seg_r`` with declared-signal rule segments (``None``: no rules)."""
    depth = max(s.cutoff, s.recall_cutoff)
    hl, fh, sh = ch["half_life"], ch["foldin_half_life"], ch["segment_half_life"]
    w_c, ctx = ch["fusion"], ch["context"]
    _run(test, _rank_none(mod, depth), a["none"], s)
    if seg_r is not None:
        _run(test, _rank_segment(seg_r, depth, behaviour=False), a["segment_rules"], s)
    _run(test, _rank_segment(seg_b, depth, behaviour=True, half_life=sh), a["segment"], s)
    # As the device serves them: levels none and segment keep no item ids, so they
    # cannot leave out what the user has already seen.
    _run(test, _rank_none(mod, depth, exclude_seen=False), a["none_served"], s)
    _run(
        test,
        _rank_segment(seg_b, depth, behaviour=True, half_life=sh, exclude_seen=False),
        a["segment_served"],
        s,
    )
    _run(test, _rank_behavioral(mod, depth, math.inf, s.flat_window), a["flat100"], s)
    _run(test, _rank_behavioral(mod, depth, hl), a["behavioral"], s)
    _run(test, _rank_contextual(mod, depth, hl, ctx[0], ctx[1], s.session_gap), a["contextual"], s)
    _run(test, _rank_individual(mod, depth, hl, 0.0, 60.0, s.fusion_depth), a["foldin"], s)
    _run(
        test,
        _rank_individual(mod, depth, hl, w_c[0], w_c[1], s.fusion_depth, fh),
        a["individual"],
        s,
    )


def _protocol(
    data: Dataset,
    s: EvalSettings,
    rules: tuple[str, ...],
    device: list[int],
    panel: _Panel,
    p: str,
    a: Mapping[str, _Acc],
    tick: Callable[[str], None],
    enc_accs: Mapping[str, Mapping[str, _Acc]],
    stats: dict[str, dict[str, float]],
) -> tuple[dict[str, object], int]:
    """Tune on validation, then measure every level and reference for one fold and one
    protocol, and the device levels again under every encoding other than full precision
    (into ``enc_accs[encoding]``, with what the bundle changed in ``stats[encoding]``);
    returns the chosen hyper-parameters and the behaviour segment count."""
    depth = max(s.cutoff, s.recall_cutoff)
    val = _views(data, device, p, s.window, inner=True)
    test = _views(data, device, p, s.window, inner=False)
    dev = set(device)
    xp = panel.x

    def als_model(cfg: tuple[float, float]) -> _Model:
        return _model(
            _catalog(data, xp, nbr=panel.nbr, y=panel.als[cfg][1], reg=cfg[0], alpha=cfg[1], s=s)
        )

    # -- tuning on the inner validation split (test items are never seen) --
    plain = _model(_catalog(data, xp, nbr=panel.nbr, y=None, reg=0.0, alpha=0.0, s=s))
    cfg = _best(
        val,
        s.als_grid,
        lambda c: _rank_individual(als_model(c), depth, 1.0, 0.0, 60.0, s.fusion_depth),
        s,
    )
    mod = als_model(cfg)
    hl = _best(val, s.half_life_grid, lambda h: _rank_behavioral(plain, depth, h), s)
    fh = _best(
        val,
        s.foldin_half_life_grid,
        lambda h: _rank_individual(mod, depth, hl, 0.0, 60.0, s.fusion_depth, h),
        s,
    )
    w_c = _best(
        val,
        list(product(s.fusion_weight_grid, s.fusion_c_grid)),
        lambda wc: _rank_individual(mod, depth, hl, wc[0], wc[1], s.fusion_depth, fh),
        s,
    )
    ctx = _best(
        val,
        list(product(s.session_boost_grid, s.context_strength_grid)),
        lambda bs: _rank_contextual(plain, depth, hl, bs[0], bs[1], s.session_gap),
        s,
    )
    sig_rows = [data.signals[u] if u not in dev else None for u in range(data.n_users)]

    def seg(m_: float, behaviour: bool) -> _Model:
        return _with_segments(
            mod,
            xp,
            panel.als[cfg][0],
            sig_rows,
            shrinkage=m_,
            behaviour=behaviour,
            rules=rules,
            s=s,
        )

    m_beh = _best(
        val, s.shrinkage_grid, lambda m_: _rank_segment(seg(m_, True), depth, behaviour=True), s
    )
    seg_b = seg(m_beh, True)
    sh = _best(
        val,
        s.segment_half_life_grid,
        lambda h: _rank_segment(seg_b, depth, behaviour=True, half_life=h),
        s,
    )
    m_rule = (
        _best(
            val,
            s.shrinkage_grid,
            lambda m_: _rank_segment(seg(m_, False), depth, behaviour=False),
            s,
        )
        if rules
        else 0.0
    )
    ch: dict[str, object] = dict(
        als=cfg,
        half_life=hl,
        foldin_half_life=fh,
        fusion=w_c,
        context=ctx,
        shrink=m_beh,
        segment_half_life=sh,
        shrink_rules=m_rule,
    )
    tick("tuning")
    # -- the device levels on the test items --
    seg_r = seg(m_rule, False) if rules else None
    _device_levels(test, mod, seg_b, seg_r, ch, a, s)
    tick("device levels")
    # -- the same levels on the catalog as each other encoding's bundle delivers it --
    others = [e for e in s.encodings if not e.in_memory]
    if others:
        key = generate_signing_key()
        with tempfile.TemporaryDirectory(prefix="ondevice-eval-") as tmp:
            for enc in others:
                loaded_b = _through_bundle(seg_b.catalog, enc, Path(tmp) / "segments.odb", key)
                order = _renumbering(seg_b.catalog, loaded_b)
                stats[enc.name] = _encoding_stats(seg_b.catalog, loaded_b, order)
                loaded_r = None
                if seg_r is not None:
                    cat_r = _through_bundle(seg_r.catalog, enc, Path(tmp) / "rules.odb", key)
                    order_r = _renumbering(seg_r.catalog, cat_r)
                    if (order is None) != (order_r is None) or not np.array_equal(
                        order if order is not None else 0, order_r if order_r is not None else 0
                    ):
                        raise InvalidInputError("two bundles of one fold put items apart")
                    loaded_r = _model(_measured(seg_r.catalog, cat_r, enc))
                loaded = _model(_measured(seg_b.catalog, loaded_b, enc))
                _device_levels(
                    _renumbered(test, order), loaded, loaded, loaded_r, ch, enc_accs[enc.name], s
                )
                tick(f"{enc.name} levels")
    # -- central references: everyone's training data --
    fit_rows = dict(panel.rows)
    fit_rows.update({v.row: v.seen for v in val})
    train_rows = dict(panel.rows)
    train_rows.update({v.row: v.seen for v in test})
    x_fit, x_train = _matrix(data, fit_rows), _matrix(data, train_rows)
    lam = _best(val, s.ease_grid, lambda lm: _rank_ease(ease_fit(x_fit, lm), depth), s)
    _run(test, _rank_ease(ease_fit(x_train, lam), depth), a["central_ease"], s)
    nbr_fit = item_neighbours(x_fit, top_n=s.neighbours)
    als_fit = _als_grid(x_fit, s)

    def central_fit(c: tuple[float, float]) -> _Model:
        return _model(
            _catalog(data, x_fit, nbr=nbr_fit, y=als_fit[c][1], reg=c[0], alpha=c[1], s=s),
            user_factors=als_fit[c][0],
        )

    ccfg = _best(
        val,
        s.als_grid,
        lambda c: _rank_individual(central_fit(c), depth, 1.0, 0.0, 60.0, s.fusion_depth),
        s,
    )
    u_c, y_c = train_als(
        x_train,
        factors=s.factors,
        regularization=ccfg[0],
        alpha=ccfg[1],
        iterations=s.als_iterations,
        seed=s.seed,
        threads=s.als_threads,
        cg_steps=s.als_cg_steps,
    )
    nbr_c = item_neighbours(x_train, top_n=s.neighbours)
    cmod = _model(
        _catalog(data, x_train, nbr=nbr_c, y=y_c, reg=ccfg[0], alpha=ccfg[1], s=s), user_factors=u_c
    )
    ch.update(ease=lam, central_als=ccfg)
    _run(test, _rank_individual(cmod, depth, hl, 0.0, 60.0, s.fusion_depth), a["central_als"], s)
    _run(test, _rank_none(cmod, depth), a["central_none"], s)
    cseg = _with_segments(
        cmod, x_train, u_c, list(data.signals), shrinkage=m_beh, behaviour=True, rules=rules, s=s
    )
    _run(test, _rank_segment(cseg, depth, behaviour=True, half_life=sh), a["central_segment"], s)
    _run(test, _rank_behavioral(cmod, depth, hl), a["central_behavioral"], s)
    _run(
        test,
        _rank_contextual(cmod, depth, hl, ctx[0], ctx[1], s.session_gap),
        a["central_contextual"],
        s,
    )
    _run(
        test,
        _rank_individual(cmod, depth, hl, w_c[0], w_c[1], s.fusion_depth, fh),
        a["central_individual"],
        s,
    )
    tick("central references")
    return ch, len(seg_b.catalog.segments)


def _prefixed(tick: Callable[[str], None], prefix: str, stage: str) -> None:
    tick(prefix + stage)


@dataclass(frozen=True, slots=True)
class _ProtocolResult:
    """What one fold contributes under one protocol: the per-user metrics of every
    level, the chosen hyper-parameters and the behaviour segment count."""

    fold: int
    protocol: str
    accs: Mapping[str, _Acc]
    chosen: dict[str, object]
    segments: int
    encoded: Mapping[str, Mapping[str, _Acc]] = field(default_factory=dict)
    """Per encoding other than full precision: the device levels' per-user metrics."""
    stats: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    """Per encoding other than full precision: what its bundle changed in the catalog."""


def _make_panel(
    data: Dataset, s: EvalSettings, f: int, device: I64, tick: Callable[[str], None]
) -> _Panel:
    """One fold's panel catalog pieces: every user outside the fold."""
    dev = set(device.tolist())
    panel_rows = {u: data.sequences[u] for u in range(data.n_users) if u not in dev}
    xp = _matrix(data, panel_rows)
    panel = _Panel(
        rows=panel_rows,
        x=xp,
        nbr=item_neighbours(xp, top_n=s.neighbours),
        als=_als_grid(xp, s),
    )
    tick(f"fold {f + 1}: panel catalog")
    return panel


def _run_protocol(
    data: Dataset,
    s: EvalSettings,
    rules: tuple[str, ...],
    f: int,
    device: I64,
    panel: _Panel,
    p: str,
    tick: Callable[[str], None],
) -> _ProtocolResult:
    """Tuning and measuring one fold under one protocol."""
    accs = {key: _Acc() for key, *_ in _LEVELS}
    enc_accs = {
        e.name: {key: _Acc() for key in _DEVICE_KEYS} for e in s.encodings if not e.in_memory
    }
    stats: dict[str, dict[str, float]] = {}
    prefix = f"fold {f + 1} {p}: "
    ch, n_seg = _protocol(
        data,
        s,
        rules,
        device.tolist(),
        panel,
        p,
        accs,
        functools.partial(_prefixed, tick, prefix),
        enc_accs,
        stats,
    )
    log.info("fold %d %s: %s", f, p, ch)
    return _ProtocolResult(
        fold=f, protocol=p, accs=accs, chosen=ch, segments=n_seg, encoded=enc_accs, stats=stats
    )


# ---- running the work in worker processes ----

_worker_queue: Any = None
_worker_limits: Any = None


def _worker_init(queue: Any) -> None:
    """A worker process: progress goes to ``queue``; BLAS stays at one thread."""
    global _worker_queue, _worker_limits
    _worker_queue = queue
    _worker_limits = single_threaded_blas()


def _worker_tick(stage: str) -> None:
    if _worker_queue is not None:
        _worker_queue.put(stage)


def _worker_panel(data: Dataset, s: EvalSettings, f: int, device: I64) -> _Panel:
    return _make_panel(data, s, f, device, _worker_tick)


def _worker_protocol(
    data: Dataset,
    s: EvalSettings,
    rules: tuple[str, ...],
    f: int,
    device: I64,
    panel: _Panel,
    p: str,
) -> _ProtocolResult:
    return _run_protocol(data, s, rules, f, device, panel, p, _worker_tick)


def _parallel(
    data: Dataset,
    s: EvalSettings,
    rules: tuple[str, ...],
    folds: Sequence[I64],
    jobs: int,
    tick: Callable[[str], None],
) -> list[_ProtocolResult]:
    """The work on ``jobs`` worker processes (spawned, so no thread state is inherited):
    first each fold's panel, then, as each panel arrives, one task per protocol of that
    fold (small tasks keep every worker busy to the end). Progress messages come back
    through a queue."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    out: list[_ProtocolResult] = []

    def drain(timeout: float | None) -> None:
        while True:
            try:
                tick(queue.get(timeout=timeout) if timeout else queue.get_nowait())
            except Empty:
                return

    with ProcessPoolExecutor(
        max_workers=jobs, mp_context=ctx, initializer=_worker_init, initargs=(queue,)
    ) as pool:
        panels: dict[Future[_Panel], int] = {
            pool.submit(_worker_panel, data, s, f, device): f for f, device in enumerate(folds)
        }
        pending: set[Future[Any]] = set(panels)
        while pending:
            finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            drain(None)
            for fut in finished:
                if fut in panels:
                    f = panels[fut]
                    panel = fut.result()
                    pending.update(
                        pool.submit(_worker_protocol, data, s, rules, f, folds[f], panel, p)
                        for p in s.protocols
                    )
                else:
                    out.append(fut.result())
    drain(0.2)  # messages sent just before the last task returned
    queue.close()
    return out


def usable_cpus() -> int:
    """How many CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def evaluate(
    data: Dataset,
    *,
    settings: EvalSettings | None = None,
    progress: Progress | None = None,
    command: str = "",
    jobs: int = 1,
) -> EvalResult:
    """Run the whole protocol on ``data``; ``progress(done, total, stage)`` is called
    after each step.

    ``jobs`` > 1 runs the work in that many worker processes: each fold's panel, then
    each (fold, protocol) pair (each ALS training then uses ``max(1, usable_cpus() //
    jobs)`` threads unless ``settings.als_threads`` says otherwise). The result is the
    same for any ``jobs``: the pieces are independent, seeded alike and merged in fold
    order; only the measured times differ. The workers are spawned (a fresh interpreter
    each), so a script that asks for them must call this under
    ``if __name__ == "__main__":``.
    """
    s = settings or EvalSettings()
    if jobs < 1:
        raise InvalidInputError("jobs must be >= 1")
    t_start = time.perf_counter()
    cpu_start = _cpu_seconds()
    rules = tuple(s.rule_signals if s.rule_signals is not None else data.rule_signals)
    rng = np.random.default_rng(s.seed)
    perm = rng.permutation(data.n_users)
    folds = [np.sort(f) for f in np.array_split(perm, s.folds)]
    n_other = sum(1 for e in s.encodings if not e.in_memory)
    total = s.folds * (1 + (3 + n_other) * len(s.protocols))
    done = 0

    def tick(stage: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, stage)

    if progress is not None:
        progress(0, total, "starting")
    jobs = min(jobs, len(folds) * len(s.protocols))
    if jobs > 1:
        if s.als_threads == 0:
            s = replace(s, als_threads=max(1, usable_cpus() // jobs))
        results = _parallel(data, s, rules, folds, jobs, tick)
        s = settings or EvalSettings()
    else:
        results = []
        with single_threaded_blas():
            for f, dev in enumerate(folds):
                panel = _make_panel(data, s, f, dev, tick)
                results += [
                    _run_protocol(data, s, rules, f, dev, panel, p, tick) for p in s.protocols
                ]
    accs = {p: {key: _Acc() for key, *_ in _LEVELS} for p in s.protocols}
    others = [e.name for e in s.encodings if not e.in_memory]
    enc_accs = {p: {e: {k: _Acc() for k in _DEVICE_KEYS} for e in others} for p in s.protocols}
    stats: dict[str, dict[str, list[Mapping[str, float]]]] = {
        p: {e: [] for e in others} for p in s.protocols
    }
    chosen: dict[str, list[dict[str, object]]] = {p: [] for p in s.protocols}
    seg_counts: dict[str, list[int]] = {p: [] for p in s.protocols}
    # in fold order, as a single process appends them, whatever order they finished in
    for res in sorted(results, key=lambda r: r.fold):
        for key, acc in res.accs.items():
            accs[res.protocol][key].extend(acc)
        for e in others:
            for key, acc in res.encoded[e].items():
                enc_accs[res.protocol][e][key].extend(acc)
            stats[res.protocol][e].append(res.stats[e])
        chosen[res.protocol].append(res.chosen)
        seg_counts[res.protocol].append(res.segments)

    rows: dict[str, tuple[LevelResult, ...]] = {}
    encoded: dict[str, dict[str, tuple[LevelResult, ...]]] = {}
    deltas: list[EncodingDelta] = []
    for p in s.protocols:
        levels = [lv for lv in _LEVELS if lv[0] != "segment_rules" or rules]
        rows[p] = tuple(_level_result(lv, accs[p][lv[0]], rules, data.n_items) for lv in levels)
        encoded[p] = {}
        for e in others:
            encoded[p][e] = tuple(
                _level_result(lv, enc_accs[p][e][lv[0]], rules, data.n_items)
                for lv in levels
                if lv[0] in _DEVICE_KEYS
            )
            for r in encoded[p][e]:
                ref = next(x for x in rows[p] if x.key == r.key)
                deltas.append(
                    EncodingDelta(
                        protocol=p,
                        key=r.key,
                        label=r.label,
                        encoding=e,
                        reference=ref.ndcg,
                        reference_se=ref.ndcg_se,
                        measured=r.ndcg,
                        measured_se=r.ndcg_se,
                        diff_se=_paired_se(enc_accs[p][e][r.key].ndcg, accs[p][r.key].ndcg),
                    )
                )
    return EvalResult(
        dataset=data.name,
        n_users=data.n_users,
        n_items=data.n_items,
        settings=s,
        rows=rows,
        chosen={p: tuple(v) for p, v in chosen.items()},
        segment_counts={p: tuple(v) for p, v in seg_counts.items()},
        seconds=time.perf_counter() - t_start,
        command=command,
        cpu_seconds=_cpu_seconds() - cpu_start,
        jobs=jobs,
        encoded=encoded,
        deltas=tuple(deltas),
        encoding_stats={p: {e: tuple(v) for e, v in st.items()} for p, st in stats.items()},
    )


def _mean_se(vals: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error (0 for fewer than two values)."""
    arr = np.asarray(vals, dtype=np.float64)
    n = arr.size
    if n == 0:
        return 0.0, 0.0
    se = float(arr.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    return float(arr.mean()), se


def _paired_se(a: Sequence[float], b: Sequence[float]) -> float:
    """Standard error of the mean of ``a - b`` (the same users in the same order)."""
    if len(a) != len(b):
        raise InvalidInputError("paired metrics of different users")
    return _mean_se(list(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)))[1]


def _level_result(
    level: tuple[str, str, str, str], acc: _Acc, rules: tuple[str, ...], n_items: int
) -> LevelResult:
    """One table row from the per-user metrics of one level."""
    key, label, group, reads = level
    hr, hr_se = _mean_se(acc.hr)
    nd, nd_se = _mean_se(acc.ndcg)
    rc, rc_se = _mean_se(acc.recall)
    return LevelResult(
        key=key,
        label=label.format(rules=" x ".join(rules)),
        group=group,
        reads=reads,
        hr=hr,
        hr_se=hr_se,
        ndcg=nd,
        ndcg_se=nd_se,
        recall=rc,
        recall_se=rc_se,
        coverage=len(acc.covered) / n_items,
        ms_per_user=float(np.mean(acc.ms)) if acc.ms else 0.0,
        users=len(acc.ndcg),
    )
