"""``python -m ondevice.operator``: the operator's tools, at the edge.

- ``keygen --out signing.key``: a new Ed25519 signing key (raw 32 bytes, mode 0600);
  prints the public key (hex) that devices pin.
- ``build --panel panel.csv --signing-key signing.key --out catalog.bundle``: build a
  catalog from a consenting panel's interaction log (``user,item,timestamp[,value]``),
  optionally with signals (``user,signal,value``) and titles/categories
  (``item,title[,category;category]``), and sign it. Progress bars (``tqdm``) go to
  stderr.
- ``verify --bundle catalog.bundle --public-key HEX``: check a bundle as a device would.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

from ..bundle import verify_bundle
from ..errors import OndeviceError
from ._progress import TqdmProgress
from .build import BuildSettings, build_catalog
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
    info = write_bundle(catalog, args.out, private_key=key)
    print(
        json.dumps(
            {
                "bundle": str(args.out),
                "items": info.n_items,
                "segments": info.n_segments,
                "factors": info.n_factors,
                "sha256": info.sha256,
                "public_key": public_key_bytes(key).hex(),
            }
        )
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    info = verify_bundle(args.bundle, public_key=bytes.fromhex(args.public_key))
    print(json.dumps({"ok": True, "name": info.name, "items": info.n_items, "sha256": info.sha256}))
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
