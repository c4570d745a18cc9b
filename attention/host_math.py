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

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import mlx.core as mx

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is a dependency; the predicate covers it
    np = None

DEFAULT_MIN_ELEMENTS = 1 << 16
_BLOCK_BYTES = 1 << 20  # rows per block: about this many bytes (L2 size; fewer numpy calls)


def workers() -> int:
    return max(1, min(os.cpu_count() or 1, 4))


class HostMath:
    """The numpy path's switch, threshold and thread pool; one per model runner (its
    ``AttentionRuntime``), built from ``RunnerConfig.host_math`` at the edge.

    ``enabled``: whether the host path may be used at all (it still applies only to
    float32 on CPU).  ``min_elements``: the smallest amount of work it takes (0 sends
    every float32 CPU call through it: tests).  The pool is created on first use and
    shut down by ``close``."""

    def __init__(self, enabled: bool = True, min_elements: int = DEFAULT_MIN_ELEMENTS) -> None:
        if min_elements < 0:
            raise ValueError("min_elements must be >= 0")
        self.enabled = enabled
        self.min_elements = min_elements
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
        return causal_attention(q, k, v, scale, self.run_parts)

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
                     run_parts=_serial) -> mx.array:
    """``q`` ``[1, H, L, D]``, ``k``/``v`` ``[1, Hkv, n, D]`` float32 with ``H % Hkv ==
    0`` and ``n >= L`` (every query sees at least key 0: no row is fully masked).
    Returns ``[1, H, L, D]`` float32, MLX's causal SDPA up to rounding."""
    b, h, length, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    if b != 1 or h % hkv or n < length or v.shape[2] != n:
        raise ValueError(f"causal_attention: q {q.shape}, k {k.shape}, v {v.shape}")
    rep = h // hkv
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
