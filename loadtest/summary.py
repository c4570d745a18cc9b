"""Auto against the better forced path over many cells: one number with its uncertainty.

Per cell, auto / best forced output tok/s is noisy (runs of a few seconds spread 1.04-1.7x
on the GPU, docs/benchmarks/loadtest-gpu.md), so a 5% bound per cell is below what a few
runs resolve.  Across cells the ratios are independent measurements of the same question
("does auto cost anything?"): their geometric mean with a t-interval of the mean log ratio
says how much auto costs on average, and how sure that is.

``python -m loadtest.summary DIR_OR_CSV ...`` reads the ``results.csv`` of one or more
``--compare`` runs (rounds included: each label's median run per cell, as the comparison
table takes it) and prints each cell's ratio and the summary.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

OURS, FORCED = "auto", ("native", "gather")
# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom; 1.96 beyond
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


@dataclass(frozen=True)
class Interval:
    """Geometric mean of ``n`` ratios and a 95% interval for it (``lo``/``hi`` are the
    mean itself when ``n`` < 2)."""

    mean: float
    lo: float
    hi: float
    n: int

    def describe(self) -> str:
        return (f"geometric mean {self.mean:.3f} over {self.n} cells "
                f"(95% interval {self.lo:.3f}-{self.hi:.3f})")


def geo_interval(ratios: Sequence[float]) -> Interval:
    """Geometric mean of positive ``ratios`` and a t-interval of the mean log ratio."""
    logs = [math.log(r) for r in ratios if r > 0 and math.isfinite(r)]
    if not logs:
        raise ValueError("no positive finite ratio")
    m = statistics.fmean(logs)
    if len(logs) < 2:
        return Interval(math.exp(m), math.exp(m), math.exp(m), len(logs))
    df = len(logs) - 1
    t = _T975[df - 1] if df <= len(_T975) else 1.96
    half = t * statistics.stdev(logs) / math.sqrt(len(logs))
    return Interval(math.exp(m), math.exp(m - half), math.exp(m + half), len(logs))


def _median_tok_s(values: list[float]) -> float:
    """The lower middle value, as ``compare.median_runs`` picks a run."""
    return sorted(values)[(len(values) - 1) // 2]


def cell_ratios(rows: Iterable[dict]) -> dict[tuple[int, int], float]:
    """(context, concurrency) -> auto / best forced tok/s, from flat result rows (each
    label's median run per cell); cells without auto or a forced path are left out."""
    runs: dict[tuple[int, int], dict[str, list[float]]] = {}
    for r in rows:
        cell = (int(float(r["context"])), int(float(r["concurrency"])))
        runs.setdefault(cell, {}).setdefault(r["label"], []).append(float(r["output_tok_s"]))
    out = {}
    for cell, by in sorted(runs.items()):
        forced = [_median_tok_s(by[f]) for f in FORCED if f in by]
        if OURS in by and forced and max(forced) > 0:
            out[cell] = _median_tok_s(by[OURS]) / max(forced)
    return out


def _csv_path(arg: str) -> Path:
    p = Path(arg)
    return p / "results.csv" if p.is_dir() else p


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.summary", description=__doc__)
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
