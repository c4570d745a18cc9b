"""Summarise ``ncu --metrics gpu__time_duration.sum --csv`` output of
``experiments.ncu_cell``: per kernel name (shortened), the launches and their median
duration in microseconds, in the order first seen.  ``python -m experiments.ncu_times
FILE.csv`` (no GPU needed)."""

from __future__ import annotations

import argparse
import csv
import statistics


def summarise(lines: list[str]) -> list[tuple[str, int, float]]:
    """(kernel name, launches, median us) per kernel of ncu's CSV ``lines``."""
    start = next((i for i, s in enumerate(lines) if s.startswith('"ID"')), None)
    if start is None:
        return []
    times: dict[str, list[float]] = {}
    for row in csv.DictReader(lines[start:]):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        unit = row.get("Metric Unit", "")
        val = float(row["Metric Value"].replace(",", ""))
        us = val * {"ns": 1e-3, "nsecond": 1e-3, "ms": 1e3, "msecond": 1e3}.get(unit, 1.0)
        name = row["Kernel Name"].split("(")[0][:70]
        times.setdefault(name, []).append(us)
    return [(n, len(v), statistics.median(v)) for n, v in times.items()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.ncu_times",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", help="ncu --csv output")
    path = ap.parse_args(argv).csv
    with open(path, errors="replace") as f:
        rows = summarise(f.read().splitlines())
    for name, n, us in rows:
        if n >= 2 or us > 5:
            print(f"{us:9.1f} us  x{n:<3d} {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
