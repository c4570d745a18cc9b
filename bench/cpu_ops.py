"""What bounds prefill on this CPU: BLAS matmuls vs MLX's elementwise transcendentals.

``slabserve bench cpu-ops`` (the launcher preloads OpenBLAS, as for the server; a bare
``python -m slabserve.bench.cpu_ops`` needs ``LD_PRELOAD`` set to libopenblas by hand).

Times, at a Qwen2.5-0.5B MLP shape (hidden 896, intermediate 4864), float32: the gate
projection's matmul for 256-1024 tokens (GFLOP/s), and the elementwise work around it
(``nn.silu(x) * y`` as the MLP runs it, ``exp``, ``sigmoid``, a plain multiply and add), so
one run shows how much of a prefill chunk is BLAS and how much is single-threaded
elementwise code that every MLX server on this CPU pays alike.  ``--decode`` adds what bounds
a decode step: the machine's read bandwidth (numpy) against the weight bytes per second of
few-row products ``x @ W.T`` as ``nn.Linear`` runs them and with ``W`` stored transposed
(``--shapes qwen``: every Linear shape of Qwen2.5-0.5B and its tied LM head, ``--rows``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
import mlx.nn as nn


def median_ms(fn, reps: int) -> float:
    """Median milliseconds of ``mx.eval(fn())`` over ``reps`` runs, after 2 warm-up runs."""
    for _ in range(2):
        mx.eval(fn())
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m slabserve.bench.cpu_ops")
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--intermediate", type=int, default=4864)
    ap.add_argument("--tokens", default="256,512,1024")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--decode", action="store_true",
                    help="also few-row products against memory bandwidth (decode steps)")
    ap.add_argument("--shapes", choices=["gate", "qwen"], default="gate",
                    help="--decode weights: the MLP gate only, or every Qwen2.5-0.5B Linear "
                         "shape (q, k/v, o, gate/up, down, tied LM head)")
    ap.add_argument("--rows", default="1,8,64", help="--decode rows per product")
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
    if a.decode:
        rows = [int(x) for x in a.rows.split(",")]
        shapes = QWEN_SHAPES if a.shapes == "qwen" else {"gate": (f, h)}
        decode_table(shapes, rows, a.reps)
    return 0


# Qwen2.5-0.5B's Linear weights as [out, in]: 24 layers each of q, k, v, o, gate, up, down,
# and the LM head (tied to the [151936, 896] embedding: ``embed_tokens.as_linear``).
QWEN_SHAPES = {
    "q / o": (896, 896), "k / v": (128, 896), "gate / up": (4864, 896),
    "down": (896, 4864), "lm_head (tied)": (151936, 896),
}


def decode_table(shapes: dict[str, tuple[int, int]], rows: list[int], reps: int) -> None:
    """Weight GB/s of ``x @ W.T`` (nn.Linear) and ``x @ Wt`` (pre-transposed, contiguous)
    per weight shape and row count, against numpy's read bandwidth over 256 MB."""
    import numpy as np

    buf = np.ones(64 << 20, np.float32)
    best = min(_time(lambda: buf.sum()) for _ in range(reps))
    print(f"\nnumpy read bandwidth: {buf.nbytes / best / 1e9:.1f} GB/s "
          f"(256 MB sum, best of {reps})")
    print("| weight | [out, in] | rows | x @ W.T ms | GB/s | x @ Wt ms | GB/s | speed-up |")
    print("|---|---|--:|--:|--:|--:|--:|--:|")
    for name, shape in shapes.items():
        w = mx.random.normal(shape) * 0.02
        wt = mx.contiguous(w.T)
        mx.eval(w, wt)
        gb = w.nbytes / 1e9
        for m in rows:
            x = mx.random.normal((m, shape[1]))
            mx.eval(x)
            t = median_ms(lambda x=x, w=w: x @ w.T, reps)
            tt = median_ms(lambda x=x, wt=wt: x @ wt, reps)
            print(f"| {name} | {list(shape)} | {m} | {t:.2f} | {gb / t * 1e3:.1f} | "
                  f"{tt:.2f} | {gb / tt * 1e3:.1f} | {t / tt:.2f}x |", flush=True)
        del w, wt


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    raise SystemExit(main())
