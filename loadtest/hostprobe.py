"""The host's CPU speed just before a run: a fixed pure-Python workload, timed.

Two processes of one server configuration differ on the lent machines by up to 1.4x in
tok/s, and the slower one is slower on the host (its engine thread's ``forward`` phase),
not on the device.  The host's own speed moves over minutes: the workload below took 0.59,
0.71 and 0.76 s before three processes in a row whose steps took 2.89, 3.87 and 4.49 ms
(docs/benchmarks/loadtest-gpu.md).  The load tester times it before every run, so a
comparison shows whether the machine held its speed between the servers it compares.
"""

from __future__ import annotations

import statistics
import time

PROBE_OPS = 200_000  # ~18 ms a pass on a 2-core EPYC VM


def _work(n: int) -> int:
    """Integer arithmetic and dict stores, what a serving loop's Python does."""
    acc, table = 0, {}
    for k in range(n):
        acc += k * k % 7
        table[k & 1023] = acc
    return acc + len(table)


def host_probe_ms(passes: int = 3, ops: int = PROBE_OPS) -> float:
    """The median of ``passes`` timings of the workload, in milliseconds (higher: a
    slower host)."""
    if passes <= 0 or ops <= 0:
        raise ValueError("passes and ops must be positive")
    times = []
    for _ in range(passes):
        t0 = time.perf_counter()
        _work(ops)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
