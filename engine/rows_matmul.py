"""Projections of a few rows on CUDA: ``x @ w.T`` (+ bias) for a decode step of 2 to 16
sequences as one custom kernel (engine/kernels/rows_matmul.cu: a warp per output column
reads the weight row once and keeps a float32 sum per input row).

Why: a Llama-1B decode step costs ~1.2 ms more host time at 8 sequences than at one for
the same graph nodes (docs/benchmarks/loadtest-gpu.md). At one row MLX runs its own gemv
kernel, above it cuBLASLt, whose host cost per call is the suspect; this kernel is a
custom kernel node like the gemv.  Measured on an H100 (`bash experiments/gpu_step.sh
rows`): 64 chained [M, 2048] x [2048, 2048] projections, compiled, took 0.63-0.76x of MLX's
matmul at M = 2-16; in the server it cut the engine thread's CPU by 0.3-0.4 ms a step at 4
and 8 streams, but the device's time rose, and steps were 0.94x at 4 streams and 1.04x at
8 (docs/benchmarks/loadtest-gpu.md): `--rows-matmul` stays off by default.

Invariants: ``applies`` answers True only on a CUDA device, for float16 / bfloat16 ``x``
``[M, K]`` with ``2 <= M <= MAX_ROWS`` and a row-major ``w`` ``[N, K]`` of the same dtype,
``K % 8 == 0``; the result is float32 sums rounded once to the dtype (as MLX's matmul, up
to summation order).  ``probe()`` compiles and checks the kernel against MLX's matmul on
random data once; any failure (no CUDA, NVRTC, a wrong result) declines it for good.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import mlx.core as mx

log = logging.getLogger("slabserve.engine")

SOURCE = Path(__file__).parent / "kernels" / "rows_matmul.cu"
HEADER = "#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n"
WARPS_PER_BLOCK = 8


class RowsMatmul:
    """The few-rows projection kernel (module docstring); one per runner."""

    MAX_ROWS = 16

    def __init__(self) -> None:
        self._kernels: dict[bool, object] = {}
        self.declined: str | None = None

    def applies(self, x: mx.array, w: mx.array) -> bool:
        return (self.declined is None and x.ndim == 2 and w.ndim == 2
                and 2 <= x.shape[0] <= self.MAX_ROWS and x.shape[1] == w.shape[1]
                and x.shape[1] % 8 == 0 and x.dtype in (mx.float16, mx.bfloat16)
                and w.dtype == x.dtype and mx.default_device() == mx.gpu)

    def __call__(self, x: mx.array, w: mx.array, bias: mx.array | None = None) -> mx.array:
        m, k = x.shape
        n = w.shape[0]
        inputs = [x, w] if bias is None else [x, w, bias]
        return self._kernel(bias is not None)(
            inputs=inputs, template=[("T", x.dtype), ("MM", m), ("NN", n), ("KK", k)],
            grid=(32 * n, 1, 1), threadgroup=(32 * WARPS_PER_BLOCK, 1, 1),
            output_shapes=[(m, n)], output_dtypes=[x.dtype])[0]

    def _kernel(self, with_bias: bool):
        if with_bias not in self._kernels:
            body = SOURCE.read_text().replace(
                "SLABSERVE_BIAS", "static_cast<float>(bias[n])" if with_bias else "0.f")
            names = ["x", "w", "bias"] if with_bias else ["x", "w"]
            # MLX caches compiled kernels on disk by name: the name carries the source's hash
            tag = hashlib.sha1((HEADER + body).encode()).hexdigest()[:10]
            self._kernels[with_bias] = mx.fast.cuda_kernel(
                name=f"slabserve_rows_matmul{'_bias' if with_bias else ''}_{tag}",
                input_names=names, output_names=["y"], source=body, header=HEADER)
        return self._kernels[with_bias]

    def probe(self) -> str | None:
        """None when the kernel runs and matches MLX's matmul here, else why not (and
        ``applies`` answers False from then on)."""
        if not (mx.default_device() == mx.gpu and mx.cuda.is_available()):
            self.declined = "not a CUDA device"
            return self.declined
        try:
            key = mx.random.key(0)
            for dtype in (mx.bfloat16, mx.float16):
                x = mx.random.normal((3, 256), key=key).astype(dtype)
                w = (mx.random.normal((40, 256), key=key) / 16).astype(dtype)
                bias = mx.random.normal((40,), key=key).astype(dtype)
                ref = x.astype(mx.float32) @ w.astype(mx.float32).T
                for got, want in ((self(x, w), ref), (self(x, w, bias), ref + bias)):
                    err = mx.abs(got.astype(mx.float32) - want).max().item()
                    if not err <= 0.02 * mx.abs(want).max().item():
                        raise ValueError(f"{dtype}: error {err:.3g}")
        except Exception as e:  # noqa: BLE001 - any failure keeps MLX's matmul
            self.declined = f"probe failed: {e!r}"
            log.warning("rows matmul kernel declined (%s); MLX's matmul instead", self.declined)
        return self.declined
