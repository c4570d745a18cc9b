"""Host and device cost of a decode step's projections at small batch on CUDA: MLX's
matmul (its gemv at one row, cuBLASLt above) against the few-rows kernel
(engine/rows_matmul.py), chained as a step chains them.

``python -m experiments.small_m_matmul [--rows 1,2,4,8,16] [--chain 64]``

Per row count: the chain's graph build, ``mx.async_eval`` (the host's launch work) and the
wait, medians over repeats, each way; then the kernel's error against a float32
reference.  CUDA only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx

from slabserve.engine.rows_matmul import RowsMatmul

ROWS = RowsMatmul()


def rows_matmul(x: mx.array, w: mx.array) -> mx.array:
    return ROWS(x, w)


def chain(x, weights, kernel: bool):
    for w, wt in weights:
        x = rows_matmul(x, w) if kernel else x @ wt
    return x


def timed(x, weights, kernel: bool, repeat: int) -> dict:
    builds, launches, waits = [], [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        y = chain(x, weights, kernel)
        t1 = time.perf_counter()
        mx.async_eval(y)
        t2 = time.perf_counter()
        mx.eval(y)
        mx.synchronize()
        t3 = time.perf_counter()
        builds.append(t1 - t0)
        launches.append(t2 - t1)
        waits.append(t3 - t2)
    med = statistics.median
    return dict(build_us=1e6 * med(builds), launch_us=1e6 * med(launches),
                wait_us=1e6 * med(waits),
                total_us=1e6 * med(sum(t) for t in zip(builds, launches, waits,
                                                          strict=True)))


def compiled_times(fn, x: mx.array, repeat: int) -> tuple[float, float]:
    """(median host seconds to build and submit ``fn(x)``, median wall seconds until it is
    done) over ``repeat`` calls, after three warm-up calls."""
    for _ in range(3):
        mx.eval(fn(x))
    host, wall = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        y = fn(x)
        mx.async_eval(y)
        t1 = time.perf_counter()
        mx.eval(y)
        mx.synchronize()
        host.append(t1 - t0)
        wall.append(time.perf_counter() - t0)
    return statistics.median(host), statistics.median(wall)


def check(dtype) -> float:
    """Worst |kernel - float32 reference| / max |reference| over shapes and row counts."""
    worst = 0.0
    for m in (2, 3, 8, 16):
        for n, k in ((3072, 2048), (2048, 8192), (1152, 896), (40, 64)):
            x = mx.random.normal((m, k)).astype(dtype)
            w = (mx.random.normal((n, k)) / k ** 0.5).astype(dtype)
            ref = x.astype(mx.float32) @ w.astype(mx.float32).T
            got = rows_matmul(x, w).astype(mx.float32)
            err = (mx.abs(got - ref).max() / mx.abs(ref).max()).item()
            worst = max(worst, err)
    return worst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--chain", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=30)
    a = ap.parse_args()
    if mx.default_device() != mx.gpu:
        raise SystemExit("CUDA only")
    print(f"probe: {ROWS.probe() or 'passed'}")
    for dtype in (mx.bfloat16, mx.float16):
        print(f"check {dtype}: worst error {check(dtype):.2e} of max |ref|")
    h = a.hidden
    weights = []
    for _ in range(a.chain):
        w = (mx.random.normal((h, h)) / h ** 0.5).astype(mx.bfloat16)
        weights.append((w, w.T))
    mx.eval([w for w, _ in weights])
    bytes_ = a.chain * h * h * 2
    print(f"{a.chain} chained [M, {h}] x [{h}, {h}] bf16 projections; weights "
          f"{bytes_ / 2**20:.0f} MiB; us per chain (median of {a.repeat})")
    print("| M | way | build | launch | wait | total | total per projection |")
    print("|--:|---|--:|--:|--:|--:|--:|")
    for m in (int(r) for r in a.rows.split(",")):
        x = mx.random.normal((m, h)).astype(mx.bfloat16)
        for kernel in (False, True) if m > 1 else (False,):
            timed(x, weights, kernel, 3)
            r = timed(x, weights, kernel, a.repeat)
            way = "rows kernel" if kernel else "mx.matmul"
            print(f"| {m} | {way} | {r['build_us']:.0f} | {r['launch_us']:.0f} | "
                  f"{r['wait_us']:.0f} | {r['total_us']:.0f} | "
                  f"{r['total_us'] / a.chain:.1f} |", flush=True)
        for kernel in (False, True) if m > 1 else (False,):  # as one compiled graph
            fn = mx.compile(lambda x, kernel=kernel: chain(x, weights, kernel))
            timed_c = compiled_times(fn, x, a.repeat)
            way = "rows kernel" if kernel else "mx.matmul"
            print(f"| {m} | {way}, compiled | - | {1e6 * timed_c[0]:.0f} (build+launch) | - | "
                  f"{1e6 * timed_c[1]:.0f} | {1e6 * timed_c[1] / a.chain:.1f} |", flush=True)


if __name__ == "__main__":
    main()
