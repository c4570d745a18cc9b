"""One native-kernel cell for Nsight Compute (``ncu``): a few launches, nothing else.

``ncu --kernel-name regex:slabserve_pooled --launch-skip 2 --launch-count 1 --section
SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis
python -m experiments.ncu_cell --natives lean,mma --batch 8 --ctx 16384`` from the
repository root (experiments/gpu_kernel.sh ``ncu`` runs it; ``ncutime`` times every kernel
at the GPU's own clocks with ``--sdpa``).  Each native runs ``--reps`` times on the same
shuffled multi-slab pool (32/8/64 fp16, block 16) as the per-layer table.
"""

from __future__ import annotations

import argparse
import math

import mlx.core as mx

from slabserve.bench.cuda_kernel import cuda_args, make_case, make_natives


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.ncu_cell")
    ap.add_argument("--natives", default="auto", help="bench.cuda_kernel --natives names")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--sdpa", action="store_true",
                    help="then MLX SDPA on contiguous K/V of the same shape (the peer)")
    a = cuda_args(ap, argv)
    if a is None:
        return 1
    pool, batch, q = make_case([a.ctx] * a.batch, 32, 8, 64, 16, mx.float16, 4096)
    scale = 1.0 / math.sqrt(64)
    for name, nat in make_natives(a.natives).items():
        assert nat.decline(q, pool, batch) is None
        for _ in range(a.reps):
            mx.eval(nat(q, pool, 0, batch, scale))
        mx.synchronize()
        print(f"{name}: {a.reps} launches done", flush=True)
    if a.sdpa:
        pool = None
        k, v = (mx.random.normal((a.batch, 8, a.ctx, 64)).astype(mx.float16) for _ in "kv")
        mx.eval(k, v)
        for _ in range(a.reps):
            mx.eval(mx.fast.scaled_dot_product_attention(q, k, v, scale=scale))
        mx.synchronize()
        print(f"sdpa contig: {a.reps} launches done", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
