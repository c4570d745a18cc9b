"""The native CUDA kernel's device time per launch against its grid's chunk count.

On an H100 the Qwen2.5-0.5B shape's decode step spent 3.9 of its 5.5 ms of device time in
the attention kernel at B=1 / 1k (162 us a layer; Llama-3.2-1B's: 27 us), and the wall-time
sweep (``bench cuda-kernel --sweep``) put the plan's launch (64 grid chunks, one used) at
the cost of 64 real chunks: something costs per grid chunk, used or not. This times each
launch on the device (PyTorch's profiler, bench/device_time.py): per shape, batch and
context, grid chunks 1-64 with each sequence split as the plan splits it (``MP`` = the
plan's fewest pages: later chunks empty) and split over every chunk (``MP`` = 1), the merge
fused into the main launch and as its own launch.

    python -m experiments.chunk_grid --shapes 14/2/64/bf16,32/8/64/bf16 --batches 1,8
"""

from __future__ import annotations

import argparse
import math
import statistics

import mlx.core as mx

from slabserve.attention.cuda_plan import min_pages, plan_chunks
from slabserve.attention.native_cuda import NativeCUDA
from slabserve.bench.cuda_kernel import make_case, parse_shape
from slabserve.bench.device_time import kernels_by_step, trace


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="14/2/64/bf16,32/8/64/bf16")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--ctxs", default="1024,16384")
    ap.add_argument("--chunks", default="1,2,4,8,16,32,64")
    ap.add_argument("--reps", type=int, default=12)
    a = ap.parse_args()
    for shape in a.shapes.split(","):
        s = parse_shape(shape)
        for b in map(int, a.batches.split(",")):
            for ctx in map(int, a.ctxs.split(",")):
                cell(shape, s, b, ctx, [int(c) for c in a.chunks.split(",")], a.reps)


def cell(name: str, s: dict, b: int, ctx: int, chunk_list: list[int], reps: int) -> None:
    pool, batch, q = make_case([ctx] * b, s["hq"], s["hkv"], s["d"], 16, s["dt"], 4096)
    scale = 1.0 / math.sqrt(s["d"])
    nat = NativeCUDA()
    assert nat.decline(q, pool, batch) is None
    params = nat._plan_params(q, pool.geom)
    mp = min_pages(params, pool.geom.block_size)
    plan = plan_chunks(b, nat._head_blocks(q, pool.geom), params)
    configs = [("plan", None, None, mp)]
    for c in chunk_list:
        for pages in sorted({1, mp}):
            for fused in (True, False):
                configs.append((f"c{c} mp{pages} {'fused' if fused else 'sep'}", c, fused,
                                pages))
    calls = []
    for _label, c, fused, pages in configs:
        if c is None:
            calls.append(lambda: nat(q, pool, 0, batch, scale))
        else:
            calls.append(lambda c=c, f=fused, p=pages: nat._run(q, pool, 0, batch, scale, c,
                                                                 fused=f, pages=p))
    for fn in calls:  # compile every launch before the trace
        mx.eval(fn())
    events = trace(lambda i: mx.eval(calls[i // reps]()), len(calls) * reps)
    steps = kernels_by_step(events)
    print(f"\n{name} B={b} ctx={ctx}: plan {plan} chunks, MP {mp} pages "
          f"(variant {nat._case(q, pool.geom)[0]}, GB {nat._case(q, pool.geom)[1]})")
    print("| launch | kernels | device us (median) | main us | merge us |")
    print("|---|--:|--:|--:|--:|")
    for i, (label, *_rest) in enumerate(configs):
        mine = steps[i * reps:(i + 1) * reps]
        busy = statistics.median(sum(d for _, d, _ in k) for k in mine)
        main_us = statistics.median(k[0][1] for k in mine if k)
        merge = [k[1][1] for k in mine if len(k) > 1]
        print(f"| {label} | {statistics.median(len(k) for k in mine):.0f} | {busy:.1f} | "
              f"{main_us:.1f} | {statistics.median(merge) if merge else 0:.1f} |")


if __name__ == "__main__":
    main()
