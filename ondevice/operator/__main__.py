"""``python -m ondevice.operator``: the operator's tools, at the edge.

- ``keygen --out signing.key``: a new Ed25519 signing key (raw 32 bytes, mode 0600);
  prints the public key (hex) that devices pin.
- ``build --panel panel.csv --signing-key signing.key --out catalog.bundle``: build a
  catalog from a consenting panel's interaction log (``user,item,timestamp[,value]``),
  optionally with signals (``user,signal,value``) and titles/categories
  (``item,title[,category;category]``), and sign it. Progress bars (``tqdm``) go to
  stderr.
- ``assemble --item-ids items.txt --popularity pop.npy --neighbours nbrs.npz
  --factors factors.npy --regularization L --alpha A [--panel panel.npz] --signing-key
  signing.key --out catalog.bundle``: the hand-off from a distributed build (Spark, see
  ``docs/operator-scale.md``): sign a catalog made of arrays computed elsewhere, checked
  by :func:`ondevice.operator.build.assemble_catalog`.
- ``verify --bundle catalog.bundle --public-key HEX``: check a bundle as a device would.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import verify_bundle
from ..errors import InvalidInputError, OndeviceError
from ._progress import TqdmProgress
from .build import BuildSettings, assemble_catalog, build_catalog, neighbours_from_pairs
from .bundle_writer import (
    generate_signing_key,
    private_key_bytes,
    public_key_bytes,
    signing_key_from_bytes,
    write_bundle,
)


def _read_signals(path: Path) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    with path.open(newline="", encoding="utf-8") as fh:
        for row in csv.reader(fh):
            if len(row) >= 3 and row[0] != "user":
                out.setdefault(row[0], {})[row[1]] = row[2]
    return out


def _read_items(path: Path) -> tuple[list[str], dict[str, str], dict[str, list[str]]]:
    ids: list[str] = []
    titles: dict[str, str] = {}
    categories: dict[str, list[str]] = {}
    with path.open(newline="", encoding="utf-8") as fh:
        for row in csv.reader(fh):
            if not row or row[0] == "item":
                continue
            ids.append(row[0])
            titles[row[0]] = row[1] if len(row) > 1 else row[0]
            categories[row[0]] = [c for c in (row[2].split(";") if len(row) > 2 else []) if c]
    return ids, titles, categories


def _keygen(args: argparse.Namespace) -> int:
    key = generate_signing_key()
    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_key_bytes(key))
    print(
        json.dumps({"private_key_file": str(args.out), "public_key": public_key_bytes(key).hex()})
    )
    return 0


def _build(args: argparse.Namespace) -> int:
    key = signing_key_from_bytes(Path(args.signing_key).read_bytes())
    signals = _read_signals(args.signals) if args.signals else None
    items, titles, categories = _read_items(args.items) if args.items else (None, None, None)
    settings = BuildSettings(
        factors=args.factors,
        segments=args.segments,
        min_segment_users=args.min_segment_users,
        rule_signals=tuple(args.rule_signal),
        name=args.name,
    )
    with TqdmProgress() as bar:
        catalog = build_catalog(
            args.panel,
            settings=settings,
            signals=signals,
            items=items,
            titles=titles,
            categories=categories,
            progress=None if args.quiet else bar,
        )
    return _write_and_report(catalog, args.out, key)


def _load(path: Path, what: str) -> Any:
    """An ``.npy`` array or ``.npz`` archive, never unpickling anything."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"cannot read {what} {str(path)!r}: {exc}") from exc


def _member(archive: Any, key: str, path: Path) -> Any:
    if key not in archive.files:
        raise InvalidInputError(f"{str(path)!r} has no array {key!r} (it has {archive.files})")
    return archive[key]


def _read_item_ids(path: Path) -> list[str]:
    try:
        with path.open(encoding="utf-8") as fh:
            return [line.rstrip("\r\n") for line in fh if line.rstrip("\r\n")]
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"cannot read item ids {str(path)!r}: {exc}") from exc


def _assemble(args: argparse.Namespace) -> int:
    key = signing_key_from_bytes(Path(args.signing_key).read_bytes())
    ids = _read_item_ids(args.item_ids)
    n = len(ids)
    nb = _load(args.neighbours, "neighbours")
    if not hasattr(nb, "files"):
        raise InvalidInputError("--neighbours must be an .npz archive")
    if "indptr" in nb.files:
        csr = (
            _member(nb, "indptr", args.neighbours),
            _member(nb, "indices", args.neighbours),
            _member(nb, "weights", args.neighbours),
        )
    else:
        csr = neighbours_from_pairs(
            _member(nb, "item", args.neighbours),
            _member(nb, "neighbour", args.neighbours),
            _member(nb, "weight", args.neighbours),
            n,
        )
    users = items = None
    user_signals = None
    if args.panel:
        panel = _load(args.panel, "panel")
        if not hasattr(panel, "files"):
            raise InvalidInputError("--panel must be an .npz archive")
        users = _member(panel, "users", args.panel)
        items = _member(panel, "items", args.panel)
        if args.signals:
            names = [str(u) for u in _member(panel, "user_ids", args.panel).tolist()]
            sig = _read_signals(args.signals)
            user_signals = [sig.get(name) for name in names]
    _, titles, categories = _read_items(args.items) if args.items else (None, None, None)
    settings = BuildSettings(
        neighbours=args.neighbours_per_item,
        segments=args.segments,
        min_segment_users=args.min_segment_users,
        rule_signals=tuple(args.rule_signal),
        name=args.name,
    )
    catalog = assemble_catalog(
        ids,
        popularity=_load(args.popularity, "popularity"),
        nbr_indptr=csr[0],
        nbr_indices=csr[1],
        nbr_weights=csr[2],
        item_factors=_load(args.factors, "item factors"),
        regularization=args.regularization,
        alpha=args.alpha,
        panel_users=users,
        panel_items=items,
        user_signals=user_signals,
        settings=settings,
        titles=titles,
        categories=categories,
    )
    return _write_and_report(catalog, args.out, key)


def _verify(args: argparse.Namespace) -> int:
    info = verify_bundle(args.bundle, public_key=bytes.fromhex(args.public_key))
    print(json.dumps({"ok": True, "name": info.name, "items": info.n_items, "sha256": info.sha256}))
    return 0


def _write_and_report(catalog: Any, out: Path, key: Any) -> int:
    """Write and sign the bundle; print what a device pins and checks, as one JSON line."""
    info = write_bundle(catalog, out, private_key=key)
    print(
        json.dumps(
            {
                "bundle": str(out),
                "items": info.n_items,
                "segments": info.n_segments,
                "factors": info.n_factors,
                "sha256": info.sha256,
                "public_key": public_key_bytes(key).hex(),
            }
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the operator tools; return the exit code."""
    parser = argparse.ArgumentParser(prog="python -m ondevice.operator", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    k = sub.add_parser("keygen", help="make a new bundle signing key")
    k.add_argument("--out", type=Path, required=True, help="file for the private key (0600)")
    k.set_defaults(run=_keygen)
    b = sub.add_parser("build", help="build and sign a catalog bundle from a panel log")
    b.add_argument("--panel", type=Path, required=True, help="CSV: user,item,timestamp[,value]")
    b.add_argument("--signals", type=Path, help="CSV: user,signal,value (for rule segments)")
    b.add_argument("--items", type=Path, help="CSV: item,title[,cat1;cat2]")
    b.add_argument("--rule-signal", action="append", default=[], help="signal for rule segments")
    b.add_argument("--signing-key", type=Path, required=True, help="the private key file")
    b.add_argument("--out", type=Path, required=True, help="the bundle to write")
    b.add_argument("--factors", type=int, default=64)
    b.add_argument("--segments", type=int, default=10)
    b.add_argument("--min-segment-users", type=int, default=50)
    b.add_argument("--name", default="catalog")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(run=_build)
    a = sub.add_parser(
        "assemble", help="sign a catalog from arrays computed elsewhere (e.g. by Spark)"
    )
    a.add_argument("--item-ids", type=Path, required=True, help="text file, one item id a line")
    a.add_argument("--popularity", type=Path, required=True, help=".npy, float[n]")
    a.add_argument(
        "--neighbours",
        type=Path,
        required=True,
        help=".npz with indptr, indices, weights (CSR) or item, neighbour, weight (pairs)",
    )
    a.add_argument("--factors", type=Path, required=True, help=".npy, float[n, f] item factors")
    a.add_argument(
        "--regularization", type=float, required=True, help="the device's plain ALS lambda"
    )
    a.add_argument("--alpha", type=float, required=True, help="confidence 1 + alpha * r")
    a.add_argument("--panel", type=Path, help=".npz with users, items (codes) [, user_ids]")
    a.add_argument("--signals", type=Path, help="CSV: user,signal,value (needs user_ids)")
    a.add_argument("--items", type=Path, help="CSV: item,title[,cat1;cat2]")
    a.add_argument("--rule-signal", action="append", default=[], help="signal for rule segments")
    a.add_argument("--neighbours-per-item", type=int, default=100)
    a.add_argument("--segments", type=int, default=10)
    a.add_argument("--min-segment-users", type=int, default=50)
    a.add_argument("--name", default="catalog")
    a.add_argument("--signing-key", type=Path, required=True, help="the private key file")
    a.add_argument("--out", type=Path, required=True, help="the bundle to write")
    a.set_defaults(run=_assemble)
    v = sub.add_parser("verify", help="verify a bundle against a public key")
    v.add_argument("--bundle", type=Path, required=True)
    v.add_argument("--public-key", required=True, help="64 hex digits")
    v.set_defaults(run=_verify)
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
        return code
    except (OndeviceError, OSError, ValueError) as exc:
        sys.stderr.write(f"ondevice.operator: error: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
