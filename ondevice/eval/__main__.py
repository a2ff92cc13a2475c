"""``python -m ondevice.eval``: measure every level, print a markdown table."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ondevice.errors import OndeviceError
from ondevice.eval.harness import (
    ENCODINGS,
    FULL,
    Encoding,
    EvalResult,
    EvalSettings,
    evaluate,
    from_synthetic,
    usable_cpus,
)
from ondevice.operator._progress import TqdmProgress


def _png(result: EvalResult, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    protocols = list(result.rows)
    fig, axes = plt.subplots(1, len(protocols), figsize=(7 * len(protocols), 5), squeeze=False)
    for ax, p in zip(axes[0], protocols, strict=True):
        rows = result.rows[p]
        none = result.row(p, "none").ndcg
        labels = [r.label for r in rows]
        lifts = [r.ndcg / none for r in rows]
        colors = ["tab:blue" if r.group.startswith("on the device") else "tab:gray" for r in rows]
        ax.barh(labels[::-1], lifts[::-1], color=colors[::-1])
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(f"{p.upper()}: NDCG@10 lift over none")
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"{result.dataset}: on the device (blue) and central references (grey)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse_encodings(text: str) -> tuple[Encoding, ...]:
    """``full,compact`` -> the named encodings, full precision first (it is the reference
    and always measured: the levels are tuned on it)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ENCODINGS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown encoding(s) {', '.join(unknown)}; known: {', '.join(ENCODINGS)}"
        )
    rest = [ENCODINGS[n] for n in dict.fromkeys(names) if n != FULL.name]
    return (FULL, *rest)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    ap = argparse.ArgumentParser(
        prog="python -m ondevice.eval",
        description=(
            "Measure what each personalization level is worth (5-fold user CV, LOO and T20, "
            "full ranking) next to centralized references, and print a markdown table."
        ),
        epilog=(
            "MovieLens-100K is not shipped: get ml-100k.zip from GroupLens "
            "(https://grouplens.org/datasets/movielens/100k/; research use only, no "
            "redistribution, no commercial use without their permission; see its README) "
            "and pass the unzipped ml-100k directory or the zip file to --movielens."
        ),
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--movielens",
        metavar="PATH",
        help="the ml-100k directory (u.data, u.user, u.item) or ml-100k.zip from GroupLens",
    )
    src.add_argument("--synthetic", action="store_true", help="a small synthetic data set")
    ap.add_argument("--out", metavar="FILE", help="also write the markdown table here")
    ap.add_argument(
        "--png", metavar="FILE", help="a lift-by-level chart (needs matplotlib; skipped otherwise)"
    )
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="worker processes sharing the folds and protocols (default: the usable CPUs); "
        "the numbers do not depend on it",
    )
    ap.add_argument(
        "--encodings",
        type=parse_encodings,
        default=parse_encodings("full,compact"),
        metavar="LIST",
        help="catalog encodings measured side by side, comma-separated (default: "
        "full,compact): full = float32 as built, compact = a signed bundle format 2 "
        "(int8 factors, one-byte weights) loaded back; full precision is always measured "
        "(the reference), so '--encodings full' is the table without the compact pass",
    )
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    command = "python -m ondevice.eval " + shlex.join(sys.argv[1:] if argv is None else argv)
    jobs = args.jobs if args.jobs is not None else max(1, min(usable_cpus(), args.folds))
    try:
        if args.movielens:
            from ondevice.eval.movielens import is_published_ml100k, load_movielens

            data = load_movielens(args.movielens)
            if not is_published_ml100k(data):
                n = sum(int(q.size) for q in data.sequences)
                print(
                    f"note: {args.movielens} holds {n} ratings by {data.n_users} users on "
                    f"{data.n_items} items, not the published ML-100K (100000 / 943 / 1682): "
                    "the results will not match docs/evaluation.md",
                    file=sys.stderr,
                )
            settings = EvalSettings(folds=args.folds, seed=args.seed, encodings=args.encodings)
        else:
            from ondevice.synthetic import generate

            data = from_synthetic(generate(n_users=400, n_items=300, seed=args.seed))
            settings = EvalSettings(
                folds=args.folds,
                seed=args.seed,
                factors=16,
                min_segment_users=20,
                segments=5,
                als_iterations=8,
                encodings=args.encodings,
            )
        with TqdmProgress("evaluation") as bar:
            result = evaluate(
                data,
                settings=settings,
                command=command,
                progress=None if args.quiet else bar,
                jobs=jobs,
            )
    except OndeviceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = result.to_markdown()
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    png = Path(args.png) if args.png else (Path(args.out).with_suffix(".png") if args.out else None)
    if png is not None:
        _png(result, png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
