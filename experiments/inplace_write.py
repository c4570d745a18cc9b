"""Does a KV write stay in place when the step before it is still running?

MLX writes a scatter's output into its input's buffer only when nothing else holds that
buffer.  With async scheduling the next step is built and evaluated while the previous
one runs, and the previous step's in-flight work still holds the slab it wrote, so the
next write would copy the whole slab.  This times one-row writes into one large slab
(`--mib`), each followed by a read of that row, per mode:

- sync / overlap: wait for each step before the next, or evaluate step t+1 before
  waiting for step t (the engine thread's order with async scheduling);
- scatter: `mx.put_along_axis` (what the pool does), the output adopted as the slab;
- inplace (CUDA only): a custom kernel that writes the row into the slab it takes as an
  input (the slab never changes identity, so nothing is donated) and returns a one-element
  token; the read takes the slab through `mx.depends` on that token.

Prints ms per step and the peak memory above the slab, then checks that every written
row holds its values and every read saw its write.

    python -m experiments.inplace_write --mib 512 --steps 30
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx

D = 64
SOURCE = """
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < N * D) {
        T* dst = const_cast<T*>(slab);
        dst[(size_t)rows[i / D] * D + i % D] = vals[i];
    }
    if (i == 0) token[0] = 1;
"""


def inplace_kernel():
    return mx.fast.cuda_kernel(name="inplace_row_write", input_names=["slab", "rows", "vals"],
                               output_names=["token"], source=SOURCE)


def run(mode: str, how: str, mib: int, steps: int, kernel) -> None:
    rows_total = (mib << 20) // (2 * D)
    slab = mx.zeros((rows_total, D), dtype=mx.bfloat16)
    mx.eval(slab)
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    picks = [(i * 7919 + 13) % rows_total for i in range(steps)]
    reads, prev = [], None
    t0 = time.perf_counter()
    for i, r in enumerate(picks):
        vals = mx.full((1, D), float(i + 1), dtype=mx.bfloat16)
        idx = mx.array([r], dtype=mx.int32)
        if how == "scatter":
            slab = mx.put_along_axis(slab, mx.broadcast_to(idx[:, None], (1, D)), vals, axis=0)
            seen = slab[r].astype(mx.float32).sum()
        else:
            (token,) = kernel(inputs=[slab, idx, vals], template=[("T", mx.bfloat16),
                                                                  ("N", 1), ("D", D)],
                              grid=(D, 1, 1), threadgroup=(D, 1, 1), output_shapes=[(1,)],
                              output_dtypes=[mx.int32])
            seen = mx.depends(slab, token)[r].astype(mx.float32).sum()
        if mode == "sync":
            mx.eval(seen, slab)
            reads.append(seen.item())
        else:
            mx.async_eval(seen, slab)
            if prev is not None:
                reads.append(prev.item())
            prev = seen
    if prev is not None and mode != "sync":
        reads.append(prev.item())
    mx.eval(slab)
    dt = (time.perf_counter() - t0) / steps * 1e3
    extra = (mx.get_peak_memory() - base) / (1 << 20)
    want = [float((i + 1) * D) for i in range(steps)]
    rows_ok = all(float(slab[r, 0].item()) == i + 1 for i, r in enumerate(picks))
    print(f"{mode:8s} {how:8s} {dt:8.3f} ms/step  peak above the slab {extra:8.1f} MiB  "
          f"reads saw their writes: {reads == want}  rows hold their values: {rows_ok}",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    gpu = mx.default_device().type == mx.gpu and mx.cuda.is_available()
    kernel = inplace_kernel() if gpu else None
    for mode in ("sync", "overlap"):
        for how in ("scatter", "inplace") if gpu else ("scatter",):
            run(mode, how, args.mib, args.steps, kernel)


if __name__ == "__main__":
    main()
