"""Benchmark: the cost of ``import ondevice`` against ``import numpy`` alone.

Runs ``python -X importtime -c "import ondevice"`` and ``python -X importtime -c "import
numpy"`` in fresh subprocesses (alternating), ``--repeats`` times each, and reads the
*cumulative* microseconds that ``-X importtime`` reports for the top-level module.
Prints the medians and their ratio, then, for the ``import ondevice`` runs, the ten
slowest modules by median *self* time (with their cumulative time) and the self time
summed per top-level package.

Two modes, both measured:

- ``bytecode cached`` (the figure for the target): as after ``pip install``, which
  compiles ``.pyc`` files. The subprocesses get ``PYTHONPYCACHEPREFIX`` pointing to a
  temporary directory (so nothing is written into the source tree) and bytecode writing
  enabled; one warm-up run of each fills the cache.
- ``environment as is``: the caller's environment unchanged. If it sets
  ``PYTHONDONTWRITEBYTECODE`` (this development sandbox does) an editable checkout
  without ``__pycache__`` recompiles every ``ondevice`` module on each import, while
  numpy's installed ``.pyc`` files are used: a development artefact, shown for honesty.

Target: ``import ondevice`` <= 1.3 x ``import numpy``: importing the SDK (which loads its
numpy-heavy modules only on first use) costs an app's start-up no more than about
importing numpy, a yardstick measured on the same machine in the same run.

Run: ``.venv/bin/python benchmarks/bench_import.py [--repeats 15]``
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import statistics
import subprocess
import sys
import tempfile

LINE = re.compile(r"^import time:\s+(\d+)\s+\|\s+(\d+)\s+\|(\s*)(\S+)\s*$")


Rows = list[tuple[str, int, int, int]]


def import_times(module: str, env: dict[str, str]) -> Rows:
    """One fresh interpreter importing ``module``: (name, self us, cumulative us,
    nesting depth) for every module it imported, in the order ``-X importtime`` prints."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    rows = []
    for line in proc.stderr.splitlines():
        m = LINE.match(line)
        if m:
            self_us, cum_us, indent, name = m.groups()
            rows.append((name, int(self_us), int(cum_us), (len(indent) - 1) // 2))
    return rows


def top_level(rows: Rows, module: str) -> tuple[int, Rows]:
    """The cumulative microseconds of the top-level ``module`` line, and the rows of the
    modules it imported (``-X importtime`` prints them just before it, nested deeper;
    modules the interpreter imported at startup are not among them)."""
    for i, (name, _, cum, depth) in enumerate(rows):
        if name == module and depth == 0:
            start = i
            while start > 0 and rows[start - 1][3] > 0:
                start -= 1
            return cum, rows[start:i]
    raise RuntimeError(f"-X importtime printed no top-level line for {module}")


def chain_to(rows: Rows, module: str) -> list[str]:
    """The chain of importers of ``module`` (outermost first) in ``rows``; empty if it
    was not imported. A parent is printed after its children, one level shallower."""
    for i, (name, _, _, depth) in enumerate(rows):
        if name == module:
            chain = [name]
            for later, _, _, d in rows[i + 1 :]:
                if d < depth:
                    chain.append(later)
                    depth = d
            return chain[::-1]
    return []


def measure(env: dict[str, str], repeats: int, title: str, details: bool) -> float:
    """Median cumulative times of both imports under ``env``; print them and, with
    ``details``, the slowest modules. Returns the ratio ondevice / numpy."""
    import_times("ondevice", env)  # warm-up: bytecode cache, OS page cache
    import_times("numpy", env)

    cum: dict[str, list[int]] = {"ondevice": [], "numpy": []}
    self_times: dict[str, list[int]] = collections.defaultdict(list)
    cum_times: dict[str, list[int]] = collections.defaultdict(list)
    numpy_inside: list[int] = []
    chain: list[str] = []
    for _ in range(repeats):
        for module in ("ondevice", "numpy"):  # alternate, so noise hits both alike
            total, under = top_level(import_times(module, env), module)
            cum[module].append(total)
            if module == "ondevice":
                chain = chain_to(under, "numpy")
                numpy_inside.append(sum(c for n, _, c, _ in under if n == "numpy"))
                for name, self_us, cum_us, _ in under:
                    self_times[name].append(self_us)
                    cum_times[name].append(cum_us)

    ond = statistics.median(cum["ondevice"])
    npy = statistics.median(cum["numpy"])
    ratio = ond / npy
    print(f"\n{title}: median of {repeats} fresh subprocesses each")
    for module, med in (("ondevice", ond), ("numpy", npy)):
        print(
            f"  import {module:<9} {med:>10,.0f} us cumulative  (range "
            f"{min(cum[module]):,}..{max(cum[module]):,})"
        )
    print(f"  ratio ondevice / numpy: {ratio:.2f}")
    if not details:
        return ratio

    if chain:
        inside = statistics.median(numpy_inside)
        print(
            f"  numpy is imported by `import ondevice` (via {' -> '.join(['ondevice', *chain])}):"
            f" {inside:,.0f} us of it; everything else {ond - inside:,.0f} us = "
            f"{(ond - inside) / npy:.2f} x numpy alone (the budget is 0.30)"
        )
    imported = list(self_times)
    print(
        f"  import ondevice loads {len(imported)} modules; numpy among them: "
        f"{'yes' if 'numpy' in self_times else 'no'}"
    )
    print("\n  Ten slowest modules under `import ondevice`, numpy's own excluded (median self):")
    print(f"  {'self us':>9} {'cumul. us':>10}  module")
    mine = [n for n in imported if n.split(".")[0] != "numpy"]
    slowest = sorted(mine, key=lambda n: statistics.median(self_times[n]), reverse=True)
    for name in slowest[:10]:
        print(
            f"  {statistics.median(self_times[name]):>9,.0f} "
            f"{statistics.median(cum_times[name]):>10,.0f}  {name}"
        )

    per_package: dict[str, float] = collections.defaultdict(float)
    for name, ts in self_times.items():
        per_package[name.split(".")[0]] += statistics.median(ts)
    print("\n  Self time per top-level package under `import ondevice` (sum of medians):")
    for pkg, us in sorted(per_package.items(), key=lambda kv: kv[1], reverse=True)[:10]:
        print(f"  {us:>9,.0f} us  {pkg}  ({100 * us / ond:.0f}%)")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="fresh runs of each (>= 7)")
    args = parser.parse_args()

    base = {k: v for k, v in os.environ.items() if k != "PYTHONPROFILEIMPORTTIME"}
    print(
        f"{sys.executable} -X importtime; PYTHONDONTWRITEBYTECODE in the environment: "
        f"{'yes' if base.get('PYTHONDONTWRITEBYTECODE') else 'no'}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-import-pycache-") as prefix:
        cached = {k: v for k, v in base.items() if k != "PYTHONDONTWRITEBYTECODE"}
        cached["PYTHONPYCACHEPREFIX"] = prefix
        ratio = measure(cached, args.repeats, "Bytecode cached (as installed)", True)
    measure(base, args.repeats, "Environment as is", False)
    print(
        f"\ntarget (bytecode cached) ondevice <= 1.3 x numpy: "
        f"{'met' if ratio <= 1.3 else 'MISSED'} ({ratio:.2f})"
    )


if __name__ == "__main__":
    main()
