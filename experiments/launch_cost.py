"""Does MLX's host cost of a kernel launch depend on the size of its inputs?

The serve-built engine's one-stream step spent 1.74 ms of host `forward` at a 2 GiB pool and
2.62 ms at an 8 GiB pool, in-place writes both (one H100, `experiments/c1_wait.py`,
2026-12-07); a step's launches take every slab as an input.  This times the host side of
`--launches` chained launches of a kernel that reads one element of each of `--inputs`
inputs, per input size (`--mib`, one buffer per input), three ways: evaluated eagerly (build
+ `mx.async_eval` of the chain, then the wait), compiled (`mx.compile` of the chain), and
as a chain of one-element adds (MLX's own kernel) for scale.

    python -m experiments.launch_cost --mib 16,256,2048 --inputs 4 --launches 200
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx

BODY = """
    if (threadIdx.x == 0 && blockIdx.x == 0) {
        float s = (float)acc[0];
{reads}
        out[0] = s;
    }
"""


def kernel(n: int):
    reads = "\n".join(f"        s += (float)b{i}[0];" for i in range(n))
    names = ["acc", *(f"b{i}" for i in range(n))]
    return mx.fast.cuda_kernel(name=f"launch_cost_{n}", input_names=names,
                               output_names=["out"], source=BODY.replace("{reads}", reads))


def chain(k, acc: mx.array, bufs: list[mx.array], launches: int) -> mx.array:
    for _ in range(launches):
        acc = k(inputs=[acc, *bufs], grid=(32, 1, 1), threadgroup=(32, 1, 1),
                output_shapes=[(4,)], output_dtypes=[mx.float32])[0]
    return acc


def timed(fn, repeat: int) -> tuple[float, float]:
    """(median host seconds to build and submit, median wall seconds) of ``fn()``."""
    host, wall = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        mx.async_eval(out)
        t1 = time.perf_counter()
        mx.eval(out)
        host.append(t1 - t0)
        wall.append(time.perf_counter() - t0)
    return statistics.median(host), statistics.median(wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", default="16,256,2048")
    ap.add_argument("--inputs", type=int, default=4)
    ap.add_argument("--launches", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=9)
    args = ap.parse_args()
    k = kernel(args.inputs)
    acc = mx.zeros((4,), dtype=mx.float32)
    print(f"{args.launches} chained launches, {args.inputs} inputs each; us per launch "
          "(host: build + submit; wall: until done)")
    print("| MiB per input | custom kernel host | wall | compiled host | wall | add host |")
    print("|--:|--:|--:|--:|--:|--:|")
    for mib in (int(x) for x in args.mib.split(",")):
        one_size(k, acc, mib, args)
        mx.clear_cache()


def one_size(k, acc: mx.array, mib: int, args) -> None:
    bufs = [mx.zeros(((mib << 20) // 2,), dtype=mx.bfloat16) for _ in range(args.inputs)]
    mx.eval(bufs, acc)
    compiled = mx.compile(lambda a, *b: chain(k, a, list(b), args.launches))
    eager = timed(lambda: chain(k, acc, bufs, args.launches), args.repeat)
    comp = timed(lambda: compiled(acc, *bufs), args.repeat)
    adds = timed(lambda: _adds(acc, bufs, args.launches), args.repeat)
    per = 1e6 / args.launches
    print(f"| {mib} | {eager[0] * per:.2f} | {eager[1] * per:.2f} | {comp[0] * per:.2f} | "
          f"{comp[1] * per:.2f} | {adds[0] * per:.2f} |", flush=True)


def _adds(acc: mx.array, bufs: list[mx.array], launches: int) -> mx.array:
    x = bufs[0][:4].astype(mx.float32)
    for _ in range(launches):
        acc = acc + x
    return acc


if __name__ == "__main__":
    main()
