"""Auto against the better forced path over many cells: one number with its uncertainty.

Per cell, auto / best forced output tok/s is noisy (runs of a few seconds spread 1.04-1.7x
on the GPU, docs/benchmarks/loadtest-gpu.md), so a 5% bound per cell is below what a few
runs resolve.  Across cells the ratios are independent measurements of the same question
("does auto cost anything?"): their geometric mean with a t-interval of the mean log ratio
says how much auto costs on average, and how sure that is.

``python -m slabserve.loadtest.summary DIR_OR_CSV ...`` reads the ``results.csv`` of one or more
``--compare`` runs (rounds included: each label's median run per cell, as the comparison
table takes it) and prints each cell's ratio and the summary.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Iterable
from pathlib import Path

from slabserve.loadtest.compare import FORCED, OURS, geo_interval, lower_middle


def cell_ratios(rows: Iterable[dict]) -> dict[tuple[int, int], float]:
    """(context, concurrency) -> auto / best forced tok/s, from flat result rows (each
    label's median run per cell); cells without auto or a forced path are left out."""
    runs: dict[tuple[int, int], dict[str, list[float]]] = {}
    for r in rows:
        cell = (int(float(r["context"])), int(float(r["concurrency"])))
        runs.setdefault(cell, {}).setdefault(r["label"], []).append(float(r["output_tok_s"]))
    out = {}
    for cell, by in sorted(runs.items()):
        forced = [lower_middle(sorted(by[f])) for f in FORCED if f in by]
        if OURS in by and forced and max(forced) > 0:
            out[cell] = lower_middle(sorted(by[OURS])) / max(forced)
    return out


def _csv_path(arg: str) -> Path:
    p = Path(arg)
    return p / "results.csv" if p.is_dir() else p


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m slabserve.loadtest.summary", description=__doc__)
    ap.add_argument("results", nargs="+", help="results.csv files or the folders holding them")
    args = ap.parse_args(argv)
    ratios = []
    for arg in args.results:
        with _csv_path(arg).open(newline="") as f:
            per_cell = cell_ratios(csv.DictReader(f))
        for (ctx, conc), r in per_cell.items():
            print(f"{arg}: ctx {ctx} conc {conc}: auto / best forced {r:.3f}")
        ratios += per_cell.values()
    if not ratios:
        print("no cell with auto and a forced path", file=sys.stderr)
        return 1
    print(f"auto / best forced tok/s: {geo_interval(ratios).describe()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
