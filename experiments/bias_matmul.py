"""A biased projection at decode batch sizes on CUDA: ``mx.addmm`` against a matmul and an add.

MLX's CUDA ``AddMM`` always runs cuBLASLt (a bias epilogue); its ``Matmul`` takes MLX's gemv
kernel for few rows. Qwen2's fused q/k/v projection has a bias (engine/fused.py uses
``mx.addmm``), and the Qwen2.5-0.5B shape's one-stream step on an H100 waited ~2 ms of 5.1 for
the device where Llama-3.2-1B's waited ~0.3 of 2.0 (docs/benchmarks/loadtest-gpu.md). This
times `--layers` pairs of projections as a Qwen-0.5B step chains them, `[M, 896] x [896,
1152] + bias` then `[M, 1152] x [1152, 896]`, three ways: ``addmm``, ``matmul`` then ``+``,
and no bias (the floor). Each chain is one ``mx.compile``d function; host = build and
``mx.async_eval``, wall = until done; medians.  It also checks that the two biased ways
agree.

    python -m experiments.bias_matmul --rows 1,2,8,32
"""

from __future__ import annotations

import argparse

import mlx.core as mx

from experiments.small_m_matmul import compiled_times

WAYS = ("addmm", "matmul+add", "no bias")


def chain(x, layers, way: str):
    for w_in, bias, w_out in layers:
        if way == "addmm":
            h = mx.addmm(bias, x, w_in)
        elif way == "matmul+add":
            h = x @ w_in + bias
        else:
            h = x @ w_in
        x = h @ w_out
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,8,32")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--qkv", type=int, default=1152)
    ap.add_argument("--repeat", type=int, default=30)
    a = ap.parse_args()
    h, n = a.hidden, a.qkv
    layers = [((mx.random.normal((h, n)) / h ** 0.5).astype(mx.bfloat16),
               (0.1 * mx.random.normal((n,))).astype(mx.bfloat16),
               (mx.random.normal((n, h)) / n ** 0.5).astype(mx.bfloat16))
              for _ in range(a.layers)]
    mx.eval(layers)
    print(f"{a.layers} x ([M, {h}] x [{h}, {n}] (+ bias), [M, {n}] x [{n}, {h}]) bf16, "
          f"compiled; us per chain, median of {a.repeat}; device {mx.default_device()}")
    print("| M | way | host | wall | wall / addmm's | max diff vs addmm |")
    print("|--:|---|--:|--:|--:|--:|")
    for m in (int(r) for r in a.rows.split(",")):
        x = mx.random.normal((m, h)).astype(mx.bfloat16)
        ref_wall, ref = None, None
        for way in WAYS:
            fn = mx.compile(lambda x, way=way: chain(x, layers, way))
            host, wall = compiled_times(fn, x, a.repeat)
            y = fn(x).astype(mx.float32)
            ref_wall = ref_wall or wall
            if ref is None:
                ref = y
            diff = "-" if way == "no bias" else \
                f"{(mx.abs(y - ref).max() / mx.abs(ref).max()).item():.1e}"
            print(f"| {m} | {way} | {1e6 * host:.0f} | {1e6 * wall:.0f} | "
                  f"{wall / ref_wall:.2f} | {diff} |", flush=True)


if __name__ == "__main__":
    main()
