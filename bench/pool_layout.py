"""Pool layout for gather-SDPA decode: blocks as [kv_heads, block, D] (head-major) vs
[block, kv_heads, D] (token-major), both gathered into [B, kv_heads, ctx, D] for SDPA.

Usage: python -m slabserve.bench.pool_layout [--batch 8] [--ctx 4096] [--dtype float32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx


def _median_ms(fn, reps: int) -> float:
    mx.eval(fn())
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(fn())
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--heads", default="32,8,64", help="q heads, kv heads, head_dim")
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args(argv)
    hq, hk, d = map(int, a.heads.split(","))
    bs, b, nblk = a.block, a.batch, a.ctx // a.block
    dt = getattr(mx, a.dtype)
    nb = b * nblk + 16
    mx.set_cache_limit(8 << 30)
    head_major = mx.random.normal((nb, hk, bs, d)).astype(dt)
    token_major = mx.random.normal((nb, bs, hk, d)).astype(dt)
    perm = mx.random.permutation(nb)[: b * nblk].reshape(b, nblk)
    q = mx.random.normal((b, hq, 1, d)).astype(dt)
    mx.eval(head_major, token_major, perm, q)

    def gather_hm():
        return head_major[perm].transpose(0, 2, 1, 3, 4).reshape(b, hk, nblk * bs, d)

    def gather_tm():
        return token_major[perm].reshape(b, nblk * bs, hk, d).transpose(0, 2, 1, 3)

    def sdpa(g):
        return lambda: mx.fast.scaled_dot_product_attention(q, g(), g(), scale=d**-0.5)

    rows = [("head-major [NB, H, bs, D]", gather_hm), ("token-major [NB, bs, H, D]", gather_tm)]
    print(f"B={b} ctx={a.ctx} heads={hq}/{hk}/{d} {a.dtype} block={bs} "
          f"MLX {mx.__version__} {mx.default_device()}, median of {a.reps}")
    print("| layout | gather K ms | gather K+V + SDPA ms |\n|---|--:|--:|")
    for name, g in rows:
        print(f"| {name} | {_median_ms(g, a.reps):.2f} | {_median_ms(sdpa(g), a.reps):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
