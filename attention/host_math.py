"""Float32 CPU kernels that run the transcendental-heavy part of prefill in numpy.

On Linux CPU, MLX's elementwise ``exp``/``sigmoid`` are scalar and single-threaded
(~40 M/s), while numpy's are vectorised (AVX2) and release the GIL.  Two prefill costs
are mostly transcendentals: the softmax of causal attention and the SiLU of the MLP.
Here the matmuls stay in MLX (OpenBLAS, all cores); only those run in numpy, split over
a small thread pool, on row blocks that fit in L2.

* ``causal_attention(q, k, v, scale)``: like ``mx.fast.scaled_dot_product_attention(q,
  k, v, scale=scale, mask="causal")`` for one sequence whose ``L`` queries sit at the
  last positions ``[n - L, n)`` of its ``n`` keys (MLX's causal mask, aligned
  bottom-right): query ``i`` sees keys ``j <= n - L + i``.
* ``silu_mul(gate, x)``: ``silu(gate) * x`` (mlx-lm's ``swiglu``).
* ``host_product(x, w, bias)``: ``x @ w (+ bias)`` by numpy's BLAS.  Where MLX's float32
  products run on the reference BLAS bundled in its Linux wheel (``mlx_blas()``: no
  OpenBLAS preloaded, ADR 0003; 4.3 GFLOP/s for a 256^3 sgemm on the 2-core test machine
  against 48.7 with OpenBLAS, docs/benchmarks/loadtest-cpu.md), ``HostMath.products`` takes
  the attention's two products to numpy's own OpenBLAS, and the linear layout
  (engine/linear_layout.py) its multi-token Linear products.  With a fast BLAS behind MLX
  they stay in MLX (faster there: no evaluation, no copy back).

Both evaluate the MLX graph they depend on (a synchronisation point), so they are used
only when ``HostMath.attention_applies`` / ``silu_applies`` say so: host math enabled,
default device CPU, float32, and at least ``min_elements`` elements of work (scores
``H*L*n``, or gate elements) so that decode steps keep MLX's lazy graph.  The patched
``swiglu`` (engine/patch.py) asks only inside a model runner's forward, on its thread:
plain mlx-lm use of the same classes (possibly under ``mx.compile``, where an evaluation
mid-call is an error) keeps mlx-lm's function.

Invariant of ``causal_attention``: the score matrix is a fresh MLX matmul output owned
here; the softmax is written into its buffer in place (a writable numpy view) and the
same array feeds ``p @ v``: no copies of the ``[H, L, n]`` matrix.  Where numpy's view is
not writable and contiguous (another MLX build), it works on a copy instead.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import mlx.core as mx

log = logging.getLogger(__name__)

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is a dependency; the predicate covers it
    np = None

DEFAULT_MIN_ELEMENTS = 1 << 16
_BLOCK_BYTES = 1 << 20  # rows per block: about this many bytes (L2 size; fewer numpy calls)


def workers() -> int:
    return max(1, min(os.cpu_count() or 1, 4))


@dataclass(frozen=True)
class MlxBlas:
    """Which BLAS serves MLX's CPU float32 products in this process: ``reference`` when it
    is the reference BLAS bundled in MLX's Linux wheel; ``detail`` says how that was read."""

    reference: bool
    detail: str


_BUNDLED_BLAS = re.compile(r"/mlx[^/]*\.libs/libblas[^/]*\.so")


def read_blas(has_global_sgemm: bool, maps: str | None) -> MlxBlas:
    """A global ``cblas_sgemm`` (a preloaded or RTLD_GLOBAL OpenBLAS/MKL/BLIS, Accelerate
    on macOS) is what libmlx's products bind to (ADR 0003); without one, a mapped
    ``mlx*.libs/libblas*.so`` (``maps``: /proc/self/maps text) is the bundled reference
    BLAS serving them."""
    if has_global_sgemm:
        return MlxBlas(False, "a global cblas_sgemm (a preloaded BLAS) serves MLX")
    found = _BUNDLED_BLAS.search(maps or "")
    if found is None:
        return MlxBlas(False, "no global cblas_sgemm and no bundled MLX libblas mapped")
    return MlxBlas(True, f"MLX's bundled reference BLAS ({found.group(0).lstrip('/')})")


@cache
def mlx_blas() -> MlxBlas:
    """``read_blas`` of this process, as ``slabserve.blas.status()`` reads it.  Fixed once
    mlx is imported (its references are bound at load), so cached."""
    try:
        has_global = hasattr(ctypes.CDLL(None), "cblas_sgemm")
    except (OSError, TypeError):  # no CDLL(None): Windows
        return MlxBlas(False, "no dynamic symbol lookup here")
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = None
    return read_blas(has_global, maps)


class HostMath:
    """The numpy path's switch, threshold and thread pool; one per model runner (its
    ``AttentionRuntime``), built from ``RunnerConfig.host_math`` at the edge.

    ``enabled``: whether the host path may be used at all (it still applies only to
    float32 on CPU).  ``min_elements``: the smallest amount of work it takes (0 sends
    every float32 CPU call through it: tests).  The pool is created on first use and
    shut down by ``close``.  ``products``: the host attention's two matrix products in
    numpy too (None: where ``mlx_blas()`` finds MLX on its bundled reference BLAS)."""

    def __init__(self, enabled: bool = True, min_elements: int = DEFAULT_MIN_ELEMENTS,
                 products: bool | None = None) -> None:
        if min_elements < 0:
            raise ValueError("min_elements must be >= 0")
        self.enabled = enabled
        self.min_elements = min_elements
        blas = mlx_blas()
        self.products = enabled and (blas.reference if products is None else products)
        log.info("host math: %s; attention products: %s (%s)", "on" if enabled else "off",
                 "numpy" if self.products else "MLX",
                 blas.detail if products is None else "set by the caller")
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _usable(self, *arrays: mx.array) -> bool:
        return (np is not None and self.enabled and mx.default_device() == mx.cpu
                and all(a.dtype == mx.float32 for a in arrays))

    def attention_applies(self, q: mx.array, k: mx.array, v: mx.array) -> bool:
        """Whether ``causal_attention`` should replace MLX's SDPA for these inputs."""
        work = q.shape[1] * q.shape[2] * k.shape[2]
        return work >= self.min_elements and self._usable(q, k, v)

    def silu_applies(self, gate: mx.array, x: mx.array) -> bool:
        """Whether ``silu_mul`` should replace mlx-lm's ``swiglu`` (same shapes, no
        broadcasting).  The patched ``swiglu`` asks only inside the runner's forward
        (engine/patch.py)."""
        return (gate.shape == x.shape and gate.size >= self.min_elements
                and self._usable(gate, x))

    def causal_attention(self, q: mx.array, k: mx.array, v: mx.array, scale: float):
        """See the module docstring; split over this object's pool."""
        return causal_attention(q, k, v, scale, self.run_parts, self.products)

    def silu_mul(self, gate: mx.array, x: mx.array) -> mx.array:
        return silu_mul(gate, x, self.run_parts)

    def run_parts(self, fn, total: int) -> None:
        """``fn(lo, hi)`` over ``[0, total)`` cut into at most ``workers()`` even parts,
        in the pool (the caller's thread takes the last part)."""
        parts = min(workers(), total)
        cuts = [total * i // parts for i in range(parts + 1)]
        pool = self._executor() if parts > 1 else None
        futures = [pool.submit(fn, cuts[i], cuts[i + 1]) for i in range(parts - 1)]
        fn(cuts[-2], cuts[-1])
        for f in futures:
            f.result()

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(workers(), thread_name_prefix="slabserve-host-math")
            return self._pool

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
                self._pool = None


def _serial(fn, total: int) -> None:
    fn(0, total)


@cache
def _upper(size: int):
    """``[size, size]`` float32: 0 on and below the diagonal, -inf above."""
    return np.triu(np.full((size, size), -np.inf, np.float32), 1)


def _softmax_heads(a, start: int, lo: int, hi: int) -> None:
    """Causal softmax in place over ``a[lo:hi]`` (``[H, L, n]``, row ``i`` sees columns
    ``<= start + i``), a block of rows at a time; columns every row of a block cannot
    see are set to 0 without computing them."""
    _, length, n = a.shape
    rows = max(1, min(length, _BLOCK_BYTES // (4 * n)))
    for h in range(lo, hi):
        for r0 in range(0, length, rows):
            r1 = min(length, r0 + rows)
            cols = start + r1
            blk = a[h, r0:r1, :cols]
            tail = blk[:, cols - (r1 - r0):]
            np.add(tail, _upper(r1 - r0), out=tail)
            m = blk.max(axis=1, keepdims=True)
            np.subtract(blk, m, out=blk)
            np.exp(blk, out=blk)
            np.divide(blk, blk.sum(axis=1, keepdims=True), out=blk)
            a[h, r0:r1, cols:] = 0.0


def causal_attention(q: mx.array, k: mx.array, v: mx.array, scale: float,
                     run_parts=_serial, products: bool = False) -> mx.array:
    """``q`` ``[1, H, L, D]``, ``k``/``v`` ``[1, Hkv, n, D]`` float32 with ``H % Hkv ==
    0`` and ``n >= L`` (every query sees at least key 0: no row is fully masked).
    Returns ``[1, H, L, D]`` float32, MLX's causal SDPA up to rounding.  ``products``:
    the two matrix products by numpy's BLAS as well (``HostMath.products``)."""
    b, h, length, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    if b != 1 or h % hkv or n < length or v.shape[2] != n:
        raise ValueError(f"causal_attention: q {q.shape}, k {k.shape}, v {v.shape}")
    rep = h // hkv
    if products:
        return _host_causal_attention(q, k, v, scale, run_parts)
    s = (q * scale).reshape(1, hkv, rep * length, d) @ k.swapaxes(-1, -2)
    mx.eval(s)
    a = np.asarray(s)  # writable view of the fresh scores (module docstring)
    in_place = a.flags.writeable and a.flags.c_contiguous
    if not in_place:  # another MLX build's buffer protocol: work on a copy instead
        a = np.ascontiguousarray(a, dtype=np.float32).copy()
    a = a.reshape(h, length, n)  # head kvh * rep + r: MLX's GQA order
    run_parts(lambda lo, hi: _softmax_heads(a, n - length, lo, hi), h)
    p = s if in_place else mx.array(a.reshape(s.shape))
    return (p @ v).reshape(1, h, length, d)


def _host_causal_attention(q, k, v, scale: float, run_parts) -> mx.array:
    """``causal_attention`` with both products in numpy (one fresh ``[H, L, n]`` score
    array, softmax in place, ``@ v`` into the output)."""
    _, h, length, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    mx.eval(q, k, v)
    qn = np.asarray(q).reshape(hkv, h // hkv * length, d) * np.float32(scale)
    a = np.matmul(qn, np.asarray(k)[0].swapaxes(-1, -2)).reshape(h, length, n)
    run_parts(lambda lo, hi: _softmax_heads(a, n - length, lo, hi), h)
    out = np.matmul(a.reshape(hkv, -1, n), np.asarray(v)[0])
    return mx.array(out).reshape(1, h, length, d)


def host_product(x: mx.array, w: mx.array, bias: mx.array | None = None) -> mx.array:
    """``x @ w (+ bias)`` for float32 ``x`` ``[..., K]``, ``w`` ``[K, N]`` by numpy's
    BLAS (evaluates ``x``: only outside ``mx.compile`` / ``vmap``)."""
    mx.eval(x, w, *([] if bias is None else [bias]))
    y = np.matmul(np.asarray(x).reshape(-1, x.shape[-1]), np.asarray(w))
    if bias is not None:
        y += np.asarray(bias)
    return mx.array(y).reshape(*x.shape[:-1], w.shape[-1])


def _silu_rows(g, x, out, lo: int, hi: int) -> None:
    rows = max(1, _BLOCK_BYTES // (4 * g.shape[1]))
    with np.errstate(over="ignore"):  # exp(-g) = inf for g < -88: silu = g / inf = -0
        for r0 in range(lo, hi, rows):
            r1 = min(hi, r0 + rows)
            gb, t = g[r0:r1], out[r0:r1]
            np.negative(gb, out=t)
            np.exp(t, out=t)
            t += 1.0
            np.divide(gb, t, out=t)
            t *= x[r0:r1]


def silu_mul(gate: mx.array, x: mx.array, run_parts=_serial) -> mx.array:
    """``silu(gate) * x`` for float32 arrays of one shape (``silu_applies``)."""
    if gate.shape != x.shape:
        raise ValueError(f"silu_mul: shapes {gate.shape} and {x.shape} differ")
    mx.eval(gate, x)
    width = gate.shape[-1] if gate.ndim else 1
    g = np.asarray(gate).reshape(-1, width)
    y = np.asarray(x).reshape(-1, width)
    out = np.empty_like(g)
    run_parts(lambda lo, hi: _silu_rows(g, y, out, lo, hi), g.shape[0])
    return mx.array(out).reshape(gate.shape)
