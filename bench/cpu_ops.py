"""What bounds prefill on this CPU: BLAS matmuls vs MLX's elementwise transcendentals.

``slabserve bench cpu-ops`` (the launcher preloads OpenBLAS, as for the server; a bare
``python -m bench.cpu_ops`` needs ``LD_PRELOAD`` set to libopenblas by hand).

Times, at a Qwen2.5-0.5B MLP shape (hidden 896, intermediate 4864), float32: the gate
projection's matmul for 256-1024 tokens (GFLOP/s), and the elementwise work around it
(``nn.silu(x) * y`` as the MLP runs it, ``exp``, ``sigmoid``, a plain multiply and add), so
one run shows how much of a prefill chunk is BLAS and how much is single-threaded
elementwise code that every MLX server on this CPU pays alike.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import mlx.nn as nn


def median_ms(fn, reps: int) -> float:
    for _ in range(2):
        mx.eval(fn())
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t)
    return 1e3 * sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cpu_ops")
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--intermediate", type=int, default=4864)
    ap.add_argument("--tokens", default="256,512,1024")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args(argv)
    mx.set_default_device(mx.cpu)
    h, f = a.hidden, a.intermediate
    w = mx.random.normal((f, h))
    print(f"MLX {mx.__version__}, float32, hidden {h}, intermediate {f}")
    print("| tokens | matmul [T,h]x[h,f] ms | GFLOP/s | silu(x)*y ms | exp ms | sigmoid ms "
          "| x*y ms | x+y ms |")
    print("|--:|--:|--:|--:|--:|--:|--:|--:|")
    for t in (int(x) for x in a.tokens.split(",")):
        x, y, act = mx.random.normal((t, h)), mx.random.normal((t, f)), mx.random.normal((t, f))
        mx.eval(w, x, y, act)
        mm = median_ms(lambda x=x: x @ w.T, a.reps)
        row = [median_ms(fn, a.reps) for fn in (
            lambda act=act, y=y: nn.silu(act) * y, lambda act=act: mx.exp(act),
            lambda act=act: mx.sigmoid(act), lambda act=act, y=y: act * y,
            lambda act=act, y=y: act + y)]
        gflops = 2 * t * h * f / (mm / 1e3) / 1e9
        print(f"| {t} | {mm:.1f} | {gflops:.0f} | " + " | ".join(f"{v:.1f}" for v in row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
