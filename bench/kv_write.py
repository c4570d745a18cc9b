"""KV write cost vs pool size: appending one token per sequence (all layers, K and V)
must cost O(new tokens), not O(pool).

Pools compared in one run, same geometry and the same 8 sequences:
  * base:        1 slab of S blocks
  * many-slabs:  64 slabs of S blocks (64x larger pool)
  * big-slab:    1 slab of 64*S blocks (64x larger single array: shows the scatter
                 itself writes in place, not merely that slabs are small)
  * big-slab, donation defeated: the same write while another reference to the slab is
    held, which forces MLX to copy the array: what every write would cost without donation.

Usage: python -m slabserve.bench.kv_write [--out docs/benchmarks/kv-write.md] [--steps 50]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import mlx.core as mx
from slabserve.kvcache import PoolGeometry, SlabPool
from slabserve.kvcache.pool import WritePlan

LAYERS, KV_HEADS, HEAD_DIM, BLOCK = 16, 8, 64, 16  # Llama-3.2-1B-like, fp16


def _time_writes(pool: SlabPool, steps: int, hold: bool, spread: bool) -> float:
    """Median ms per step of writing one token for 8 sequences into every layer.
    ``spread``: the sequences' current blocks lie in 8 different slabs (else in slab 0)."""
    g = pool.geom
    stride = g.slab_blocks + 3 if spread else 3
    blocks = [(i * stride) % (pool.num_slabs * g.slab_blocks) for i in range(8)]
    k = mx.random.normal((8, g.kv_heads, g.head_dim)).astype(g.dtype)
    v = mx.random.normal((8, g.kv_heads, g.head_dim)).astype(g.dtype)
    mx.eval(k, v)
    times = []
    for step in range(min(steps, 5) + 5 if hold else steps + 5):
        plan = WritePlan(g, [(b, step % g.block_size) for b in blocks])
        # an unevaluated view of every K slab keeps MLX from donating their buffers
        held = [pool.k[layer][0][:1] for layer in range(g.num_layers)] if hold else []
        t0 = time.perf_counter()
        for layer in range(g.num_layers):
            pool.write(layer, plan, k, v)
        mx.eval(pool.take_pending())
        dt = time.perf_counter() - t0
        del held
        if step >= 5:
            times.append(dt * 1e3)
    return statistics.median(times)


def run(steps: int, slab_tokens: int) -> list[tuple[str, int, float, float]]:
    sb = slab_tokens // BLOCK
    cases = [("1 slab", sb, 1, False, False),
             ("64 slabs, sequences in one slab", sb, 64, False, False),
             ("64 slabs, sequences in 8 slabs", sb, 64, False, True),
             ("1 slab, 64x larger", 64 * sb, 1, False, False),
             ("1 slab, 64x larger, donation defeated (copies)", 64 * sb, 1, True, False)]
    rows = []
    for name, slab_blocks, slabs, hold, spread in cases:
        geom = PoolGeometry(LAYERS, KV_HEADS, HEAD_DIM, BLOCK, slab_blocks, mx.float16)
        pool = SlabPool(geom, initial_slabs=slabs)
        ms = _time_writes(pool, steps, hold, spread)
        rows.append((name, pool.nbytes, ms, 0.0))
        del pool
    base = rows[0][2]
    return [(n, b, ms, ms / base) for n, b, ms, _ in rows]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--slab-tokens", type=int, default=1024)
    ap.add_argument("--out", default=None, help="write a markdown table here")
    args = ap.parse_args(argv)
    rows = run(args.steps, args.slab_tokens)
    lines = [
        f"Geometry: {LAYERS} layers x {KV_HEADS} kv heads x {HEAD_DIM}, fp16, block {BLOCK}, "
        f"slab {args.slab_tokens} tokens; 8 sequences append 1 token each to every layer "
        f"(K and V); median of {args.steps} steps. MLX {mx.__version__}, "
        f"{platform.machine()}, device {mx.default_device()}.",
        "",
        "| pool | pool MiB | ms per step | vs 1 slab |",
        "|---|--:|--:|--:|",
    ]
    lines += [f"| {n} | {b / 2**20:.0f} | {ms:.3f} | {r:.2f}x |" for n, b, ms, r in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
