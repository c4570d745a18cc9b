"""Summarise ``ncu --metrics gpu__time_duration.sum --csv`` output of ``bench.ncu_cell``:
per kernel name (shortened), the launches and their median duration in microseconds, in
the order first seen.  ``python -m slabserve.bench.ncu_times FILE.csv``"""

from __future__ import annotations

import csv
import statistics
import sys


def summarise(lines: list[str]) -> list[tuple[str, int, float]]:
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
    path = (argv or sys.argv[1:])[0]
    with open(path, errors="replace") as f:
        rows = summarise(f.read().splitlines())
    for name, n, us in rows:
        if n >= 2 or us > 5:
            print(f"{us:9.1f} us  x{n:<3d} {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
